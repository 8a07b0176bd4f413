"""Offline quick start: scikit-learn's 8×8 digits, a small MLP, the whole sweep in under a minute on 2 cores.

  python -m experiments.sweep --config=configs/digits.py
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.workdir = "workdirs/digits"
  config.data.name = "digits"
  config.model.hidden = (512, 512, 512)
  config.teacher.epochs = 30
  config.teacher.batch_size = 32
  config.teacher.patience = 0
  config.teacher.ema_decay = 0.99
  config.student.epochs = 5
  config.student.batch_size = 32
  config.student.patience = 0
  config.student.ema_decay = 0.0
  config.sweep.ranks = (4, 8, 16, 32)
  config.sweep.parallel_ranks = True
  config.latency.repeats = 10
  return config
