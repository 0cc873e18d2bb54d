"""Streams: a group is one when two independent data paths are added on it (a residual), and only then.

Several readers (a squeeze-excite conv and a projection, a VAE's two heads), a product with a function of
itself (squeeze-excite's gate) and an add of a value with a function of itself (the tanh GELU's
x + 0.044715 x^3) are not streams: a default prune removes their channels exactly as prune_streams=True.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from test_coupling import bounded, groups_by_name, members, random_variables

from receding_jax import pruning


class SqueezeExciteNet(nn.Module):
  """Two EfficientNet-style MBConv blocks: expand 1x1 -> depthwise 3x3 -> squeeze-excite (mean over the
  map, reduce 1x1, expand 1x1, sigmoid, multiply) -> project 1x1. With `residual`, the second block adds
  its input back: a residual stream over both blocks' projections."""

  residual: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.swish(bounded(train)(nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
    for i, wide in enumerate((24, 32)):
      y = nn.swish(bounded(train)(nn.Conv(wide, (1, 1), use_bias=False, name=f"b{i}_expand")(x)))
      y = nn.swish(bounded(train)(nn.Conv(wide, (3, 3), feature_group_count=wide, use_bias=False,
                                          name=f"b{i}_depthwise")(y)))
      gate = nn.swish(nn.Conv(wide // 4, (1, 1), name=f"b{i}_se_reduce")(y.mean((1, 2), keepdims=True)))
      y = y * nn.sigmoid(nn.Conv(wide, (1, 1), name=f"b{i}_se_expand")(gate))
      y = bounded(train)(nn.Conv(8, (1, 1), use_bias=False, name=f"b{i}_project")(y))
      x = x + y if i and self.residual else y
    return nn.Dense(3, name="head")(x.mean((1, 2)))


class GeluBlock(nn.Module):
  """A transformer's MLP: embed, then h + out(gelu(norm(hidden(h)))) with the tanh GELU, then a head."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(8, name="embed")(x)
    y = nn.gelu(bounded(train)(nn.Dense(32, use_bias=False, name="hidden")(h)), approximate=True)
    h = h + nn.Dense(8, name="out")(y)
    return nn.Dense(2, name="head")(h.mean(1))


class TwoHeadEncoder(nn.Module):
  """A VAE: one hidden layer read by a mean head and a log-variance head, a sample, a decoder."""

  @nn.compact
  def __call__(self, x, noise, train=False):
    h = nn.relu(bounded(train)(nn.Dense(16, use_bias=False, name="encoder")(x)))
    mean, log_var = nn.Dense(4, name="mean")(h), nn.Dense(4, name="log_var")(h)
    z = mean + jnp.exp(0.5 * log_var) * noise
    d = nn.relu(bounded(train)(nn.Dense(16, use_bias=False, name="decoder")(z)))
    return nn.Dense(6, name="reconstruction")(d), mean, log_var


def masks_equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("residual", [False, True])
def test_squeeze_excite_channels_are_no_stream_and_a_threshold_prunes_them_as_prune_streams_does(residual):
  x = jnp.zeros((1, 8, 8, 3))
  model = SqueezeExciteNet(residual=residual)
  variables = random_variables(model, x)
  groups = groups_by_name(model, variables, x)
  for block, norm in ((0, "BoundedScaleNorm_1"), (1, "BoundedScaleNorm_4")):  # Expand and depthwise norms.
    expanded = groups[norm]
    assert {(f"b{block}_se_reduce/kernel", 2), (f"b{block}_se_expand/kernel", 3),
            (f"b{block}_project/kernel", 2)} <= members(expanded) and not expanded.stream
  streams = {name for name, g in groups.items() if g.stream}
  assert streams == ({"BoundedScaleNorm_3"} if residual else set())  # Both projections add into it.
  default = pruning.channel_masks(model, variables, threshold=0.5, inputs=x)
  every = pruning.channel_masks(model, variables, threshold=0.5, inputs=x, prune_streams=True)
  assert masks_equal(default, {k: v for k, v in every.items() if k not in streams})
  assert {"BoundedScaleNorm_1", "BoundedScaleNorm_4"} <= default.keys()
  assert not default["BoundedScaleNorm_1"].all() and not default["BoundedScaleNorm_4"].all()
  macs = lambda masks: pruning.count_macs(model, x, variables=variables, masks=masks)
  if not residual:
    assert macs(default) == macs(every) < macs({})
  narrow_model, narrow = pruning.prune_params(model, variables, threshold=0.5, inputs=x)  # Checked: exact.
  kept = int(default["BoundedScaleNorm_4"].sum())
  assert narrow["params"]["b1_se_expand"]["kernel"].shape == (1, 1, 8, kept)
  assert narrow["params"]["b1_project"]["kernel"].shape[2] == kept
  assert narrow_model.apply(narrow, x).shape == (1, 3)


def test_the_tanh_gelu_adds_a_value_to_a_function_of_itself_and_makes_no_stream():
  x = jnp.zeros((2, 5, 6))
  model = GeluBlock()
  variables = random_variables(model, x)
  traced = pruning.trace(model, variables, x)
  hidden = traced.group("BoundedScaleNorm_0")
  residual = next(g for g in traced.groups if ("out/kernel", 1) in members(g))
  assert ("hidden/kernel", 1) in members(hidden) and ("out/kernel", 0) in members(hidden)
  assert not hidden.stream and residual.stream and ("embed/kernel", 1) in members(residual)
  masks = pruning.channel_masks(model, variables, 0.5, inputs=x)
  assert set(masks) == {"BoundedScaleNorm_0"} and masks["BoundedScaleNorm_0"].sum() == 16
  _, narrow = pruning.prune_params(model, variables, 0.5, inputs=x)  # Checked: exact.
  assert narrow["params"]["out"]["kernel"].shape == (16, 8)


def test_a_hidden_layer_read_by_two_heads_is_no_stream():
  inputs = (jnp.zeros((2, 6)), jnp.zeros((2, 4)))
  model = TwoHeadEncoder()
  variables = random_variables(model, inputs)
  groups = groups_by_name(model, variables, inputs)
  encoder = groups["BoundedScaleNorm_0"]
  assert {("mean/kernel", 0), ("log_var/kernel", 0)} <= members(encoder) and not encoder.stream
  latent = next(g for g in groups.values() if ("decoder/kernel", 0) in members(g))
  assert latent.stream and latent.group.status == "unprunable"  # Mean + scale * noise: two paths added.
  masks = pruning.channel_masks(model, variables, 0.5, inputs=inputs)
  assert set(masks) == {"BoundedScaleNorm_0", "BoundedScaleNorm_1"}
  _, narrow = pruning.prune_params(model, variables, masks=masks, inputs=inputs)  # Checked: exact.
  kept = int(masks["BoundedScaleNorm_0"].sum())
  assert narrow["params"]["mean"]["kernel"].shape == narrow["params"]["log_var"]["kernel"].shape == (kept, 4)
