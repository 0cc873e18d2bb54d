"""The coupling analysis on models the zoo does not have, and on every zoo model against its known groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from receding_jax import BoundedScaleNorm, pruning
from receding_jax.errors import InputError
from receding_jax.models import get_model


def bounded(train):
  return BoundedScaleNorm(use_running_average=not train)


class SeparableNet(nn.Module):
  """Expand 1x1 -> depthwise 3x3 -> project 1x1, MobileNet style, then a dense head."""

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.relu(bounded(train)(nn.Conv(12, (1, 1), use_bias=False, name="expand")(x)))
    y = nn.relu(bounded(train)(nn.Conv(12, (3, 3), feature_group_count=12, use_bias=False, name="depthwise")(y)))
    y = bounded(train)(nn.Conv(8, (1, 1), use_bias=False, name="project")(y))
    return nn.Dense(3, name="head")(y.mean((1, 2)))


class ProjectionResNet(nn.Module):
  """Two stages of one block each; the second block has a 1x1 strided projection shortcut."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(bounded(train)(nn.Conv(8, (3, 3), name="stem")(x)))
    for i, (width, stride) in enumerate(((8, 1), (16, 2))):
      y = nn.relu(bounded(train)(nn.Conv(width, (3, 3), strides=stride, name=f"b{i}_conv1")(x)))
      y = bounded(train)(nn.Conv(width, (3, 3), name=f"b{i}_conv2")(y))
      shortcut = x if i == 0 else bounded(train)(nn.Conv(width, (1, 1), strides=stride, name=f"b{i}_proj")(x))
      x = nn.relu(y + shortcut)
    return nn.Dense(4, name="head")(x.mean((1, 2)))


class ConcatNet(nn.Module):
  """Two branches concatenated along channels, a conv, then a flatten into a dense layer."""

  @nn.compact
  def __call__(self, x, train=False):
    a = nn.relu(bounded(train)(nn.Conv(6, (3, 3), name="a")(x)))
    b = nn.relu(bounded(train)(nn.Conv(5, (3, 3), name="b")(x)))
    y = nn.relu(bounded(train)(nn.Conv(7, (3, 3), name="c")(jnp.concatenate([a, b], -1))))
    return nn.Dense(3, name="head")(y.reshape(y.shape[0], -1))


class AttentionNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(16, name="embed")(x)
    h = h + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name="attn")(h)
    return nn.Dense(2, name="head")(h.mean(1))


class GroupedNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    y = nn.relu(bounded(train)(nn.Conv(8, (3, 3), name="c1")(x)))
    y = nn.relu(bounded(train)(nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(y)))
    return nn.Dense(2, name="head")(y.mean((1, 2)))


class LayerNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    y = nn.relu(nn.LayerNorm(name="ln")(nn.Conv(8, (3, 3), name="c1")(x)))
    return nn.Dense(2, name="head")(y.mean((1, 2)))


class Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, x):
    h = nn.tanh(nn.Dense(6, name="cell")(jnp.concatenate([carry, x], -1)))
    return h, h


class ScannedNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(5, name="embed")(x)
    scan = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1)
    carry, _ = scan(name="rnn")(jnp.zeros((x.shape[0], 6)), x)
    return nn.Dense(2, name="head")(carry)


