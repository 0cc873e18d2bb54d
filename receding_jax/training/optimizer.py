"""The training recipe's optimiser (docs/method.md section 4): learning-rate schedule, penalty strength and the
optax chain penalty -> SGD with coupled weight decay, bounded norms at 10x the learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from receding_jax import penalties
from receding_jax.norm import LOGIT_NAME
from receding_jax.selection import PyTree, path_names
from receding_jax.training.config import default_config
from receding_jax.training.paper_configs import PAPER_SCHEDULE


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Base learning rate per step: linear warm-up, then steps (x decay_factor at each decay fraction of
  the run) or cosine decay to 0."""
  o = config.optim
  total = o.num_epochs * steps_per_epoch
  warmup = int(o.warmup_epochs * steps_per_epoch)
  if o.schedule == "step":
    boundaries = {int(f * total) - warmup: o.decay_factor for f in o.decay_fractions}
    main = optax.piecewise_constant_schedule(o.learning_rate, boundaries)
  else:
    main = optax.cosine_decay_schedule(o.learning_rate, total - warmup)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), main], [warmup])


def learning_rate_sum(config: ml_collections.ConfigDict, steps_per_epoch: int) -> float:
  """Sum of the base learning rate over every step of the run (the penalty's integrated push / strength)."""
  total = config.optim.num_epochs * steps_per_epoch
  schedule = learning_rate_schedule(config, steps_per_epoch)
  return float(jnp.sum(jax.vmap(schedule)(jnp.arange(total))))


def effective_penalty_strength(config: ml_collections.ConfigDict, steps_per_epoch: int) -> float:
  """The strength the penalty runs with: ``penalty.strength``, or with ``penalty.relative_to_paper``
  that strength x (learning-rate sum of the paper's schedule / learning-rate sum of this run), so that a
  logit receives the same total push as in the paper's 160-epoch, batch-64 run."""
  if not config.penalty.relative_to_paper:
    return float(config.penalty.strength)
  paper = default_config()
  paper.optim.schedule, paper.optim.warmup_epochs = "step", 0.0
  for key in ("batch_size", "num_epochs", "learning_rate", "decay_fractions", "decay_factor"):
    paper.optim[key] = PAPER_SCHEDULE[key]
  paper_steps = PAPER_SCHEDULE["train_examples"] // PAPER_SCHEDULE["batch_size"]
  ratio = learning_rate_sum(paper, paper_steps) / learning_rate_sum(config, steps_per_epoch)
  return float(config.penalty.strength) * ratio


def bounded_norm_labels(params: PyTree) -> PyTree:
  """'bounded_norm' for every leaf of a `BoundedScaleNorm` (its logits and optional bias), else 'default'."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  bounded = {path_names(p)[:-1] for p, _ in leaves if path_names(p)[-1] == LOGIT_NAME}
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "bounded_norm" if path_names(p)[:-1] in bounded else "default", params
  )


def penalty_transform(config: ml_collections.ConfigDict, strength: float) -> optax.GradientTransformation:
  """The method's penalty at `strength` as a transform that adds its gradient (identity for 'none')."""
  p = config.penalty
  if p.kind == "rni":
    return penalties.add_receding_penalty(strength, shift=p.shift)
  if p.kind == "l1":
    return penalties.add_l1_penalty(strength)
  if p.kind == "polarization":
    return penalties.add_polarization_penalty(strength, t=p.polarization_t)
  return optax.identity()


def penalty_value(config: ml_collections.ConfigDict, strength: float, params: PyTree) -> jax.Array:
  """strength x penalty(params): the term the penalty adds to the loss (0 for 'none')."""
  p = config.penalty
  if p.kind == "rni":
    value = penalties.receding_penalty(params, shift=p.shift)
  elif p.kind == "l1":
    value = penalties.l1_penalty(params)
  elif p.kind == "polarization":
    value = penalties.polarization_penalty(params, t=p.polarization_t)
  else:
    return jnp.zeros((), jnp.float32)
  return strength * value


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, penalty_strength: float | None = None
) -> optax.GradientTransformation:
  """docs/method.md section 4: penalty gradient -> SGD (Nesterov) with coupled weight decay; bounded norms get
  ``norm_lr_multiplier`` x the learning rate and no decay; polarization clamps BatchNorm scales to [0, 1].
  `penalty_strength` defaults to `effective_penalty_strength(config, steps_per_epoch)`."""
  o = config.optim
  schedule = learning_rate_schedule(config, steps_per_epoch)
  if penalty_strength is None:
    penalty_strength = effective_penalty_strength(config, steps_per_epoch)

  def sgd(lr):
    return optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov and o.momentum > 0)

  parts = [
      penalty_transform(config, penalty_strength),
      optax.multi_transform(
          {
              "default": optax.chain(optax.add_decayed_weights(o.weight_decay), sgd(schedule)),
              "bounded_norm": sgd(lambda step: o.norm_lr_multiplier * schedule(step)),
          },
          bounded_norm_labels,
      ),
  ]
  if config.penalty.kind == "polarization":
    parts.append(penalties.project_to_interval(0.0, 1.0))
  return optax.chain(*parts)
