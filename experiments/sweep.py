r"""The rank sweep: teacher → every rank → truncated, straight-through and factorized accuracy.

  python -m experiments.sweep --config=configs/digits.py
  python -m experiments.sweep --config=configs/mnist.py --config.sweep.ranks="(10,20)"

Writes results.json, results.csv and plots into --config.workdir; run it again to resume.
"""

import sys

from absl import app

from experiments import cli
from lrnet import sweep


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_guarded(lambda: sweep.run_sweep(cli.CONFIG.value))


if __name__ == "__main__":
  cli.check_config_file(sys.argv)
  app.run(main)