def random_variables(model, x, seed=0):
  """Variables with every leaf random (positive variances): a trained-looking model. `x`: an input or a
  tuple of inputs."""
  variables = model.init(jax.random.key(0), *(x if isinstance(x, tuple) else (x,)))
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  values = [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
  variables = jax.tree.unflatten(treedef, values)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(lambda v: jnp.abs(v) + 0.5, variables["batch_stats"])
  return variables


def groups_by_name(model, variables, x):
  return {g.name: g for g in pruning.trace(model, variables, x).groups}


def members(group):
  return {("/".join(leaf[1:]), axis) for leaf, axis in group.group.members}


def assert_pruning_is_exact(model, variables, x, masks, **kwargs):
  """The narrow model equals the wide one whose removed channels' norms (logit -> -inf) are switched off."""
  narrow_model, narrow_variables = pruning.prune_params(model, variables, masks=masks, inputs=x, **kwargs)
  wide = jax.tree.map(np.array, variables)
  traced = pruning.trace(model, variables, x)
  for name, mask in masks.items():
    group = traced.group(name)
    for norm, offset, size in group.norms:
      node = wide["params"]
      for key in norm.split("/"):
        node = node[key]
      node["scale_logit"][~mask[offset:offset + size]] = -1e4
  inputs = jax.random.normal(jax.random.key(3), x.shape)
  expected = model.apply(wide, inputs)
  got = narrow_model.apply(narrow_variables, inputs)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert pruning.count_params(narrow_variables) < pruning.count_params(variables)
  return narrow_model, narrow_variables


def test_depthwise_convolution_ties_its_input_output_and_kernel_channels():
  x = jnp.zeros((1, 8, 8, 3))
  model = SeparableNet()
  variables = random_variables(model, x)
  groups = groups_by_name(model, variables, x)
  inner = groups["BoundedScaleNorm_0"]
  assert members(inner) >= {("expand/kernel", 3), ("depthwise/kernel", 3), ("project/kernel", 2),
                            ("BoundedScaleNorm_0/scale_logit", 0), ("BoundedScaleNorm_1/scale_logit", 0)}
  assert [n for n, _, _ in inner.norms] == ["BoundedScaleNorm_0", "BoundedScaleNorm_1"] and not inner.stream
  keep = np.arange(12) % 3 != 0
  narrow_model, narrow_variables = assert_pruning_is_exact(model, variables, x, {"BoundedScaleNorm_0": keep})
  assert narrow_variables["params"]["depthwise"]["kernel"].shape == (3, 3, 1, 8)
  y, updates = narrow_model.apply(narrow_variables, x, train=True, mutable=["batch_stats"])  # Train mode runs.
  assert y.shape == (1, 3) and updates["batch_stats"]["BoundedScaleNorm_1"]["mean"].shape == (8,)


def test_projection_shortcut_streams_are_found_and_pruned_only_when_asked():
  x = jnp.zeros((1, 8, 8, 3))
  model = ProjectionResNet()
  variables = random_variables(model, x)
  groups = groups_by_name(model, variables, x)
  stage0, stage1 = groups["BoundedScaleNorm_0"], groups["BoundedScaleNorm_4"]
  assert stage0.stream and stage1.stream
  assert ("b1_proj/kernel", 2) in members(stage0) and ("b1_conv1/kernel", 2) in members(stage0)
  assert {("b1_proj/kernel", 3), ("b1_conv2/kernel", 3), ("head/kernel", 0)} <= members(stage1)
  assert not groups["BoundedScaleNorm_1"].stream and not groups["BoundedScaleNorm_3"].stream
  default = pruning.channel_masks(model, variables, 0.5, inputs=x)
  assert set(default) == {"BoundedScaleNorm_1", "BoundedScaleNorm_3"}  # Block-inner channels only.
  with_streams = pruning.channel_masks(model, variables, 0.5, inputs=x, prune_streams=True)
  assert set(with_streams) == set(default) | {"BoundedScaleNorm_0", "BoundedScaleNorm_4"}
  masks = {"BoundedScaleNorm_4": np.arange(16) % 4 != 1, "BoundedScaleNorm_1": np.arange(8) != 5}
  narrow_model, narrow_variables = assert_pruning_is_exact(model, variables, x, masks)
  losses = train_a_few_steps(narrow_model, narrow_variables, (8, 8, 8, 3), classes=4)
  assert losses[-1] < losses[0] and np.isfinite(losses).all()


def train_a_few_steps(model, variables, shape, classes, steps=5):
  """SGD in train mode (batch statistics updated) under jit and grad; returns the losses."""
  images = jax.random.normal(jax.random.key(5), shape)
  labels = jnp.arange(shape[0]) % classes

  @jax.jit
  def step(variables):
    def loss_fn(params):
      logits, stats = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), stats
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {"params": params, **stats}, loss

  losses = []
  for _ in range(steps):
    variables, loss = step(variables)
    losses.append(float(loss))
  return np.array(losses)


def test_concatenated_branches_form_one_group_at_offsets_and_a_flatten_slices_the_dense_rows():
  x = jnp.zeros((1, 6, 6, 3))
  model = ConcatNet()
  variables = random_variables(model, x)
  groups = groups_by_name(model, variables, x)
  joined = groups["BoundedScaleNorm_0"]
  assert joined.size == 11 and [(n, o, s) for n, o, s in joined.norms] == [("BoundedScaleNorm_0", 0, 6),
                                                                           ("BoundedScaleNorm_1", 6, 5)]
  assert ("c/kernel", 2) in members(joined) and ("head/kernel", 0) in members(groups["BoundedScaleNorm_2"])
  masks = {"BoundedScaleNorm_0": np.arange(11) % 2 == 0, "BoundedScaleNorm_2": np.arange(7) != 3}
  _, narrow = assert_pruning_is_exact(model, variables, x, masks)
  assert narrow["params"]["head"]["kernel"].shape == (6 * 6 * 6, 3)  # Every position loses channel 3.


