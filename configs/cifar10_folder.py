"""CIFAR-10 from a local image folder (the JPEGs of ../shared/data, extracted), VGG-16 at 1/4 width, RNI.

    mkdir -p /tmp/cifar10-jpeg && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
    python -m receding_jax.main --config=configs/cifar10_folder.py --workdir=/tmp/runs/folder

The CPU-scale setting of METHOD.md section 8: 15 epochs at batch 128, about 105 s an epoch on 2 cores.
The paper's strength (1e-3, shift 3) is given relative to the paper's schedule, so the run keeps its
integrated push: it trains with ~21x that strength.
"""

from receding_jax.config import paper_config


def get_config():
  c = paper_config("cifar10", "cifar_vgg16", "rni")
  c.dataset.name = "folder"
  c.dataset.folder = "/tmp/cifar10-jpeg"
  c.model.width_multiplier = 0.25
  c.optim.batch_size = 128
  c.optim.num_epochs = 15
  c.penalty.relative_to_paper = True
  return c
