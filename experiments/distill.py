r"""Subclass distillation (origin notebook 003): a subclass teacher, then an MLP student alone,
with soft targets and with subclass distillation.

  python -m experiments.distill --config=configs/fashion_mnist_subclass.py

Writes results.json into --config.workdir and prints the table; run it again to resume.
"""

from experiments import cli
from lrnet import distill

if __name__ == "__main__":
  cli.run_app(distill.run_distill)
