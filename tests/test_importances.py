"""neuron_importances and importance_summary on real Flax variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import receding_jax as rj


class MixedNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="dense")(x)
    x = rj.BoundedScaleNorm(use_running_average=True, name="bounded")(x)
    x = nn.Dense(3)(x)
    x = nn.BatchNorm(use_running_average=True, name="bn")(x)
    return nn.LayerNorm(name="ln")(x)


def test_importances_keyed_by_module_path_with_their_definitions():
  variables = MixedNet().init(jax.random.key(0), jnp.ones((2, 5)))
  variables["params"]["bn"]["scale"] = jnp.array([-0.7, 0.0, 2.5])
  importances = rj.neuron_importances(variables)
  assert sorted(importances) == ["bn", "bounded"]  # LayerNorm is not a BatchNorm.
  logits = variables["params"]["bounded"]["scale_logit"]
  np.testing.assert_allclose(importances["bounded"], jax.nn.sigmoid(logits))
  np.testing.assert_allclose(importances["bn"], [0.7, 0.0, 2.5])
  assert bool(jnp.all((importances["bounded"] > 0) & (importances["bounded"] < 1)))


def test_nested_paths_join_module_names():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return rj.BoundedScaleNorm(use_running_average=True, name="norm1")(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Block(name="stage1_block0")(x)

  variables = Net().init(jax.random.key(0), jnp.ones((1, 2)))
  assert list(rj.neuron_importances(variables)) == ["stage1_block0/norm1"]


def test_summary_counts_low_and_high_shares():
  importances = {"a": jnp.array([0.01, 0.02, 0.6]), "b": jnp.array([0.3, 0.9, 0.99, 0.04, 0.5])}
  summary = rj.importance_summary(importances)
  assert summary["fraction_below_0.05"] == pytest.approx(3 / 8)
  assert summary["fraction_above_0.5"] == pytest.approx(3 / 8)  # 0.5 itself is not above.
  assert summary["count"] == 8
  assert summary["mean"] == pytest.approx(np.mean([0.01, 0.02, 0.6, 0.3, 0.9, 0.99, 0.04, 0.5]), rel=1e-6)
  with pytest.raises(ValueError, match="low"):
    rj.importance_summary(importances, low=0.6, high=0.5)


def test_importances_need_variables_with_params():
  with pytest.raises(TypeError, match="list"):
    rj.neuron_importances([1, 2])


def test_an_nnx_state_gives_the_importances_of_the_equivalent_linen_variables():
  """MixedNet wrapped for NNX: its state merges params and batch stats per module; same keys, same values."""
  model = nnx.bridge.ToNNX(MixedNet(), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, jnp.ones((2, 5)))
  model.bn["scale"][...] = jnp.array([-0.7, 0.0, 2.5])
  state = nnx.state(model)
  linen = {"params": nnx.to_pure_dict(nnx.filter_state(state, nnx.Param)),
           "batch_stats": nnx.to_pure_dict(nnx.filter_state(state, nnx.BatchStat))}
  MixedNet().apply(linen, jnp.ones((2, 5)))  # They are MixedNet's variables.
  expected = rj.neuron_importances(linen)
  assert sorted(expected) == ["bn", "bounded"]
  for tree in (state, nnx.as_pure(state)):
    got = rj.neuron_importances(tree)
    assert list(got) == list(expected)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  np.testing.assert_allclose(rj.neuron_importances(state)["bn"], [0.7, 0.0, 2.5])


def test_native_nnx_batch_norms_are_identified_by_their_batch_stats():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)])
      self.norm = nnx.LayerNorm(4, rngs=rngs)

  importances = rj.neuron_importances(nnx.state(Net(nnx.Rngs(0))))
  assert list(importances) == ["layers/1"]  # Not the LayerNorm: it keeps no mean/var.
  np.testing.assert_array_equal(importances["layers/1"], np.ones(4))


def test_a_model_without_norm_layers_has_no_importances():
  variables = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match="found no norm layer"):
    rj.neuron_importances(variables)
