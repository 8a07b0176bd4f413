"""The reference MLP on real Fashion-MNIST with the stronger recipe: AdamW, warm-up + cosine,
label smoothing, random shifts and flips (clothes are left-right symmetric); ranks 10 and 20.

  python -m experiments.sweep --config=configs/fashion_mnist_best.py

The same students distilled from that teacher go to another workdir, into which the trained
teacher is copied (a finished run whose fingerprint matches is reused):

  mkdir -p workdirs/distilled/runs workdirs/distilled/models
  cp workdirs/fashion_mnist_best/runs/teacher.json workdirs/distilled/runs/
  cp -r workdirs/fashion_mnist_best/models/teacher workdirs/distilled/models/
  python -m experiments.sweep --config=configs/fashion_mnist_best.py \\
      --config.workdir=workdirs/distilled --config.student.distillation.weight=0.5 \\
      --config.sweep.kinds='("straight_through","factorized")'
"""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.workdir = "workdirs/fashion_mnist_best"
  for run in (config.teacher, config.student):
    run.schedule = "cosine"
    run.weight_decay = 1e-4
    run.label_smoothing = 0.1
    run.shift = 2
    run.flip = True
    run.patience = 0   # the cosine schedule runs to its end; the best val epoch is kept
  config.teacher.epochs = 40
  config.teacher.batch_size = 128
  config.teacher.warmup_epochs = 1.0
  config.student.epochs = 10
  config.sweep.ranks = (10, 20)
  return config