def test_attention_heads_are_a_group_and_a_head_dimension_that_changes_the_scaling_is_refused():
  x = jnp.zeros((2, 5, 4))
  model = AttentionNet()
  variables = random_variables(model, x)
  traced = pruning.trace(model, variables, x)
  heads = next(g for g in traced.groups if ("attn/query/kernel", 1) in members(g))
  assert {("attn/key/kernel", 1), ("attn/value/kernel", 1), ("attn/out/kernel", 0)} <= members(heads)
  with pytest.raises(InputError, match="0 scored"):  # No norm scores them: a criterion cannot prune them.
    pruning.channel_masks(model, variables, 0.5, inputs=x)
  narrow_model, narrow = pruning.prune_params(model, variables, masks={heads.name: np.array([1, 0, 1, 0], bool)},
                                              inputs=x)
  assert narrow["params"]["attn"]["query"]["kernel"].shape == (16, 2, 4)
  assert narrow_model.apply(narrow, x).shape == (2, 2)
  head_dim = next(g for g in traced.groups if ("attn/query/kernel", 2) in members(g))
  with pytest.raises(ValueError, match="not exact"):  # q.k is scaled by 1/sqrt(head_dim), read off shapes.
    pruning.prune_params(model, variables, masks={head_dim.name: np.array([1, 0, 1, 1], bool)}, inputs=x)


def test_unprunable_groups_are_refused_with_their_reasons():
  x = jnp.zeros((1, 6, 6, 3))
  model = GroupedNet()
  variables = random_variables(model, x)
  groups = groups_by_name(model, variables, x)
  assert all(groups[n].group.status == "unprunable" for n in ("BoundedScaleNorm_0", "BoundedScaleNorm_1"))
  assert "grouped convolution (feature_group_count=2)" in groups["BoundedScaleNorm_0"].group.reasons
  with pytest.raises(InputError, match=r"0 prunable group\(s\)"):  # Nothing a criterion could prune.
    pruning.channel_masks(model, variables, 0.5, inputs=x)
  with pytest.raises(ValueError, match="feature_group_count=2"):
    pruning.prune_params(model, variables, masks={"BoundedScaleNorm_0": np.arange(8) > 2}, inputs=x)

  x = jnp.zeros((1, 4, 3))
  model = ScannedNet()
  variables = random_variables(model, x)
  embed = next(g for g in pruning.trace(model, variables, x).groups if ("embed/kernel", 1) in members(g))
  assert embed.group.status == "unprunable" and any("'scan'" in r for r in embed.group.reasons)
  with pytest.raises(ValueError, match="'scan' has no coupling rule"):
    pruning.prune_params(model, variables, masks={embed.name: np.arange(5) > 1}, inputs=x)


def test_a_layer_norm_over_channels_is_approximate_refused_unless_allowed():
  x = jnp.zeros((1, 6, 6, 3))
  model = LayerNormNet()
  variables = random_variables(model, x)
  group = next(g for g in pruning.trace(model, variables, x).groups if ("c1/kernel", 3) in members(g))
  assert group.group.status == "approximate" and any("reduce_sum" in r for r in group.group.reasons)
  masks = {group.name: np.arange(8) > 1}
  with pytest.raises(ValueError, match="allow_approximate"):
    pruning.prune_params(model, variables, masks=masks, inputs=x)
  with pytest.warns(UserWarning, match="approximate"):
    _, narrow = pruning.prune_params(model, variables, masks=masks, inputs=x, allow_approximate=True)
  assert narrow["params"]["ln"]["scale"].shape == (6,)


def test_a_registered_rule_makes_an_unknown_primitive_prunable():
  from receding_jax.pruning import rules

  try:
    del rules.RULES["tanh"]
    x = jnp.zeros((1, 4, 3))
    model = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(2)])
    variables = random_variables(model, x)
    hidden = lambda: next(g for g in pruning.trace(model, variables, x).groups if g.size == 6)
    assert "primitive 'tanh' has no coupling rule" in hidden().group.reasons[0]
    pruning.register_rule("tanh", rules.elementwise)
    assert hidden().group.status == "prunable"
  finally:
    pruning.register_rule("tanh", rules.elementwise)


