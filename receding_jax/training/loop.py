"""The training loop: epochs of chunked steps (`steps`) over the run's data (`data`), evaluation, checkpoints,
metrics (`metric_writer`, the workdir's files) and resumption."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from receding_jax import compile_clock, pruning
from receding_jax.importances import importance_summary, neuron_importances
from receding_jax.training import (
    checkpointing,
    compile_cache,
    console,
    data,
    metric_writer,
    model_specs,
    plots,
    shrinking,
    splits,
    workdir,
    workdir_files,
)
from receding_jax.training.config import ConfigError, model_spec, validate_config
from receding_jax.training.optimizer import learning_rate_schedule
from receding_jax.training.steps import State, Trainer, make_mesh, make_trainer


def evaluate(trainer: Trainer, state: State, feed: data.Feed, split: str) -> dict[str, float]:
  """Accuracy and mean loss over every real example of `feed`, named after `split` ('validation',
  'test'): {split_loss, split_accuracy, split_count}."""
  sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  console.note_first_compile(trainer.evaluate, f"the evaluation of {type(trainer.model).__name__}")
  variables = {k: state[k] for k in ("params", "batch_stats")}  # One compiled program, whatever else `state` holds.
  for chunk in feed.chunks():
    out = jax.device_get(trainer.evaluate(variables, chunk))
    sums = {k: sums[k] + float(out[k]) for k in sums}
  count = max(sums["count"], 1.0)
  return {f"{split}_loss": sums["loss"] / count, f"{split}_accuracy": sums["correct"] / count,
          f"{split}_count": sums["count"]}


def evaluate_feeds(trainer: Trainer, state: State, feeds: Mapping[str, data.Feed]) -> dict[str, float]:
  """`evaluate` on each of `feeds` ({split role: feed})."""
  out: dict[str, float] = {}
  for role, feed in feeds.items():
    out.update(evaluate(trainer, state, feed, role))
  return out


def evaluate_variables(config: ml_collections.ConfigDict, spec: Mapping[str, Any],
                       variables: Mapping[str, Any], roles: tuple[str, ...] | None = None) -> dict[str, float]:
  """{'params', 'batch_stats'} of the model of `spec` evaluated on the split `roles` of `config` (default:
  the validation (if carved) and test splits)."""
  roles = splits.evaluation_roles(config) if roles is None else tuple(roles)
  shards = data.load_splits(config, roles)
  placement = data.choose_placement(config, shards)
  mesh = make_mesh()
  feeds = {r: data.eval_feed(config, shards[r], mesh, placement, r) for r in roles}
  trainer = make_trainer(config, model_specs.build_model(spec), 1, mesh, prepare_eval=feeds[roles[0]].prepare)
  state = jax.device_put({k: variables[k] for k in ("params", "batch_stats")}, NamedSharding(mesh, P()))
  return evaluate_feeds(trainer, state, feeds)


def _check_batch(config: ml_collections.ConfigDict) -> None:
  b = config.optim.batch_size
  for what, n in (("processes", jax.process_count()), ("devices", jax.device_count())):
    if b % n:
      raise ConfigError(f"config.optim.batch_size = {b} must divide evenly over the {n} {what}")


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir_path: str,
    *,
    spec: Mapping[str, Any] | None = None,
    init_variables: Mapping[str, Any] | None = None,
    skip_damaged_checkpoints: bool = False,
    label: str = "",
) -> dict[str, Any]:
  """Trains `config` in `workdir_path`, resuming from its newest checkpoint; returns the final metrics.

  Writes ``config.json``, ``checkpoints/`` (last k and best k epochs), TensorBoard events and
  ``metrics.jsonl`` (one line per epoch). A non-finite loss stops the run with FloatingPointError before
  anything is saved, so the last good checkpoint stays the newest. `spec` (a model spec, default the
  config's) and `init_variables` ({'params', 'batch_stats'} to start from, e.g. a pruned network's)
  serve fine-tuning; a resumed run takes its state from its own checkpoint. A damaged newest checkpoint
  stops the run (DamagedCheckpointError) unless `skip_damaged_checkpoints`, which resumes from the newest
  readable one (see `resume`). The workdir is locked against other runs for the duration. `label` heads
  the run's plan line ('fine-tune 1 of 3 (pruned 0.3): ').
  """
  validate_config(config)
  _check_batch(config)
  compile_cache.enable(config)
  workdir_path = str(workdir.path(workdir_path))
  splits.check_available(config)
  with workdir_files.hold(workdir_path):
    workdir_files.check_config(workdir_path, config)
    summary = _train_and_evaluate(config, workdir_path, spec, init_variables, skip_damaged_checkpoints, label)
    workdir_files.sync(f"trained {workdir_path}")  # Every process may now read what process 0 wrote.
    return summary


def resume(make_manager: Callable[[], Any], target: State | None, skip_damaged: bool) -> tuple[State | None, Any]:
  """(state restored from the newest readable checkpoint into `target`'s structure and placement, or None
  if there is none; its manager).

  A damaged newest step raises DamagedCheckpointError and changes nothing, unless `skip_damaged`: then it
  is moved aside (`checkpointing.set_aside`) and the next older step is tried, saying so.
  """
  manager = make_manager()
  while (step := manager.latest_step()) is not None:
    try:
      return checkpointing.restore(manager, target=target)[0], manager
    except checkpointing.DamagedCheckpointError as e:
      if not skip_damaged:
        older = [s for s in manager.all_steps() if s < step]
        raise checkpointing.DamagedCheckpointError(
            f"{e}; nothing was changed (older steps {older} are kept); to resume from the newest readable "
            "step, rerun with --skip_damaged_checkpoints") from None
      moved = checkpointing.set_aside(manager, step)
      print(f"skipping damaged checkpoint step {step} (moved to {moved}): {e}", flush=True)
      manager.close()
      manager = make_manager()
  return None, manager


@dataclasses.dataclass
class _Run:
  """What changes when a run shrinks: its model spec, trainer and state, and the shrink bookkeeping
  (`shrinking`; None when the run does not shrink)."""

  spec: dict[str, Any]
  trainer: Trainer
  state: State
  book: dict[str, np.ndarray] | None

  def saved(self) -> State:
    """The state a checkpoint holds: the train state and, when shrinking, its bookkeeping."""
    return self.state if self.book is None else {**self.state, shrinking.BOOK_KEY: self.book}


def _start(config: ml_collections.ConfigDict, build: Callable[[Mapping[str, Any]], Trainer], spec: dict[str, Any],
           manager_factory, init_variables, skip_damaged) -> tuple[_Run, Any]:
  """The run's start: its newest checkpoint (restored into the shapes of the spec it saved: a shrunk
  network's; nothing is initialised), else `init_variables` with a fresh optimiser state, else a fresh init."""
  seen: dict[str, Any] = {}

  def target_of(saved_spec: dict[str, Any]) -> State:
    seen["spec"] = saved_spec
    target = build(saved_spec).abstract_state()
    if config.shrink.enabled:
      target[shrinking.BOOK_KEY] = shrinking.abstract_book({k: target[k] for k in ("params", "batch_stats")})
    return target

  state, manager = resume(manager_factory, target_of, skip_damaged)
  if state is not None:
    spec = seen["spec"]
    return _Run(spec, build(spec), state, state.pop(shrinking.BOOK_KEY, None)), manager
  trainer = build(spec)
  if init_variables is None:
    print("initialising the model...", flush=True)
    state = trainer.init()
  else:
    replicated = NamedSharding(trainer.mesh, P())
    start = {k: jax.device_put(init_variables[k], replicated) for k in ("params", "batch_stats")}
    if jax.tree.structure(start["params"]) != jax.tree.structure(trainer.abstract_state()["params"]):
      raise ValueError("init_variables do not fit the model of `spec`")
    state = trainer.start(start["params"], start["batch_stats"])
  book = None
  if config.shrink.enabled:
    variables = jax.device_get({k: state[k] for k in ("params", "batch_stats")})
    book = shrinking.new_book(spec, variables, config.prune.prune_streams)
    _know_macs(spec, book["macs"])  # Counted by the same trace.
  return _Run(spec, trainer, state, book), manager


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir_path: str, spec: Mapping[str, Any] | None,
    init_variables: Mapping[str, Any] | None, skip_damaged: bool, label: str,
) -> dict[str, Any]:
  spec = dict(spec or model_spec(config))
  placement, mesh, train_feed, eval_feeds, every_epoch = _feeds(config)
  steps_per_epoch, first = train_feed.steps, next(iter(eval_feeds.values()))
  build = lambda s: make_trainer(config, model_specs.build_model(s), steps_per_epoch, mesh,
                                 prepare=train_feed.prepare, prepare_eval=first.prepare)
  manager_factory = lambda: checkpointing.make_manager(
      workdir.checkpoint_dir(workdir_path), keep_last=config.checkpoint.keep_last,
      keep_best=config.checkpoint.keep_best, best_metric="validation_accuracy")
  run, manager = _start(config, build, spec, manager_factory, init_variables, skip_damaged)
  start_step = int(run.state["step"])
  start_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  if start_step:
    print(f"resuming from step {start_step} (epoch {start_epoch}) in {workdir_path}", flush=True)
  if start_epoch >= config.optim.num_epochs:
    manager.close()
    return _finished_metrics(workdir_path, run.trainer, run.state, start_epoch, eval_feeds)
  print(label + console.run_line(config, run.spec, run.trainer, steps_per_epoch, placement), flush=True)
  writer = metric_writer.open_writer(workdir_path, active=jax.process_index() == 0)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  summary: dict[str, Any] = {}
  run_start = time.perf_counter()
  for epoch in range(start_epoch, config.optim.num_epochs):
    last = epoch + 1 == config.optim.num_epochs
    with compile_clock.Clock() as clock:  # The epoch's wall time, and how much of it was compiling.
      cost = _cost(run)  # Of the network this epoch trains (before any shrink at its end).
      run.state, train_metrics = _train_epoch(run.trainer, run.state, train_feed, epoch, config.optim.num_epochs,
                                               skip_steps, manager)
      step = int(run.state["step"])
      summary = {"epoch": epoch + 1, "step": step, **train_metrics, "learning_rate": float(schedule(step - 1)),
                 **cost}
      if last or (epoch + 1) % config.eval_every_epochs == 0:
        summary.update(evaluate_feeds(run.trainer, run.state, eval_feeds if last else every_epoch))
      importances = neuron_importances(jax.device_get({"params": run.state["params"],
                                                       "batch_stats": run.state["batch_stats"]}))
      summary.update({f"importance_{k}": v for k, v in importance_summary(importances).items()})
      if shrinking.is_check(config, epoch + 1):
        summary.update(_shrink(config, build, run, importances, summary, eval_feeds if last else every_epoch))
    skip_steps = 0
    summary.update(epoch_seconds=clock.seconds, compile_seconds=clock.compile_seconds)
    # The epoch's line first, then its checkpoint: killed between the two, the rerun resumes from the older
    # checkpoint and logs the epoch again (readers keep an epoch's last line); never a checkpoint that
    # metrics.jsonl does not know, which a rerun would take as finished.
    _record_epoch(writer, workdir_path, summary, importances)
    if (epoch + 1) % config.checkpoint.every_epochs == 0 or last:
      checkpointing.save(manager, step, run.saved(), run.spec,
                         metrics={"validation_accuracy": summary.get("validation_accuracy", 0.0)})
    _report_epoch(config, workdir_path, summary, time.perf_counter() - run_start, epoch + 1 - start_epoch)
  writer.close()
  manager.close()
  return summary


