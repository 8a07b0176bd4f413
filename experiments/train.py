r"""Trains and saves the dense teacher of a config alone (a later sweep reuses it).

  python -m experiments.train --config=configs/fashion_mnist.py
"""

from experiments import cli
from lrnet import sweep

if __name__ == "__main__":
  cli.run_app(sweep.train_teacher_only)
