"""Origin notebook 003 on Fashion-MNIST: a subclass CNN teacher, then an MLP student trained
alone, with soft targets and with subclass distillation (`lrnet.distill`).

  sudo apt-get install -y dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist/
  python -m experiments.distill --config=configs/fashion_mnist_subclass.py
  python -m experiments.distill --config=configs/fashion_mnist_subclass.py \
      --config.data.name=mnist --config.data.dir=/path/to/mnist/idx

The notebook trained 200 epochs on MNIST; a few epochs fit a 2-core CPU.
"""

import ml_collections
from ml_collections import config_dict

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workdir = "workdirs/fashion_mnist_subclass"  # results, checkpoints, logs go here
  config.seed = 0                    # initialisation, dropout, validation split and shuffling
  config.overwrite = False           # retrain finished runs of other settings in the workdir
  config.checkpoint_every_secs = 30.0  # training checkpoints at most this often; 0: every epoch

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"  # mnist | fashion_mnist | digits | cifar10
  config.data.dir = config_dict.placeholder(str)  # directory of IDX files; None: search
  config.data.val_fraction = 0.1     # carved from the training set (early stopping, model choice)

  config.model = ml_collections.ConfigDict()  # the teacher (lrnet.models)
  config.model.name = "cnn"          # notebook 003's CNN; mlp | convnet | resmlp also work
  config.model.channels = (32, 64)   # cnn: its two conv layers' channels
  config.model.dense = 128           # cnn: its dense layer's width
  config.model.dropout = 0.5         # cnn: dropout rate, in training only
  config.model.subclasses = 2        # k: outputs per class of the teacher and the students

  config.teacher = mnist.recipe(epochs=5, batch_size=256, patience=3)  # Adam 1e-3 (notebook)
  config.teacher.diversity = ml_collections.ConfigDict()  # the subclass teacher's auxiliary loss
  config.teacher.diversity.weight = 0.7       # β in CE + β · diversity
  config.teacher.diversity.temperature = 4.0  # its temperature

  config.student = mnist.recipe(epochs=10, batch_size=256, patience=3)  # each of the 3 students
  config.student.hidden = (784, 784)  # the MLP student's hidden widths (784-784-784)
  config.student.distillation = ml_collections.ConfigDict()  # soft_targets and subclass students
  config.student.distillation.weight = 0.5       # w in (1-w)·CE + w·T²·KL(teacher‖student)
  config.student.distillation.temperature = 4.0  # T

  # Devices (lrnet.parallel): `data` splits every training batch; 1 and 1: one device.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.members = 1            # one run at a time: keep 1
  config.mesh.data = 1
  return config