def _feeds(config: ml_collections.ConfigDict) -> tuple[str, jax.sharding.Mesh, data.Feed, dict[str, data.Feed],
                                                      dict[str, data.Feed]]:
  """(data placement, the mesh, the training feed, the evaluation feeds by role, those evaluated every epoch): the
  validation split if carved, else test, every epoch; all at the end (test every epoch too if asked, for
  the paper's convention: the best test accuracy over epochs)."""
  roles = splits.evaluation_roles(config)
  shards = data.load_splits(config, ("train", *roles))
  placement = data.choose_placement(config, shards)
  mesh = make_mesh()
  eval_feeds = {r: data.eval_feed(config, shards[r], mesh, placement, r) for r in roles}
  every_epoch = {r: eval_feeds[r] for r in roles if r == roles[0] or config.eval_test_every_epoch}
  return placement, mesh, data.train_feed(config, shards["train"], mesh, placement), eval_feeds, every_epoch


#: Multiply-accumulates of one input by model spec (its JSON): traced once per spec, unless a trace that
#: already counted them (a shrink's, the shrink bookkeeping's) recorded them with `_know_macs`.
_MACS: dict[str, int] = {}


def _know_macs(spec: Mapping[str, Any], macs: int) -> None:
  _MACS[json.dumps(spec, sort_keys=True)] = int(macs)


