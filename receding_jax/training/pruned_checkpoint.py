"""A pruned copy of a checkpoint: the narrow network saved as a new, self-contained checkpoint, and its report.

The output holds step 0 with the narrow model's params and batch_stats and a model spec with the narrowed
layers' widths by path (``pruned``), so it restores and evaluates with `checkpointing.restore` +
`model_specs.build_model` without the original; beside it ``pruning_report.json``
(`workdir.write_report`): parameters, MACs and group widths before and after, the share of the pruned
groups' channels removed, the criterion, and the
seconds spent reading, analysing, slicing, checking the narrow model (`prune_params`' check), counting and
saving. Used
by the experiment's prune phase and by ``python -m receding_jax.prune_checkpoint``.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from receding_jax import pruning
from receding_jax.compile_clock import timed
from receding_jax.errors import InputError
from receding_jax.importances import neuron_importances
from receding_jax.training import checkpointing, evaluation, model_specs, workdir_files
from receding_jax.training import workdir as wd
from receding_jax.training.shrinking import BOOK_KEY, SHRUNK_KEY, kept_whole


def prune_checkpoint(
    checkpoint_dir: wd.PathLike,
    output_dir: wd.PathLike,
    *,
    step: int | str | None = None,
    ratio: float | None = None,
    scope: str = "global",
    min_channels: int = 3,
    mac_reduction: float | None = None,
    threshold: float | None = None,
    channel_multiple: int = 1,
    prune_streams: bool = False,
    model_factory: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    flop_reduction: float | None = None,
) -> dict[str, Any]:
  """Prunes the checkpoint at `checkpoint_dir` (step `step`, default newest) into `output_dir`.

  `step`: a step number; None, the newest (as before); or 'best' / 'latest' (`evaluation.choose_step`, which
  the command line defaults to 'best'), whose reason the report records as 'source_step_reason'.

  `model_factory` ('module:function', returning a Linen module) builds the model instead of the checkpoint's
  own spec (a model outside the zoo); `input_shape` (one input, no batch axis) is the shape pruning traces
  with when the model has no ``input_shape`` attribute. Everything is checked (output free, checkpoint
  readable, criterion valid, the pruned model verified) before anything is written.
  `flop_reduction`: deprecated spelling of `mac_reduction`.
  Returns the report. Multi-host: every process calls it (orbax saves together); only process 0 writes the
  report, atomically and last, so its presence means the pruned checkpoint is complete.
  """
  source_dir, output = _check_request(checkpoint_dir, output_dir, model_factory)
  reason = None
  if isinstance(step, str):
    step, reason = evaluation.choose_step(source_dir, step)
  seconds: dict[str, float] = {}
  with timed(seconds, "read"):
    state, spec, source_step = _read_source(source_dir, step, model_factory, input_shape)
  shrunk = bool(spec.get(SHRUNK_KEY))
  model = model_specs.build_model(spec) if shrunk else model_specs.base_model(spec)
  inputs = model_specs.example_inputs(spec)
  variables = {k: jax.device_get(state[k]) for k in ("params", "batch_stats") if k in state}
  criterion = {"ratio": ratio, "mac_reduction": mac_reduction if flop_reduction is None else flop_reduction,
               "threshold": threshold, "scope": scope, "min_channels": min_channels,
               "channel_multiple": channel_multiple, "prune_streams": prune_streams}  # As given.
  if shrunk:  # Narrowed while it trained: the criterion counts the unshrunk network's channels and MACs.
    macs_now = pruning.count_macs(model, inputs, variables=variables)
    ratio, mac_reduction = unshrunk_criterion(state[BOOK_KEY], ratio, mac_reduction, macs_now)
    _, flop_reduction = unshrunk_criterion(state[BOOK_KEY], None, flop_reduction, macs_now)  # Its old spelling.
  keep_groups = kept_whole(model)
  narrow_model, narrow_variables = pruning.prune_params(
      model, variables, ratio, inputs=inputs, scope=scope, min_channels=min_channels, keep_groups=keep_groups,
      mac_reduction=mac_reduction, threshold=threshold, channel_multiple=channel_multiple,
      prune_streams=prune_streams, seconds=seconds,  # 'analysis', 'slicing', 'check'.
      flop_reduction=flop_reduction,
  )
  # A pruned network is pruned (not shrinking) whatever it came from: pruning it again is refused.
  narrow_spec = {**{k: v for k, v in spec.items() if k != SHRUNK_KEY},
                 "pruned": getattr(narrow_model, "pruned_overrides", {})}
  with timed(seconds, "count"):
    counts = _counts(model, variables, narrow_model, narrow_variables, inputs, prune_streams, keep_groups)
  report = {"source": os.fspath(source_dir), "source_step": source_step, "criterion": criterion, **counts}
  if reason is not None:
    report["source_step_reason"] = reason
  if shrunk:
    report.update(_shrunk_counts(state[BOOK_KEY], counts))
  workdir_files.sync(f"checked {output}")  # No process may see another's new output_dir as taken.
  with timed(seconds, "save"):
    _save(output, narrow_variables, narrow_spec)
  report["seconds"] = seconds
  wd.write_report(output, report)
  return report


def _check_request(checkpoint_dir: wd.PathLike, output_dir: wd.PathLike, model_factory: str | None):
  """(source, output) paths, checked before anything is read: the output free, the source there, the
  factory importable."""
  source_dir, output = wd.path(checkpoint_dir), wd.path(output_dir)
  if not wd.is_empty(output):
    raise FileExistsError(f"output_dir {output_dir} exists and is not empty; refusing to overwrite it")
  if not source_dir.is_dir():
    raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir} does not exist")
  if model_factory is not None:
    model_specs.import_factory(model_factory)  # A bad name fails before the checkpoint is read.
  return source_dir, output


def _read_source(source_dir, step: int | None, model_factory: str | None,
                 input_shape: tuple[int, ...] | None) -> tuple[Any, dict[str, Any], int]:
  """(state, the spec of the model to prune, step) of the source checkpoint; ValueError if already pruned."""
  state, spec, source_step = checkpointing.read_step(source_dir, step)
  if model_factory is not None:
    spec = {"factory": model_factory}
  if input_shape is not None:
    spec = {**spec, "input_shape": list(input_shape)}
  if spec.get("pruned") and not spec.get(SHRUNK_KEY):
    raise InputError(f"{source_dir} holds an already pruned model: prune the original checkpoint again instead")
  return state, spec, source_step


def unshrunk_criterion(book: Any, ratio: float | None, mac_reduction: float | None,
                       macs_now: int) -> tuple[float | None, float | None]:
  """(ratio, mac_reduction) for a network that shrank while it trained (`book`: its `shrinking` bookkeeping)
  that remove what the given ones remove from the unshrunk network, less what shrinking already removed;
  InputError where shrinking removed more than asked."""
  total, removed = int(book["prunable"]), int(book["removed"])
  if ratio is not None:
    count = pruning.criteria.removal_count(ratio, total) - removed
    if count < 0:
      raise InputError(f"ratio {ratio:g} removes {count + removed} of the unshrunk network's {total} prunable "
                       f"channels, but shrinking during training already removed {removed}: prune at a higher ratio")
    ratio = 0.0 if count == 0 else (count - 0.5) / max(total - removed - 1, 1)
  if mac_reduction is not None:
    wanted = (1.0 - mac_reduction) * int(book["macs"])
    if macs_now < wanted:
      raise InputError(f"mac_reduction {mac_reduction:g} keeps {wanted:,.0f} of the unshrunk network's MACs, but "
                       f"shrinking during training already left {macs_now:,}: prune at a higher reduction")
    mac_reduction = 1.0 - wanted / macs_now
  return ratio, mac_reduction


def _save(output: Any, variables: Any, spec: dict[str, Any]) -> None:
  """The pruned network as step 0 of a new checkpoint in `output`."""
  target = checkpointing.make_manager(output)
  checkpointing.save(target, 0, {**variables, "step": np.int64(0)}, spec)
  target.close()


def _shrunk_counts(book: Any, counts: dict[str, Any]) -> dict[str, Any]:
  """What a report of a network that shrank while it trained adds: the unshrunk network's counts and
  what shrinking removed, and the share removed of the unshrunk network's prunable channels."""
  removed = int(book["removed"]) + sum(counts["widths_before"]) - sum(counts["widths_after"])
  return {"shrunk_while_training": {k: int(book[k]) for k in ("prunable", "removed", "macs", "params")},
          "removed_fraction": removed / max(int(book["prunable"]), 1)}


