"""What a run prints: its plan, a progress bar per epoch (interactive terminals only), one line per epoch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections


def format_seconds(seconds: float) -> str:
  """'1h02m03s' or '2m03s'."""
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_line(config: ml_collections.ConfigDict, spec: Mapping[str, Any], trainer, steps_per_epoch: int,
             placement: str) -> str:
  """The plan: model, penalty (effective strength), schedule, batch, devices, processes, data placement."""
  relative = f" (given {config.penalty.strength:g} relative to the paper's schedule)" \
      if config.penalty.relative_to_paper else ""
  dtype = spec.get("compute_dtype", "float32")
  return (f"{spec['name']} ({spec['norm']} norm, {dtype}), penalty {config.penalty.kind} strength "
          f"{trainer.penalty_strength:.4g}{relative}, {steps_per_epoch} steps/epoch x {config.optim.num_epochs} "
          f"epochs, batch {config.optim.batch_size} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), {jax.process_count()} process(es), data {placement}")


def progress(steps: int, epoch: int, epochs: int):
  """A tqdm bar for one epoch, shown on process 0's interactive terminal only."""
  from tqdm import tqdm

  return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=None if jax.process_index() == 0 else True,
              leave=False, dynamic_ncols=True)


def epoch_line(summary: Mapping[str, Any], num_epochs: int, elapsed: float, epochs_done: int) -> str:
  """One epoch's line: losses, accuracies, penalty, learning rate, importances, its time and the ETA."""
  parts = [f"epoch {summary['epoch']}/{num_epochs}", f"loss {summary['train_loss']:.4f}",
           f"train acc {summary['train_accuracy']:.4f}"]
  for split, short in (("validation", "val"), ("test", "test")):
    if f"{split}_accuracy" in summary:
      parts.append(f"{short} acc {summary[f'{split}_accuracy']:.4f}")
  parts += [f"penalty {summary['train_penalty']:.3g}", f"lr {summary['learning_rate']:.3g}",
            f"importances <0.05 {summary['importance_fraction_below_0.05']:.1%}",
            f">0.5 {summary['importance_fraction_above_0.5']:.1%}"]
  if "macs" in summary:
    parts.append(f"params {summary['params']:,} MACs {count_text(summary['macs'])}")
  eta = elapsed / max(epochs_done, 1) * (num_epochs - summary["epoch"])
  compiling = summary.get("compile_seconds", 0.0)
  spent = f"{summary['epoch_seconds']:.1f} s" + (f", {compiling:.1f} s of it compiling" if compiling >= 0.05 else "")
  return "  ".join(parts) + f"  ({spent}, ETA {format_seconds(eta)})"


def count_text(n: float) -> str:
  """'1.25G', '340.0M', '12.3k' or '17'."""
  for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= size:
      return f"{n / size:.2f}{unit}"
  return f"{n:g}"


def shrink_line(epoch: int, removed: Mapping[str, int], counts: Mapping[str, int],
                before: Mapping[str, float], after: Mapping[str, float]) -> str:
  """A shrink's line: the groups and channels removed, params and MACs before -> after, and the change of
  validation (else test) loss and accuracy it caused (`before`, `after`: evaluation metrics)."""
  split = "validation" if "validation_loss" in before else "test"
  shown = ", ".join(f"{name} -{n}" for name, n in list(removed.items())[:4])
  more = f", {len(removed) - 4} more" if len(removed) > 4 else ""
  loss, acc = f"{split}_loss", f"{split}_accuracy"
  return (f"shrink after epoch {epoch}: removed {sum(removed.values())} channels from {len(removed)} group(s) "
          f"({shown}{more}); params {counts['params_before']:,} -> {counts['params_after']:,}, MACs "
          f"{count_text(counts['macs_before'])} -> {count_text(counts['macs_after'])}; {split} loss "
          f"{before[loss]:.4f} -> {after[loss]:.4f}, accuracy {before[acc]:.4f} -> {after[acc]:.4f}; "
          "the narrow train step compiles once")


