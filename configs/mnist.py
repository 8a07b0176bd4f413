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
  config.model.hidden = (1024,) * 5  # hidden widths of the MLP

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
  # True: one compilation for many ranks. The straight-through students of integer ranks share
  # one program (traced rank, every member tracking the largest rank's subspace): side by side
  # in one call on an accelerator, one after another on a CPU. The factorized ones are
  # zero-padded into shared programs, all side by side on an accelerator, on a CPU only ranks
  # whose padding costs ≤ 10 % more (sweep.factorized_batches). False: one by one, each with a
  # program at its own rank, the faster choice on a 2-core CPU unless compilation dominates
  # (digits); see BUILD_NOTES.md.
  config.sweep.parallel_ranks = False
  config.sweep.kinds = ("straight_through", "factorized")  # students to train; (): truncation only

  config.projection = ml_collections.ConfigDict()  # the straight-through projection
  # alternating (the fastest): per step one product with W, the search subspace on W's right and
  # left side by turns; a right step finds the best rank-r approximation of the current W in it
  # (Rayleigh–Ritz), a left step projects through the unit images of those vectors; forward and
  # input gradient through the two factors (BUILD_NOTES.md, benchmark: on 2 CPU cores ≈ 0.7×
  # the dense step at r = 10, ≈ 1.9× at r = 200; update_every 1 only). streaming: Rayleigh–Ritz
  # every step in a subspace iterated on the previous step's W (two products per step, ≈ 1.1–1.5×
  # the alternating cost). subspace: a whole iteration and Rayleigh–Ritz per refinement (slower
  # still). exact: an SVD of every projected weight at every step (≈ 35–45× the dense step on a
  # 2-core CPU).
  config.projection.method = "alternating"  # exact | subspace | streaming | alternating
  config.projection.oversample = 10    # tracked methods: extra directions beyond the rank
  # subspace, streaming: refine every k-th step, reuse the subspace in between (alternating: 1
  # only). Fashion-MNIST rank 20, 200 steps from the teacher, five data orders: alternating ends
  # −0.01 points from the exact projection's test accuracy on average (−0.44…+0.37; mean of the
  # last 4 evaluations −0.15), streaming −0.09 (−0.74…+0.18; −0.15), at 70–90× its speed;
  # streaming with k = 2 lost 0.3–0.6 points (session 4) and, a reused basis needing the dense
  # products again, is slower up to rank 50.
  config.projection.update_every = 1

  config.latency = ml_collections.ConfigDict()  # forward latency, dense vs factorized
  config.latency.batch_size = 100
  config.latency.repeats = 30
  return config
