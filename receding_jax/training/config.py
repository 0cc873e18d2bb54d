"""The experiment configuration: every key with its default, and the checks run before anything starts.

A run is described by one `ml_collections.ConfigDict`. Config files (``configs/*.py``) start from
`default_config()` and change values; `validate_config` then refuses any key the defaults do not have
(a typo would otherwise be silently ignored), any value of the wrong type and any impossible value,
naming it, before a dataset is opened or a workdir is touched.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from receding_jax.errors import InputError
from receding_jax.models import COMPUTE_DTYPES, MODELS, NORM_KINDS
from receding_jax.pruning import SCOPES

DATASETS = ("cifar10", "cifar100", "imagenet2012", "digits", "folder")
AUGMENTATIONS = ("cifar", "imagenet", "none")
PENALTIES = ("rni", "l1", "polarization", "none")
SCHEDULES = ("step", "cosine")
PHASES = ("train", "prune", "finetune")
PRUNE_SOURCES = ("last", "best")
PLACEMENTS = ("auto", "device", "streaming")
#: Which norm each penalty acts on.
PENALTY_NORM = {"rni": "bounded", "l1": "batch", "polarization": "batch"}


def default_config() -> ml_collections.ConfigDict:
  """All keys of a run with their defaults: VGG-16 on CIFAR-10 with the receding penalty (docs/method.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "cifar10"  # One of DATASETS; 'folder' reads `folder` with tfds.ImageFolder.
  c.dataset.folder = ""  # Root of an image folder (train/<class>/*.jpg, test/<class>/*.jpg); '' = `archive`'s.
  c.dataset.archive = ""  # A .tar.gz of an image folder, extracted once into a cache folder (training/archive.py).
  c.dataset.archive_sha256 = ""  # The archive's expected sha256 ('' = not checked).
  c.dataset.data_dir = ""  # tfds data_dir ('' = tfds' default).
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"  # The test split: only reported, never used to choose anything.
  # Examples of `train_split` held out as the validation split, on which every choice (best checkpoint,
  # per-epoch evaluation, comparing methods) is made; 0 = none: train on all and choose nothing.
  c.dataset.validation_examples = 0
  c.dataset.validation_seed = 0  # Which examples are held out (folder, digits); independent of `seed`.
  c.dataset.num_classes = 10
  c.dataset.image_size = 32  # Side of the square training/eval crops.
  c.dataset.augment = "cifar"  # One of AUGMENTATIONS.
  c.dataset.mean = (0.4914, 0.4822, 0.4465)  # Per-channel normalisation, on [0, 1] pixels.
  c.dataset.std = (0.2023, 0.1994, 0.2010)

  # Where batches come from (receding_jax.training.data): 'device' keeps the splits' uint8 images on the
  # accelerators and runs `steps_per_dispatch` steps per dispatch; 'streaming' decodes and augments on the
  # host (Grain); 'auto' = 'device' when the splits fit `device_budget_mb` and their augmentation runs there.
  c.data = ml_collections.ConfigDict()
  c.data.placement = "auto"
  # uint8 images of every split the run reads, the training split twice (its epoch is laid out as a copy),
  # all devices together.
  c.data.device_budget_mb = 2048.0
  # Steps per dispatch of device-resident data; 0 = 100 on GPUs and TPUs, 1 on CPUs (XLA:CPU runs a step
  # inside a scan slower than a dispatched one: benchmarks/).
  c.data.steps_per_dispatch = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "cifar_vgg16"  # A key of receding_jax.models.MODELS.
  c.model.norm = "bounded"  # 'bounded' (BoundedScaleNorm) or 'batch' (BatchNorm).
  c.model.width_multiplier = 1.0
  c.model.batch_norm_scale_init = 1.0  # gamma init of 'batch' norms (0.5 in the paper's L1/polarization/UCS).
  # 'float32' or 'bfloat16': convolutions, dense layers and activations compute in this dtype; params,
  # optimizer state, norm statistics, penalty, loss and logits stay float32 (mixed precision).
  c.model.compute_dtype = "float32"

  c.penalty = ml_collections.ConfigDict()
  c.penalty.kind = "rni"  # One of PENALTIES.
  c.penalty.strength = 1e-3
  c.penalty.shift = 3.0  # rni only: b in sigmoid(w + b).
  c.penalty.polarization_t = 1.5  # polarization only.
  # If True, `strength` means "the paper's strength": it is rescaled so that the penalty's integrated
  # push (strength x sum of the learning rates over all steps) equals that of the paper's schedule
  # (paper_configs.PAPER_SCHEDULE). A 15-epoch run at batch 128 then uses ~21x the given strength.
  c.penalty.relative_to_paper = False

  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 64  # Global batch, split over processes and devices.
  c.optim.num_epochs = 160
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  # Coupled (added to the gradient), on every parameter but the bounded norms' logits: conv and dense
  # kernels and biases, BatchNorm scales and biases (the reference's SGD weight_decay).
  c.optim.weight_decay = 1e-4
  c.optim.norm_lr_multiplier = 10.0  # Bounded norms: lr x this and no weight decay.
  c.optim.schedule = "step"  # 'step': x decay_factor at each of decay_fractions; 'cosine'.
  c.optim.decay_fractions = (0.5, 0.75)
  c.optim.decay_factor = 0.1
  c.optim.warmup_epochs = 0.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep_last = 2
  c.checkpoint.keep_best = 0  # Also keep this many with the best validation accuracy (needs a validation split).
  c.checkpoint.every_epochs = 1

  c.eval_every_epochs = 1
  # Also evaluate the test split every epoch (only reported, never used to choose): what the paper's
  # convention, the best test accuracy over epochs, needs when there is a validation split. Without one,
  # test is the split evaluated every epoch anyway.
  c.eval_test_every_epoch = False

  # The experiment: which phases `python -m receding_jax.main` runs (in this order), and their settings.
  c.phases = ("train",)  # Any of PHASES, in order: train -> prune (one-shot, each ratio) -> finetune.
  c.prune = ml_collections.ConfigDict()
  c.prune.ratios = (0.5, 0.9)  # Shares of prunable channels to remove, each in [0, 1).
  c.prune.scope = "global"  # 'global' (RNI, L1, polarization) or 'local' (UCS).
  c.prune.min_channels = 3
  c.prune.channel_multiple = 1
  # Which trained checkpoint is pruned: 'last' (the end of training) or 'best' (the highest validation
  # accuracy among the kept checkpoints, ties going to the later step; needs checkpoint.keep_best >= 1).
  c.prune.source = "last"
  c.prune.prune_streams = False  # Also prune residual streams (the paper prunes block-inner channels only).
  c.finetune = ml_collections.ConfigDict()
  c.finetune.num_epochs = 160  # Same schedule as training (scaled to this length), no penalty.

  # Shrinking while training (training/shrinking.py, docs/shrinking.md): off by default, so the paper's
  # recipe trains the full width to the end. On: after every `every_epochs`-th epoch from `start_epoch` on,
  # the channels whose importance stayed at or below `threshold` (the one-shot threshold's meaning) for
  # `patience` checks in a row are removed, with the optimiser state, never more than `max_ratio` of the
  # prunable channels in all; prune.min_channels, prune.channel_multiple and prune.prune_streams apply.
  # The prune phase's ratios then count the channels of the unshrunk network (at least max_ratio each).
  c.shrink = ml_collections.ConfigDict()
  c.shrink.enabled = False
  c.shrink.every_epochs = 5  # Each shrink compiles the narrow step once: not too often.
  c.shrink.threshold = 0.01
  c.shrink.patience = 2
  c.shrink.start_epoch = 1  # The first epoch (counted from 1) whose end is a check.
  c.shrink.max_ratio = 0.5

  # JAX's persistent compilation cache (training.compile_cache): 'auto' = ~/.cache/receding_jax/
  # jax_compilation_cache ($XDG_CACHE_HOME if set), a path, or '' (off). How a run runs, not what it
  # computes: a workdir resumes under another value.
  c.compilation_cache_dir = "auto"
  return c


def _walk(config: ml_collections.ConfigDict, prefix: str = ""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))


