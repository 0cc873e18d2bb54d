"""`shrink` mid-training: receded channels leave the params, batch statistics and optimizer state, and the
narrow run continues the wide one (same losses, same momentum at the kept channels, same step count)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import receding_jax as rj
from receding_jax.errors import InputError
from receding_jax.nnx_norm import NnxBoundedScaleNorm
from receding_jax.training.config import default_config
from receding_jax.training.optimizer import make_optimizer

RECEDED = {0: [1, 4], 1: [0, 2, 5]}  # Norm index -> channels whose logits are set to -1e4 (importance 0).


class LinenNet(nn.Module):
  input_shape = (6, 6, 3)  # What pruning traces it on when no inputs= is given.

  @nn.compact
  def __call__(self, x, train=False):
    for _ in range(2):
      x = nn.relu(rj.BoundedScaleNorm(use_running_average=not train)(nn.Conv(8, (3, 3), use_bias=False)(x)))
    return nn.Dense(4)(x.mean((1, 2)))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv0, self.norm0 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs), NnxBoundedScaleNorm(8, rngs=rngs)
    self.conv1, self.norm1 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs), NnxBoundedScaleNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm0(self.conv0(x)))
    return self.head(nnx.relu(self.norm1(self.conv1(x))).mean((1, 2)))


IMAGES, LABELS = jax.random.normal(jax.random.key(1), (8, 6, 6, 3)), jnp.arange(8) % 4
KEEP = [np.isin(np.arange(8), RECEDED[i], invert=True) for i in (0, 1)]


def kept(name: str, leaf) -> np.ndarray:
  """`leaf` of parameter (module, leaf name) at the kept channels, sliced by hand for these two nets."""
  module, leaf_name = name
  leaf = np.asarray(leaf)
  if module in ("Conv_0", "conv0"):
    return leaf[..., KEEP[0]]
  if module in ("Conv_1", "conv1"):
    return leaf[:, :, KEEP[0]][..., KEEP[1]]
  if module in ("BoundedScaleNorm_0", "norm0"):
    return leaf[KEEP[0]]
  if module in ("BoundedScaleNorm_1", "norm1"):
    return leaf[KEEP[1]]
  return leaf[KEEP[1]] if leaf_name == "kernel" else leaf  # The head's input rows.


def named(tree) -> dict:
  """{(module, leaf name): array} of the params-shaped tree `tree` (NNX Variables unwrapped)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  keys = lambda path: tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))[-2:]
  return {keys(p): v for p, v in leaves if not isinstance(v, optax.MaskedNode)}


def momenta(opt_state) -> list[dict]:
  traces = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
  return [named(t.trace) for t in traces if isinstance(t, optax.TraceState)]


def counts(opt_state) -> list[int]:
  return [int(x) for x in jax.tree.leaves(opt_state) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)]


