"""The jitted steps: one SGD step, one evaluation batch, and many of either per dispatch (`jax.lax.scan`).

Layout follows flax's ``examples/imagenet``: the step functions are pure; `loop` runs them. One program
runs on one CPU, a GPU node or a multi-host TPU slice: batches are sharded along the mesh axis ``data``
and everything else is replicated, so under `jax.jit` with ``Auto`` axes XLA inserts the collectives and
norm statistics are those of the *global* batch.

A chunk is a dict of arrays with a leading axis of k steps, ``image`` and ``label`` [k, batch, ...] (and
``mask`` [k, batch] for evaluation), sharded along the batch axis. ``prepare(batch, key)`` turns one step's
raw batch into the model's input (the device-resident data's augmentation; the identity for streamed
batches, which arrive ready); it runs inside the scan, so raw uint8 images never exist as float32 chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from receding_jax import cpu_compilation
from receding_jax.models import for_platform
from receding_jax.training.optimizer import effective_penalty_strength, make_optimizer, penalty_value

DATA_AXIS = "data"
State = dict[str, Any]  # {'params', 'batch_stats', 'opt_state', 'step', 'rng'}: what a checkpoint holds.
Batch = Mapping[str, jax.Array]
Prepare = Callable[[Batch, jax.Array | None], dict[str, jax.Array]]


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int) -> State:
  """Fresh variables, optimiser state, step 0 and the dropout key, as one checkpointable dict."""
  init_key, _ = jax.random.split(jax.random.key(seed))
  variables = model.init(init_key, jnp.zeros((1, *model.input_shape), jnp.float32), train=False)
  return start_state(variables["params"], variables.get("batch_stats", {}), tx=tx, seed=seed)


def start_state(params: Any, batch_stats: Any, *, tx: optax.GradientTransformation, seed: int) -> State:
  """The state that starts training from given variables (a fresh init's, a pruned network's): the
  optimiser's initial state, step 0 and the dropout key of `seed`."""
  _, dropout_key = jax.random.split(jax.random.key(seed))
  return {
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(dropout_key),
  }


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32, [batch]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(
    state: State, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
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


def eval_step(state: State, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the real (mask 1) examples of a padded global batch: 'loss', 'correct', 'count'."""
  logits = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  return {
      "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
      "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
      "count": jnp.sum(mask),
  }


def data_key(seed: int) -> jax.Array:
  """The root key of the training data's augmentation (independent of the model's init and dropout)."""
  return jax.random.fold_in(jax.random.key(seed), 0x0DA7A)


def train_chunk(state: State, chunk: Batch, *, step: Callable, prepare: Prepare, seed: int
                ) -> tuple[State, dict[str, jax.Array]]:
  """`step` over the k batches of `chunk` in one scan; metrics stacked, [k] each. The augmentation key of
  a batch is a function of (seed, global step) only."""

  def body(s, raw):
    batch = prepare(raw, jax.random.fold_in(data_key(seed), s["step"]))
    return step(s, batch)

  if jax.tree.leaves(chunk)[0].shape[0] == 1:  # No loop: XLA:CPU runs a step inside a while loop slower.
    state, metrics = body(state, jax.tree.map(lambda v: v[0], chunk))
    return state, jax.tree.map(lambda v: v[None], metrics)
  return jax.lax.scan(body, state, chunk)


def eval_chunk(state: State, chunk: Batch, *, model: nn.Module, prepare: Prepare) -> dict[str, jax.Array]:
  """`eval_step` summed over the k batches of `chunk`: {'loss', 'correct', 'count'}, scalars."""

  def body(sums, raw):
    out = eval_step(state, {**prepare(raw, None), "mask": raw["mask"]}, model=model)
    return jax.tree.map(jnp.add, sums, out), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}
  return jax.lax.scan(body, zeros, chunk)[0]


def ready(batch: Batch, key: jax.Array | None) -> dict[str, jax.Array]:
  """The `prepare` of batches that arrive augmented and normalised (streamed from the host)."""
  del key
  return {"image": batch["image"], "label": batch["label"]}


# ---------------------------------------------------------------------------------------------------
# Devices.


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'data', Auto axis type (XLA adds collectives)."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def chunk_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Chunks [k, batch, ...]: the batch axis split over the devices."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The jitted steps of one run, bound to its model, optimiser, mesh and data preparation.

  Each is compiled on first use, once per shape: `make_trainer` returns the same Trainer (and `evaluate`
  is shared by every trainer of the same model and data preparation), so phases that build a trainer for
  the same network again (evaluating a checkpoint, fine-tuning after pruning) reuse what was compiled.
  A state is only initialised by running `init` when training starts from scratch: a restore takes its
  target from `abstract_state` (shapes only) and fine-tuning starts from given variables with `start`.
  """

  model: nn.Module
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  train: Callable[[State, Batch], tuple[State, dict]]  # One chunk: (state, stacked [k] metrics).
  evaluate: Callable[[State, Batch], dict]  # One chunk: summed metrics.
  init: Callable[[], State]  # A fresh state (runs the model's init).
  start: Callable[[Any, Any], State]  # (params, batch_stats) -> the state that trains from them.
  penalty_strength: float  # The effective strength (see `effective_penalty_strength`).

  def abstract_state(self) -> State:
    """The state's shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s), traced, not computed: the
    target a checkpoint is restored into."""
    replicated = NamedSharding(self.mesh, P())
    shapes = jax.eval_shape(self.init)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def make_trainer(
    config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int,
    mesh: jax.sharding.Mesh | None = None, prepare: Prepare = ready, prepare_eval: Prepare = ready,
) -> Trainer:
  """Builds the optimiser and jits init and the chunked train/eval with replicated state (donated to the
  train chunk) and chunks sharded over `mesh` (default: every device, `make_mesh`). On CPU the train chunk
  compiles with `cpu_compilation.training_compiler_options` (convolutions kept from YNNPACK: ~2x faster),
  and `init`/`start`, which run once, with `cpu_compilation.one_shot_compiler_options`. A zoo model runs in
  the formulation of the mesh's platform (`models.for_platform`: on CPU, ``cpu_friendly``), which is the
  Trainer's `model`. The same arguments (config by value, model by equality, functions by identity) give
  the same Trainer."""
  mesh = mesh or make_mesh()
  platform = mesh.devices.flat[0].platform
  model = for_platform(model, platform)
  options = (cpu_compilation.training_compiler_options(platform), cpu_compilation.one_shot_compiler_options(platform))
  key = (config.to_json_best_effort(sort_keys=True), model, steps_per_epoch, mesh, prepare, prepare_eval,
         json.dumps(options, sort_keys=True))
  if key not in _TRAINERS:
    if len(_TRAINERS) >= 16:  # Bounded: a long-lived process (a notebook, the tests) builds many.
      _TRAINERS.pop(next(iter(_TRAINERS)))
    _TRAINERS[key] = _build_trainer(config, model, steps_per_epoch, mesh, prepare, prepare_eval, *options)
  return _TRAINERS[key]


_TRAINERS: dict[tuple, Trainer] = {}


def _build_trainer(config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int,
                   mesh: jax.sharding.Mesh, prepare: Prepare, prepare_eval: Prepare,
                   train_options: dict | None, once: dict | None) -> Trainer:
  strength = effective_penalty_strength(config, steps_per_epoch)
  tx = make_optimizer(config, steps_per_epoch, strength)
  replicated = NamedSharding(mesh, P())
  step = lambda s, b: train_step(s, b, model=model, tx=tx, config=config, penalty_strength=strength)
  train = _named(lambda s, c: train_chunk(s, c, step=step, prepare=prepare, seed=config.seed), "train_chunk")
  train = jax.jit(train, out_shardings=(replicated, replicated), donate_argnums=0, compiler_options=train_options)
  init = jax.jit(_named(lambda: init_state(model, tx, config.seed), "init_state"), out_shardings=replicated,
                 compiler_options=once)
  start = jax.jit(_named(lambda p, b: start_state(p, b, tx=tx, seed=config.seed), "start_state"),
                  out_shardings=replicated, compiler_options=once)
  return Trainer(model, tx, mesh, train, _evaluate_fn(model, mesh, prepare_eval), init, start, strength)


@functools.lru_cache(maxsize=16)
def _evaluate_fn(model: nn.Module, mesh: jax.sharding.Mesh, prepare_eval: Prepare) -> Callable:
  """The jitted chunked evaluation of `model`: one per (model, mesh, preparation), whatever the optimiser."""
  evaluate = _named(lambda s, c: eval_chunk(s, c, model=model, prepare=prepare_eval), "eval_chunk")
  return jax.jit(evaluate, out_shardings=NamedSharding(mesh, P()))


def _named(fn: Callable, name: str) -> Callable:
  """`fn` under `name`, the name jax's compile logs and `compile_clock` report it by."""
  fn.__name__ = fn.__qualname__ = name
  return fn