class ConfigError(InputError):
  """A config that cannot run: an unknown or missing key, a mistyped or impossible value."""


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key} = {value!r}: {expected}")


def known_keys() -> list[str]:
  """Every config key ('optim.batch_size', ...), sorted."""
  return sorted(k for k, _ in _walk(default_config()))


def unknown_keys_message(unknown: Sequence[str]) -> str:
  """'unknown config keys [...]' with the nearest known key for each, on one line."""
  known = known_keys()
  hints = {k: close[0] for k in unknown if (close := difflib.get_close_matches(k, known, n=1))}
  if len(unknown) == 1 and hints:
    hint = f" (did you mean {hints[unknown[0]]!r}?)"
  else:
    hint = "".join(f" ({v!r} for {k!r}?)" for k, v in hints.items())
  return f"unknown config keys {sorted(unknown)}{hint}; every key and its default is in receding_jax/training/config.py"


def check_override_flags(argv: Sequence[str], flag: str = "config") -> None:
  """ConfigError for any ``--config.KEY=value`` (or ``--noconfig.KEY``) whose KEY is not a config key, before
  absl parses the flags (ml_collections would fail there with a long traceback)."""
  known, unknown = set(known_keys()), []
  for arg in argv:
    name = arg.lstrip("-").split("=", 1)[0]
    for prefix in (f"{flag}.", f"no{flag}."):
      if arg.startswith("--") and name.startswith(prefix) and name[len(prefix):] not in known:
        unknown.append(name[len(prefix):])
  if unknown:
    raise ConfigError(unknown_keys_message(unknown))


