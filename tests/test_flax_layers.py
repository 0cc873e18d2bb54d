"""Pruning through flax layers and conventions beyond plain convs: transposed convs with a U-Net's
concatenated skip (NNX and Linen), partitioning boxes on the variables, and attention implementations whose
shape rules the jaxpr does not show (`jax.nn.dot_product_attention`)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from receding_jax import BoundedScaleNorm, pruning
from receding_jax.errors import InputError
from receding_jax.nnx_norm import NnxBoundedScaleNorm

SKIP = np.arange(11) % 3 != 1  # enc_norm's 6 channels, then up_norm's 5: the concatenated skip.
DOWN = np.arange(8) % 2 == 0


class NnxUNet(nnx.Module):
  """Encoder conv, a strided conv down, a transposed conv up, concatenated with the encoder's map."""

  def __init__(self, rngs: nnx.Rngs, transpose_kernel: bool = False):
    self.enc = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.enc_norm = nnx.BatchNorm(6, rngs=rngs)
    self.down = nnx.Conv(6, 8, (3, 3), strides=2, rngs=rngs)
    self.down_norm = NnxBoundedScaleNorm(8, rngs=rngs)
    self.up = nnx.ConvTranspose(8, 5, (2, 2), strides=(2, 2), transpose_kernel=transpose_kernel, rngs=rngs)
    self.up_norm = nnx.BatchNorm(5, rngs=rngs)
    self.dec = nnx.Conv(11, 4, (3, 3), rngs=rngs)
    self.head = nnx.Conv(4, 2, (1, 1), rngs=rngs)

  def __call__(self, x):
    e = nnx.relu(self.enc_norm(self.enc(x)))
    u = nnx.relu(self.up_norm(self.up(nnx.relu(self.down_norm(self.down(e))))))
    return self.head(nnx.relu(self.dec(jnp.concatenate([e, u], -1))))


class LinenUNet(nn.Module):
  transpose_kernel: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    e = nn.relu(nn.BatchNorm(not train, name="enc_norm")(nn.Conv(6, (3, 3), name="enc")(x)))
    d = nn.relu(BoundedScaleNorm(use_running_average=not train, name="down_norm")(
        nn.Conv(8, (3, 3), strides=2, name="down")(e)))
    up = nn.ConvTranspose(5, (2, 2), strides=(2, 2), transpose_kernel=self.transpose_kernel, name="up")
    u = nn.relu(nn.BatchNorm(not train, name="up_norm")(up(d)))
    return nn.Conv(2, (1, 1), name="head")(nn.relu(nn.Conv(4, (3, 3), name="dec")(jnp.concatenate([e, u], -1))))


def switch_off_nnx(model, masks):
  """The removed channels' norms output zero: BatchNorm scale and bias 0, a bounded norm's logit -40."""
  for norm, removed in ((model.enc_norm, ~masks["enc_norm"][:6]), (model.up_norm, ~masks["enc_norm"][6:])):
    norm.scale[...] = jnp.where(removed, 0.0, norm.scale[...])
    norm.bias[...] = jnp.where(removed, 0.0, norm.bias[...] + 0.1)
  model.down_norm.scale_logit[...] = jnp.where(~masks["down_norm"], -40.0, model.down_norm.scale_logit[...])


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_an_nnx_unet_with_a_transposed_conv_and_a_concatenated_skip_prunes_exactly(transpose_kernel):
  model = NnxUNet(nnx.Rngs(0), transpose_kernel)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  skip = pruning.trace(model, inputs=x).group("enc_norm")
  assert [(n, o, s) for n, o, s in skip.norms] == [("enc_norm", 0, 6), ("up_norm", 6, 5)]
  same, _ = pruning.prune_params(model, masks={}, inputs=x)  # Nothing removed (this crashed too).
  assert same.up.kernel[...].shape == model.up.kernel[...].shape
  masks = {"enc_norm": SKIP, "down_norm": DOWN}
  switch_off_nnx(model, masks)
  model.eval()
  before = model(x)
  narrow, state = pruning.prune_params(model, masks=masks, inputs=x)  # Checked.
  kernel = (2, 2, 3, 4) if transpose_kernel else (2, 2, 4, 3)
  assert narrow.up.kernel[...].shape == kernel and state["dec"]["kernel"][...].shape == (3, 3, 7, 4)
  assert (narrow.up.in_features, narrow.up.out_features, narrow.dec.in_features) == (4, 3, 7)
  narrow.eval()
  np.testing.assert_allclose(narrow(x), before, rtol=1e-5, atol=1e-5)


