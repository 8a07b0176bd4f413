"""Benchmark of the straight-through projection and factorized inference (experiments/bench.py).

  python -m experiments.bench --config=configs/bench.py --config.workdir=/tmp/lrnet_bench
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workdir = "workdirs/bench"     # bench.json goes here
  config.seed = 0
  config.input_dim = 784
  config.hidden = (1024,) * 5           # the reference MLP
  config.num_classes = 10
  config.batch_size = 100               # train step batch
  config.ranks = (10, 20, 50, 100, 200)
  config.exact_ranks = (10, 200)        # the exact SVD step is slow: fewer ranks
  config.update_every = (1, 4)          # subspace refinement periods to time
  config.repeats = 5                    # train steps: 4·repeats timed steps; latency: 4·repeats calls
  config.exact_repeats = 1
  config.optimality_steps = 60          # real Adam steps of a subspace student per rank ...
  config.optimality_every = 5           # ... with the exact optimality ratio every k-th step
  config.optimality_ranks = (10, 200)
  config.latency_batch_sizes = (1, 100, 1000)
  return config