def _validate_data(config: ml_collections.ConfigDict) -> None:
  """The dataset and data sections' values."""
  d = config.dataset
  _check(d.name in DATASETS, "dataset.name", d.name, f"one of {DATASETS}")
  _check(d.name != "folder" or bool(d.folder or d.archive), "dataset.folder", d.folder,
         "dataset 'folder' needs a folder, or dataset.archive (a .tar.gz of one)")
  _check(d.archive_sha256 == "" or re.fullmatch(r"[0-9a-fA-F]{64}", d.archive_sha256) is not None,
         "dataset.archive_sha256", d.archive_sha256, "'' or 64 hexadecimal digits")
  _check(d.augment in AUGMENTATIONS, "dataset.augment", d.augment, f"one of {AUGMENTATIONS}")
  _check(d.num_classes >= 2, "dataset.num_classes", d.num_classes, "at least 2")
  _check(d.image_size >= 1, "dataset.image_size", d.image_size, "positive")
  _check(len(d.mean) == len(d.std) and all(s > 0 for s in d.std), "dataset.std", d.std,
         "positive, one per channel, as many as dataset.mean")
  _check(d.validation_examples >= 0, "dataset.validation_examples", d.validation_examples, "must be >= 0")
  _check(config.data.placement in PLACEMENTS, "data.placement", config.data.placement, f"one of {PLACEMENTS}")
  _check(config.data.device_budget_mb >= 0, "data.device_budget_mb", config.data.device_budget_mb, "must be >= 0")
  _check(config.data.steps_per_dispatch >= 0, "data.steps_per_dispatch", config.data.steps_per_dispatch, "must be >= 0")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first unknown key, missing key, mistyped or impossible value."""
  defaults = dict(_walk(default_config()))
  given = dict(_walk(config))
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(unknown_keys_message(unknown))
  missing = sorted(set(defaults) - set(given))
  if missing:
    raise ConfigError(f"config lacks keys {missing}")
  for key, value in given.items():
    _check(_type_ok(value, defaults[key]), key, value, f"expected a {type(defaults[key]).__name__}")

  d, m, p, o, k = config.dataset, config.model, config.penalty, config.optim, config.checkpoint
  _validate_data(config)
  _check(m.name in MODELS, "model.name", m.name, f"one of {sorted(MODELS)}")
  _check(m.norm in NORM_KINDS, "model.norm", m.norm, f"one of {NORM_KINDS}")
  _check(m.width_multiplier > 0, "model.width_multiplier", m.width_multiplier, "positive")
  _check(m.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", m.compute_dtype, f"one of {COMPUTE_DTYPES}")
  _check(p.kind in PENALTIES, "penalty.kind", p.kind, f"one of {PENALTIES}")
  _check(p.kind not in PENALTY_NORM or PENALTY_NORM[p.kind] == m.norm, "penalty.kind", p.kind,
         f"acts on {PENALTY_NORM.get(p.kind)!r} norms but model.norm is {m.norm!r}")
  _check(p.strength >= 0, "penalty.strength", p.strength, "must be >= 0")
  _check(p.polarization_t >= 0, "penalty.polarization_t", p.polarization_t, "must be >= 0")
  _check(o.batch_size >= 1, "optim.batch_size", o.batch_size, "positive")
  _check(o.num_epochs >= 1, "optim.num_epochs", o.num_epochs, "positive")
  _check(o.learning_rate > 0, "optim.learning_rate", o.learning_rate, "positive")
  _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)")
  _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
  _check(o.norm_lr_multiplier > 0, "optim.norm_lr_multiplier", o.norm_lr_multiplier, "positive")
  _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"one of {SCHEDULES}")
  _check(all(0 < f < 1 for f in o.decay_fractions) and list(o.decay_fractions) == sorted(o.decay_fractions),
         "optim.decay_fractions", o.decay_fractions, "increasing fractions in (0, 1)")
  _check(0 < o.decay_factor <= 1, "optim.decay_factor", o.decay_factor, "in (0, 1]")
  _check(0 <= o.warmup_epochs < o.num_epochs, "optim.warmup_epochs", o.warmup_epochs, "in [0, num_epochs)")
  _check(k.keep_last >= 1, "checkpoint.keep_last", k.keep_last, "at least 1")
  _check(k.keep_best >= 0, "checkpoint.keep_best", k.keep_best, "must be >= 0")
  _check(k.keep_best == 0 or d.validation_examples > 0, "checkpoint.keep_best", k.keep_best,
         "choosing the best checkpoint needs a validation split (dataset.validation_examples > 0); the test "
         "split is never used to choose")
  _check(k.every_epochs >= 1, "checkpoint.every_epochs", k.every_epochs, "at least 1")
  _check(config.eval_every_epochs >= 1, "eval_every_epochs", config.eval_every_epochs, "at least 1")
  phases = tuple(config.phases)
  _check(bool(phases) and all(ph in PHASES for ph in phases) and list(phases) == sorted(phases, key=PHASES.index)
         and len(set(phases)) == len(phases), "phases", phases, f"a non-empty ordered selection of {PHASES}")
  r = config.prune
  _check(all(isinstance(x, (int, float)) and 0 <= x < 1 for x in r.ratios) and len(r.ratios) > 0,
         "prune.ratios", r.ratios, "ratios in [0, 1)")
  _check(r.scope in SCOPES, "prune.scope", r.scope, f"one of {SCOPES}")
  _check(r.min_channels >= 1, "prune.min_channels", r.min_channels, "at least 1")
  _check(r.channel_multiple >= 1, "prune.channel_multiple", r.channel_multiple, "at least 1")
  _check(r.source in PRUNE_SOURCES, "prune.source", r.source, f"one of {PRUNE_SOURCES}")
  _check(r.source != "best" or k.keep_best >= 1, "prune.source", r.source,
         "pruning the best checkpoint needs checkpoint.keep_best >= 1 (and so a validation split)")
  _check(config.finetune.num_epochs >= 1, "finetune.num_epochs", config.finetune.num_epochs, "at least 1")
  _validate_shrink(config)


def _validate_shrink(config: ml_collections.ConfigDict) -> None:
  """The shrink section's values; with pruning after training, max_ratio within its smallest ratio."""
  s = config.shrink
  _check(s.every_epochs >= 1, "shrink.every_epochs", s.every_epochs, "at least 1")
  _check(s.threshold >= 0 and s.threshold == s.threshold, "shrink.threshold", s.threshold, "a number >= 0")
  _check(s.patience >= 1, "shrink.patience", s.patience, "at least 1")
  _check(s.start_epoch >= 1, "shrink.start_epoch", s.start_epoch, "at least 1 (the end of the first epoch)")
  _check(0 <= s.max_ratio < 1, "shrink.max_ratio", s.max_ratio, "in [0, 1)")
  smallest = min(config.prune.ratios)
  _check(not (s.enabled and "prune" in config.phases) or s.max_ratio <= smallest, "shrink.max_ratio",
         s.max_ratio, f"at most the smallest prune ratio {smallest:g}: the prune phase counts the unshrunk "
         "network's channels and cannot put back what shrinking removed")


