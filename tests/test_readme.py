"""README.md stays true: its programmatic example runs, and CI runs its test command."""

import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(marker: str) -> list[str]:
  return [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if marker in block]


def test_readme_example_compresses_and_trains_a_stock_resnet_with_batchnorm():
  (example,) = _python_blocks("lrnet.compress(")
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  # The example asserts its own claims; check it got to the end.
  assert namespace["logits"].shape == (8, 10)


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
