"""experiments/bench.py on a tiny MLP and random data: every section measured and written."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bench as bench_config
from experiments import bench
import lrnet
from lrnet import config as config_lib
from lrnet import models
from lrnet import tracker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(workdir):
  config = bench_config.get_config()
  config.workdir = str(workdir)
  config.data_name, config.input_dim, config.num_classes = "random", 16, 4
  config.hidden, config.batch_size = (24, 20), 8
  config.pretrain_steps = 30  # random data holds 20 batches: spans two shuffles
  # Every tracked student compiles its own programs (seconds each): few ranks.
  config.ranks, config.exact_ranks, config.optimality_ranks = (5,), (5,), (2, 5)
  config.block_steps, config.repeats, config.exact_repeats = 2, 2, 1
  config.optimality_steps, config.optimality_every = 6, 3
  config.latency_batch_sizes = (4,)
  return config


def test_bench_writes_every_section(tmp_path):
  lines = []
  result = bench.run_bench(tiny_config(tmp_path), log=lines.append)
  out = json.loads((tmp_path / "bench.json").read_text())
  assert out == json.loads(json.dumps(result))
  assert set(out) == {"machine", "config", "data", "start", "matmul_gflops", "train_steps",
                      "dense_step", "optimality", "latency"}
  assert out["machine"]["backend"] == "cpu" and out["machine"]["cpu_count"] >= 1
  assert out["data"] == "random" and out["start"] == "30 Adam steps on random"
  assert out["matmul_gflops"] > 0 and out["dense_step"]["ms"] > 0 and out["dense_step"]["gflops"] > 0
  assert [(row["method"], row["rank"]) for row in out["train_steps"]] == [
      ("alternating", 5), ("exact", 5)]
  assert all(row["ms"] > 0 and row["ratio"] > 0 for row in out["train_steps"])

  optimality = out["optimality"]
  assert [entry["rank"] for entry in optimality["ranks"]] == [2, 5]
  for entry in optimality["ranks"]:
    # Eckart–Young: no rank-r matrix beats the truncated SVD; the tracker stays within 1e-3.
    assert 1.0 - 1e-6 <= entry["median"] <= entry["max"] <= 1.001
    assert entry["steps"] == 6 and entry["measurements"] == 2 * 2  # steps 3 and 6, two layers
    assert isinstance(entry["refreshes"], int) and 0 <= entry["refreshes"] <= 6 * 2
  assert optimality["max"] == max(entry["max"] for entry in optimality["ranks"])
  assert optimality["refreshes"] == sum(entry["refreshes"] for entry in optimality["ranks"])
  assert isinstance(optimality["refreshes"], int) and optimality["tracker_calls"] == 2 * 6 * 2

  assert [(row["batch"], row["rank"]) for row in out["latency"]] == [(4, 5)]
  for row in out["latency"]:
    assert row["dense_ms"] > 0 and row["factorized_ms"] > 0 and row["ratio"] > 0
    # Hidden layers 16×24 and 24×20; the output layer stays dense.
    assert row["theoretical_ratio"] == row["rank"] * (16 + 24 + 24 + 20) / (16 * 24 + 24 * 20)
  assert "SVD REFRESHES" in lines[-2] and lines[-1] == f"wrote {tmp_path / 'bench.json'}"


@pytest.mark.parametrize("field, value, message", [
    ("repeats", 0, r"repeats=0 .*integer >= 1"),
    ("pretrain_steps", -1, r"pretrain_steps=-1 .*integer >= 0"),
    ("exact_ranks", (5, 0), r"exact_ranks=\(5, 0\) .*integers >= 1"),
    ("optimality_ranks", (2, 10), r"optimality_ranks=\(2, 10\) .*1\.\.9 \(r·\(m \+ n\) < m·n"),
    ("data_name", "cifar", r"data_name='cifar' .*random"),
    ("optimality_every", 7, r"optimality_every=7 .*<= optimality_steps=6"),
])
def test_bench_rejects_bad_fields_with_one_line(tmp_path, field, value, message):
  config = tiny_config(tmp_path)
  config[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    bench.run_bench(config, log=lambda _: None)
  assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("override, field", [
    ("--config.repeats=0", "repeats=0"),
    ("--config.teacher_dir=/nonexistent/sweep", "teacher_dir='/nonexistent/sweep'"),
])
def test_bench_command_exits_2_with_one_line(tmp_path, override, field):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench", "--config=configs/bench.py",
       f"--config.workdir={tmp_path}", override],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"error: config field {field} is invalid")
  assert not (tmp_path / "bench.json").exists()


def test_next_projection_is_what_the_layer_applies_next_without_advancing_it():
  net = models.mlp((24,), 10, project_rank=5)
  images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32))
  params = models.mlp((24,), 10).init(jax.random.PRNGKey(0), images)
  state = jax.jit(lambda params: lrnet.tracker_state(net, params, images))(params)
  apply = jax.jit(net.apply)
  for i in range(3):  # calls on moving weights: the tracked pairs lag W's, no SVD refresh
    noise = jax.random.normal(jax.random.PRNGKey(10 + i), (32, 24)) * 0.01 / np.sqrt(32)
    params = {**params, "linear_0": {**params["linear_0"], "w": params["linear_0"]["w"] + noise}}
    _, state = apply(params, state, images)
  assert int(state["linear_0"]["tracker"].refreshes) == 0
  layer_state = state["linear_0"]["tracker"]
  before = jax.tree_util.tree_map(np.array, layer_state)

  w_hat = bench.next_projection(params["linear_0"]["w"], layer_state, 5)
  assert np.linalg.matrix_rank(np.asarray(w_hat), tol=1e-4) == 5
  jax.tree_util.tree_map(np.testing.assert_array_equal, layer_state, before)  # not advanced
  # The student's next forward applies exactly this Ŵ to its inputs.
  logits, new_state = apply(params, state, images)
  hidden = jax.nn.relu(images @ w_hat + params["linear_0"]["b"])
  np.testing.assert_allclose(logits, hidden @ params["linear_1"]["w"] + params["linear_1"]["b"],
                             rtol=1e-5, atol=1e-5)
  # The measurement must use the layer's state, not the advanced one: they differ here.
  advanced = bench.next_projection(params["linear_0"]["w"], new_state["linear_0"]["tracker"], 5)
  assert float(jnp.max(jnp.abs(advanced - w_hat))) > 1e-4  # measured: 5.5e-4
  ratio = tracker.optimality_ratio(params["linear_0"]["w"], w_hat, 5)
  assert float(ratio) >= 1.0 - 1e-6