#: Keys configs no longer have ("section.key"): a workdir's config.json that still holds them resumes.
RETIRED_KEYS = ("dataset.shuffle_buffer",)  # Only the tf.data stream of TFRecord datasets used it.
#: Keys that say how a run runs, not what it computes: a workdir's run resumes (and a finished one is
#: found) whatever their values.
RUN_ONLY_KEYS = ("compilation_cache_dir",)


def run_identity(saved: Mapping[str, Any]) -> dict[str, Any]:
  """What two configs (as JSON, e.g. recorded in a workdir) must agree on to be the same run: the config
  without the `RETIRED_KEYS` and `RUN_ONLY_KEYS` it may hold, and with the default of every key added
  since it was recorded (a key a workdir's config.json lacks meant what its default means)."""
  defaults = json.loads(default_config().to_json_best_effort())
  saved = {**defaults, **saved}
  saved = {k: {**defaults[k], **v} if isinstance(v, Mapping) and isinstance(defaults.get(k), Mapping)
           else dict(v) if isinstance(v, Mapping) else v for k, v in saved.items() if k not in RUN_ONLY_KEYS}
  for key in RETIRED_KEYS:
    section, name = key.split(".")
    if isinstance(saved.get(section), dict):
      saved[section].pop(name, None)
  return saved


