"""BoundedGate (Linen and NNX): the receding importance without a BatchNorm, found by the penalty, the
importances and the pruner by its variable layout; MLP hidden units, a ConvNeXt inverted bottleneck, attention
heads; and a small ViT on the digits trained with the receding penalty, pruned at 0.01 and exported."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import receding_jax as rj
from receding_jax import deploy, pruning
from receding_jax.deploy import stablehlo
from receding_jax.gate import bounded_gate
from receding_jax.selection import path_names

# Importances on both sides of the threshold 0.01: 3.4e-4 and 0.0090 go, 0.011 stays.
RECEDED_LOGITS = {0: -8.0, 3: -4.7, 5: -4.5}


def test_the_gate_scales_each_channel_by_sigmoid_of_its_logit_along_its_axis():
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 3))
  logit = jnp.array([-2.0, 0.0, 3.0, 1.0])
  expected = x * jax.nn.sigmoid(logit)[:, None]  # Axis -2: [..., heads, head_dim].
  np.testing.assert_allclose(bounded_gate(x, logit, -2), expected, rtol=1e-6)
  linen = rj.BoundedGate(axis=-2)
  variables = linen.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {"scale_logit": (4,)}}  # The bounded norm's name.
  np.testing.assert_allclose(linen.apply({"params": {"scale_logit": logit}}, x), expected, rtol=1e-6)
  gate = rj.NnxBoundedGate(4, axis=-2, rngs=nnx.Rngs(0))
  gate.scale_logit[...] = logit
  np.testing.assert_allclose(gate(x), expected, rtol=1e-6)
  assert bounded_gate(x.astype(jnp.bfloat16), logit, -2).dtype == jnp.float32  # Promotes, as the norm.
  assert rj.BoundedGate(dtype=jnp.bfloat16).apply(variables, x[..., 0]).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"the logits have shape \(4,\), the input .* has \(3,\)"):
    gate(x[..., :3, :])  # Three heads, four logits.


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="down")(rj.BoundedGate(name="gate")(nn.relu(nn.Dense(12, name="up")(x))))


class LinenConvNeXt(nn.Module):
  """A ConvNeXt block: depthwise conv, LayerNorm, 4x expansion, GELU, gate, projection, layer scale, residual."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (2, 2), strides=2, name="stem")(x)
    y = nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x)
    y = nn.gelu(nn.Dense(32, name="expand")(nn.LayerNorm(name="norm")(y)))  # Flax's default, tanh GELU.
    y = nn.Dense(8, name="project")(rj.BoundedGate(name="gate")(y))
    x = x + y * self.param("layer_scale", nn.initializers.constant(0.1), (8,))
    return nn.Dense(3, name="head")(x.mean((1, 2)))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.up, self.gate = nnx.Linear(5, 12, rngs=rngs), rj.NnxBoundedGate(12, rngs=rngs)
    self.down = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    return self.down(self.gate(nnx.relu(self.up(x))))


class NnxConvNeXt(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (2, 2), strides=2, rngs=rngs)
    self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.norm, self.expand = nnx.LayerNorm(8, rngs=rngs), nnx.Linear(8, 32, rngs=rngs)
    self.gate, self.project = rj.NnxBoundedGate(32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)
    self.layer_scale, self.head = nnx.Param(jnp.full((8,), 0.1)), nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    y = self.project(self.gate(nnx.gelu(self.expand(self.norm(self.depthwise(x))))))
    return self.head((x + y * self.layer_scale[...]).mean((1, 2)))


def receded(logit):
  """`logit` with the channels of RECEDED_LOGITS at those values (two below the threshold 0.01, one above)."""
  logit = np.array(logit, np.float32)
  for channel, value in RECEDED_LOGITS.items():
    logit[channel] = value
  return logit


