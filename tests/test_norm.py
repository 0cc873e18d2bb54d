"""BoundedScaleNorm against flax.linen.BatchNorm, its pure functions, dtypes and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from receding_jax import BoundedScaleNorm
from receding_jax.norm import batch_moments, canonicalize_axes, normalize, update_running_average


def _as_batch_norm_variables(variables):
  """BatchNorm variables with scale = sigmoid(logit) and the same running statistics."""
  params = {"scale": jax.nn.sigmoid(variables["params"]["scale_logit"])}
  if "bias" in variables["params"]:
    params["bias"] = variables["params"]["bias"]
  return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("axis, shape", [(-1, (8, 6, 6, 5)), (1, (8, 5, 6, 6)), ((1, 3), (4, 3, 2, 5))])
@pytest.mark.parametrize("use_bias", [False, True])
def test_agrees_with_batch_norm_in_train_and_eval(axis, shape, use_bias):
  norm = BoundedScaleNorm(axis=axis, momentum=0.8, use_bias=use_bias, bias_init=nn.initializers.normal(1.0))
  batch_norm = nn.BatchNorm(axis=axis, momentum=0.8, use_bias=use_bias)
  key = jax.random.key(0)
  variables = norm.init(key, jnp.zeros(shape), use_running_average=False)
  bn_variables = _as_batch_norm_variables(variables)
  train = jax.jit(lambda v, x: norm.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
  bn_train = jax.jit(lambda v, x: batch_norm.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
  for step in range(3):  # Several steps, so running statistics accumulate.
    x = 3.0 * jax.random.normal(jax.random.fold_in(key, step), shape) + step
    y, updates = train(variables, x)
    y_bn, bn_updates = bn_train(bn_variables, x)
    np.testing.assert_allclose(y, y_bn, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], bn_updates["batch_stats"]["mean"], atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], bn_updates["batch_stats"]["var"], rtol=1e-5)
    variables = {**variables, **updates}
    bn_variables = {**bn_variables, **bn_updates}
  assert not np.allclose(variables["batch_stats"]["var"], 1.0)  # The running stats really moved.
  y_eval = norm.apply(variables, x, use_running_average=True)
  y_bn_eval = batch_norm.apply(bn_variables, x, use_running_average=True)
  np.testing.assert_allclose(y_eval, y_bn_eval, atol=2e-5, rtol=1e-5)


def test_variables_layout_and_init():
  norm = BoundedScaleNorm()
  variables = norm.init(jax.random.key(3), jnp.ones((2, 4096)), use_running_average=True)
  assert set(variables["params"]) == {"scale_logit"}
  logit = variables["params"]["scale_logit"]
  assert logit.shape == (4096,) and logit.dtype == jnp.float32
  assert abs(float(logit.mean())) < 0.1 and abs(float(logit.std()) - 1.0) < 0.05  # Normal(0, 1).
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_output_scale_is_sigmoid_of_logit_and_gradient_reaches_logits():
  norm = BoundedScaleNorm(use_running_average=False)
  x = jax.random.normal(jax.random.key(1), (64, 3)) * jnp.array([1.0, 5.0, 0.5]) + 2.0
  logits = jnp.array([-2.0, 0.0, 4.0])
  variables = {"params": {"scale_logit": logits}, "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  y, _ = norm.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y.std(0), jax.nn.sigmoid(logits), rtol=1e-3)  # Unit std times the scale.
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)

  def loss(logit):
    v = {**variables, "params": {"scale_logit": logit}}
    return jnp.sum(norm.apply(v, x, mutable=["batch_stats"])[0] ** 2)

  # sum y^2 = n * sigmoid(w)^2 (unit variance per channel), so d/dw = 2 n s^2 (1 - s).
  s = jax.nn.sigmoid(logits)
  np.testing.assert_allclose(jax.grad(loss)(logits), 2 * 64 * s**2 * (1 - s), rtol=1e-3)


def test_bfloat16_inputs_keep_float32_statistics():
  norm = BoundedScaleNorm(dtype=jnp.bfloat16)
  x32 = 10.0 + jax.random.normal(jax.random.key(2), (32, 4, 4, 8))
  x16 = x32.astype(jnp.bfloat16)
  variables = norm.init(jax.random.key(0), x16, use_running_average=False)
  y16, updates = norm.apply(variables, x16, use_running_average=False, mutable=["batch_stats"])
  y32, updates32 = BoundedScaleNorm().apply(
      variables, x32, use_running_average=False, mutable=["batch_stats"]
  )
  assert y16.dtype == jnp.bfloat16
  assert updates["batch_stats"]["mean"].dtype == jnp.float32
  assert updates["batch_stats"]["var"].dtype == jnp.float32
  np.testing.assert_allclose(updates["batch_stats"]["mean"], updates32["batch_stats"]["mean"], rtol=1e-2)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.1)
  # dtype=None promotes like flax: bf16 input with f32 params gives f32 output.
  y_default = BoundedScaleNorm().apply(variables, x16, use_running_average=True)
  assert y_default.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["bounded", "batch"])
def test_zoo_norms_in_bfloat16_reduce_in_float32_and_return_bfloat16(kind):
  """Both norms of the zoo (`make_norm`): float32 params and statistics close to float32's, bf16 output."""
  from receding_jax.models.layers import make_norm

  x32 = 10.0 + jax.random.normal(jax.random.key(2), (32, 4, 4, 8))
  x16 = x32.astype(jnp.bfloat16)
  norm16, norm32 = (make_norm(kind, True, "norm", compute_dtype=dt) for dt in ("bfloat16", "float32"))
  variables = norm16.init(jax.random.key(0), x16)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  y16, updates16 = norm16.apply(variables, x16, mutable=["batch_stats"])
  y32, updates32 = norm32.apply(variables, x32, mutable=["batch_stats"])
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(updates16)} == {jnp.dtype(jnp.float32)}
  for name in ("mean", "var"):
    np.testing.assert_allclose(updates16["batch_stats"][name], updates32["batch_stats"][name], rtol=1e-2)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.1)


