"""Penalties and their optax transforms: gradient identity, masks, extremes, jit and sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from multidevice import run_with_cpu_devices

import receding_jax as rj
from receding_jax.models import MODELS, get_model
from receding_jax.training import optimizer as recipe
from receding_jax.training.config import PENALTY_NORM, default_config

VGG_WIDTHS = (4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32)  # CIFAR VGG-16 at 1/16 width.


def vgg_shaped_params(norm: str, seed: int = 0):
  """A CIFAR VGG-16-shaped parameter pytree: 13 conv(+bias) + norm layers and a classifier.

  Drawn with numpy's generator: eager `jax.random` would compile a sampler for every shape.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  params, in_ch = {}, 3
  for i, width in enumerate(VGG_WIDTHS):
    params[f"conv{i}"] = {"kernel": normal(3, 3, in_ch, width), "bias": jnp.zeros(width)}
    if norm == "bounded":
      params[f"norm{i}"] = {"scale_logit": normal(width, scale=3.0)}
    else:
      params[f"norm{i}"] = {"scale": jnp.asarray(rng.uniform(-1.0, 1.0, width), jnp.float32), "bias": normal(width)}
    in_ch = width
  params["classifier"] = {"kernel": normal(in_ch, 10), "bias": jnp.zeros(10)}
  return params


def random_updates(params, seed: int = 7):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)


CASES = {
    "receding": (
        lambda p: rj.receding_penalty(p, shift=3.0),
        lambda s: rj.add_receding_penalty(s, 3.0),
        "bounded",
    ),
    "l1": (rj.l1_penalty, rj.add_l1_penalty, "batch"),
    "polarization": (
        lambda p: rj.polarization_penalty(p, t=1.2),
        lambda s: rj.add_polarization_penalty(s, t=1.2),
        "batch",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_added_update_is_the_gradient_of_strength_times_penalty(name):
  penalty, make_transform, norm = CASES[name]
  params = vgg_shaped_params(norm)
  updates = random_updates(params)
  strength = 3e-3
  tx = make_transform(strength)
  update = jax.jit(tx.update)
  expected = jax.jit(jax.grad(lambda p: strength * penalty(p)))(params)
  # From zero updates the added term is seen without rounding against O(1) updates.
  added, state = update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-12), added, expected)
  assert isinstance(state, optax.EmptyState)
  new_updates, _ = update(updates, tx.init(params), params)
  jax.tree.map(lambda n, u, e: np.testing.assert_allclose(n, u + e, rtol=1e-6), new_updates, updates, expected)
  # Only the penalised leaves move: conv kernels, biases and the classifier are untouched.
  for layer in ("conv0", "conv12", "classifier"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(new_updates[layer][leaf], updates[layer][leaf])
  penalised = "scale_logit" if norm == "bounded" else "scale"
  assert float(jnp.abs(added["norm5"][penalised]).max()) > 0


def test_receding_gradient_has_the_closed_form_and_only_pushes_logits_down():
  logits = jnp.linspace(-12.0, 12.0, 97)
  params = {"norm": {"scale_logit": logits}}
  grad = jax.grad(lambda p: rj.receding_penalty(p, shift=1.5))(params)["norm"]["scale_logit"]
  s = jax.nn.sigmoid(logits + 1.5)
  np.testing.assert_allclose(grad, -s * (1 - s) * jnp.log(s), rtol=1e-4, atol=1e-9)
  assert bool(jnp.all(grad >= 0))
  np.testing.assert_allclose(rj.receding_penalty(params, shift=1.5), jnp.sum(s * (1 - jnp.log(s))), rtol=1e-5)


def test_polarization_matches_zhuang_et_al_over_all_layers_together():
  params = {"a": {"scale": jnp.array([0.1, 0.9])}, "b": {"scale": jnp.array([-0.5, 0.3, 0.7])}}
  gammas = np.array([0.1, 0.9, -0.5, 0.3, 0.7])
  expected = 1.4 * np.abs(gammas).sum() - np.abs(gammas - gammas.mean()).sum()
  np.testing.assert_allclose(rj.polarization_penalty(params, t=1.4), expected, rtol=1e-6)
  # Per-layer means would give another number: the mean is shared.
  layers = (np.array([0.1, 0.9]), np.array([-0.5, 0.3, 0.7]))
  per_layer = sum(1.4 * np.abs(g).sum() - np.abs(g - g.mean()).sum() for g in layers)
  assert abs(per_layer - expected) > 0.1


def test_l1_matches_hand_computed_value():
  params = {"bn": {"scale": jnp.array([0.5, -2.0]), "bias": jnp.array([10.0, 10.0])}}
  np.testing.assert_allclose(rj.l1_penalty(params), 2.5)


@pytest.mark.parametrize("extreme", [1e4, -1e4])
def test_receding_transform_is_finite_at_extreme_logits(extreme):
  params = {"norm": {"scale_logit": jnp.array([extreme, -extreme, 0.0, extreme])}}
  tx = rj.add_receding_penalty(1.0, shift=3.0)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert bool(jnp.all(jnp.isfinite(updates["norm"]["scale_logit"])))
  assert bool(jnp.isfinite(rj.receding_penalty(params, shift=3.0)))
  pushed = np.asarray(updates["norm"]["scale_logit"])
  np.testing.assert_array_equal(pushed[[0, 1, 3]], 0.0)  # Saturated either way: no push.
  assert float(pushed[2]) > 0


def test_chain_before_sgd_equals_penalty_added_to_the_loss():
  model = nn.Sequential([nn.Dense(6), rj.BoundedScaleNorm(use_running_average=True), nn.Dense(2)])
  x = jax.random.normal(jax.random.key(0), (5, 3))
  variables = model.init(jax.random.key(1), x)

  def data_loss(params):
    return jnp.mean(model.apply({**variables, "params": params}, x) ** 2)

  strength, lr = 0.05, 0.1
  tx = optax.chain(rj.add_receding_penalty(strength), optax.sgd(lr, momentum=0.9, nesterov=True))
  reference = optax.sgd(lr, momentum=0.9, nesterov=True)
  params_a = params_b = variables["params"]
  state_a, state_b = tx.init(params_a), reference.init(params_b)
  for _ in range(3):
    updates, state_a = tx.update(jax.grad(data_loss)(params_a), state_a, params_a)
    params_a = optax.apply_updates(params_a, updates)
    full_loss = lambda p: data_loss(p) + strength * rj.receding_penalty(p)
    updates, state_b = reference.update(jax.grad(full_loss)(params_b), state_b, params_b)
    params_b = optax.apply_updates(params_b, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params_a, params_b)


def test_user_masks_as_pytree_and_callable_select_the_same_leaves():
  params = vgg_shaped_params("bounded")
  only_first = jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key == "norm0" and path[-1].key == "scale_logit", params
  )
  by_tree = jax.grad(lambda p: rj.receding_penalty(p, mask=only_first))(params)
  by_callable = jax.grad(lambda p: rj.receding_penalty(p, mask=lambda q: only_first))(params)
  jax.tree.map(np.testing.assert_array_equal, by_tree, by_callable)
  assert float(jnp.abs(by_tree["norm0"]["scale_logit"]).sum()) > 0
  np.testing.assert_array_equal(by_tree["norm1"]["scale_logit"], 0.0)


