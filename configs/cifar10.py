"""Origin notebook 001: CIFAR-10, conv + dense network (`convnet`), rank fractions 0.1 … 1.0.

  python -m experiments.sweep --config=configs/cifar10.py --config.data.dir=<cifar-10-batches-py>

CIFAR-10 comes from the standard python batches (cifar-10-python.tar.gz, extracted) in `data.dir`
or TFDS; inputs are normalised per channel with the notebook's mean and std.
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.workdir = "workdirs/cifar10"
  config.data.name = "cifar10"
  config.model.name = "convnet"
  config.model.dense = (3000, 2000, 2000, 1000)  # convnet: dense widths after the convs
  config.teacher.batch_size = 100
  config.sweep.ranks = tuple(round(0.1 * i, 1) for i in range(1, 11))  # fractions of min(m, n)
  return config