def test_a_linen_unet_with_a_transposed_kernel_prunes_exactly():
  model, x = LinenUNet(), jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = jax.tree.map(lambda v: v + 0.1, model.init(jax.random.key(0), x))
  params = variables["params"]
  for name, removed in (("enc_norm", ~SKIP[:6]), ("up_norm", ~SKIP[6:])):
    params[name] = {k: jnp.where(removed, 0.0, v) for k, v in params[name].items()}
  params["down_norm"]["scale_logit"] = jnp.where(~DOWN, -40.0, params["down_norm"]["scale_logit"])
  narrow_model, narrow = pruning.prune_params(model, variables, masks={"enc_norm": SKIP, "down_norm": DOWN},
                                              inputs=x)
  assert narrow["params"]["up"]["kernel"].shape == (2, 2, 3, 4)  # [*window, features, in].
  assert narrow_model.pruned_overrides["up"] == {"features": 3}
  np.testing.assert_allclose(narrow_model.apply(narrow, x), model.apply(variables, x), rtol=1e-5, atol=1e-5)


def logical(names):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class PartitionedMLP(nn.Module):
  """A T5X/MaxText-style MLP block: logically partitioned kernels and bias, a norm on the hidden units."""

  @nn.compact
  def __call__(self, x, train=False):
    bias = nn.with_logical_partitioning(nn.initializers.normal(0.1), ("mlp",))
    h = nn.Dense(8, kernel_init=logical(("embed", "mlp")), bias_init=bias, name="wi")(x)
    h = nn.relu(BoundedScaleNorm(use_running_average=not train, name="norm")(h))
    return nn.Dense(4, kernel_init=logical(("mlp", "embed")), name="wo")(h)


def test_logically_partitioned_variables_are_pruned_and_returned_in_their_boxes():
  model, x, keep = PartitionedMLP(), jax.random.normal(jax.random.key(1), (3, 4)), np.arange(8) % 3 != 0
  variables = model.init(jax.random.key(0), x)
  variables["params"]["norm"]["scale_logit"] = jnp.where(keep, 1.0, -40.0)
  narrow_model, narrow = pruning.prune_params(model, variables, masks={"norm": keep}, inputs=x)
  kernel, bias = narrow["params"]["wi"]["kernel"], narrow["params"]["wi"]["bias"]
  assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.names == ("embed", "mlp")
  assert kernel.value.shape == (4, 5) and bias.names == ("mlp",) and bias.value.shape == (5,)
  assert narrow["params"]["wo"]["kernel"].names == ("mlp", "embed")
  np.testing.assert_array_equal(kernel.value, variables["params"]["wi"]["kernel"].value[:, keep])
  np.testing.assert_allclose(narrow_model.apply(narrow, x), model.apply(variables, x), rtol=1e-5, atol=1e-6)
  fresh = narrow_model.init(jax.random.key(2), x)  # The narrow model's own init makes the same boxes.
  assert jax.tree.map(np.shape, nn.unbox(fresh)) == jax.tree.map(np.shape, nn.unbox(narrow))
  _, plain = pruning.prune_params(model, nn.unbox(variables), masks={"norm": keep}, inputs=x)
  assert jax.tree.all(jax.tree.map(np.array_equal, plain, nn.unbox(narrow)))  # Unboxed in, unboxed out.

  tx = optax.adam(1e-3)
  sliced = pruning.prune_params_like(tx.init(variables["params"]), model, variables["params"], {"norm": keep},
                                     variables=variables, inputs=x)
  assert jax.tree.structure(sliced[0].mu) == jax.tree.structure(narrow["params"])
  assert jax.tree.map(np.shape, sliced[0].mu) == jax.tree.map(np.shape, narrow["params"])


