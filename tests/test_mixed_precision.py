"""Mixed precision (model.compute_dtype = 'bfloat16'): bf16 convolutions and dense layers, float32 params,
optimizer state, norm statistics and logits, through init, training steps, specs, configs and pruning;
and a bf16 model still learns.

The models are the zoo's CIFAR classes made shallow and narrow (a 3-conv VGG, a ResNet-8) on digits-sized
8x8x1 inputs: XLA:CPU compile time grows with depth, and VGG-16 / ResNet-20 cost minutes here. Keys are
'rbg': the threefry init of even these small models compiles for tens of seconds on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jcore

from receding_jax import pruning
from receding_jax.models import CifarResNet, CifarVGG, get_model, model_from_spec
from receding_jax.training.config import ConfigError, default_config, model_spec, validate_config

BATCH = 64


def tiny(kind: str, compute_dtype: str) -> CifarVGG | CifarResNet:
  """The VGG (BatchNorm, the baselines') or the ResNet (bounded norms, the method's) at tiny size."""
  if kind == "vgg":
    return CifarVGG(widths=(8, 16, 32), pool_after=(0, 1), norm="batch", input_shape=(8, 8, 1),
                    compute_dtype=compute_dtype)
  return CifarResNet(blocks_per_stage=1, stage_widths=(8, 16, 32), norm="bounded", input_shape=(8, 8, 1),
                     compute_dtype=compute_dtype)


def digits():
  """scikit-learn's 8x8 digits as the quickstart reads them: [0, 1] pixels normalised with its mean 0.3
  and std 0.4, the first 1,500 for training, the other 297 for testing (input_pipeline.DIGITS_TRAIN)."""
  from sklearn.datasets import load_digits

  data = load_digits()
  images = ((data.images / 16.0 - 0.3) / 0.4).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  return (images[:1500], labels[:1500]), (images[1500:], labels[1500:])


def dtypes(tree) -> set[str]:
  return {str(jnp.asarray(leaf).dtype) for leaf in jax.tree.leaves(tree)}


def primitive_dtypes(jaxpr: jcore.Jaxpr, primitive: str):
  """(operand dtypes, output dtype) of every `primitive` equation, sub-jaxprs (jit, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      yield tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from primitive_dtypes(sub.jaxpr, primitive)
        elif isinstance(sub, jcore.Jaxpr):
          yield from primitive_dtypes(sub, primitive)


TX = optax.sgd(0.05, momentum=0.9, nesterov=True)


@functools.cache
def setup(kind: str):
  """(bf16 model, its init variables, a jitted SGD step), built once per module run and kind."""
  model = tiny(kind, "bfloat16")
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((2, 8, 8, 1)))

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(p):
      logits, updates = model.apply(
          {"params": p, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
      return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, logits, grads

  return model, variables, step


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
def test_bf16_models_keep_float32_state_through_training_and_convolve_in_bf16(kind):
  model, variables, step = setup(kind)
  assert dtypes(variables) == {"float32"}
  (images, labels), _ = digits()
  x, y = images[:BATCH], labels[:BATCH]
  opt_state = TX.init(variables["params"])

  # Every convolution and dense layer takes bf16 operands and gives bf16, forward and backward.
  jaxpr = jax.make_jaxpr(step)(variables["params"], variables["batch_stats"], opt_state, x, y).jaxpr
  for primitive in ("conv_general_dilated", "dot_general"):
    found = set(primitive_dtypes(jaxpr, primitive))
    assert found == {(("bfloat16", "bfloat16"), "bfloat16")}, (primitive, found)

  params, batch_stats, losses = variables["params"], variables["batch_stats"], []
  for _ in range(3):
    params, batch_stats, opt_state, loss, logits, grads = step(params, batch_stats, opt_state, x, y)
    losses.append(float(loss))
  assert logits.dtype == loss.dtype == jnp.float32
  assert dtypes(params) == dtypes(batch_stats) == dtypes(opt_state) == dtypes(grads) == {"float32"}
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]  # The same batch three times: it fits it.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), batch_stats, variables["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0
  # Evaluation (running statistics) gives float32 logits too.
  assert jax.jit(model.apply)({"params": params, "batch_stats": batch_stats}, x).dtype == jnp.float32


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
def test_bf16_norm_statistics_are_float32_and_close_to_the_float32_models(kind):
  bf16, variables, _ = setup(kind)
  f32 = tiny(kind, "float32")
  (images, _), _ = digits()
  x = images[:BATCH]

  def train_forward(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)

  (logits16, new16), (logits32, new32) = train_forward(bf16), train_forward(f32)
  assert logits16.dtype == logits32.dtype == jnp.float32
  assert dtypes(new16) == {"float32"}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new16), jax.tree.leaves(new32), strict=True):
    # bf16 keeps 8 significant bits (~0.4% per rounding), a few roundings deep by the last norm.
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * float(jnp.abs(b).max()), err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))


