"""The training loop: jitted train/eval steps over a device mesh, metrics, checkpoints (the optimiser is
`receding_jax.training.optimizer`).

Layout follows flax's ``examples/imagenet``: the step functions are pure and jitted; `train_and_evaluate`
is the loop. One program runs on one CPU, a GPU node or a multi-host TPU slice: the batch is sharded
along the mesh axis ``data`` and everything else is replicated, so under `jax.jit` with ``Auto`` axes XLA
inserts the collectives and norm statistics are those of the *global* batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from receding_jax.importances import importance_summary, neuron_importances
from receding_jax.models import model_from_spec
from receding_jax.training import checkpointing, input_pipeline, workdir_files
from receding_jax.training.config import model_spec, validate_config
from receding_jax.training.optimizer import (
  effective_penalty_strength,
  learning_rate_schedule,
  make_optimizer,
  penalty_value,
)

DATA_AXIS = "data"
State = dict[str, Any]  # {'params', 'batch_stats', 'opt_state', 'step', 'rng'}: what a checkpoint holds.


# ---------------------------------------------------------------------------------------------------
# State and steps.


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int) -> State:
  """Fresh variables, optimiser state, step 0 and the dropout key, as one checkpointable dict."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  variables = model.init(init_key, jnp.zeros((1, *model.input_shape), jnp.float32), train=False)
  return {
      "params": variables["params"],
      "batch_stats": variables.get("batch_stats", {}),
      "opt_state": tx.init(variables["params"]),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(dropout_key),
  }


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32, [batch]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(
    state: State, batch: Mapping[str, jax.Array], *, model: nn.Module, tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict, penalty_strength: float,
) -> tuple[State, dict[str, jax.Array]]:
  """One SGD step on a global batch; returns the new state and {'loss', 'accuracy', 'penalty'} (the
  penalty term strength x R(params) that `tx` adds the gradient of)."""
  dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state["batch_stats"]}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_key},
    )
    return cross_entropy(logits, batch["label"]).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  step_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {
      **state,
      "params": optax.apply_updates(state["params"], step_updates),
      "batch_stats": updates.get("batch_stats", state["batch_stats"]),
      "opt_state": opt_state,
      "step": state["step"] + 1,
  }
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "penalty": penalty_value(config, penalty_strength, state["params"]),
  }
  return new_state, metrics