def check_found(params, importances, logit):
  """The penalty's default mask is the gate's logit alone; the importances are its sigmoid, under 'gate'."""
  mask = rj.bounded_logit_mask(params)
  names = [path_names(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m]
  assert names == [("gate", "scale_logit")]
  s = jax.nn.sigmoid(jnp.asarray(logit))
  np.testing.assert_allclose(rj.receding_penalty(params, shift=1.0),
                             jnp.sum(jax.nn.sigmoid(logit + 1.0) * (1 - jax.nn.log_sigmoid(logit + 1.0))), rtol=1e-5)
  np.testing.assert_allclose(importances["gate"], s, rtol=1e-6)
  return np.asarray(s) > 0.01


@pytest.mark.parametrize("model, x", [(LinenMLP(), jnp.ones((2, 5))), (LinenConvNeXt(), jnp.ones((2, 8, 8, 3)))],
                         ids=["mlp", "convnext"])
def test_linen_gates_are_penalised_reported_scored_and_pruned_at_the_threshold(model, x):
  variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), x))
  variables["params"]["gate"]["scale_logit"] = logit = receded(variables["params"]["gate"]["scale_logit"])
  importances = rj.neuron_importances(variables)
  assert list(importances) == ["gate"]  # Linen variables without batch statistics: the LayerNorm is no BatchNorm.
  keep = check_found(variables["params"], importances, logit)
  groups = {g.name: g for g in pruning.trace(model, variables, x).groups}
  assert groups["gate"].group.status == "prunable" and not groups["gate"].stream  # GELU adds x to itself: no stream.
  if "layer_scale" in variables["params"]:
    residual = [g for g in groups.values() if (("params", "stem", "kernel"), 3) in g.group.members]
    assert residual[0].stream and not residual[0].norms  # The residual add is a stream; the LayerNorm no norm.
  narrow_model, narrow_vars = rj.prune_params(model, variables, threshold=0.01, inputs=x)  # Checked.
  kernel = "project" if "layer_scale" in variables["params"] else "down"
  assert narrow_vars["params"][kernel]["kernel"].shape[0] == keep.sum() == logit.size - 2
  np.testing.assert_array_equal(narrow_vars["params"]["gate"]["scale_logit"], logit[keep])
  switched_off = jax.tree.map(np.copy, variables)
  switched_off["params"]["gate"]["scale_logit"][~keep] = -1e4  # The removed channels contribute exactly 0.
  inputs = jax.random.normal(jax.random.key(2), x.shape)
  np.testing.assert_allclose(jax.jit(narrow_model.apply)(narrow_vars, inputs),
                             jax.jit(model.apply)(switched_off, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, x", [(NnxMLP, jnp.ones((2, 5))), (NnxConvNeXt, jnp.ones((2, 8, 8, 3)))],
                         ids=["mlp", "convnext"])
def test_nnx_gates_are_penalised_reported_scored_and_pruned_at_the_threshold(make, x):
  model = make(nnx.Rngs(0))
  model.gate.scale_logit[...] = logit = receded(model.gate.scale_logit[...])
  keep = check_found(nnx.state(model, nnx.Param), rj.neuron_importances(model), logit)
  narrow, _ = rj.prune_params(model, threshold=0.01, inputs=x)
  assert narrow.gate.num_features == keep.sum() == logit.size - 2
  expand = narrow.expand if make is NnxConvNeXt else narrow.up
  assert expand.out_features == expand.kernel[...].shape[-1] == keep.sum()
  model.gate.scale_logit[...] = np.where(keep, logit, -1e4)
  inputs = jax.random.normal(jax.random.key(2), x.shape)
  np.testing.assert_allclose(narrow(inputs), model(inputs), rtol=1e-5, atol=1e-6)


class Block(nn.Module):
  """A pre-norm transformer block with a gate on its attention heads and one on its MLP hidden units."""

  heads: int
  head_dim: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    q, k, v = (nn.DenseGeneral((self.heads, self.head_dim), name=n)(y) for n in ("query", "key", "value"))
    heads = rj.BoundedGate(axis=-2, name="head_gate")(nn.dot_product_attention(q, k, v))  # [b, t, heads, dim]
    x = x + nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(heads)
    y = rj.BoundedGate(name="mlp_gate")(nn.gelu(nn.Dense(self.hidden, name="up")(nn.LayerNorm()(x))))
    return x + nn.Dense(x.shape[-1], name="down")(y)


class ViT(nn.Module):
  """2x2 patches of an 8x8 image (16 tokens), position embeddings, `depth` blocks, mean pooling."""

  dim: int = 24
  depth: int = 2
  heads: int = 6
  head_dim: int = 4
  hidden: int = 48

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.dim, (2, 2), strides=2, padding="VALID", name="patches")(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    for i in range(self.depth):
      x = Block(self.heads, self.head_dim, self.hidden, name=f"block{i}")(x)
    return nn.Dense(10, name="head")(nn.LayerNorm()(x).mean(1))


def test_attention_heads_behind_a_gate_are_pruned_whole():
  model, x = ViT(depth=1, heads=4), jnp.ones((1, 8, 8, 1))
  variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), x))
  block = variables["params"]["block0"]
  block["head_gate"]["scale_logit"] = np.array([1.0, -8.0, 0.5, 2.0], np.float32)
  block["mlp_gate"]["scale_logit"] = np.abs(block["mlp_gate"]["scale_logit"])  # Every hidden unit stays.
  narrow_model, narrow_vars = rj.prune_params(model, variables, threshold=0.01, inputs=x)
  narrow = narrow_vars["params"]["block0"]
  assert [narrow[n]["kernel"].shape for n in ("query", "key", "value", "out")] == [(24, 3, 4)] * 3 + [(3, 4, 24)]
  assert narrow["up"]["kernel"].shape == (24, 48)
  block["head_gate"]["scale_logit"][1] = -1e4
  inputs = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  np.testing.assert_allclose(jax.jit(narrow_model.apply)(narrow_vars, inputs),
                             jax.jit(model.apply)(variables, inputs), rtol=1e-5, atol=1e-6)


