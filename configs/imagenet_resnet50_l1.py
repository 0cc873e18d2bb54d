"""ResNet-50 on ImageNet (tfds imagenet2012, prepared in data_dir), l1: 90 epochs, batch 256, lr 0.1."""

from receding_jax.training.paper_configs import paper_config


def get_config():
  return paper_config("imagenet2012", "resnet50", "l1")
