"""ResNet-56 on CIFAR-10, UCS baseline (BatchNorm, no penalty, local-scope pruning): docs/method.md sections 2-7."""

from receding_jax.training.paper_configs import paper_config


def get_config():
  return paper_config("cifar10", "cifar_resnet56", "ucs")