def test_pure_functions_compose_to_the_module():
  x = jax.random.normal(jax.random.key(4), (16, 3, 3, 6)) * 2 + 0.5
  mean, var = batch_moments(x, (0, 1, 2))
  np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-5)
  scale = jnp.linspace(0.1, 0.9, 6)
  y = normalize(x, mean, var, scale, None, (3,), 1e-5)
  np.testing.assert_allclose(y, (x - mean) / jnp.sqrt(var + 1e-5) * scale, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(update_running_average(jnp.ones(2), jnp.array([3.0, 5.0]), 0.9), [1.2, 1.4])


def test_batch_moments_average_over_a_named_axis():
  x = jax.random.normal(jax.random.key(5), (4, 8, 3)) + jnp.arange(4.0)[:, None, None]
  mean, var = jax.vmap(lambda xi: batch_moments(xi, (0,), axis_name="devices"), axis_name="devices")(x)
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(mean[0], flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(var[0], flat.var(0), rtol=1e-4)


@pytest.mark.parametrize("axis", [4, -5, (1, 7)])
def test_axis_out_of_range_is_a_value_error(axis):
  with pytest.raises(ValueError, match=str(axis if isinstance(axis, int) else 7)):
    BoundedScaleNorm(axis=axis).init(jax.random.key(0), jnp.ones((2, 3, 3, 4)), use_running_average=True)


def test_repeated_axis_is_a_value_error():
  with pytest.raises(ValueError, match="twice"):
    canonicalize_axes(4, (3, -1))


def test_channel_count_mismatch_with_stored_statistics_is_a_value_error():
  norm = BoundedScaleNorm()
  variables = norm.init(jax.random.key(0), jnp.ones((2, 8)), use_running_average=True)
  with pytest.raises(ValueError, match=r"\(5,\).*batch_stats/mean has shape \(8,\)"):
    norm.apply(variables, jnp.ones((2, 5)), use_running_average=True)
  variables["batch_stats"] = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
  with pytest.raises(ValueError, match=r"params/scale_logit has shape \(8,\)"):
    norm.apply(variables, jnp.ones((2, 5)), use_running_average=True)
