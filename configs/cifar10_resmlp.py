"""Origin notebook 004: CIFAR-10, residual fully connected network (`resmlp`), 7 teacher epochs.

  python -m experiments.sweep --config=configs/cifar10_resmlp.py --config.data.dir=<cifar-10-batches-py>
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.workdir = "workdirs/cifar10_resmlp"
  config.model.name = "resmlp"
  config.model.width = 1000                      # resmlp: width of every hidden layer
  config.model.blocks = 2                        # resmlp: residual blocks
  config.teacher.epochs = 7                      # the notebook's
  config.sweep.ranks = (10, 20, 50, 100, 200, "full")
  return config
