"""ResNet-56 on CIFAR-100, polarization penalty (Zhuang et al., 2020): docs/method.md sections 2-7."""

from receding_jax.training.paper_configs import paper_config


def get_config():
  return paper_config("cifar100", "cifar_resnet56", "polarization")
