"""ResNet-56 on CIFAR-100, L1 on BatchNorm scales (Network Slimming): docs/method.md sections 2-7."""

from receding_jax.training.paper_configs import paper_config


def get_config():
  return paper_config("cifar100", "cifar_resnet56", "l1")