def eval_step(state: State, batch: Mapping[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the real (mask 1) examples of a padded global batch: 'loss', 'correct', 'count'."""
  logits = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, batch["image"], train=False)
  mask = batch["mask"]
  return {
      "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
      "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
      "count": jnp.sum(mask),
  }


# ---------------------------------------------------------------------------------------------------
# Devices.


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'data', Auto axis type (XLA adds collectives)."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(mesh: jax.sharding.Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays sharded along the batch axis."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The jitted steps of one run, bound to its model, optimiser and mesh."""

  model: nn.Module
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  train: Callable[[State, dict], tuple[State, dict]]
  evaluate: Callable[[State, dict], dict]
  init: Callable[[], State]
  penalty_strength: float  # The effective strength (see `effective_penalty_strength`).


def make_trainer(
    config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int, mesh: jax.sharding.Mesh | None = None
) -> Trainer:
  """Builds the optimiser and jits init/train/eval with replicated state and a batch sharded over `mesh`
  (default: every device, `make_mesh`)."""
  strength = effective_penalty_strength(config, steps_per_epoch)
  tx = make_optimizer(config, steps_per_epoch, strength)
  mesh = mesh or make_mesh()
  replicated = NamedSharding(mesh, P())
  train = jax.jit(
      lambda s, b: train_step(s, b, model=model, tx=tx, config=config, penalty_strength=strength),
      out_shardings=(replicated, replicated), donate_argnums=0,
  )
  evaluate = jax.jit(lambda s, b: eval_step(s, b, model=model), out_shardings=replicated)
  init = jax.jit(lambda: init_state(model, tx, config.seed), out_shardings=replicated)
  return Trainer(model, tx, mesh, train, evaluate, init, strength)


def evaluate(
    trainer: Trainer, state: State, batches: Iterable[Mapping[str, np.ndarray]], split: str
) -> dict[str, float]:
  """Accuracy and mean loss over every real example of `batches`, named after `split` ('validation',
  'test'): {split_loss, split_accuracy, split_count}."""
  sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for local in batches:
    out = jax.device_get(trainer.evaluate(state, global_batch(trainer.mesh, local)))
    sums = {k: sums[k] + float(out[k]) for k in sums}
  count = max(sums["count"], 1.0)
  return {f"{split}_loss": sums["loss"] / count, f"{split}_accuracy": sums["correct"] / count,
          f"{split}_count": sums["count"]}


def evaluate_splits(
    trainer: Trainer, state: State, config: ml_collections.ConfigDict, shards: Mapping[str, input_pipeline.Shard]
) -> dict[str, float]:
  """`evaluate` on each of `shards` ({split role: shard})."""
  out: dict[str, float] = {}
  for split, shard in shards.items():
    out.update(evaluate(trainer, state, input_pipeline.eval_batches(shard, config), split))
  return out


# ---------------------------------------------------------------------------------------------------
# The loop.


def _check_batch(config: ml_collections.ConfigDict) -> None:
  b = config.optim.batch_size
  for what, n in (("processes", jax.process_count()), ("devices", jax.device_count())):
    if b % n:
      raise ValueError(f"config.optim.batch_size = {b} must divide evenly over the {n} {what}")


def _format_seconds(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _progress(steps: int, epoch: int, epochs: int):
  from tqdm import tqdm  # tfds depends on tqdm; the bar shows only on an interactive terminal.

  return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=None if jax.process_index() == 0 else True,
              leave=False, dynamic_ncols=True)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    spec: Mapping[str, Any] | None = None,
    init_variables: Mapping[str, Any] | None = None,
    skip_damaged_checkpoints: bool = False,
) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final metrics.

  Writes ``config.json``, ``checkpoints/`` (last k and best k epochs), TensorBoard events and
  ``metrics.jsonl`` (one line per epoch). A non-finite loss stops the run with FloatingPointError before
  anything is saved, so the last good checkpoint stays the newest. `spec` (a model spec, default the
  config's) and `init_variables` ({'params', 'batch_stats'} to start from, e.g. a pruned network's)
  serve fine-tuning; a resumed run takes its state from its own checkpoint. A damaged newest checkpoint
  stops the run (DamagedCheckpointError) unless `skip_damaged_checkpoints`, which resumes from the newest
  readable one (see `resume`). The workdir is locked against other runs for the duration.
  """
  validate_config(config)
  _check_batch(config)
  workdir = os.path.abspath(workdir)
  with workdir_files.hold(workdir):
    workdir_files.check_config(workdir, config)
    summary = _train_and_evaluate(config, workdir, spec, init_variables, skip_damaged_checkpoints)
    workdir_files.sync(f"trained {workdir}")  # Every process may now read what process 0 wrote.
    return summary


def resume(
    make_manager: Callable[[], Any], state: State, skip_damaged: bool
) -> tuple[State, Any]:
  """(state restored from the newest readable checkpoint, or `state` if there is none; its manager).

  A damaged newest step raises DamagedCheckpointError and changes nothing, unless `skip_damaged`: then it
  is moved aside (`checkpointing.set_aside`) and the next older step is tried, saying so.
  """
  manager = make_manager()
  while (step := manager.latest_step()) is not None:
    try:
      return checkpointing.restore(manager, target=state)[0], manager
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
  return state, manager


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, spec: Mapping[str, Any] | None,
    init_variables: Mapping[str, Any] | None, skip_damaged: bool,
) -> dict[str, Any]:
  spec = dict(spec or model_spec(config))
  model = model_from_spec(spec)

  pi, pc = jax.process_index(), jax.process_count()
  train_shard = input_pipeline.load_shard(config, "train", pi, pc)
  roles = input_pipeline.evaluation_roles(config)
  eval_shards = {role: input_pipeline.load_shard(config, role, pi, pc) for role in roles}
  # Validation if carved, else test; all at the end (and test every epoch too if asked, for the paper's
  # convention: the best test accuracy over epochs).
  every_epoch = {r: eval_shards[r] for r in roles if r == roles[0] or config.eval_test_every_epoch}
  steps_per_epoch = input_pipeline.steps_per_epoch(train_shard, config.optim.batch_size)
  trainer = make_trainer(config, model, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch)

  def make_manager():
    return checkpointing.make_manager(
        os.path.join(workdir, "checkpoints"), keep_last=config.checkpoint.keep_last,
        keep_best=config.checkpoint.keep_best, best_metric="validation_accuracy",
    )

  state, manager = resume(make_manager, trainer.init(), skip_damaged)
  if manager.latest_step() is None and init_variables is not None:
    replicated = NamedSharding(trainer.mesh, P())
    start = {k: jax.device_put(init_variables[k], replicated) for k in ("params", "batch_stats")}
    if jax.tree.structure(start["params"]) != jax.tree.structure(state["params"]):
      raise ValueError("init_variables do not fit the model of `spec`")
    state = {**state, **start}
  start_step = int(state["step"])
  start_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  if start_step:
    print(f"resuming from step {start_step} (epoch {start_epoch}) in {workdir}", flush=True)
  if start_epoch >= config.optim.num_epochs:
    print(f"the run in {workdir} is already finished", flush=True)
    manager.close()
    return _last_logged_epoch(workdir)

  writer = metric_writers.create_default_writer(workdir, just_logging=pi > 0, asynchronous=False)
  num_epochs = config.optim.num_epochs
  relative = f" (given {config.penalty.strength:g} relative to the paper's schedule)" \
      if config.penalty.relative_to_paper else ""
  print(f"{spec['name']} ({spec['norm']} norm), penalty {config.penalty.kind} strength "
        f"{trainer.penalty_strength:.4g}{relative}, "
        f"{steps_per_epoch} steps/epoch x {num_epochs} epochs, batch {config.optim.batch_size} on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {pc} process(es)", flush=True)
  summary: dict[str, Any] = {}
  run_start = time.perf_counter()
  for epoch in range(start_epoch, num_epochs):
    epoch_start = time.perf_counter()
    step_metrics = []
    bar = _progress(steps_per_epoch, epoch, num_epochs)
    bar.update(skip_steps)
    for local in input_pipeline.train_batches(train_shard, config, epoch, skip_steps):
      state, metrics = trainer.train(state, global_batch(trainer.mesh, local))
      step_metrics.append(metrics)
      bar.update(1)
      if len(step_metrics) % config.log_every_steps == 0:
        _check_finite(step_metrics[-config.log_every_steps :], state, manager)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    bar.close()
    skip_steps = 0
    _check_finite(step_metrics, state, manager)
    step = int(state["step"])
    train_metrics = {f"train_{k}": float(np.mean(v)) for k, v in jax.device_get(_stack(step_metrics)).items()}
    summary = {"epoch": epoch + 1, "step": step, **train_metrics, "learning_rate": float(schedule(step - 1))}
    last = epoch + 1 == num_epochs
    if last:
      summary.update(evaluate_splits(trainer, state, config, eval_shards))
    elif (epoch + 1) % config.eval_every_epochs == 0:
      summary.update(evaluate_splits(trainer, state, config, every_epoch))
    importances = neuron_importances(jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]}))
    summary.update({f"importance_{k}": v for k, v in importance_summary(importances).items()})
    summary["epoch_seconds"] = time.perf_counter() - epoch_start
    if (epoch + 1) % config.checkpoint.every_epochs == 0 or last:
      checkpointing.save(manager, step, state, spec,
                         metrics={"validation_accuracy": summary.get("validation_accuracy", 0.0)})
    _write_epoch(writer, workdir, summary, importances)
    elapsed = time.perf_counter() - run_start
    eta = elapsed / (epoch + 1 - start_epoch) * (num_epochs - epoch - 1)
    print(_epoch_line(summary, num_epochs) + f"  ({summary['epoch_seconds']:.1f} s, ETA {_format_seconds(eta)})",
          flush=True)
  writer.close()
  manager.close()
  return summary


def _last_logged_epoch(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = f.read().splitlines()
  return json.loads(lines[-1]) if lines else {}


def _stack(metrics: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  return {k: jnp.stack([m[k] for m in metrics]) for k in metrics[0]}


def _check_finite(metrics: list[dict[str, jax.Array]], state: State, manager) -> None:
  """FloatingPointError naming the first step whose loss is NaN/Inf and the checkpoint that is kept."""
  losses = np.asarray(jax.device_get(jnp.stack([m["loss"] for m in metrics])))
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    first = int(state["step"]) - len(metrics) + int(bad[0]) + 1
    raise FloatingPointError(
        f"the training loss is {losses[bad[0]]} at step {first}; stopping. The last good checkpoint "
        f"(step {manager.latest_step()}) in {manager.directory} is kept."
    )


def _epoch_line(summary: Mapping[str, Any], num_epochs: int) -> str:
  parts = [f"epoch {summary['epoch']}/{num_epochs}", f"loss {summary['train_loss']:.4f}",
           f"train acc {summary['train_accuracy']:.4f}"]
  for split, short in (("validation", "val"), ("test", "test")):
    if f"{split}_accuracy" in summary:
      parts.append(f"{short} acc {summary[f'{split}_accuracy']:.4f}")
  parts += [f"penalty {summary['train_penalty']:.3g}", f"lr {summary['learning_rate']:.3g}",
            f"importances <0.05 {summary['importance_fraction_below_0.05']:.1%}",
            f">0.5 {summary['importance_fraction_above_0.5']:.1%}"]
  return "  ".join(parts)


def _write_epoch(writer, workdir: str, summary: Mapping[str, Any], importances: Mapping[str, Any]) -> None:
  """Scalars and importance histograms to TensorBoard; one JSON line (with a 100-bin histogram of all
  importances on [0, 1], larger |gamma| counted in the last bin) to metrics.jsonl."""
  step = summary["step"]
  writer.write_scalars(step, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
  values = np.concatenate([np.ravel(v) for v in importances.values()]) if importances else np.zeros(0)
  writer.write_histograms(step, {"importances/all": values})
  counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=100, range=(0.0, 1.0))
  path = os.path.join(workdir, "metrics.jsonl")
  previous = ""
  if workdir_files.is_writer() and os.path.exists(path):
    with open(path) as f:
      previous = f.read()
  # Rewritten whole and atomically: a kill never leaves half a line.
  workdir_files.write_text(path, previous + json.dumps({**summary, "importance_histogram": counts.tolist()}) + "\n")

