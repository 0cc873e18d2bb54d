"""Quickstart: a small CIFAR ResNet with bounded norms and the receding penalty on scikit-learn's embedded
8x8 digits (no download): train, prune one-shot at 30/50/70%, fine-tune each; about 3 minutes on 2 CPU cores.
300 of the 1,500 training digits are held out for validation: the checkpoint pruned is the one with the best
validation accuracy (`prune.source = "best"`; ties go to the later epoch); the 297 test digits are only reported."""

from receding_jax.training.config import default_config


def get_config():
  c = default_config()
  c.dataset.name = "digits"
  c.dataset.image_size = 8
  c.dataset.augment = "none"
  c.dataset.mean = (0.3,)
  c.dataset.std = (0.4,)
  c.dataset.validation_examples = 300
  c.checkpoint.keep_best = 1
  c.model.name = "cifar_resnet20"
  c.model.width_multiplier = 0.5
  c.penalty.kind = "rni"
  c.penalty.strength = 2e-2  # Shows receding within 345 steps (the paper's 1e-3 assumes ~125k steps).
  c.penalty.shift = 0.0
  c.optim.batch_size = 64
  c.optim.num_epochs = 15
  c.optim.learning_rate = 0.05
  c.phases = ("train", "prune", "finetune")
  c.prune.ratios = (0.3, 0.5, 0.7)
  c.prune.source = "best"
  c.finetune.num_epochs = 5
  return c
