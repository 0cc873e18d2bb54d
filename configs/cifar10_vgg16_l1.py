"""VGG-16 on CIFAR-10, L1 on BatchNorm scales (Network Slimming): docs/method.md sections 2-7."""

from receding_jax.training.paper_configs import paper_config


def get_config():
  return paper_config("cifar10", "cifar_vgg16", "l1")