def jax_attention(query, key, value, bias=None, mask=None, **_):
  """A Linen attention_fn that runs jax.nn.dot_product_attention (fused or cuDNN attention)."""
  return jax.nn.dot_product_attention(query, key, value, bias, mask)


def fixed_scale_attention(query, key, value, bias=None, mask=None, **_):
  return jax.nn.dot_product_attention(query, key, value, bias, mask, scale=0.5)


class LinenAttention(nn.Module):
  attention_fn: Any = nn.dot_product_attention

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(16, name="embed")(x)
    attention = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, attention_fn=self.attention_fn,
                                                name="attn")
    return nn.Dense(2, name="head")((h + attention(h)).mean(1))


class NnxAttention(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, attention_fn: Any = nnx.dot_product_attention):
    self.embed = nnx.Linear(4, 16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=16, qkv_features=16, decode=False,
                                       attention_fn=attention_fn, rngs=rngs)
    self.head = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    return self.head((h + self.attn(h)).mean(1))


def attention_model(kind, attention_fn):
  """(model, Linen variables or None, run(model, variables) -> outputs on x, x)."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  if kind == "nnx":
    model = NnxAttention(nnx.Rngs(0), attention_fn)
    return model, None, lambda m, _: m(x), x
  model = LinenAttention(attention_fn)
  return model, model.init(jax.random.key(0), x), lambda m, v: m.apply(v, x), x


def group_of(traced, leaf, axis):
  return next(g for g in traced.groups if any(k[-3:] == leaf and a == axis for k, a in g.group.members))


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_jax_nn_attention_ties_the_value_head_dimension_and_refuses_to_prune_it(kind):
  attention_fn = nnx.dot_product_attention if kind == "nnx" else jax_attention  # Both run jax.nn's.
  model, variables, run, x = attention_model(kind, attention_fn)
  traced = pruning.trace(model, variables, x)
  head_dim = group_of(traced, ("attn", "value", "kernel"), 2)
  assert group_of(traced, ("attn", "query", "kernel"), 2) is head_dim  # Tied to q's and k's.
  assert head_dim.group.status == "unprunable"
  assert any("jax.nn.dot_product_attention" in r for r in head_dim.group.reasons)
  for check in (True, False):
    with pytest.raises(InputError, match="needs equal query, key and value head dimensions"):
      pruning.prune_params(model, variables, masks={head_dim.name: np.array([1, 0, 1, 1], bool)}, inputs=x,
                           check=check)
  heads = group_of(traced, ("attn", "query", "kernel"), 1)  # Heads stay prunable; unchecked, it runs.
  narrow_model, narrow = pruning.prune_params(model, variables, masks={heads.name: np.array([1, 0, 1, 1], bool)},
                                              inputs=x, check=False)
  if kind == "nnx":
    model.attn.out.kernel[...] = model.attn.out.kernel[...].at[1].set(0.0)
  else:
    out = variables["params"]["attn"]["out"]
    out["kernel"] = out["kernel"].at[1].set(0.0)
  np.testing.assert_allclose(run(narrow_model, narrow), run(model, variables), rtol=1e-5, atol=1e-6)
  if kind == "linen":  # flax's own Linen attention (einsums) has no such rule: v's head dim prunes alone.
    default = LinenAttention()
    traced = pruning.trace(default, default.init(jax.random.key(0), x), x)
    assert group_of(traced, ("attn", "value", "kernel"), 2).group.status == "prunable"
    assert group_of(traced, ("attn", "query", "kernel"), 2) is not group_of(traced, ("attn", "value", "kernel"), 2)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_with_a_fixed_scale_the_query_key_and_value_head_dimensions_prune_together_exactly(kind):
  model, variables, run, x = attention_model(kind, fixed_scale_attention)
  traced = pruning.trace(model, variables, x)
  head_dim = group_of(traced, ("attn", "value", "kernel"), 2)
  assert group_of(traced, ("attn", "query", "kernel"), 2) is head_dim and head_dim.group.status == "prunable"
  keep = np.array([1, 1, 0, 1], bool)
  narrow_model, narrow = pruning.prune_params(model, variables, masks={head_dim.name: keep}, inputs=x)  # Checked.
  if kind == "nnx":
    for layer in (model.attn.query, model.attn.key, model.attn.value):
      layer.kernel[...] = layer.kernel[...] * keep
      layer.bias[...] = layer.bias[...] * keep
    assert (narrow_model.attn.head_dim, narrow_model.attn.qkv_features) == (3, 12)
  else:
    for name in ("query", "key", "value"):
      layer = variables["params"]["attn"][name]
      variables["params"]["attn"][name] = {k: v * keep for k, v in layer.items()}
  np.testing.assert_allclose(run(narrow_model, narrow), run(model, variables), rtol=1e-5, atol=1e-6)


class NnxLayers(nnx.Module):
  """Einsum -> BatchNorm -> LinearGeneral (two output axes) -> bounded norm -> LoRA -> BatchNorm -> Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.ein = nnx.Einsum("btd,dh->bth", (6, 8), (8,), rngs=rngs)
    self.n1 = nnx.BatchNorm(8, rngs=rngs)
    self.general = nnx.LinearGeneral(8, (2, 5), rngs=rngs)
    self.n2 = NnxBoundedScaleNorm(5, rngs=rngs)
    self.lora = nnx.LoRA(5, 3, 7, rngs=rngs)
    self.n3 = nnx.BatchNorm(7, rngs=rngs)
    self.head = nnx.Linear(7, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.n2(self.general(nnx.relu(self.n1(self.ein(x))))))
    return self.head(nnx.relu(self.n3(self.lora(h))).mean((1, 2)))


