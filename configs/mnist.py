"""The reference experiment: MNIST, 784 → 5×1024 ReLU → 10, Adam 1e-3 (origin notebook 000).

  python -m experiments.sweep --config=configs/mnist.py --config.data.dir=/path/to/mnist/idx

MNIST comes from IDX files in `data.dir` (train-images-idx3-ubyte.gz, ...) or TFDS.
Other configs import `get_config` and override only what changes.
"""

import ml_collections
from ml_collections import config_dict


def recipe(epochs: int, batch_size: int, patience: int) -> ml_collections.ConfigDict:
  """A training recipe; the defaults are origin notebook 000's (Adam 1e-3, nothing else)."""
  run = ml_collections.ConfigDict()
  run.epochs = epochs              # at most; early stopping on validation accuracy
  run.batch_size = batch_size
  run.learning_rate = 1e-3         # Adam's (peak, with a schedule)
  run.schedule = "constant"        # constant | cosine (linear warm-up, cosine decay to 0)
  run.warmup_epochs = 0.0          # cosine: warm-up length
  run.weight_decay = 0.0           # > 0: AdamW's decoupled weight decay
  run.label_smoothing = 0.0        # ε of the smoothed one-hot targets
  run.shift = 0                    # augmentation: random shifts of up to this many pixels
  run.flip = False                 # augmentation: random horizontal flips (not for digits)
  run.patience = patience          # epochs without a better val accuracy before stopping; 0: never
  run.ema_decay = 0.0              # parameter EMA decay; 0: off
  return run


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

  # The teacher's recipe also trains the dense controls (equal-size dense nets from scratch).
  config.teacher = recipe(epochs=30, batch_size=50, patience=5)
  config.student = recipe(epochs=10, batch_size=100, patience=3)  # low-rank students
  config.student.distillation = ml_collections.ConfigDict()  # from the teacher's outputs
  config.student.distillation.weight = 0.0       # w in (1-w)·CE + w·T²·KL(teacher‖student); 0: off
  config.student.distillation.temperature = 4.0  # T

  config.sweep = ml_collections.ConfigDict()
  config.sweep.ranks = (10, 20, 50, 100, 200, "full")  # int ≤ min(m, n), fraction in (0, 1], or "full"
  config.sweep.budgets = ()           # fractions in (0, 1) of the compressed layers' dense weights:
                                     # per-layer ranks from lrnet.allocate_ranks
  config.sweep.parallel_ranks = False  # integer ranks of a kind as one batch, one compilation
  # The compressed layers (module-path globs, lrnet.compression): () includes every dense and
  # conv layer but the output layer; exclude removes from that selection.
  config.sweep.include = ()
  config.sweep.exclude = ()
  # Students to train; (): truncation only. dense_control: a dense net of the teacher's depth,
  # as wide as fits the factorized student's parameter count, trained from scratch.
  config.sweep.kinds = ("straight_through", "factorized", "dense_control")

  # Where students start: svd (plain truncation) | whitened (truncation minimising the layer
  # outputs' error on calibration inputs). Truncated accuracy is reported for both.
  config.truncation = "svd"
  config.calibration = ml_collections.ConfigDict()  # inputs whitening the truncation
  config.calibration.examples = 2048  # training examples
  config.calibration.damping = 0.01   # λ = damping · trace(XᵀX)/m added to XᵀX
  config.allocation = ml_collections.ConfigDict()  # per-layer ranks of sweep.budgets
  config.allocation.criterion = "greedy"  # greedy (validation loss) | energy | stable_rank

  config.projection = ml_collections.ConfigDict()  # the straight-through projection
  config.projection.method = "alternating"  # alternating (tracked, fast) | exact (SVD per step)
  config.projection.oversample = 10    # alternating: singular pairs tracked beyond the rank

  # Devices (lrnet.parallel): `members` splits a batch of ranks (sweep.parallel_ranks), `data`
  # splits every training batch; -1: every device the other axis leaves. 1 and 1: one device.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.members = 1
  config.mesh.data = 1

  config.latency = ml_collections.ConfigDict()  # forward latency, dense vs factorized
  config.latency.batch_size = 100
  config.latency.repeats = 30
  return config
