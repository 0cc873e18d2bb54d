"""VGG-16 on CIFAR-10 with the receding penalty, the paper's recipe (docs/method.md sections 2 and 4)."""

from receding_jax.training.config import default_config


def get_config():
  return default_config()