def digits_splits():
  """scikit-learn's 8x8 digits as [n, 8, 8, 1] in [0, 1], shuffled once: 1,497 to train, 300 held out."""
  from sklearn.datasets import load_digits

  data = load_digits()
  order = np.random.default_rng(0).permutation(len(data.target))
  images, labels = (data.images[order] / 16.0).astype(np.float32)[..., None], data.target[order]
  return images[:-300], labels[:-300], images[-300:], labels[-300:]


def train_with_the_receding_penalty(model, images, labels, steps=400, batch=128, seed=0):
  """Adam (3e-3; the gates' logits 10x, as the method's norms) after the receding penalty (strength 0.1,
  shift 3), in a plain jitted loop."""
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
  labels_of = lambda p: jax.tree_util.tree_map_with_path(lambda k, _: path_names(k)[-1] == "scale_logit", p)
  tx = optax.chain(rj.add_receding_penalty(0.1, shift=3.0),
                   optax.multi_transform({True: optax.adam(3e-2), False: optax.adam(3e-3)}, labels_of))
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    chosen = rng.choice(len(labels), batch, replace=False)
    params, opt_state = step(params, opt_state, images[chosen], labels[chosen])
  return {"params": params}


def test_a_gated_vit_on_the_digits_recedes_prunes_at_001_without_loss_and_exports(tmp_path):
  train_x, train_y, val_x, val_y = digits_splits()
  model = ViT()
  variables = train_with_the_receding_penalty(model, train_x, train_y)
  importances = rj.neuron_importances(variables)
  assert sorted(importances) == [f"block{i}/{g}" for i in range(2) for g in ("head_gate", "mlp_gate")]
  values = np.concatenate([np.ravel(v) for v in importances.values()])
  # Bimodal: at least a quarter of the 108 gates receded below 0.05, a quarter kept above 0.5, and at most a
  # quarter between (measured over seeds 0-5: 39-55% below, 32-49% above, 4-18% between).
  assert np.mean(values < 0.05) >= 0.25 and np.mean(values > 0.5) >= 0.25
  assert np.mean((values >= 0.05) & (values <= 0.5)) <= 0.25
  accuracy = lambda m, v: float(np.mean(np.asarray(jax.jit(m.apply)(v, val_x)).argmax(-1) == val_y))
  narrow_model, narrow_vars = rj.prune_params(model, variables, threshold=0.01, inputs=val_x[:1])  # Checked.
  assert rj.count_params(narrow_vars) < 0.9 * rj.count_params(variables)  # Measured: 0.66-0.79.
  assert all(narrow_vars["params"][f"block{i}"]["up"]["kernel"].shape[1] < 48 for i in range(2))
  before, after = accuracy(model, variables), accuracy(narrow_model, narrow_vars)
  assert before >= 0.85 and abs(after - before) <= 0.01 + 1e-9, (before, after)  # Within one point (3 of 300).

  report = deploy.export_model(narrow_model, narrow_vars, tmp_path / "vit", formats=("stablehlo",),
                               inputs=jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  assert report["files"]["model.stablehlo"]["relative_error"] <= deploy.TOLERANCE
  exported = stablehlo.run_stablehlo((tmp_path / "vit" / "model.stablehlo").read_bytes(), val_x)
  expected = np.asarray(jax.jit(narrow_model.apply)(narrow_vars, val_x))
  np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  assert float(np.mean(exported.argmax(-1) == val_y)) == after
