"""The reference experiment on real Fashion-MNIST (60k/10k, offline).

  sudo apt-get install -y dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist/
  python -m experiments.sweep --config=configs/fashion_mnist.py
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.workdir = "workdirs/fashion_mnist"
  config.data.name = "fashion_mnist"
  return config
