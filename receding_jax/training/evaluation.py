"""Which step of a checkpoint directory to use, and how good any checkpoint the project writes is on a split.

`choose_step` resolves ``best`` / ``latest`` / a step number for a checkpoint directory, with the reason in
words: ``best`` is the pipeline's choice (`prune.source = 'best'`): among the kept steps, the highest
validation accuracy that the run logged in its ``metrics.jsonl`` (the workdir is the checkpoint directory's
parent), ties the later step; a run that logged no validation accuracy for a kept step gets the newest step,
and the reason says so. `evaluate` measures accuracy and loss of a chosen step on one split with the data
config of its run (the nearest ``config.json`` above the checkpoint, or a config file given), beside its
parameters and MACs. Used by ``python -m receding_jax.evaluate`` and ``python -m receding_jax.prune_checkpoint``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from receding_jax import pruning
from receding_jax.errors import InputError
from receding_jax.training import checkpointing, loop, model_specs, plots, splits
from receding_jax.training import workdir as wd
from receding_jax.training.config import ConfigError, default_config

CHOICES = ("best", "latest")


def _kept_steps(checkpoint_dir: wd.PathLike) -> list[int]:
  """The steps saved in `checkpoint_dir`, oldest first; InputError when there is none."""
  directory = wd.path(checkpoint_dir)
  if not directory.is_dir():
    raise InputError(f"checkpoint_dir {checkpoint_dir} does not exist")
  manager = checkpointing.make_manager(directory, create=False)
  steps = sorted(manager.all_steps())
  manager.close()
  if not steps:
    raise InputError(f"{checkpoint_dir} holds no checkpoint step")
  return steps


def choose_step(checkpoint_dir: wd.PathLike, which: int | str = "best") -> tuple[int, str]:
  """(step, why) of `which` ('best', 'latest' or a step number) among the steps kept in `checkpoint_dir`;
  InputError for another `which` or a step that is not kept."""
  steps = _kept_steps(checkpoint_dir)
  text = str(which).strip()
  if text.isdigit():
    if int(text) not in steps:
      raise InputError(f"no checkpoint step {text} in {checkpoint_dir} (kept steps: {steps})")
    return int(text), "the step asked for"
  if text not in CHOICES:
    raise InputError(f"--step must be best, latest or a step number, got {which!r}")
  if len(steps) == 1:
    return steps[0], "its only step"
  if text == "latest":
    return steps[-1], f"the newest of the kept steps {steps}"
  epochs = plots.last_per_epoch(wd.read_metrics(wd.path(checkpoint_dir).parent))
  scored = [e for e in epochs if e.get("step") in steps and "validation_accuracy" in e]
  if not scored:
    return steps[-1], (f"the newest of the kept steps {steps}: the run recorded no validation accuracy for them, "
                       "so 'best' falls back to the latest")
  best = max(scored, key=lambda e: (e["validation_accuracy"], e["step"]))
  return best["step"], (f"the best validation accuracy ({best['validation_accuracy']:.4f}, epoch {best['epoch']}) "
                        f"among kept steps {steps}")


def load_config_file(path: wd.PathLike) -> ml_collections.ConfigDict:
  """The config of a config file (``configs/NAME.py`` with ``get_config()``); InputError when unreadable."""
  if not os.path.isfile(path):
    raise InputError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise InputError(f"config file {path} has no get_config()")
  return module.get_config()


def run_config(checkpoint_dir: wd.PathLike) -> tuple[ml_collections.ConfigDict, str]:
  """(config, where it was read) of the run that wrote `checkpoint_dir` (`workdir.config_of_checkpoints`),
  over the defaults for keys it predates."""
  found = wd.config_of_checkpoints(checkpoint_dir)
  if found is None:
    raise InputError(f"no config.json in {checkpoint_dir} or the two folders above it: give the run's config "
                     "with --config")
  config = default_config()
  config.unlock()
  config.update(found[0])
  return config, os.fspath(found[1])


def evaluate(checkpoint_dir: wd.PathLike, split: str = "test", step: int | str = "best",
             config_file: wd.PathLike | None = None) -> dict[str, Any]:
  """Accuracy and loss on `split` ('train', 'validation', 'test') of step `step` (`choose_step`) of the
  checkpoint in `checkpoint_dir`, pruned or not, with its parameters and MACs (one input), the step, why it
  was chosen and which config gave the data."""
  if split not in splits.ROLES:
    raise InputError(f"--split must be one of {', '.join(splits.ROLES)}, got {split!r}")
  chosen, why = choose_step(checkpoint_dir, step)
  if config_file is not None:
    config, config_source = load_config_file(config_file), os.fspath(config_file)
  else:
    config, config_source = run_config(checkpoint_dir)
  if split == "validation" and config.dataset.validation_examples <= 0:
    raise ConfigError(f"the config of {checkpoint_dir} ({config_source}) carves no validation split "
                      "(dataset.validation_examples = 0)")
  state, spec, _ = checkpointing.read_step(checkpoint_dir, chosen)
  variables = {k: state[k] for k in ("params", "batch_stats") if k in state}
  metrics = loop.evaluate_variables(config, spec, variables, roles=(split,))
  model = model_specs.build_model(spec)
  return {"checkpoint_dir": os.fspath(checkpoint_dir), "step": chosen, "why": why, "config": config_source,
          "split": split, "examples": int(metrics[f"{split}_count"]),
          "accuracy": metrics[f"{split}_accuracy"], "loss": metrics[f"{split}_loss"],
          "params": pruning.count_params(variables),
          "macs": pruning.count_macs(model, model_specs.example_inputs(spec), variables=variables)}


def format_evaluation(result: dict[str, Any]) -> str:
  """A markdown table of one evaluation: split, examples, accuracy, loss, parameters, MACs."""
  return "\n".join([
      "| split | examples | accuracy | loss | parameters | MACs (one input) |",
      "|---|---:|---:|---:|---:|---:|",
      f"| {result['split']} | {result['examples']:,} | {result['accuracy']:.4f} | {result['loss']:.4f} | "
      f"{result['params']:,} | {result['macs']:,} |",
  ])