def _cost(run: _Run) -> dict[str, int]:
  """{'params', 'macs'} of the run's network: parameters, and multiply-accumulates of one input."""
  params = int(sum(np.size(x) for x in jax.tree.leaves(run.state["params"])))
  key = json.dumps(run.spec, sort_keys=True)
  if key not in _MACS:
    _know_macs(run.spec, pruning.count_macs(model_specs.build_model(run.spec), model_specs.example_inputs(run.spec)))
  return {"params": params, "macs": _MACS[key]}


def _shrink(config: ml_collections.ConfigDict, build: Callable[[Mapping[str, Any]], Trainer], run: _Run,
            importances: Mapping[str, Any], summary: Mapping[str, Any], feeds: Mapping[str, data.Feed]
            ) -> dict[str, Any]:
  """One shrink check at an epoch's end (`shrinking`): counts updated; the channels that stayed receded
  removed from `run` (spec, trainer, state laid out again over the mesh); the shrink's line. Returns what
  the epoch's record gains: the evaluation of the narrow network (what its checkpoint holds) and the
  shrink's channels and before/after metrics."""
  run.book = {**run.book, "counts": shrinking.counted(run.book["counts"], importances, config.shrink.threshold)}
  if not shrinking.due(config, run.book):
    return {}
  host = jax.device_get({k: run.state[k] for k in ("params", "batch_stats", "opt_state")})
  done = shrinking.shrink_state(config, run.spec, {k: host[k] for k in ("params", "batch_stats")},
                                host["opt_state"], importances, run.book)
  if done is None:
    return {}
  measured = [f"{r}_{m}" for r in feeds for m in ("loss", "accuracy", "count")]
  before = {k: summary[k] for k in measured if k in summary} or evaluate_feeds(run.trainer, run.state, feeds)
  trainer = build(done.spec)
  replicated = NamedSharding(trainer.mesh, P())
  state = {**run.state, **done.variables, "opt_state": done.opt_state}
  run.spec, run.trainer, run.book = done.spec, trainer, done.book
  _know_macs(done.spec, done.counts["macs_after"])  # The shrink's trace counted them (mac_model, exact).
  run.state = jax.device_put({k: state[k] for k in ("params", "batch_stats", "opt_state", "step", "rng")}, replicated)
  after = evaluate_feeds(trainer, run.state, {r: f for r, f in feeds.items() if f"{r}_loss" in before})
  print(console.shrink_line(int(summary["epoch"]), done.removed, done.counts, before, after), flush=True)
  return {**after, "shrink_removed_channels": sum(done.removed.values()),
          "shrink_params_after": done.counts["params_after"], "shrink_macs_after": done.counts["macs_after"],
          **{f"shrink_before_{k}": v for k, v in before.items()}}


