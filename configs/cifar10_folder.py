"""The CPU-scale demonstration (docs/cpu_demo.md): CIFAR-10 from a local image folder (the JPEGs of
../shared/data, extracted), VGG-16 at 1/4 width, one method per run:

    mkdir -p /tmp/cifar10-jpeg && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
    python -m receding_jax.main --config=configs/cifar10_folder.py:rni --workdir=/tmp/runs/rni
    python -m receding_jax.main --config=configs/cifar10_folder.py:l1 --workdir=/tmp/runs/l1
    python -m receding_jax.main --config=configs/cifar10_folder.py:ucs --workdir=/tmp/runs/ucs

The method (after the colon) is one of rni, l1, ucs, polarization; default rni. The same short schedule
for all: 12 epochs at batch 128, then one-shot pruning at 30/50/70/90% and a 2-epoch fine-tune of each,
with 5,000 of the 50,000 training images held out for validation (test is only reported). The paper's
strengths are given relative to the paper's schedule, so each run keeps the paper's integrated push: at
this length it trains with ~30x the paper's strength (printed at start). An epoch costs ~105 s on 2 cores.
"""

from receding_jax.training.config import paper_config


def get_config(method: str = "rni"):
  c = paper_config("cifar10", "cifar_vgg16", method or "rni")
  c.dataset.name = "folder"
  c.dataset.folder = "/tmp/cifar10-jpeg"
  c.dataset.validation_examples = 5000
  c.checkpoint.keep_best = 1
  c.model.width_multiplier = 0.25
  c.optim.batch_size = 128
  c.optim.num_epochs = 12
  c.penalty.relative_to_paper = method != "ucs"
  c.prune.ratios = (0.3, 0.5, 0.7, 0.9)
  c.finetune.num_epochs = 2
  return c
