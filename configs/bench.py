"""Benchmark of the straight-through projection and factorized inference (experiments/bench.py).

  python -m experiments.bench --config=configs/bench.py --config.workdir=/tmp/lrnet_bench

About 25 minutes on 2 CPU cores, most of it the exact-projection student (`compare_steps`).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workdir = "workdirs/bench"     # bench.json goes here
  config.seed = 0
  # Data for pre-training, the optimality trajectory and the exact-vs-subspace students:
  # a dataset of lrnet.data (its input size wins over input_dim), or "random": random images.
  config.data_name = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)
  config.input_dim = 784                # random images only
  config.num_classes = 10               # random images only
  config.hidden = (1024,) * 5           # the reference MLP
  config.batch_size = 100               # train step batch
  # Straight-through students start from a trained network: models/teacher of this sweep
  # workdir, or (None) the reference MLP trained this many Adam steps here.
  config.teacher_dir = config_dict.placeholder(str)
  config.pretrain_steps = 500
  config.ranks = (10, 20, 50, 100, 200)
  config.exact_ranks = (10, 200)        # the exact SVD step is slow: fewer ranks
  # Fast projections (projection.method) to measure; "subspace" is the slowest of them.
  config.methods = ("alternating", "streaming")
  config.update_every = (1, 2)          # refinement periods to time (alternating: 1 only)
  config.repeats = 5                    # train steps: `repeats` blocks of 8 steps, each after 8
                                        # dense steps (ratios); latency: 4·repeats calls
  config.exact_repeats = 1
  config.optimality_steps = 64          # real Adam steps of a subspace student per rank ...
  config.optimality_every = 3           # ... with the exact optimality ratio every k-th step
  config.optimality_ranks = (10, 200)
  config.optimality_update_every = (1, 2)
  config.parallel_steps = 100           # factorized students of every rank: one by one vs together
  config.latency_batch_sizes = (1, 100, 1000)
  # Straight-through students with projection.method exact vs each of `methods`, same batches.
  config.compare_ranks = (20,)
  config.compare_steps = 200
  config.compare_eval_every = 25        # test accuracy of the projected weights every k steps
  config.compare_update_every = (1,)
  return config