def _report_epoch(config: ml_collections.ConfigDict, workdir_path: str, summary: Mapping[str, Any],
                  elapsed: float, epochs_done: int) -> None:
  """Prints the epoch's line, and on process 0 the collapse warning (`console.collapse_warning`, over the
  epochs of metrics.jsonl) at the epoch where it first holds."""
  print(console.epoch_line(summary, config.optim.num_epochs, elapsed, epochs_done), flush=True)
  if jax.process_index() != 0:
    return
  epochs = plots.last_per_epoch(workdir.read_metrics(workdir_path))
  warning = lambda lines: console.collapse_warning(lines, config.dataset.num_classes, config.penalty.kind,
                                                   config.penalty.relative_to_paper)
  if (message := warning(epochs)) is not None and warning(epochs[:-1]) is None:
    print(message, flush=True)


def _finished_metrics(workdir_path: str, trainer: Trainer, state: State, epoch: int,
                      feeds: Mapping[str, data.Feed]) -> dict:
  """The final metrics of a finished run: its last epoch line; where the final checkpoint has none (a run
  killed between saving and logging, when saving came first), it is evaluated and its line written."""
  print(f"the run in {workdir_path} is already finished", flush=True)
  last = workdir.last_metrics(workdir_path)
  step = int(state["step"])
  if last.get("step") == step:
    return last
  print(f"the final checkpoint (step {step}) was never logged; evaluating it", flush=True)
  variables = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
  importances = neuron_importances(variables)
  summary = {"epoch": epoch, "step": step, **evaluate_feeds(trainer, state, feeds),
             **{f"importance_{k}": v for k, v in importance_summary(importances).items()}}
  writer = metric_writer.open_writer(workdir_path, active=jax.process_index() == 0)
  _record_epoch(writer, workdir_path, summary, importances)
  writer.close()
  return summary