def test_rules_given_to_one_call_neither_change_the_defaults_nor_reach_another_call():
  from receding_jax.pruning import rules

  def refuse(eqn, rel):
    rel.fix_all([*eqn.invars, *eqn.outvars], "refused by this call's rule")

  x = jnp.zeros((1, 4, 3))
  model = nn.Sequential([nn.Dense(6), nn.tanh, jax.lax.bessel_i0e, nn.Dense(2)])  # bessel_i0e: no built-in rule.
  variables = random_variables(model, x)
  hidden = lambda **kw: next(g for g in pruning.trace(model, variables, x, **kw).groups if g.size == 6)
  mine = {"bessel_i0e": rules.elementwise}
  assert hidden(rules=mine).group.status == "prunable"
  assert "refused by this call's rule" in hidden(rules={**mine, "tanh": refuse}).group.reasons
  assert "primitive 'bessel_i0e' has no coupling rule" in hidden().group.reasons[0]  # The other call: defaults.
  assert "bessel_i0e" not in rules.RULES and rules.RULES["tanh"] is rules.elementwise
  keep = {hidden(rules=mine).name: np.arange(6) < 4}
  _, narrow = pruning.prune_params(model, variables, masks=keep, inputs=x, rules=mine)
  assert narrow["params"]["layers_0"]["kernel"].shape == (3, 4)
  with pytest.raises(ValueError, match="cannot be removed"):
    pruning.prune_params(model, variables, masks=keep, inputs=x)


def test_masks_for_unknown_groups_or_of_the_wrong_size_are_refused_before_slicing():
  x = jnp.zeros((1, 8, 8, 3))
  model = SeparableNet()
  variables = random_variables(model, x)
  with pytest.raises(ValueError, match="does not have: \\['nope'\\]"):
    pruning.prune_params(model, variables, masks={"nope": np.ones(3, bool)}, inputs=x)
  with pytest.raises(ValueError, match="shape \\(5,\\), the group has 12"):
    pruning.prune_params(model, variables, masks={"BoundedScaleNorm_0": np.ones(5, bool)}, inputs=x)
  with pytest.raises(ValueError, match="has no input_shape attribute: pass inputs="):
    pruning.prune_params(model, variables, 0.5)


# The groups the zoo's hand-written descriptions listed, by norm: producer conv, norm, consumer.
def _zoo_expected(name, model):
  if name.startswith("cifar_vgg") or name == "vgg16":
    n = len(model.widths)
    last = "classifier" if name.startswith("cifar") else "fc0"
    return {f"norm{i}": {(f"conv{i}/kernel", 3), (f"norm{i}/scale_logit", 0),
                         (f"conv{i + 1}/kernel", 2) if i + 1 < n else (f"{last}/kernel", 0)} for i in range(n)}
  sizes = model.stage_sizes if name == "resnet50" else [model.blocks_per_stage] * 3
  blocks = [(s, b) for s, size in enumerate(sizes) for b in range(size)]
  pairs = (1,) if name.startswith("cifar") else (1, 2)
  inner = {f"stage{s}_block{b}/norm{k}": {(f"stage{s}_block{b}/conv{k}/kernel", 3),
                                          (f"stage{s}_block{b}/norm{k}/scale_logit", 0),
                                          (f"stage{s}_block{b}/conv{k + 1}/kernel", 2)}
           for s, b in blocks for k in pairs}
  if name != "resnet50":
    return inner
  # ResNet-50's stem is read by the first block's conv1 and projection shortcut and added to nothing: no stream.
  return {**inner, "stem_norm": {("stem_conv/kernel", 3), ("stem_norm/scale_logit", 0),
                                 ("stage0_block0/conv1/kernel", 2), ("stage0_block0/proj_conv/kernel", 2)}}


@pytest.mark.parametrize("name", ["cifar_vgg16", "cifar_resnet20", "resnet50", "vgg16"])
def test_the_analysis_finds_the_groups_the_zoo_descriptions_listed(name):
  model = get_model(name, 10, width_multiplier=0.0625 if name in ("resnet50", "vgg16") else 0.25,
                    **({"hidden": 16} if name == "vgg16" else {}))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape))))
  found = pruning.trace(model, variables).groups
  selected = {g.name: members(g) for g in found if g.norms and not g.stream and g.group.status == "prunable"}
  expected = _zoo_expected(name, model)
  assert set(selected) == set(expected)
  for norm, required in expected.items():
    assert required <= selected[norm], norm