#: Top-level keys that only say what happens after training (which phases run, how the trained network is
#: pruned and fine-tuned): the trained network does not depend on them, so a workdir's finished training
#: is extended under new values (a new ratio is pruned and fine-tuned from the same checkpoint), never redone.
PHASE_KEYS = ("phases", "prune", "finetune")


def trained_network_identity(saved: Mapping[str, Any]) -> dict[str, Any]:
  """What two configs (as JSON) must agree on to train the same network: `run_identity` without the
  `PHASE_KEYS`."""
  return {k: v for k, v in run_identity(saved).items() if k not in PHASE_KEYS}


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'optim.learning_rate': 0.1, ...}: a config as JSON, flattened to dotted keys."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_leaves(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
  """The dotted keys ('optim.learning_rate') whose values differ between two configs (as JSON dicts, e.g.
  read from config.json); a key only one of them has counts."""
  flat_a, flat_b = _leaves(a), _leaves(b)
  return sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k, _ABSENT) != flat_b.get(k, _ABSENT))


def describe_differences(before: Mapping[str, Any], now: Mapping[str, Any], labels=("recorded", "now")) -> str:
  """'optim.learning_rate: 0.05 (recorded) vs 0.07 (now); ...' for every differing key."""
  flat_before, flat_now = _leaves(before), _leaves(now)

  def shown(flat: Mapping[str, Any], key: str) -> str:
    return repr(flat[key]) if key in flat else "absent"

  return "; ".join(f"{k}: {shown(flat_before, k)} ({labels[0]}) vs {shown(flat_now, k)} ({labels[1]})"
                   for k in differing_keys(before, now))


_ABSENT = object()


def model_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The JSON model spec ({'name', 'num_classes', 'norm', 'compute_dtype', 'overrides'}) that
  `models.model_from_spec` builds; the input shape comes from the dataset (image_size, number of channels)."""
  overrides: dict[str, Any] = {
      "width_multiplier": float(config.model.width_multiplier),
      "input_shape": [config.dataset.image_size, config.dataset.image_size, len(config.dataset.mean)],
  }
  if config.model.norm == "batch":
    overrides["batch_norm_scale_init"] = float(config.model.batch_norm_scale_init)
  return {"name": config.model.name, "num_classes": config.dataset.num_classes, "norm": config.model.norm,
          "compute_dtype": config.model.compute_dtype, "overrides": overrides}
