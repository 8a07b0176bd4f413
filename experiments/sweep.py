r"""The rank sweep: teacher → every rank → truncated, straight-through and factorized accuracy.

  python -m experiments.sweep --config=configs/digits.py
  python -m experiments.sweep --config=configs/mnist.py --config.sweep.ranks="(10,20)"

Writes results.json, results.csv and plots into --config.workdir; run it again to resume.
"""

from experiments import cli
from lrnet import sweep

if __name__ == "__main__":
  cli.run_app(sweep.run_sweep)
