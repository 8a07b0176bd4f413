"""Byte-level language model: a small decoder-only transformer on the Python standard library.

  python -m experiments.sweep --config=configs/text_transformer.py

Offline with nothing installed: the corpus is the running Python's standard-library sources
(`lrnet.text`), so its numbers depend on the Python version. `--config.data.path=` any UTF-8
file, directory or glob. Results are reported in bits per byte (test loss / ln 2). Every
projection (attention q, k, v, output; MLP in and out) is compressed; embeddings and the head
stay dense. `--config.sweep.include='("*/mlp_*",)'` compresses only the MLPs, `'("*/query",
"*/key")'` only q and k.
"""

from ml_collections import config_dict

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.workdir = "workdirs/text_transformer"
  config.data.name = "text"
  config.data.path = config_dict.placeholder(str)  # UTF-8 file, directory or glob; None: stdlib
  config.data.max_bytes = 2_000_000  # corpus cut-off (the first bytes in sorted file order)
  config.data.context = 64         # bytes per window (T)
  config.data.val_fraction = 0.05  # the validation block's share of the corpus, and the test block's
  del config.data.dir

  config.model.name = "transformer"
  del config.model.hidden
  config.model.width = 128         # d_model; the dense control narrows it
  config.model.layers = 2          # transformer blocks (the dense control keeps the depth)
  config.model.heads = 4           # attention heads (width divisible by them)
  config.model.mlp_ratio = 4       # MLP width = mlp_ratio · width
  config.model.dropout = 0.0       # on the embeddings and each block's two outputs, in training
  config.model.tied_head = False   # True: logits = LN(x) Eᵀ, no head of its own

  config.teacher.epochs = 3
  config.teacher.batch_size = 64
  config.teacher.learning_rate = 2e-3
  config.teacher.schedule = "cosine"
  config.teacher.warmup_epochs = 0.2
  config.teacher.patience = 0
  config.student.epochs = 1
  config.student.batch_size = 64
  config.student.learning_rate = 1e-3
  config.student.schedule = "cosine"
  config.student.warmup_epochs = 0.1
  config.student.patience = 0

  config.sweep.kinds = ("straight_through", "factorized", "dense_control", "dense_control_long")
  config.sweep.ranks = (8, 16, 32)
  config.sweep.budgets = (0.25,)
  config.sweep.parallel_ranks = True
  config.calibration.examples = 256  # windows: 256 · 64 inputs per projection
  config.latency.batch_size = 32
  config.latency.repeats = 10
  return config
