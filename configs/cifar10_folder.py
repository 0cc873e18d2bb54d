"""The CPU-scale demonstration (docs/cpu_demo.md): CIFAR-10 from a local image folder (the JPEGs of
../shared/data/cifar10-jpeg.tar.gz, which the first run extracts once into ~/.cache/receding_jax/datasets and
later runs reuse), VGG-16 at 1/4 width, one method per run:

    python -m receding_jax.main --config=configs/cifar10_folder.py:rni --workdir=/tmp/runs/rni
    python -m receding_jax.main --config=configs/cifar10_folder.py:l1 --workdir=/tmp/runs/l1
    python -m receding_jax.main --config=configs/cifar10_folder.py:ucs --workdir=/tmp/runs/ucs

The archive is `dataset.archive`: $RECEDING_JAX_CIFAR10_ARCHIVE (the tests' setting) or else
../shared/data/cifar10-jpeg.tar.gz beside the repository; `--config.dataset.archive=PATH` sets another (checked
against its sha256), `--config.dataset.folder=DIR` reads an already extracted folder instead.
The method (after the colon) is one of rni, l1, ucs, polarization; default rni. The same short schedule
for all: 12 epochs at batch 128, then one-shot pruning at 30/50/70/90% and a 2-epoch fine-tune of each,
with 5,000 of the 50,000 training images held out for validation (test is only reported). The paper's
strengths are given relative to the paper's schedule, so each run keeps the paper's integrated push: at
this length it trains with ~30x the paper's strength (printed at start). An epoch costs ~105 s on 2 cores.
"""

import os
import pathlib

from receding_jax.training.paper_configs import paper_config

#: The real CIFAR-10 JPEGs (../shared/data/README.md) and their sha256.
ARCHIVE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
ARCHIVE_SHA256 = "d34c68f61cca57aa9144c8f25bda427abb9921bd642d5857a2fc1a6b4416f965"


def get_config(method: str = "rni"):
  c = paper_config("cifar10", "cifar_vgg16", method or "rni")
  c.dataset.name = "folder"
  c.dataset.archive = os.environ.get("RECEDING_JAX_CIFAR10_ARCHIVE") or str(ARCHIVE)
  c.dataset.archive_sha256 = ARCHIVE_SHA256
  c.dataset.validation_examples = 5000
  c.checkpoint.keep_best = 1
  c.model.width_multiplier = 0.25
  c.optim.batch_size = 128
  c.optim.num_epochs = 12
  c.penalty.relative_to_paper = method != "ucs"
  c.prune.ratios = (0.3, 0.5, 0.7, 0.9)
  c.finetune.num_epochs = 2
  return c
