"""README.md stays true: its programmatic example runs, and CI runs its test command."""

import pathlib
import re

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
