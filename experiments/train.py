r"""Trains and saves the dense teacher of a config alone (a later sweep reuses it).

  python -m experiments.train --config=configs/fashion_mnist.py
"""

import sys

from absl import app

from experiments import cli
from lrnet import sweep


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_guarded(lambda: sweep.train_teacher_only(cli.CONFIG.value))


if __name__ == "__main__":
  cli.check_config_file(sys.argv)
  app.run(main)