#: Train metrics are fetched (and the loss checked) once this many steps are pending: fetching every
#: step would stop the host from preparing the next batch while the devices compute.
FETCH_EVERY_STEPS = 50


def _train_epoch(trainer: Trainer, state: State, feed: data.Feed, epoch: int, num_epochs: int, skip: int,
                 manager) -> tuple[State, dict[str, float]]:
  """Trains the chunks of one epoch; returns the state and the epoch's mean train metrics. Metrics stay on
  the devices until FETCH_EVERY_STEPS steps are pending; a non-finite loss then stops the run, naming its
  step (`_check_finite`), before anything is saved."""
  bar = console.progress(feed.steps, epoch, num_epochs)
  bar.update(skip)
  step = epoch * feed.steps + skip
  pending: list[dict[str, jax.Array]] = []
  fetched: list[dict[str, np.ndarray]] = []
  console.note_first_compile(trainer.train, f"the train step of {type(trainer.model).__name__}")

  def fetch():
    got = {k: np.concatenate([np.asarray(m[k]) for m in jax.device_get(pending)]) for k in pending[0]}
    _check_finite(got["loss"], step, manager)
    fetched.append(got)
    bar.update(len(got["loss"]))
    bar.set_postfix(loss=f"{float(got['loss'][-1]):.3f}")
    pending.clear()

  for chunk in feed.chunks(epoch, skip):
    state, metrics = trainer.train(state, chunk)
    pending.append(metrics)
    step += int(chunk["label"].shape[0])
    if sum(int(m["loss"].shape[0]) for m in pending) >= FETCH_EVERY_STEPS:
      fetch()
  if pending:
    fetch()
  bar.close()
  stacked = {k: np.concatenate([m[k] for m in fetched]) for k in fetched[0]}
  return state, {f"train_{k}": float(np.mean(v)) for k, v in stacked.items()}


def _check_finite(losses: np.ndarray, step: int, manager) -> None:
  """FloatingPointError naming the first step whose loss is NaN/Inf and the checkpoint that is kept;
  `step` is the step count after the last of `losses`."""
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    first = step - len(losses) + int(bad[0]) + 1
    raise FloatingPointError(
        f"the training loss is {losses[bad[0]]} at step {first}; stopping. The last good checkpoint "
        f"(step {manager.latest_step()}) in {manager.directory} is kept."
    )


def _record_epoch(writer, workdir_path: str, summary: Mapping[str, Any], importances: Mapping[str, Any]) -> None:
  """Scalars and importance histograms to TensorBoard; one JSON line (with a 100-bin histogram of all
  importances on [0, 1], larger |gamma| counted in the last bin) to metrics.jsonl."""
  step = summary["step"]
  writer.write_scalars(step, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
  values = np.concatenate([np.ravel(v) for v in importances.values()]) if importances else np.zeros(0)
  writer.write_histograms(step, {"importances/all": values})
  counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=100, range=(0.0, 1.0))
  workdir.append_metrics(workdir_path, {**summary, "importance_histogram": counts.tolist()})