def test_compute_dtype_is_in_the_spec_and_old_specs_build_float32_models():
  config = default_config()
  config.model.compute_dtype = "bfloat16"
  validate_config(config)
  spec = model_spec(config)
  assert spec["compute_dtype"] == "bfloat16"
  assert model_from_spec(spec).compute_dtype == "bfloat16"
  old = {k: v for k, v in spec.items() if k != "compute_dtype"}
  assert model_from_spec(old).compute_dtype == "float32"
  assert model_spec(default_config())["compute_dtype"] == "float32"

  config.model.compute_dtype = "float16"
  with pytest.raises(ConfigError, match=r"model\.compute_dtype = 'float16'") as error:
    validate_config(config)
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="'float16'"):
    get_model("cifar_vgg16", 10, compute_dtype="float16")
  with pytest.raises(ValueError, match="'half'"):
    model_from_spec({**spec, "compute_dtype": "half"})


def test_pruning_a_bf16_model_keeps_its_compute_dtype():
  model, variables, _ = setup("resnet")
  narrow_model, narrow_variables = pruning.prune_params(model, variables, 0.5, min_channels=1)
  widths = lambda m, v: sum(pruning.group_widths(m, v).values())
  assert narrow_model.compute_dtype == "bfloat16" and widths(narrow_model, narrow_variables) < widths(model, variables)
  assert dtypes(narrow_variables) == {"float32"}
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  assert jax.eval_shape(narrow_model.apply, narrow_variables, x).dtype == jnp.float32


def test_the_pruning_check_holds_a_bf16_model_with_float32_logits_to_the_bf16_tolerance():
  model, variables, _ = setup("resnet")
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  program = lambda m: jax.make_jaxpr(lambda v, x: m.apply(v, x))(variables, x)
  bf16 = program(model)
  assert [v.dtype for v in bf16.out_avals] == [jnp.float32]  # Logits in float32, convolutions in bf16.
  assert pruning.checking.tolerance(bf16) == 3e-2
  assert pruning.checking.tolerance(program(tiny("resnet", "float32"))) == 1e-4


def test_a_bf16_resnet_learns_digits():
  model, variables, step = setup("resnet")
  (train_x, train_y), (test_x, test_y) = digits()
  params, batch_stats, opt_state = variables["params"], variables["batch_stats"], TX.init(variables["params"])
  rng = np.random.default_rng(0)
  for _ in range(8):  # 8 epochs of 23 batches: 184 steps.
    order = rng.permutation(len(train_y))
    for i in range(0, len(order) - BATCH + 1, BATCH):
      batch = order[i:i + BATCH]
      params, batch_stats, opt_state, *_ = step(params, batch_stats, opt_state, train_x[batch], train_y[batch])
  assert dtypes(params) == dtypes(batch_stats) == {"float32"}
  logits = jax.jit(model.apply)({"params": params, "batch_stats": batch_stats}, test_x)
  accuracy = float(np.mean(np.argmax(logits, -1) == test_y))
  print(f"bf16 ResNet-8 test accuracy after 184 steps: {accuracy:.3f}")
  assert accuracy > 0.6  # Chance is 0.1.