def _counts(model: nn.Module, variables: Any, narrow_model: nn.Module, narrow_variables: Any, inputs: Any,
            prune_streams: bool, keep_groups: tuple[str, ...]) -> dict[str, Any]:
  """Parameters, MACs and the widths of the pruned groups before and after (one trace of each model), and the
  share of those groups' channels removed (beside the criterion's ratio: ties, min_channels and
  channel_multiple move it)."""
  wide, narrow = pruning.trace(model, variables, inputs), pruning.trace(narrow_model, narrow_variables, inputs)
  before = {g.name: g.size for g in pruning.criteria.selected(wide.groups, prune_streams, False, keep_groups)}
  # Every narrow group, and the norms' widths: a group pruned to one channel is no group of the narrow
  # trace at all (a size-1 axis reads as a broadcast), but its norm still says its width.
  after = {**{p: int(np.size(v)) for p, v in neuron_importances(narrow_variables).items()},
           **{g.name: g.size for g in narrow.groups}}
  return {
      "params_before": pruning.count_params(variables),
      "params_after": pruning.count_params(narrow_variables),
      "macs_before": pruning.mac_model(wide.coupling)({}),
      "macs_after": pruning.mac_model(narrow.coupling)({}),
      "groups": list(before),
      "widths_before": list(before.values()),
      "widths_after": [after[name] for name in before],
      "removed_fraction": 1.0 - sum(after[name] for name in before) / max(sum(before.values()), 1),
  }


def report_macs(report: dict[str, Any]) -> tuple[int, int]:
  """(MACs before, after) of a pruning report; reports written before the rename hold them as flops_*."""
  old = "macs_before" not in report
  return report["flops_before" if old else "macs_before"], report["flops_after" if old else "macs_after"]


def format_report(report: dict[str, Any]) -> str:
  """A markdown table of parameters and MACs (multiply-accumulates) before and after pruning."""
  rows = [("parameters", report["params_before"], report["params_after"]),
          ("MACs (one input)", *report_macs(report))]
  lines = ["| | before | after | after / before |", "|---|---:|---:|---:|"]
  lines += [f"| {name} | {b:,} | {a:,} | {a / b:.3f} |" for name, b, a in rows]
  lines.append(f"| prunable channels | {sum(report['widths_before']):,} | {sum(report['widths_after']):,} | "
               f"{sum(report['widths_after']) / sum(report['widths_before']):.3f} |")
  if "shrunk_while_training" in report:  # Before: the network before it shrank while training.
    unshrunk = report["shrunk_while_training"]
    for name, key, after in (("parameters (unshrunk)", "params", report["params_after"]),
                             ("MACs (unshrunk)", "macs", report_macs(report)[1]),
                             ("prunable channels (unshrunk)", "prunable", sum(report["widths_after"]))):
      lines.append(f"| {name} | {unshrunk[key]:,} | {after:,} | {after / max(unshrunk[key], 1):.3f} |")
  return "\n".join(lines)
