"""An NNX model end to end: bounded norms, trained with the penalty, pruned, fine-tuned; the original untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from receding_jax import add_receding_penalty, neuron_importances, pruning, receding_penalty
from receding_jax.nnx_norm import NnxBoundedScaleNorm


class SmallNet(nnx.Module):
  """conv -> norm -> depthwise conv -> norm -> strided conv -> norm -> flatten -> linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.norm1 = NnxBoundedScaleNorm(8, rngs=rngs)
    self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.norm2 = NnxBoundedScaleNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 12, (3, 3), strides=2, rngs=rngs)
    self.norm3 = NnxBoundedScaleNorm(12, rngs=rngs)
    self.head = nnx.Linear(12 * 4 * 4, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = nnx.relu(self.norm2(self.depthwise(x)))
    x = nnx.relu(self.norm3(self.conv2(x)))
    return self.head(x.reshape(x.shape[0], -1))


def data(n=32):
  """Two classes: a bright or a dark 8x8 image with noise."""
  labels = jnp.arange(n) % 2
  images = (2.0 * labels[:, None, None, None] - 1.0) + jax.random.normal(jax.random.key(1), (n, 8, 8, 1))
  return images, labels


@nnx.jit
def train_step(model, optimizer, images, labels):
  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def test_an_nnx_model_trains_with_the_penalty_prunes_and_fine_tunes():
  model = SmallNet(nnx.Rngs(0))
  images, labels = data()
  assert set(neuron_importances(model)) == {"norm1", "norm2", "norm3"}  # Found by layout, from the module.
  assert float(receding_penalty(model)) == float(receding_penalty(nnx.state(model, nnx.Param)))
  tx = optax.chain(add_receding_penalty(1e-3), optax.sgd(0.05, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = [float(train_step(model, optimizer, images, labels)) for _ in range(6)]
  assert losses[-1] < losses[0]

  # Recede half of norm3's channels completely; they go, and the logits stay.
  model.norm3.scale_logit[...] = model.norm3.scale_logit[...].at[::2].set(-40.0)
  model.eval()
  before = model(images)
  model.train()
  masks = pruning.channel_masks(model, threshold=1e-6, inputs=images[:1])
  assert int(masks["norm3"].sum()) == 6 and masks["norm3"][1::2].all()
  narrow, narrow_state = pruning.prune_params(model, masks=masks, inputs=images[:1])
  assert narrow is not model and model.conv2.kernel[...].shape == (3, 3, 8, 12)  # The original is untouched.
  assert narrow.conv2.kernel[...].shape == (3, 3, 8, 6) and narrow.head.kernel[...].shape == (6 * 16, 2)
  assert narrow.norm3.num_features == 6 and narrow.conv2.out_features == 6
  assert pruning.count_params(narrow_state) < pruning.count_params(model)
  narrow.eval()
  np.testing.assert_allclose(narrow(images), before, rtol=1e-5, atol=1e-5)
  narrow.train()

  # The optimizer's momentum is sliced like the parameters and fine-tuning goes on from it.
  sliced = pruning.prune_params_like(optimizer.opt_state, model, nnx.state(model, nnx.Param), masks,
                                     inputs=images[:1])
  narrow_optimizer = nnx.Optimizer(narrow, tx, wrt=nnx.Param)
  shapes = lambda tree: [np.shape(x) for x in jax.tree.leaves(tree)]
  assert shapes(sliced) == shapes(narrow_optimizer.opt_state)
  narrow_optimizer.opt_state = sliced
  tuned = [float(train_step(narrow, narrow_optimizer, images, labels)) for _ in range(6)]
  assert tuned[-1] < tuned[0] and all(np.isfinite(tuned))


def test_a_depthwise_group_is_scored_by_the_larger_of_its_two_norms():
  model = SmallNet(nnx.Rngs(1))
  model.norm1.scale_logit[...] = jnp.full((8,), -40.0)  # Receded before the depthwise conv only.
  images, _ = data(4)
  importance = pruning.group_importances(model, inputs=images[:1])["norm1"]
  np.testing.assert_allclose(importance, jax.nn.sigmoid(model.norm2.scale_logit[...]), rtol=1e-6)


def unsupported(*args):
  raise pruning.checking.Unsupported("mocked")


@pytest.mark.parametrize("evaluation", ["host", "xla"])
def test_the_check_refuses_a_wrongly_sliced_nnx_model(monkeypatch, evaluation):
  if evaluation == "xla":  # As for a model with a primitive the host evaluation does not cover.
    monkeypatch.setattr(pruning.checking, "evaluate", unsupported)
  model = SmallNet(nnx.Rngs(2))
  images, _ = data(2)
  masks = {"norm1": np.arange(8) > 2}  # conv1 -> norm1 -> depthwise -> norm2 lose channels 0-2.
  narrow, _ = pruning.prune_params(model, masks=masks, inputs=images)  # Right: passes.
  slice_tree = pruning.slicing.slice_tree

  def wrong(tree, coupling, keep):  # A sliced kernel (conv1's) with its kept channels in the wrong order.
    leaves, treedef = jax.tree.flatten(slice_tree(tree, coupling, keep))
    i = next(i for i, leaf in enumerate(leaves) if np.shape(leaf) == (3, 3, 1, 8 - 3))
    leaves[i] = np.flip(np.asarray(leaves[i]), -1)
    return jax.tree.unflatten(treedef, leaves)

  monkeypatch.setattr(pruning.api.slicing, "slice_tree", wrong)
  with pytest.raises(ValueError, match="is not exact"):
    pruning.prune_params(model, masks=masks, inputs=images)
  assert narrow.conv1.kernel[...].shape == (3, 3, 1, 5) and narrow.depthwise.kernel[...].shape == (3, 3, 1, 5)
