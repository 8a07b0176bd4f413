"""The reference experiment: MNIST, 784 → 5×1024 ReLU → 10, Adam 1e-3 (origin notebook 000).

  python -m experiments.sweep --config=configs/mnist.py --config.data.dir=/path/to/mnist/idx

MNIST comes from IDX files in `data.dir` (train-images-idx3-ubyte.gz, ...) or TFDS.
Other configs import `get_config` and override only what changes. A field's meaning is the
comment ending the line that first assigns it (`--help` prints them; README.md's table is
generated from them): one line each.
"""

import ml_collections
from ml_collections import config_dict


def recipe(epochs: int, batch_size: int, patience: int) -> ml_collections.ConfigDict:
  """A training recipe; the defaults are origin notebook 000's (Adam 1e-3, nothing else)."""
  run = ml_collections.ConfigDict()
  run.epochs = epochs              # at most; early stopping on validation accuracy
  run.batch_size = batch_size      # examples per step
  run.learning_rate = 1e-3         # Adam's (peak, with a schedule)
  run.schedule = "constant"        # constant | cosine (linear warm-up, cosine decay to 0)
  run.warmup_epochs = 0.0          # cosine: epochs of linear warm-up
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
  config.overwrite = False           # retrain finished runs of settings other than this config's
  config.checkpoint_every_secs = 30.0  # training checkpoints at most this often; 0: every epoch

  config.data = ml_collections.ConfigDict()
  config.data.name = "mnist"  # mnist | fashion_mnist | digits | cifar10 | text (lrnet.text)
  config.data.dir = config_dict.placeholder(str)  # IDX files (or cifar-10-batches-py); None: search
  config.data.val_fraction = 0.1     # carved from the training set (early stopping, model choice)

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"  # mlp | convnet | resmlp | cnn | resnet18 | transformer | "module:fn"
  config.model.hidden = (1024,) * 5  # mlp: hidden widths

  config.teacher = recipe(epochs=30, batch_size=50, patience=5)
  # Recommended for students (BUILD_NOTES "Students' recipe", measured over seeds): cosine decay
  # over all epochs, --config.student.schedule=cosine --config.student.patience=0.
  config.student = recipe(epochs=10, batch_size=100, patience=3)  # low-rank students
  config.student.distillation = ml_collections.ConfigDict()  # from the teacher's outputs
  config.student.distillation.weight = 0.0       # w in (1-w)·CE + w·T²·KL(teacher‖student); 0: off
  config.student.distillation.temperature = 4.0  # T, softening both outputs

  config.sweep = ml_collections.ConfigDict()
  config.sweep.ranks = (10, 20, 50, 100, 200, "full")  # ints ≤ min(m, n), fractions, "full"
  config.sweep.budgets = ()  # fractions in (0, 1) of the compressed layers' weights (allocated)
  config.sweep.parallel_ranks = False  # integer ranks of a kind as one batch, one compilation
  config.sweep.seeds = 1  # students and controls trained with seeds seed … seed+N-1: mean ± sd
  config.sweep.include = ()  # compressed layers, module-path globs; (): dense, conv but the output
  config.sweep.exclude = ()  # module-path globs removed from that selection
  # dense_control: a dense net of the teacher's depth, as wide as fits the factorized student's
  # parameter count, trained from scratch with the students' recipe (an equal training budget);
  # dense_control_long: the same net trained with the teacher's recipe.
  config.sweep.kinds = (  # students trained at each point; (): truncation only
      "straight_through", "factorized", "dense_control")

  # Truncated accuracy is reported for both starts.
  config.truncation = "svd"  # students start from: svd (plain) | whitened (for calibration inputs)
  config.calibration = ml_collections.ConfigDict()  # inputs whitening the truncation
  config.calibration.examples = 2048  # training examples whose inputs whiten the truncation
  config.calibration.damping = 0.01   # λ = damping · trace(XᵀX)/m added to XᵀX
  config.allocation = ml_collections.ConfigDict()  # per-layer ranks of sweep.budgets
  config.allocation.criterion = "greedy"  # greedy (validation loss) | energy | stable_rank

  config.projection = ml_collections.ConfigDict()  # the straight-through projection
  config.projection.method = "alternating"  # alternating (tracked, fast) | exact (SVD per step)
  config.projection.oversample = 10    # alternating: singular pairs tracked beyond the rank

  # Devices (lrnet.parallel): `members` splits a batch of ranks (sweep.parallel_ranks), `data`
  # splits every training batch; -1: every device the other axis leaves. 1 and 1: one device.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.members = 1  # devices a batch of ranks is split over
  config.mesh.data = 1     # devices every training batch is split over

  config.latency = ml_collections.ConfigDict()  # forward latency, dense vs factorized
  config.latency.batch_size = 100  # examples per measured forward pass
  config.latency.repeats = 30     # timed passes (the median is reported)
  config.latency.remeasure = False  # measure again though this workdir's results.json has them
  return config
