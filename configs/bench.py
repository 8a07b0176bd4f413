"""Benchmark of straight-through training and factorized inference (experiments/bench.py).

  python -m experiments.bench --config=configs/bench.py --config.workdir=/tmp/lrnet_bench

About 4 minutes on 2 CPU cores (measured 243 s with other jobs on them); the exact ranks (~40×
the dense step) and the optimality SVDs take most of it. Add --config.teacher_dir=<sweep workdir>
to start from a trained teacher instead of 500 Adam steps.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workdir = "workdirs/bench"       # bench.json goes here
  config.seed = 0                         # initialisation, data order, random data
  config.data_name = "fashion_mnist"      # a dataset of lrnet.data, or "random" (random images)
  config.data_dir = config_dict.placeholder(str)  # IDX files; None: lrnet.data's default places
  config.input_dim = 784                  # random data only: pixels per image
  config.num_classes = 10                 # random data only: label range
  config.hidden = (1024,) * 5             # the reference MLP
  config.batch_size = 100                 # examples per train step
  config.learning_rate = 1e-3             # Adam, for pre-training and the students
  config.teacher_dir = config_dict.placeholder(str)  # sweep workdir with models/teacher; None: ...
  config.pretrain_steps = 500             # ... start from the MLP trained this many steps here
  config.ranks = (10, 20, 50, 100, 200)   # alternating train steps and factorized inference
  config.exact_ranks = (10, 200)          # exact (SVD per step, ~40× dense): few ranks
  config.block_steps = 8                  # train steps per timed block (one jitted scan)
  config.repeats = 5                      # timed blocks per alternating rank; 4× forward calls
  config.exact_repeats = 1                # timed blocks per exact rank
  config.optimality_ranks = (10, 200)     # alternating students followed along real steps
  config.optimality_steps = 64            # Adam steps per student
  config.optimality_every = 4             # measure ρ of every hidden layer every k-th step
  config.latency_batch_sizes = (1, 100, 1000)  # inference batch sizes
  return config