class LinenEinsums(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(BoundedScaleNorm(use_running_average=not train, name="norm")(nn.Einsum((6, 8), "bd,dh->bh")(x)))
    return nn.Einsum((8, 3), "bh,ho->bo")(h)


def test_nnx_and_linen_layers_beyond_convs_get_their_narrow_widths():
  model, x = NnxLayers(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (2, 3, 6))
  masks = {"n1": np.arange(8) % 3 != 1, "n2": np.arange(5) != 2, "n3": np.arange(7) % 2 == 0}
  for norm in (model.n1, model.n3):
    removed = ~masks["n1" if norm is model.n1 else "n3"]
    norm.scale[...], norm.bias[...] = jnp.where(removed, 0.0, 1.5), jnp.where(removed, 0.0, 0.1)
  model.n2.scale_logit[...] = jnp.where(masks["n2"], 1.0, -40.0)
  model.eval()
  before = model(x)
  narrow, _ = pruning.prune_params(model, masks=masks, inputs=x)  # Checked.
  assert (narrow.ein.kernel_shape, narrow.ein.bias_shape) == ((6, 5), (5,))
  assert (narrow.general.in_features, narrow.general.out_features) == ((5,), (2, 4))
  assert (narrow.lora.in_features, narrow.lora.out_features, narrow.n3.num_features) == (4, 4, 4)
  narrow.eval()
  np.testing.assert_allclose(narrow(x), before, rtol=1e-5, atol=1e-6)

  linen, x = LinenEinsums(), jax.random.normal(jax.random.key(1), (2, 6))
  variables = linen.init(jax.random.key(0), x)
  variables["params"]["norm"]["scale_logit"] = jnp.where(masks["n1"], 1.0, -40.0)
  narrow_linen, narrow_vars = pruning.prune_params(linen, variables, masks={"norm": masks["n1"]}, inputs=x)
  assert narrow_linen.pruned_overrides == {"Einsum_0": {"shape": [6, 5]}, "Einsum_1": {"shape": [5, 3]}}
  np.testing.assert_allclose(narrow_linen.apply(narrow_vars, x), linen.apply(variables, x), rtol=1e-5, atol=1e-6)
