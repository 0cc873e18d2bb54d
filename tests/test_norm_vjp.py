"""The bounded norm's closed-form backward against autodiff of the reference formula (batch_moments + normalize).

Values, gradients wrt x, logit and bias, and the running statistics, over shapes, feature axes, bias, jit,
named axes (vmap, shard_map; 8 devices in a subprocess), bfloat16, and the Linen and NNX modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from receding_jax import BoundedScaleNorm, NnxBoundedScaleNorm
from receding_jax.norm import batch_moments, bounded_norm_train, bounded_scale, normalize, update_running_average
from tests.multidevice import run_with_cpu_devices

EPS = 1e-5


def reference(x, logit, bias, feature_axes, dtype=None, axis_name=None):
  """The formula the closed form replaces, differentiated by JAX: (y, mean, var)."""
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  mean, var = batch_moments(x, reduction_axes, axis_name)
  return normalize(x, mean, var, bounded_scale(logit), bias, feature_axes, EPS, dtype), mean, var


def closed_form(x, logit, bias, feature_axes, dtype=None, axis_name=None):
  return bounded_norm_train(x, logit, bias, feature_axes, EPS, dtype, axis_name)


def inputs(shape, feature_axes, use_bias, seed=0):
  """x with a large mean and uneven scale, logits, bias (or None) and a random output weight."""
  keys = jax.random.split(jax.random.key(seed), 4)
  features = tuple(shape[a] for a in feature_axes)
  x = 5.0 + 3.0 * jax.random.normal(keys[0], shape)
  logit = jax.random.normal(keys[1], features)
  bias = jax.random.normal(keys[2], features) if use_bias else None
  return x, logit, bias, jax.random.normal(keys[3], shape)


def value_and_grads(norm_fn, x, logit, bias, weight, feature_axes, **kwargs):
  """(loss, (dx, dlogit, dbias), mean, var) of sum(relu(y) * weight), under jit."""

  def loss(x, logit, bias):
    y, mean, var = norm_fn(x, logit, bias, feature_axes, **kwargs)
    return jnp.sum(jax.nn.relu(y.astype(jnp.float32)) * weight), (mean, var)

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (value, (mean, var)), grads = grad_fn(x, logit, bias)
  return value, grads, mean, var


def assert_trees_close(actual, expected, rtol, atol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "shape, feature_axes",
    [((8, 6, 6, 5), (3,)), ((4, 5, 6, 6), (1,)), ((4, 3, 5, 6), (1, 3)), ((32, 7), (1,))],
    ids=["nhwc", "nchw", "two-axes", "dense"],
)
@pytest.mark.parametrize("use_bias", [False, True])
def test_values_and_gradients_equal_autodiff(shape, feature_axes, use_bias):
  x, logit, bias, weight = inputs(shape, feature_axes, use_bias)
  ours = value_and_grads(closed_form, x, logit, bias, weight, feature_axes)
  expected = value_and_grads(reference, x, logit, bias, weight, feature_axes)
  assert_trees_close(ours, expected, rtol=2e-5, atol=2e-5)
  assert ours[1][2] is None if bias is None else float(jnp.abs(ours[1][2]).max()) > 0.1


def test_gradient_is_the_closed_form_for_a_known_loss():
  """sum(y * w) with w = xhat: dlogit = n s (1 - s) per channel, dx = s r (xhat - xhat) = 0 to rounding."""
  x = 4.0 + 2.0 * jax.random.normal(jax.random.key(1), (64, 3))
  logit = jnp.array([-1.0, 0.0, 2.0])
  xhat = (x - x.mean(0)) / jnp.sqrt(x.var(0) + EPS)
  loss = lambda x, logit: jnp.sum(closed_form(x, logit, None, (1,))[0] * xhat)
  dx, dlogit = jax.grad(loss, argnums=(0, 1))(x, logit)
  s = jax.nn.sigmoid(logit)
  np.testing.assert_allclose(dlogit, 64 * s * (1 - s) * x.var(0) / (x.var(0) + EPS), rtol=1e-4)
  np.testing.assert_allclose(dx, 0.0, atol=1e-5)


def test_named_axis_under_vmap_is_global_statistics():
  """vmap with axis_name: 4 shards of 8 rows each agree with autodiff and with one norm over all 32 rows."""
  x, logit, bias, weight = inputs((4, 8, 5), (2,), True, seed=2)

  def sharded(norm_fn):
    def apply(x, logit, bias, feature_axes):
      fn = lambda xi: norm_fn(xi, logit, bias, (feature_axes[0] - 1,), axis_name="shards")
      return jax.vmap(fn, axis_name="shards")(x)
    return apply

  ours = value_and_grads(sharded(closed_form), x, logit, bias, weight, (2,))
  assert_trees_close(ours, value_and_grads(sharded(reference), x, logit, bias, weight, (2,)), 2e-5, 2e-5)
  flat = value_and_grads(closed_form, x.reshape(32, 5), logit, bias, weight.reshape(32, 5), (1,))
  np.testing.assert_allclose(ours[0], flat[0], rtol=1e-5)
  np.testing.assert_allclose(ours[1][0].reshape(32, 5), flat[1][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours[1][1], flat[1][1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours[2][0], flat[2], rtol=1e-5)


@pytest.mark.parametrize("axis_name", ["data", None])
def test_shard_map_on_one_device_with_and_without_axis_name(axis_name):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  x, logit, bias, weight = inputs((8, 4, 4, 6), (3,), True, seed=3)

  def sharded(norm_fn):
    def apply(x, logit, bias, feature_axes):
      fn = lambda x, logit, bias: norm_fn(x, logit, bias, feature_axes, axis_name=axis_name)
      out_specs = (P("data"), P(), P()) if axis_name else (P("data"), P("data"), P("data"))
      return jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=out_specs)(x, logit, bias)
    return apply

  ours = value_and_grads(sharded(closed_form), x, logit, bias, weight, (3,))
  assert_trees_close(ours, value_and_grads(sharded(reference), x, logit, bias, weight, (3,)), 2e-5, 2e-5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_bfloat16_input_float32_statistics(dtype):
  x, logit, bias, weight = inputs((16, 4, 4, 8), (3,), True, seed=4)
  x = x.astype(jnp.bfloat16)
  ours = value_and_grads(closed_form, x, logit, bias, weight, (3,), dtype=dtype)
  expected = value_and_grads(reference, x, logit, bias, weight, (3,), dtype=dtype)
  assert ours[2].dtype == ours[3].dtype == jnp.float32
  assert ours[1][0].dtype == jnp.bfloat16 and ours[1][1].dtype == jnp.float32
  assert closed_form(x, logit, bias, (3,), dtype=dtype)[0].dtype == (dtype or jnp.float32)
  np.testing.assert_allclose(ours[2], expected[2], rtol=1e-6)  # The statistics: same float32 maths.
  np.testing.assert_allclose(ours[3], expected[3], rtol=1e-6)
  assert_trees_close(ours[:2], expected[:2], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("use_bias", [False, True])
def test_linen_module_gradients_and_running_statistics(use_bias):
  norm = BoundedScaleNorm(axis=1, momentum=0.8, use_bias=use_bias, bias_init=nn.initializers.normal(1.0),
                          closed_form_backward=True)
  x, _, _, weight = inputs((8, 5, 3, 3), (1,), False, seed=5)
  variables = norm.init(jax.random.key(0), x, use_running_average=False)
  stats = {"mean": jnp.linspace(-1, 1, 5), "var": jnp.linspace(0.5, 2, 5)}

  def loss(params, x):
    y, updates = norm.apply({"params": params, "batch_stats": stats}, x, use_running_average=False,
                            mutable=["batch_stats"])
    return jnp.sum(jax.nn.relu(y) * weight), updates["batch_stats"]

  (value, new_stats), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)

  def reference_loss(params, x):
    y, mean, var = reference(x, params["scale_logit"], params.get("bias"), (1,))
    return jnp.sum(jax.nn.relu(y) * weight), (mean, var)

  (expected, (mean, var)), expected_grads = jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True)(
      variables["params"], x)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert_trees_close(grads, expected_grads, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new_stats["mean"], update_running_average(stats["mean"], mean, 0.8), rtol=1e-6)
  np.testing.assert_allclose(new_stats["var"], update_running_average(stats["var"], var, 0.8), rtol=1e-6)


def test_nnx_module_gradients_and_running_statistics():
  x, _, _, weight = inputs((16, 4, 4, 6), (3,), False, seed=6)
  model = NnxBoundedScaleNorm(6, use_bias=True, momentum=0.7, closed_form_backward=True, rngs=nnx.Rngs(0))
  logit, bias = model.scale_logit[...], model.bias[...]

  def loss(model, x):
    return jnp.sum(jax.nn.relu(model(x)) * weight)

  grads = nnx.grad(loss, argnums=(0, 1))(model, x)
  expected = jax.grad(lambda x, logit, bias: jnp.sum(jax.nn.relu(reference(x, logit, bias, (3,))[0]) * weight),
                      argnums=(0, 1, 2))(x, logit, bias)
  np.testing.assert_allclose(grads[1], expected[0], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(grads[0].scale_logit[...], expected[1], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(grads[0].bias[...], expected[2], rtol=2e-5, atol=2e-5)
  _, mean, var = reference(x, logit, bias, (3,))
  np.testing.assert_allclose(model.mean[...], 0.3 * mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(model.var[...], 0.7 + 0.3 * var, rtol=1e-6)


def test_eight_devices_shard_map_and_sharded_jit_match_one_device():
  """Data-parallel paths on 8 CPU devices: shard_map with axis_name, and jit of a batch sharded over a mesh
  (XLA adds the collectives), both equal to autodiff on one device of the whole batch."""
  out = run_with_cpu_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from receding_jax.norm import bounded_norm_train, bounded_norm_train_autodiff

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    keys = jax.random.split(jax.random.key(0), 3)
    x = 3.0 + 2.0 * jax.random.normal(keys[0], (32, 4, 4, 6))
    logit, weight = jax.random.normal(keys[1], (6,)), jax.random.normal(keys[2], x.shape)

    def loss(norm_fn, axis_name=None):
      return lambda x, logit: jnp.sum(jax.nn.relu(norm_fn(x, logit, None, (3,), 1e-5, None, axis_name)[0]) * weight)

    expected = jax.jit(jax.grad(loss(bounded_norm_train_autodiff), argnums=(0, 1)))(x, logit)
    in_mesh = jax.device_put(x, NamedSharding(mesh, P("data")))
    jitted = jax.jit(jax.grad(loss(bounded_norm_train), argnums=(0, 1)))(in_mesh, logit)

    def per_shard(x, logit, weight):
      y = bounded_norm_train(x, logit, None, (3,), 1e-5, None, "data")[0]
      return jnp.sum(jax.nn.relu(y) * weight)

    sharded_loss = jax.shard_map(lambda x, logit, w: jax.lax.psum(per_shard(x, logit, w), "data"), mesh=mesh,
                                 in_specs=(P("data"), P(), P("data")), out_specs=P())
    mapped = jax.jit(jax.grad(sharded_loss, argnums=(0, 1)))(in_mesh, logit, weight)
    for got in (jitted, mapped):
      for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    print("ok", len(jitted[0].sharding.device_set), float(jnp.abs(mapped[1]).max()))
  """)
  assert out.startswith("ok 8 ")
  assert float(out.split()[2]) > 0.01  # The logit gradient is not trivially zero.


def test_modules_train_through_the_closed_form_and_through_autodiff_where_forward_mode_is_needed():
  x = jax.random.normal(jax.random.key(9), (8, 3, 3, 4))

  def forward(module):
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    return lambda v: module.apply(variables, v, use_running_average=False, mutable=["batch_stats"])[0]

  with pytest.raises(TypeError, match="custom_vjp"):  # The default, the custom VJP, is reverse mode only.
    jax.jvp(forward(BoundedScaleNorm()), (x,), (jnp.ones_like(x),))
  assert NnxBoundedScaleNorm(4, rngs=nnx.Rngs(0)).closed_form_backward  # The same default in NNX.
  # Autodiff of the same formula: forward mode works, and agrees with the closed form's reverse mode.
  direction = jax.random.normal(jax.random.key(1), x.shape)
  _, tangent = jax.jvp(forward(BoundedScaleNorm(closed_form_backward=False)), (x,), (direction,))
  _, pullback = jax.vjp(forward(BoundedScaleNorm()), x)
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  np.testing.assert_allclose(jnp.vdot(tangent, cotangent), jnp.vdot(direction, pullback(cotangent)[0]), rtol=1e-4)
