"""A stock ResNet-18 (`resnet18`: hk.nets.ResNet18's blocks, BatchNorm, a 3×3 stem for 32×32
inputs) on CIFAR-10, with shifts and flips.

  python -m experiments.sweep --config=configs/cifar10_resnet18.py \
      --config.data.dir=<cifar-10-batches-py>
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.workdir = "workdirs/cifar10_resnet18"
  config.model = config.model.copy_and_resolve_references()
  with config.unlocked():
    config.model = type(config.model)({"name": "resnet18"})
    config.model.widths = (64, 128, 256, 512)  # resnet18: the four block groups' channels
  for run in ("teacher", "student"):
    config[run].shift, config[run].flip = 4, True
  config.sweep.ranks = (0.125, 0.25, 0.5)
  return config
