"""The model zoo: shapes, parameter counts of the standard sizes, init, norms by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from receding_jax import pruning
from receding_jax.models import CifarResNet, get_model, layers, model_from_spec
from receding_jax.models.layers import max_pool_2x2
from receding_jax.models.resnet import option_a_shortcut


@pytest.mark.parametrize(
    "name, num_classes, params",
    [
        ("cifar_vgg16", 10, 14_728_266),  # 13 conv(+bias) + 13 x (scale, bias) + dense: torch's count
        ("cifar_resnet20", 10, 269_722),  # He et al. option A: 0.27M
        ("cifar_resnet56", 10, 853_018),
        ("cifar_resnet110", 100, 1_733_812),
        ("resnet50", 1000, 25_557_032),
        ("vgg16", 1000, 138_365_992),
    ],
)
def test_full_size_parameter_counts_match_the_standard_batch_norm_models(name, num_classes, params):
  model = get_model(name, num_classes, norm="batch")
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape))))
  assert pruning.count_params(variables) == params


def test_bounded_models_have_no_norm_bias_and_one_logit_per_channel():
  model = get_model("cifar_resnet20", 10, norm="bounded", width_multiplier=0.25)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  block = variables["params"]["stage1_block0"]
  assert set(block["norm1"]) == {"scale_logit"}
  assert block["norm1"]["scale_logit"].shape == (8,)
  assert variables["batch_stats"]["stage1_block0"]["norm1"]["mean"].shape == (8,)


@pytest.mark.parametrize("shape", [(3, 3, 8, 7), (1, 1, 16, 32), (3, 3, 3, 64), (64, 10)])
def test_flat_drawn_initialisers_give_flax_initialisers_values(shape):
  """The zoo draws kernels flat and reshapes them (an N-D draw compiles ~10x slower on XLA:CPU): the values
  must be those of the initialisers docs/method.md names, in and out of jit, element for element (the random bits
  are identical; the float arithmetic after them may round apart in the last bit, as XLA compiles the flat
  and the N-D program differently at some optimisation levels)."""
  key = jax.random.key(3)
  if len(shape) == 4:
    ours, flax_init = layers.conv_kernel_init, nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  else:
    ours, flax_init = layers.dense_kernel_init, nn.initializers.normal(stddev=0.01)
  expected = np.asarray(flax_init(key, shape))
  np.testing.assert_allclose(np.asarray(ours(key, shape)), expected, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(jax.jit(ours, static_argnums=1)(key, shape)), expected, rtol=1e-6, atol=0)


def test_init_follows_the_method():
  model = get_model("cifar_vgg16", 10, norm="batch", batch_norm_scale_init=0.5, width_multiplier=0.5)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  kernel = params["conv8"]["kernel"]  # 3x3x128x256
  np.testing.assert_allclose(float(kernel.std()), np.sqrt(2.0 / (9 * 256)), rtol=0.02)
  np.testing.assert_array_equal(params["conv8"]["bias"], 0.0)
  np.testing.assert_allclose(float(params["classifier"]["kernel"].std()), 0.01, rtol=0.1)
  np.testing.assert_array_equal(params["norm3"]["scale"], 0.5)


@pytest.mark.parametrize("name", ["cifar_vgg16", "cifar_resnet20"])
def test_train_mode_updates_batch_stats_and_gives_logits(name):
  model = get_model(name, 7, width_multiplier=0.125)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (4, 7) and bool(jnp.all(jnp.isfinite(logits)))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), updates["batch_stats"], variables["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0


def test_option_a_shortcut_subsamples_and_pads_zero_channels_on_both_sides():
  x = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
  y = option_a_shortcut(x, 8, 2)
  assert y.shape == (2, 2, 2, 8)
  np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0.0)
  np.testing.assert_array_equal(y[..., 6:], 0.0)


def test_max_pool_reshape_matches_flax_max_pool_and_its_gradient():
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
  g = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x)
  g_ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2))(x)
  np.testing.assert_allclose(g, g_ref)


def test_model_spec_round_trip_and_bad_names():
  spec = {"name": "cifar_resnet20", "num_classes": 10, "norm": "batch", "overrides": {"inner_widths": [3] * 9}}
  model = model_from_spec(spec)
  assert isinstance(model, CifarResNet) and model.widths == (3,) * 9 and model.norm == "batch"
  with pytest.raises(ValueError, match="'resnet7'"):
    get_model("resnet7", 10)
  with pytest.raises(ValueError, match="'layer'"):
    get_model("cifar_vgg16", 10, norm="layer")
  with pytest.raises(ValueError, match="depth"):
    get_model("cifar_vgg16", 10, depth=3)
  with pytest.raises(ValueError, match="extra"):
    model_from_spec({"name": "cifar_vgg16", "num_classes": 10, "extra": 1})


@pytest.mark.parametrize("size, stride", [(2, 1), (2, 2), (1, 1), (4, 2)])
def test_cpu_friendly_conv_matches_flax_conv_values_and_gradients(size, stride):
  """Small maps take the patches + matmul path when asked; the parameters and results are nn.Conv's."""
  import flax.linen as nn

  from receding_jax.models.layers import conv

  x = jax.random.normal(jax.random.key(0), (3, size, size, 6))
  ours = conv(5, 3, stride, use_bias=True, cpu_friendly=True)
  plain = nn.Conv(5, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))
  variables = ours.init(jax.random.key(1), x)
  assert jax.tree.structure(variables) == jax.tree.structure(plain.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda v, x, m=m: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))(variables, x)
           for m in (ours, plain)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)


