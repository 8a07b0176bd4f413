"""README.md stays true: its programmatic example runs, and CI runs its test command."""

import json
import pathlib
import re
import subprocess
import sys
import types

import haiku as hk
import jax
import numpy as np

from configs import digits
from configs import mnist
from experiments import cli
import lrnet
from lrnet import models
from lrnet import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(marker: str) -> list[str]:
  return [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if marker in block]


def test_readme_example_compresses_and_trains_a_stock_resnet_with_batchnorm():
  (example,) = _python_blocks("lrnet.compress(")
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (8, 10)  # it got to the end; its comments' claims:
  state, compressed = namespace["state"], namespace["compressed"]
  initial, _ = namespace["init"](jax.random.PRNGKey(0), namespace["images"], is_training=True)
  convs = [name for name in initial if "conv" in name]
  assert len(convs) == 1 + 4 * (2 * 2 + 1)  # ResNet-18's: a stem; per group 2 × 2 and a shortcut
  for name, leaves in initial.items():  # every conv to rank 8: {w} -> {u, v}; BatchNorm untouched
    if name in convs:
      assert set(leaves) == {"w"} and set(compressed[name]) == {"u", "v"}
      assert compressed[name]["u"].shape[-1] == 8
    else:  # the output layer (dense at rank 8) and BatchNorm's scales and offsets
      assert name == "res_net/~/logits" or "batchnorm" in name
      assert all((compressed[name][key] == leaves[key]).all() for key in leaves)
  # Trained a few steps: BatchNorm statistics update next to the student's trackers.
  student_state = namespace["student_state"]
  assert any("tracker" in leaves for leaves in student_state.values())
  assert any(not np.allclose(student_state[name]["average"], leaves["average"])
             for name, leaves in state.items() if "mean_ema" in name)
  # Whitened (from the trained parameters): the first group's layers, by their names.
  params = namespace["params"]
  plain = lrnet.compress(params, rank=8, include="*block_group_0*")
  for name in compressed:
    whitened = namespace["whitened"][name]
    same = all(np.array_equal(whitened[key], plain[name][key]) for key in whitened)
    assert same != (name.startswith("res_net/~/block_group_0/") and name in convs), name
  # Per-layer ranks ({layer: rank}) within 5 % of the compressed layers' weights.
  ranks = namespace["ranks"]
  rows = [row for row in lrnet.summarize(params, ranks) if row.name in ranks]
  assert all(isinstance(rank, int) for rank in ranks.values())
  assert 0.04 < (sum(row.compressed_params for row in rows)
                 / sum(row.dense_params for row in rows)) <= 0.05


def test_readme_field_table_is_the_quick_starts_config_files():
  assert cli.field_table("configs/digits.py") in README, (
      "regenerate README.md's field table: python -c 'from experiments import cli; "
      "print(cli.field_table(\"configs/digits.py\"))'")
  reference = mnist.get_config()  # "hidden widths (1024,)*5, 30 / 10 epochs, patience 5 / 3, …"
  assert "(hidden widths `(1024,)*5`, 30 / 10 epochs,\npatience 5 / 3, batch sizes 50 / 100, 30 " \
         "latency repeats)" in README
  assert reference.model.hidden == (1024,) * 5 and reference.latency.repeats == 30
  assert [(reference[run].epochs, reference[run].patience, reference[run].batch_size)
          for run in ("teacher", "student")] == [(30, 5, 50), (10, 3, 100)]


def test_readme_quick_start_plan_and_results_example_sizes():
  config = digits.get_config()
  exp = types.SimpleNamespace(config=config, places={}, finished=lambda run: None)
  plan = sweep.plan(exp)
  assert plan.startswith(f"plan: {len(exp.places)} runs") and len(exp.places) == 13  # "13 runs"
  assert "[4/13 rank 16 straight_through] epoch 2" in README
  assert exp.places["rank_16_straight_through"] == "4/13 rank 16 straight_through"
  assert "SIGINT during [12/13 rank 16 dense_control]: saved it\nafter epoch 2 of 5 in" in README
  assert exp.places["rank_16_dense_control"] == "12/13 rank 16 dense_control"
  assert config[sweep.DENSE_CONTROLS["dense_control"]].epochs == 5
  # The results.json example: the quick start's MLP 64 → 3×512 → 10 at rank 4, a 5 % budget.
  fn = models.network(config.model, 10)
  params = hk.transform(fn).init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))
  shapes = [[64, 512], [512, 512], [512, 512]]
  rows = lrnet.summarize(params, 4)
  assert [list(row.shape) for row in rows[:3]] == shapes and rows[3].note == "output layer"
  dense, low = lrnet.count_params(params), sum(row.compressed_params for row in rows)
  ratio = sum(row.compressed_flops for row in rows) / sum(row.dense_flops for row in rows)
  control = models.dense_control(config.model, 10, np.zeros((1, 8, 8, 1)), low)[1]
  budget = {"linear_0": 15, "linear_1": 9, "linear_2": 9}
  budget_params = sum(row.compressed_params for row in lrnet.summarize(params, budget))
  layers = ", ".join(f'{{"name": "linear_{i}", "shape": {shape}}}' for i, shape in enumerate(shapes))
  example = " ".join(re.search(r"```json\n(.*?)```", README, re.S)[1].split())
  for claim in (f'"params": {dense}, "epochs": 30', f'"layers": [{layers}]',
                f'"rank": 4, "params": {low}, "compression": {dense / low:.1f}',
                f'"dense_control_params": {control}', f'"theoretical_latency_ratio": {ratio:.3f}',
                f'"layer_ranks": {json.dumps(budget)}, "params": {budget_params}',
                # 1,293 training digits make 40 steps of 32 per epoch.
                f'"epochs": 30, "steps": {30 * 40}, "examples": {30 * 40 * 32}',
                f'"factorized_cost": {{"steps": {5 * 40}, "epochs": 5, "examples": {5 * 40 * 32}'):
    assert claim in example, claim


def test_ci_runs_the_readme_test_command():
  match = re.search(r"Run the tests:\n+```(?:bash|sh)?\n(.+?)\n```", README)
  assert match, "README.md must give the test command under 'Run the tests:'"
  ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
  assert ci_lines[-1] == match.group(1).strip()


def test_readme_user_network_and_its_config_sweep_from_their_own_directory(tmp_path):
  (network,) = _python_blocks("def mlp(num_classes")
  (config,) = _python_blocks('"name": "my_nets:mlp"')
  (tmp_path / "my_nets.py").write_text(network)
  (tmp_path / "my_config.py").write_text(config)
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config=my_config.py", "--config.workdir=w",
       "--config.teacher.epochs=2", "--config.student.epochs=1", "--config.sweep.ranks=(4,)",
       "--config.latency.repeats=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((tmp_path / "w" / "results.json").read_text())
  assert [layer["name"] for layer in results["layers"]] == ["linear"]  # the output layer stays dense
  (entry,) = results["ranks"]
  assert "error" not in entry and entry["straight_through_accuracy"] is not None