def linen_step(model, tx):
  @jax.jit
  def step(variables, opt_state):
    def loss_fn(params):
      logits, stats = model.apply({**variables, "params": params}, IMAGES, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return {"params": optax.apply_updates(variables["params"], updates), **stats}, opt_state, loss
  return step


def recede(params, names):
  """`params` with the RECEDED channels' logits of the norms `names` at -1e4."""
  params = jax.tree.map(lambda x: x, params)
  for i, name in enumerate(names):
    params[name]["scale_logit"] = params[name]["scale_logit"].at[jnp.array(RECEDED[i])].set(-1e4)
  return params


def test_linen_shrink_continues_training_with_the_projects_optimizer():
  config = default_config()
  config.optim.num_epochs = 2  # 4 steps: the learning rate drops at steps 2 and 3, after the shrink.
  tx = make_optimizer(config, steps_per_epoch=2, penalty_strength=1e-3)
  model = LinenNet()
  variables = model.init(jax.random.key(0), IMAGES[:1])
  variables = {**variables, "params": recede(variables["params"], ["BoundedScaleNorm_0", "BoundedScaleNorm_1"])}
  opt_state, step = tx.init(variables["params"]), linen_step(model, tx)
  for _ in range(2):
    variables, opt_state, _ = step(variables, opt_state)

  narrow_model, narrow_vars, narrow_state, masks, removed = rj.shrink(model, variables, opt_state, threshold=0.01)
  assert sorted(removed.values()) == [2, 3] and all(m.shape == (8,) for m in masks.values())
  for tree in ("params", "batch_stats"):
    wide, narrow = named(variables[tree]), named(narrow_vars[tree])
    assert wide.keys() == narrow.keys()
    for name in wide:
      np.testing.assert_array_equal(narrow[name], kept(name, wide[name]))
  wide_momenta, narrow_momenta = momenta(opt_state), momenta(narrow_state)
  assert len(wide_momenta) == 2 and {*wide_momenta[0], *wide_momenta[1]} == named(variables["params"]).keys()
  assert [m.keys() for m in narrow_momenta] == [m.keys() for m in wide_momenta]
  for wide, narrow in zip(wide_momenta, narrow_momenta, strict=True):
    for name in wide:  # Exactly the wide momentum at the kept channels.
      np.testing.assert_array_equal(narrow[name], kept(name, wide[name]))
  assert counts(narrow_state) == counts(opt_state) and set(counts(opt_state)) == {2}

  narrow_step = linen_step(narrow_model, tx)
  for _ in range(2):  # The loss continues where it was: the removed channels contributed exactly 0.
    variables, opt_state, loss = step(variables, opt_state)
    narrow_vars, narrow_state, narrow_loss = narrow_step(narrow_vars, narrow_state)
    np.testing.assert_allclose(narrow_loss, loss, rtol=1e-5)
  for name, leaf in named(narrow_vars["params"]).items():
    np.testing.assert_allclose(leaf, kept(name, named(variables["params"])[name]), rtol=1e-4, atol=1e-6)


@nnx.jit
def nnx_step(model, optimizer):
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(IMAGES), LABELS).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def test_nnx_shrink_returns_a_new_module_and_optimizer_that_continue():
  model = NnxNet(nnx.Rngs(0))
  for i, norm in enumerate((model.norm0, model.norm1)):
    norm.scale_logit[...] = norm.scale_logit[...].at[jnp.array(RECEDED[i])].set(-1e4)
  tx = optax.chain(rj.add_receding_penalty(1e-3), optax.sgd(0.05, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for _ in range(2):
    nnx_step(model, optimizer)
  wide_kernel = np.asarray(model.conv1.kernel[...])

  narrow, state, narrow_optimizer, _, removed = rj.shrink(model, opt_state=optimizer, threshold=0.01,
                                                          inputs=IMAGES[:1])
  assert sorted(removed.values()) == [2, 3] and isinstance(narrow_optimizer, nnx.Optimizer)
  assert model.conv1.kernel[...].shape == (3, 3, 8, 8)  # The wide model is untouched.
  np.testing.assert_array_equal(narrow.conv1.kernel[...], kept(("conv1", "kernel"), wide_kernel))
  assert named(state)[("conv1", "kernel")].shape == (3, 3, 6, 5)
  (wide_momenta,), (narrow_momenta,) = momenta(optimizer.opt_state), momenta(narrow_optimizer.opt_state)
  assert wide_momenta.keys() == named(nnx.state(model, nnx.Param)).keys() and len(wide_momenta) == 6
  for name in wide_momenta:
    np.testing.assert_array_equal(narrow_momenta[name], kept(name, wide_momenta[name]))
  assert int(narrow_optimizer.step[...]) == int(optimizer.step[...]) == 2

  for _ in range(2):
    loss, narrow_loss = nnx_step(model, optimizer), nnx_step(narrow, narrow_optimizer)
    np.testing.assert_allclose(narrow_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(narrow.head.kernel[...], kept(("head", "kernel"), model.head.kernel[...]), rtol=1e-4,
                             atol=1e-6)


def test_nothing_below_the_threshold_returns_the_inputs_and_no_norm_is_refused():
  model = LinenNet()
  variables = model.init(jax.random.key(0), IMAGES[:1])
  opt_state = optax.sgd(0.1, momentum=0.9).init(variables["params"])
  shrunk = rj.shrink(model, variables, opt_state, threshold=0.01)
  assert shrunk.model is model and shrunk.variables is variables and shrunk.opt_state is opt_state
  assert shrunk.removed == {} and all(np.all(m) for m in shrunk.masks.values())
  with pytest.raises(InputError, match="exactly one"):
    rj.shrink(model, variables, opt_state, threshold=0.01, ratio=0.5)
  dense = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  with pytest.raises(InputError):
    rj.shrink(dense, dense.init(jax.random.key(0), IMAGES[:1, 0, 0]), threshold=0.01, inputs=IMAGES[:1, 0, 0])


def test_given_importances_and_max_removed_choose_what_goes_and_the_report_follows_the_channels():
  model = LinenNet()
  variables = model.init(jax.random.key(0), IMAGES[:1])
  variables = {**variables, "params": recede(variables["params"], ["BoundedScaleNorm_0", "BoundedScaleNorm_1"])}
  own = rj.neuron_importances(variables)
  stale = {"BoundedScaleNorm_0": np.asarray(own["BoundedScaleNorm_0"]), "BoundedScaleNorm_1": np.full(8, np.inf)}
  report = {}
  shrunk = rj.shrink(model, variables, threshold=0.01, importances=stale, report=report)
  assert shrunk.removed == {"BoundedScaleNorm_0": 2}  # norm1's receded channels are not stale yet.
  np.testing.assert_array_equal(report["kept"]["BoundedScaleNorm_0"], KEEP[0])
  assert "BoundedScaleNorm_1" not in report["kept"]
  assert report["params_after"] == rj.pruning.count_params(shrunk.variables) < report["params_before"]
  assert report["macs_after"] == rj.count_macs(shrunk.model, variables=shrunk.variables) < report["macs_before"]
  # At most one channel: the least important of the stale ones (channel 1 at 1e-6, channel 4 at 0).
  graded = np.ones(8)
  graded[1], graded[4] = 1e-6, 0.0
  one = rj.shrink(model, variables, threshold=0.01, importances={**stale, "BoundedScaleNorm_0": graded},
                  max_removed=1)
  assert one.removed == {"BoundedScaleNorm_0": 1}
  np.testing.assert_array_equal(one.masks["BoundedScaleNorm_0"], np.arange(8) != 4)
  none_stale = {name: np.full(8, np.inf) for name in stale}
  assert rj.shrink(model, variables, threshold=0.01, importances=none_stale).removed == {}
  with pytest.raises(InputError, match="norms the model does not have"):
    rj.shrink(model, variables, threshold=0.01, importances={"norm9": np.zeros(8)})
  with pytest.raises(InputError, match="max_removed"):
    rj.shrink(model, variables, threshold=0.01, max_removed=-1)


def test_keep_groups_are_left_whole_by_a_shrink():
  model = LinenNet()
  variables = model.init(jax.random.key(0), IMAGES[:1])
  variables = {**variables, "params": recede(variables["params"], ["BoundedScaleNorm_0", "BoundedScaleNorm_1"])}
  shrunk = rj.shrink(model, variables, threshold=0.01, keep_groups=("BoundedScaleNorm_0",))
  assert shrunk.removed == {"BoundedScaleNorm_1": 3}
  stale = {"BoundedScaleNorm_0": np.zeros(8), "BoundedScaleNorm_1": np.full(8, np.inf)}
  kept_whole = rj.shrink(model, variables, threshold=0.01, importances=stale, keep_groups=("BoundedScaleNorm_0",))
  assert kept_whole.removed == {}