def note_first_compile(jitted: Any, what: str) -> None:
  """Says 'compiling WHAT...' before the first call of `jitted` in this process (nothing is cached for it
  yet), so that a long compile is never a silence; process 0 only."""
  cache_size = getattr(jitted, "_cache_size", None)
  if jax.process_index() == 0 and cache_size is not None and cache_size() == 0:
    print(f"compiling {what}...", flush=True)


def phase_line(record: Mapping[str, Any]) -> str:
  """One phase's line: 'train: 28.8 s = compile 6.1 s (train_chunk 4.2 s, ...) + run 22.7 s', and its
  parts ('check 1.1 s') where the record has them."""
  head = f"{record['phase']}: {record['seconds']:.1f} s = compile {record['compile_seconds']:.1f} s"
  named = sorted(record.get("compiled", {}).items(), key=lambda kv: -kv[1])
  if named:
    shown = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in named[:3])
    head += f" ({shown}{f', {len(named) - 3} more' if len(named) > 3 else ''})"
  head += f" + run {record['run_seconds']:.1f} s"
  parts = record.get("parts", {})
  return head + ("; " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) if parts else "")


#: A penalised run has collapsed when this many evaluated epochs in a row sit at chance accuracy (at most
#: 1/num_classes + CHANCE_MARGIN, on validation, else test) while its mean importance has fallen to at most
#: COLLAPSED_MEAN of the first epoch's (an L1 quickstart at strength 0.02: validation 0.11, 0.10, 0.10 at
#: epochs 4-6 while the mean importance fell 0.89 -> 0.38 -> 0.21 -> 0.09).
COLLAPSE_EPOCHS = 3
CHANCE_MARGIN = 0.05
COLLAPSED_MEAN = 0.5


def collapse_warning(epochs: list[Mapping[str, Any]], num_classes: int, penalty_kind: str,
                     relative_to_paper: bool = False) -> str | None:
  """The warning for a penalised run whose accuracy sits at chance (see COLLAPSE_EPOCHS) while its importances
  collapse: the penalty strength is too high for the schedule; it names the key to lower. None otherwise
  (also for an unpenalised run, e.g. a fine-tune). `epochs`: the epoch lines of metrics.jsonl, in order."""
  if penalty_kind == "none":
    return None
  chance, streak = 1.0 / num_classes, []
  start = epochs[0].get("importance_mean", 0.0) if epochs else 0.0
  for e in epochs:
    accuracy = _accuracy(e)
    if accuracy is None:
      continue  # Not evaluated that epoch.
    streak = [*streak, e] if accuracy <= chance + CHANCE_MARGIN else []
    mean = e.get("importance_mean", start)
    if len(streak) >= COLLAPSE_EPOCHS and 0 < start and mean <= COLLAPSED_MEAN * start:
      first, key = streak[0]["epoch"], "penalty.strength"
      key += " (given relative to the paper's schedule: penalty.relative_to_paper)" if relative_to_paper else ""
      split = "validation" if "validation_accuracy" in e else "test"
      return (f"warning: {split} accuracy at chance (1/{num_classes}) for epochs {first}-{e['epoch']} "
              f"({', '.join(f'{_accuracy(x):.2f}' for x in streak)}) while the mean importance fell from {start:.2f} "
              f"to {mean:.2f}: the {penalty_kind} penalty is too strong for this schedule; lower {key}")
  return None


def _accuracy(epoch: Mapping[str, Any]) -> float | None:
  """An epoch line's validation accuracy, else its test accuracy, else None (not evaluated)."""
  return epoch.get("validation_accuracy", epoch.get("test_accuracy"))


def outputs_line(workdir: str) -> str:
  """The run's last line: where its results, plots and TensorBoard events are."""
  w = workdir.rstrip("/")
  return (f"results: {w}/results.md (and results.json); plots: {w}/plots/; TensorBoard: tensorboard --logdir {w} "
          "(pip install tensorboard)")
