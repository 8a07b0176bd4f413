"""The reference experiment: MNIST, 784 → 5×1024 ReLU → 10, Adam 1e-3 (origin notebook 000).

  python -m experiments.sweep --config=configs/mnist.py --config.data.dir=/path/to/mnist/idx

MNIST comes from IDX files in `data.dir` (train-images-idx3-ubyte.gz, ...) or TFDS.
Other configs import `get_config` and override only what changes.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workdir = "workdirs/mnist"  # results, checkpoints, logs and plots go here
  config.seed = 0                    # initialisation, validation split and shuffling
  config.overwrite = False           # allow a workdir holding results of another config
  config.checkpoint_every_secs = 30.0  # training checkpoints at most this often; 0: every epoch

  config.data = ml_collections.ConfigDict()
  config.data.name = "mnist"         # mnist | fashion_mnist | digits
  config.data.dir = config_dict.placeholder(str)  # directory of IDX files; None: search
  config.data.val_fraction = 0.1     # carved from the training set (early stopping, model choice)

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"          # mlp | convnet | resmlp | cnn (lrnet.models)
  config.model.hidden = (1024,) * 5  # mlp: hidden widths

  config.teacher = ml_collections.ConfigDict()
  config.teacher.epochs = 30         # at most; early stopping on validation accuracy
  config.teacher.batch_size = 50
  config.teacher.learning_rate = 1e-3
  config.teacher.patience = 5        # epochs without a better val accuracy before stopping; 0: never
  config.teacher.ema_decay = 0.0     # parameter EMA decay; 0: off

  config.student = ml_collections.ConfigDict()  # straight-through and factorized students
  config.student.epochs = 10
  config.student.batch_size = 100
  config.student.learning_rate = 1e-3
  config.student.patience = 3
  config.student.ema_decay = 0.0

  config.sweep = ml_collections.ConfigDict()
  config.sweep.ranks = (10, 20, 50, 100, 200, "full")  # int ≤ min(m, n), fraction in (0, 1], or "full"
  config.sweep.parallel_ranks = False  # integer ranks of a kind as one batch, one compilation
  config.sweep.kinds = ("straight_through", "factorized")  # students to train; (): truncation only

  config.projection = ml_collections.ConfigDict()  # the straight-through projection
  config.projection.method = "alternating"  # alternating (tracked, fast) | exact (SVD per step)
  config.projection.oversample = 10    # alternating: singular pairs tracked beyond the rank

  config.latency = ml_collections.ConfigDict()  # forward latency, dense vs factorized
  config.latency.batch_size = 100
  config.latency.repeats = 30
  return config
