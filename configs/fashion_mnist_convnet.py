"""A conv + dense network on real Fashion-MNIST, offline: origin notebook 003's CNN (`cnn`).

  sudo apt-get install -y dataset-fashion-mnist
  python -m experiments.sweep --config=configs/fashion_mnist_convnet.py

On a CPU, conv networks train one jitted step per call (XLA:CPU runs convolutions inside a
loop ≈ 18× slower than outside one; BUILD_NOTES.md).

Conv and dense layers are compressed alike (a conv kernel as its [kh·kw·c_in, c_out] matrix);
ranks are fractions of each layer's min(m, n), since the first conv's matrix is only 9 × 32.
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.workdir = "workdirs/fashion_mnist_convnet"
  config.data.name = "fashion_mnist"
  config.model.name = "cnn"
  config.teacher.batch_size = 256       # notebook 003's
  config.teacher.epochs = 4
  config.student.batch_size = 256
  config.student.epochs = 1
  config.sweep.ranks = (0.1, 0.25, 0.5)
  return config