def test_the_residual_boundary_is_the_identity_in_value_and_gradient():
  from receding_jax.models.layers import residual_boundary

  x, cotangent = jax.random.normal(jax.random.key(0), (2, 2, 3, 2, 5))
  y, pull_back = jax.vjp(jax.jit(lambda v: residual_boundary(v, True)), x)
  assert np.array_equal(y, x) and np.array_equal(pull_back(cotangent)[0], cotangent)
  assert residual_boundary(x, False) is x  # Evaluation (and inference, export) never sees it.


def residual_chain_fusion_sizes(blocks: int) -> int:
  """Operands of the largest fusion in the compiled gradient of `blocks` residual blocks of the CIFAR kind
  (conv, batch statistics, add, ReLU), with the boundary after each block."""
  import re

  from receding_jax.models.layers import residual_boundary

  def loss(kernels, x):
    for kernel in kernels:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = (y - y.mean((0, 1, 2))) * jax.lax.rsqrt(y.var((0, 1, 2)) + 1e-5)
      x = residual_boundary(jax.nn.relu(x + y), True)
    return jnp.sum(x * x)

  kernels = [jnp.full((3, 3, 4, 4), 0.1)] * blocks
  text = jax.jit(jax.grad(loss)).lower(kernels, jnp.ones((2, 8, 8, 4))).compile().as_text()
  return max(m.group(1).count("%") for m in re.finditer(r"= \S+ fusion\((.*?)\), kind", text))


def test_the_residual_boundary_keeps_the_backward_from_recomputing_the_residual_stream():
  # Without it, XLA:CPU fused the whole chain of earlier blocks into each kernel gradient's transpose: the
  # largest fusion grew with depth (25 operands at 9 blocks). With it, depth does not matter.
  assert residual_chain_fusion_sizes(8) == residual_chain_fusion_sizes(3)


def formulation(model: nn.Module, train: bool) -> str:
  """The jaxpr text `model` traces to on a batch of 2: its training loss' gradient, or its eval forward."""
  x = jnp.ones((2, *model.input_shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  if not train:
    return str(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))
  loss = lambda p, v: jnp.sum(model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])[0])
  return str(jax.make_jaxpr(jax.grad(loss))(variables["params"], variables))


def test_the_traced_formulation_is_the_models_attribute_not_the_tracing_machine(monkeypatch):
  # The CPU formulation: 2x2 maps convolved as patches + matmul (VGG's last block: 3 more dot_generals),
  # and in training a custom-VJP fusion boundary after every residual block.
  vgg, resnet = (get_model(name, 10, width_multiplier=0.125) for name in ("cifar_vgg16", "cifar_resnet20"))
  cases = [(m.clone(cpu_friendly=cpu), train) for m, train in ((vgg, False), (resnet, True)) for cpu in (False, True)]
  on_cpu = [formulation(m, train) for m, train in cases]
  plain_vgg, cpu_vgg, plain_resnet, cpu_resnet = on_cpu
  assert plain_vgg.count("dot_general") == 1 and cpu_vgg.count("dot_general") == 4
  assert "custom_vjp" not in plain_resnet and cpu_resnet.count("custom_vjp_call") == 9
  assert not vgg.cpu_friendly and not resnet.cpu_friendly  # A library user's model is the portable one.
  for backend in ("gpu", "tpu"):  # Traced on a host whose default backend is an accelerator: the same.
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert [formulation(m, train) for m, train in cases] == on_cpu


def test_the_trainer_chooses_the_cpu_formulation_on_cpu_and_pruning_keeps_it():
  from receding_jax.models import for_platform
  from receding_jax.training import steps
  from receding_jax.training.paper_configs import paper_config

  model = get_model("cifar_resnet20", 10, width_multiplier=0.25)
  narrow = pruning.narrow_linen(model, {"stage0_block0/conv1": {"features": 2}})  # As a pruned checkpoint's.
  trainer = steps.make_trainer(paper_config("cifar10", "cifar_resnet20", "rni"), narrow, steps_per_epoch=10)
  assert type(trainer.model) is type(narrow) and trainer.model.cpu_friendly  # The mesh here is a CPU's.
  assert "custom_vjp_call" in formulation(trainer.model, train=True)
  state = trainer.init()  # The CPU-friendly narrow model initialises (and applies) at the narrow widths.
  assert state["params"]["stage0_block0"]["conv1"]["kernel"].shape == (3, 3, 4, 2)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  np.testing.assert_allclose(trainer.model.apply(variables, x), narrow.apply(variables, x), rtol=1e-5, atol=1e-5)
  assert for_platform(trainer.model, "gpu") == narrow and for_platform(model, "cpu") == model.clone(cpu_friendly=True)
