"""A stock ResNet-18 (`resnet18`: hk.nets.ResNet18's blocks, BatchNorm, a 3×3 stem) on real
Fashion-MNIST, offline, narrow enough for 2 CPU cores.

  sudo apt-get install -y dataset-fashion-mnist
  python -m experiments.sweep --config=configs/fashion_mnist_resnet.py

BatchNorm statistics are updated in training and used in evaluation, for the teacher and both
students; conv layers are compressed as their [kh·kw·c_in, c_out] matrices, so ranks are
fractions of each layer's min(m, n).
"""

from configs import fashion_mnist_convnet


def get_config():
  config = fashion_mnist_convnet.get_config()
  config.workdir = "workdirs/fashion_mnist_resnet"
  with config.unlocked():
    config.model = type(config.model)({"name": "resnet18"})
    config.model.widths = (8, 16, 32, 64)  # resnet18: the four block groups' channels
  config.teacher.batch_size = 128
  config.teacher.epochs = 2
  config.student.batch_size = 128
  config.student.epochs = 1
  config.sweep.ranks = (0.25, 0.5)
  return config
