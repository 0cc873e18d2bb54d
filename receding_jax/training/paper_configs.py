"""The paper's experiments as configs: its schedule, its penalty settings per method and model family, and
the datasets' statistics (docs/method.md sections 2 and 3); `paper_config` builds one experiment's config."""

from __future__ import annotations

import ml_collections

from receding_jax.training.config import PHASES, ConfigError, default_config

#: The schedule the paper's strengths were tuned for: CIFAR (50,000 images), batch 64, 160 epochs,
#: lr 0.1 divided by 10 at 50% and 75% of the steps.
PAPER_SCHEDULE = {"train_examples": 50_000, "batch_size": 64, "num_epochs": 160, "learning_rate": 0.1,
                  "decay_fractions": (0.5, 0.75), "decay_factor": 0.1}

#: Penalty settings per (method, model family): docs/method.md sections 2 and 3 (160 epochs, batch 64).
PAPER_PENALTIES = {
    ("rni", "vgg"): {"kind": "rni", "strength": 1e-3, "shift": 3.0},
    ("rni", "resnet"): {"kind": "rni", "strength": 1e-4, "shift": 0.0},
    ("l1", "vgg"): {"kind": "l1", "strength": 1e-4},
    ("l1", "resnet"): {"kind": "l1", "strength": 1e-5},
    ("polarization", "vgg"): {"kind": "polarization", "strength": 3e-5, "polarization_t": 1.5},
    ("polarization", "resnet"): {"kind": "polarization", "strength": 5e-5, "polarization_t": 1.4},
    ("ucs", "vgg"): {"kind": "none", "strength": 0.0},
    ("ucs", "resnet"): {"kind": "none", "strength": 0.0},
}
DATASET_STATS = {
    "cifar10": {"num_classes": 10, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)},
    "cifar100": {"num_classes": 100, "mean": (0.5071, 0.4867, 0.4408), "std": (0.2675, 0.2565, 0.2761)},
    "imagenet2012": {"num_classes": 1000, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}


def paper_config(dataset: str, model: str, method: str) -> ml_collections.ConfigDict:
  """The config of one paper experiment: `dataset` in DATASET_STATS, `model` a zoo name, `method` one
  of 'rni', 'l1', 'ucs', 'polarization' (RNI = bounded norms + receding penalty; the others BatchNorm,
  gamma init 0.5 as in the official code, UCS included)."""
  family = "vgg" if "vgg" in model else "resnet"
  if (method, family) not in PAPER_PENALTIES:
    raise ConfigError(f"unknown method {method!r}; choose one of rni, l1, ucs, polarization")
  if dataset not in DATASET_STATS:
    raise ConfigError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_STATS)}")
  c = default_config()
  c.dataset.name = dataset
  for key, value in DATASET_STATS[dataset].items():
    c.dataset[key] = value
  c.model.name = model
  c.model.norm = "bounded" if method == "rni" else "batch"
  c.model.batch_norm_scale_init = 0.5  # The official vgg16.py/resnet56.py, for every BatchNorm method.
  for key, value in PAPER_PENALTIES[(method, family)].items():
    c.penalty[key] = value
  c.phases = PHASES
  c.prune.scope = "local" if method == "ucs" else "global"
  if dataset == "imagenet2012":  # The usual ImageNet recipe: 90 epochs, lr 0.1 per 256 images, steps at 30/60.
    c.dataset.eval_split = "validation"
    c.dataset.image_size = 224
    c.dataset.augment = "imagenet"
    c.optim.batch_size = 256
    c.optim.num_epochs = 90
    c.optim.decay_fractions = (1 / 3, 2 / 3)
    c.finetune.num_epochs = 90
  return c