def test_default_batch_norm_mask_skips_layer_norm_and_uses_batch_stats_when_given():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True, name="bn")(nn.Dense(4)(x))
      x = nn.LayerNorm()(x)
      return nn.LayerNorm(name="custom_ln")(x)

  variables = Net().init(jax.random.key(0), jnp.ones((1, 3)))
  from_params = rj.batch_norm_scale_mask(variables["params"])
  assert from_params["bn"]["scale"] and not from_params["LayerNorm_0"]["scale"]
  exact = rj.batch_norm_scale_mask(variables)
  assert exact["bn"]["scale"] and not exact["LayerNorm_0"]["scale"] and not exact["custom_ln"]["scale"]
  assert not exact["bn"]["bias"] and not exact["Dense_0"]["kernel"]


def test_scheduled_strength_keeps_a_step_count():
  params = {"n": {"scale_logit": jnp.zeros(3)}}
  tx = rj.add_receding_penalty(optax.linear_schedule(0.0, 1.0, 4))
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  first, state = tx.update(zeros, state, params)
  second, state = tx.update(zeros, state, params)
  np.testing.assert_array_equal(first["n"]["scale_logit"], 0.0)  # strength 0 at step 0
  one = jax.grad(rj.receding_penalty)(params)["n"]["scale_logit"]
  np.testing.assert_allclose(second["n"]["scale_logit"], 0.25 * one, rtol=1e-6)
  assert int(state.count) == 2


def test_project_to_interval_clips_scales_after_the_step():
  params = {"bn": {"scale": jnp.array([0.2, 0.9, 0.05]), "bias": jnp.array([0.0, 0.0, 0.0])}}
  tx = optax.chain(optax.sgd(1.0), rj.project_to_interval(0.0, 1.0))
  grads = {"bn": {"scale": jnp.array([-0.5, -0.5, 0.5]), "bias": jnp.array([5.0, -5.0, 0.0])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["bn"]["scale"], [0.7, 1.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(new["bn"]["bias"], [-5.0, 5.0, 0.0])


def test_bad_input_names_the_value():
  with pytest.raises(ValueError, match=r"-0\.1"):
    rj.add_receding_penalty(-0.1)
  with pytest.raises(ValueError, match="-1"):
    rj.add_l1_penalty(-1)
  with pytest.raises(ValueError, match="-2"):
    rj.add_polarization_penalty(1e-4, t=-2)
  with pytest.raises(TypeError, match="str"):
    rj.add_receding_penalty("strong")
  params = {"n": {"scale_logit": jnp.zeros(2)}}
  with pytest.raises(TypeError, match="str"):
    rj.add_receding_penalty(1.0, mask="scale_logit").init(params)
  with pytest.raises(TypeError, match="int"):
    rj.receding_penalty(params, mask={"n": {"scale_logit": 1}})
  with pytest.raises(ValueError, match="structure"):
    rj.receding_penalty(params, mask={"m": {"scale_logit": True}})
  with pytest.raises(ValueError, match="lower"):
    rj.project_to_interval(1.0, 0.0)


def test_transform_on_sharded_parameters_matches_unsharded():
  out = run_with_cpu_devices(
      """
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, AxisType
      import receding_jax as rj
      mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
      params = {"a": {"scale_logit": jax.random.normal(jax.random.key(0), (64,)) * 4},
                "b": {"kernel": jnp.ones((64, 16))}}
      updates = jax.tree.map(jnp.ones_like, params)
      tx = rj.add_receding_penalty(0.5, shift=3.0)
      sharding = NamedSharding(mesh, P("model"))
      sharded = jax.device_put(params, sharding)
      out, _ = jax.jit(tx.update)(jax.device_put(updates, sharding), tx.init(sharded), sharded)
      ref, _ = tx.update(updates, tx.init(params), params)
      assert len(out["a"]["scale_logit"].sharding.device_set) == 8, out["a"]["scale_logit"].sharding
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), out, ref)
      print("OK", jax.device_count())
      """
  )
  assert out.strip() == "OK 8"


# ---------------------------------------------------------------------------------------------------
# flax.nnx states, and masks that select nothing.


class NnxBoundedNorm(nnx.Module):
  """A native NNX bounded norm (scale only): what the default mask finds is the Param's name."""

  def __init__(self, features: int, rngs: nnx.Rngs):
    self.scale_logit = nnx.Param(2.0 * jax.random.normal(rngs.params(), (features,)))

  def __call__(self, x):
    return x * jax.nn.sigmoid(self.scale_logit[...])


class NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.norm = NnxBoundedNorm(4, rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.ln = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.ln(self.bn(self.norm(self.linear(x)))))


def nnx_net():
  model = NnxNet(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for norm in (model.bn, model.ln):  # Scales that differ from 1, of both signs.
    norm.scale[...] = jnp.asarray(rng.uniform(-1.0, 1.5, 4), jnp.float32)
  return model


def linen_twin(model):
  """The Linen variables with the same layout and values as the NNX model's state."""
  state = nnx.state(model)
  return {"params": nnx.to_pure_dict(nnx.filter_state(state, nnx.Param)),
          "batch_stats": nnx.to_pure_dict(nnx.filter_state(state, nnx.BatchStat))}


def test_penalties_and_masks_read_nnx_states_as_the_equivalent_linen_variables():
  model = nnx_net()
  state, params_only, linen = nnx.state(model), nnx.state(model, nnx.Param), linen_twin(model)
  exact = rj.batch_norm_scale_mask(linen)  # Linen: exact given the batch statistics.
  for nnx_tree in (state, nnx.as_pure(state), params_only):
    np.testing.assert_allclose(rj.receding_penalty(nnx_tree, shift=1.0),
                               rj.receding_penalty(linen["params"], shift=1.0), rtol=1e-6)
  assert float(rj.receding_penalty(state)) > 0
  # A whole state (Variables or pure) knows its BatchNorms exactly: the LayerNorm's scale is left out ...
  for nnx_tree in (state, nnx.as_pure(state)):
    np.testing.assert_allclose(rj.l1_penalty(nnx_tree), rj.l1_penalty(linen["params"], mask=exact), rtol=1e-6)
    np.testing.assert_allclose(rj.polarization_penalty(nnx_tree, t=1.2),
                               rj.polarization_penalty(linen["params"], t=1.2, mask=exact), rtol=1e-6)
  # ... params alone follow the params-only rule, as Linen params do ('ln' is not auto-named).
  np.testing.assert_allclose(rj.l1_penalty(params_only), rj.l1_penalty(linen["params"]), rtol=1e-6)
  mask = rj.batch_norm_scale_mask(state)
  assert mask["bn"]["scale"].get_value() and not mask["ln"]["scale"].get_value() and not mask["bn"]["mean"].get_value()
  assert rj.bounded_logit_mask(state)["norm"]["scale_logit"].get_value()
  assert sum(jax.tree.leaves(rj.bounded_logit_mask(params_only))) == 1


def test_nnx_optimizer_with_the_penalty_chained_moves_logits_by_its_gradient():
  model = nnx_net()
  strength, lr, shift = 0.5, 0.1, 1.0
  bn_scales = nnx.filter_state(rj.batch_norm_scale_mask(nnx.state(model)), nnx.Param)
  tx = optax.chain(rj.add_receding_penalty(strength, shift=shift), rj.add_l1_penalty(strength, mask=bn_scales),
                   optax.sgd(lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 3))
  grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
  before = {name: np.asarray(leaf) for name, leaf in
            [("logit", model.norm.scale_logit[...]), ("bn", model.bn.scale[...]), ("ln", model.ln.scale[...])]}
  optimizer.update(model, grads)
  s = jax.nn.sigmoid(before["logit"] + shift)
  penalty_grad = -s * (1 - s) * np.log(s)
  np.testing.assert_allclose(model.norm.scale_logit[...],
                             before["logit"] - lr * (grads["norm"]["scale_logit"][...] + strength * penalty_grad),
                             rtol=1e-5)
  np.testing.assert_allclose(model.bn.scale[...],
                             before["bn"] - lr * (grads["bn"]["scale"][...] + strength * np.sign(before["bn"])),
                             rtol=1e-5)
  np.testing.assert_allclose(model.ln.scale[...], before["ln"] - lr * grads["ln"]["scale"][...], rtol=1e-5)


def test_a_default_mask_that_finds_nothing_raises_naming_what_it_looked_for():
  dense_only = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  bounded = {"norm": {"scale_logit": jnp.zeros(2)}}
  cases = [
      (lambda: rj.receding_penalty(dense_only), "receding_penalty found no bounded-norm logit"),
      (lambda: rj.add_receding_penalty(1e-3).init(dense_only), "add_receding_penalty found no .*'scale_logit'"),
      (lambda: rj.l1_penalty(bounded), "l1_penalty found no BatchNorm scale"),
      (lambda: rj.add_l1_penalty(1e-3).init(bounded), "add_l1_penalty found no BatchNorm scale"),
      (lambda: rj.polarization_penalty(bounded, t=1.2), "polarization_penalty found no BatchNorm"),
      (lambda: rj.add_polarization_penalty(1e-3, t=1.2).init(bounded), "add_polarization_penalty found no"),
      (lambda: rj.project_to_interval().init(bounded), "project_to_interval found no BatchNorm scale"),
      (lambda: rj.receding_penalty(nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))), "no bounded-norm logit"),
      (lambda: rj.neuron_importances({"params": dense_only}), "neuron_importances found no norm layer"),
      (lambda: rj.neuron_importances(nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))), "found no norm layer"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message) as info:
      call()
    assert "\n" not in str(info.value)
  nothing = {"norm": {"scale_logit": False}}
  with pytest.raises(ValueError, match="the given mask selects none of the 1 leaves"):
    rj.receding_penalty(bounded, mask=nothing)
  with pytest.raises(ValueError, match="add_receding_penalty: the given mask selects none"):
    rj.add_receding_penalty(1e-3, mask=lambda p: nothing).init(bounded)
  # Inside a chain the error comes at init, before any update.
  with pytest.raises(ValueError, match="add_l1_penalty found no BatchNorm scale"):
    optax.chain(rj.add_l1_penalty(1e-3), optax.sgd(0.1)).init(bounded)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["rni", "l1", "polarization", "none"])
def test_the_training_recipe_builds_for_every_zoo_model_and_penalty(name, kind):
  """recipe.make_optimizer / penalty_value / neuron_importances on each model with its penalty's norm."""
  config = default_config()
  config.penalty.kind = kind
  norm = PENALTY_NORM.get(kind, "bounded")
  model = get_model(name, 10, norm=norm, width_multiplier=0.0625)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape)), train=False))
  tx = recipe.make_optimizer(config, steps_per_epoch=10)
  jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), variables["params"])  # Abstract: no compilation.
  value = jax.eval_shape(lambda p: recipe.penalty_value(config, 1e-3, p), variables["params"])
  assert value.shape == ()
  importances = jax.eval_shape(rj.neuron_importances, variables)
  assert len(importances) >= 13
  if kind != "none":  # The penalty on the other norm kind now fails at init instead of adding 0.
    other = get_model(name, 10, norm="batch" if norm == "bounded" else "bounded", width_multiplier=0.0625)
    params = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, *other.input_shape))))["params"]
    with pytest.raises(ValueError, match="found no"):
      jax.eval_shape(tx.init, params)
