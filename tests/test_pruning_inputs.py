"""What pruning calls a model with: extra call arguments (PRNG keys, rngs), the check's inputs (tokens), and the
refusals where a criterion has nothing to score; group names that address one group each."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import receding_jax as rj
from receding_jax import pruning
from receding_jax.errors import InputError
from receding_jax.nnx_norm import NnxBoundedScaleNorm
from receding_jax.pruning.check_inputs import random_inputs

norm = lambda: rj.BoundedScaleNorm(use_running_average=True)


def filled(variables, seed=0):
  """Random parameters (numpy), positive variances."""
  rng = np.random.default_rng(seed)
  draw = lambda path, v: (rng.uniform(0.5, 2.0, v.shape) if path[-1].key == "var" else rng.normal(size=v.shape))
  return jax.tree_util.tree_map_with_path(lambda p, v: draw(p, v).astype(np.float32), variables)


def recede_half(logits: np.ndarray) -> np.ndarray:
  """`logits` with every other channel's importance sigmoid(logit) receded to exactly 0."""
  logits = np.array(logits)
  logits[::2] = -1e4
  return logits


class LinenVAE(nn.Module):
  """Samples its latents with a PRNG key passed as a positional argument of __call__."""

  @nn.compact
  def __call__(self, x, z_rng):
    h = nn.relu(norm()(nn.Dense(16)(x)))
    h = nn.relu(norm()(nn.Dense(12)(h)))
    mean, logvar = nn.Dense(4)(h), nn.Dense(4)(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, logvar.shape)
    return nn.Dense(8)(nn.relu(norm()(nn.Dense(12)(z))))


class LinenDropout(nn.Module):
  """Dropout off in eval mode (`train`), and one that is always on (Monte Carlo dropout): both take the
  apply's rngs={'dropout': key}."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.Dropout(0.5, deterministic=not train)(nn.relu(norm()(nn.Dense(16)(x))))
    h = nn.Dropout(0.3, deterministic=False)(nn.relu(norm()(nn.Dense(10)(h))))
    return nn.Dense(3)(nn.relu(norm()(nn.Dense(12)(h))))


def sliced_momentum(model, variables, masks, x, kwargs):
  """prune_params_like of a momentum equal to the parameters: it must come out as the narrow parameters."""
  params = variables["params"]
  state = optax.trace(0.9).init(params)._replace(trace=params)
  return pruning.prune_params_like(state, model, params, masks, inputs=x, apply_kwargs=kwargs).trace


@pytest.mark.parametrize("case", ["vae", "dropout"])
def test_a_linen_model_that_takes_a_prng_key_is_pruned_checked_and_exact(case):
  x, key = jax.random.normal(jax.random.key(1), (3, 8)), jax.random.key(7)
  if case == "vae":
    model, kwargs, call = LinenVAE(), {"z_rng": key}, lambda m, v, k: m.apply(v, x, k)
    variables = filled(model.init(jax.random.key(0), x, key))
  else:
    model, kwargs = LinenDropout(), {"rngs": {"dropout": key}}
    call = lambda m, v, k: m.apply(v, x, train=False, rngs={"dropout": k})
    variables = filled(model.init({"params": jax.random.key(0), "dropout": key}, x))
  for name in ("BoundedScaleNorm_0", "BoundedScaleNorm_2"):
    variables["params"][name]["scale_logit"] = recede_half(variables["params"][name]["scale_logit"])
  masks = pruning.channel_masks(model, variables, threshold=0.0, inputs=x, apply_kwargs=kwargs)
  pruned = {name: int(m.sum()) for name, m in masks.items() if not m.all()}
  assert pruned == {"BoundedScaleNorm_0": 8, "BoundedScaleNorm_2": 6}
  narrow_model, narrow = rj.prune_params(model, variables, masks=masks, inputs=x, apply_kwargs=kwargs)  # Checked.
  assert pruning.group_widths(narrow_model, narrow, inputs=x, apply_kwargs=kwargs)["BoundedScaleNorm_0"] == 8
  for k in (key, jax.random.key(8)):  # The same key draws the same numbers in both models.
    np.testing.assert_allclose(call(narrow_model, narrow, k), call(model, variables, k), rtol=1e-5, atol=1e-5)
  assert not np.allclose(call(model, variables, key), call(model, variables, jax.random.key(8)))  # It draws.
  momentum = sliced_momentum(model, variables, masks, x, kwargs)
  jax.tree.map(np.testing.assert_array_equal, momentum, narrow["params"])
  assert rj.count_macs(narrow_model, x, apply_kwargs=kwargs) < rj.count_macs(model, x, apply_kwargs=kwargs)
  with pytest.warns(DeprecationWarning):
    assert rj.pruning.count_flops(model, x, apply_kwargs=kwargs) == rj.count_macs(model, x, apply_kwargs=kwargs)


def test_channels_that_a_random_draw_touches_stay_and_the_others_are_prunable():
  model, x, key = LinenDropout(), jnp.ones((2, 8)), jax.random.key(3)
  variables = filled(model.init({"params": jax.random.key(0), "dropout": key}, x))
  traced = pruning.trace(model, variables, x, apply_kwargs={"rngs": {"dropout": key}})
  assert traced.group("BoundedScaleNorm_1").group.status == "unprunable"  # Under the dropout that is always on.
  assert traced.group("BoundedScaleNorm_0").group.status == "prunable"  # Its dropout is off in eval mode.


class NnxSampler(nnx.Module):
  """Takes nnx.Rngs keyword-only: dropout (off in eval mode) and a sampled latent that draws from it."""

  def __init__(self, rngs: nnx.Rngs):
    self.encode = nnx.Linear(8, 16, rngs=rngs)
    self.norm = NnxBoundedScaleNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5)
    self.mean = nnx.Linear(16, 4, rngs=rngs)
    self.decode = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x, *, rngs: nnx.Rngs):
    mean = self.mean(self.drop(nnx.relu(self.norm(self.encode(x))), rngs=rngs))
    return self.decode(mean + jax.random.normal(rngs.noise(), mean.shape))


def test_an_nnx_model_that_takes_rngs_is_pruned_checked_and_exact():
  model, x = NnxSampler(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (3, 8))
  model.norm.scale_logit[...] = jnp.asarray(recede_half(model.norm.scale_logit[...]))
  rngs = nnx.Rngs(noise=5)
  with pytest.raises(InputError, match=r"NnxSampler.__call__ .* 'rngs'; pass its other arguments in apply_kwargs"):
    pruning.channel_masks(model, threshold=0.0, inputs=x)
  masks = pruning.channel_masks(model, threshold=0.0, inputs=x, apply_kwargs={"rngs": rngs})
  narrow, _ = rj.prune_params(model, masks=masks, inputs=x, apply_kwargs={"rngs": rngs})  # Checked.
  assert narrow.encode.kernel[...].shape == (8, 8) and int(rngs.noise.count[...]) == 0  # Theirs is not used up.
  model.eval()
  narrow.eval()
  np.testing.assert_allclose(narrow(x, rngs=nnx.Rngs(noise=5)), model(x, rngs=nnx.Rngs(noise=5)), rtol=1e-5)
  params = nnx.state(model, nnx.Param)
  state = optax.trace(0.9).init(params)._replace(trace=params)
  momentum = pruning.prune_params_like(state, model, params, masks, inputs=x, apply_kwargs={"rngs": rngs}).trace
  jax.tree.map(np.testing.assert_array_equal, momentum, nnx.state(narrow, nnx.Param))


class LayerNormOnly(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(nn.Dense(16, name="embed")(x))  # Over the channels: approximate, no importance.
    return nn.Dense(4, name="out")(nn.gelu(nn.Dense(32, name="hidden")(h)))


@pytest.mark.parametrize("criterion", [{"ratio": 0.5}, {"threshold": 0.1}, {"mac_reduction": 0.3}])
def test_a_criterion_on_a_model_without_importances_is_refused_and_masks_still_prune_it(criterion):
  model, x = LayerNormOnly(), jnp.ones((2, 8))
  variables = model.init(jax.random.key(0), x)
  message = r"needs importances, and this model has none: 2 prunable group\(s\) \(4 in all\), 0 scored"
  with pytest.raises(InputError, match=message):
    pruning.channel_masks(model, variables, inputs=x, **criterion)
  with pytest.raises(InputError, match=message):
    rj.prune_params(model, variables, inputs=x, **criterion)
  hidden = next(g for g in pruning.trace(model, variables, x).groups if g.group.status == "prunable")
  _, narrow = rj.prune_params(model, variables, masks={hidden.name: np.arange(32) < 20}, inputs=x)
  assert narrow["params"]["hidden"]["kernel"].shape == (16, 20) and narrow["params"]["out"]["kernel"].shape == (20, 4)


class OuterProduct(nn.Module):
  """One dense kernel axis is the flatten of two groups' channels (p's and q's): a name for each."""

  @nn.compact
  def __call__(self, x):
    a = nn.relu(nn.Dense(4, use_bias=False, name="p")(x))
    b = nn.relu(nn.Dense(6, use_bias=False, name="q")(x))
    return nn.Dense(3, name="head")((a[:, :, None] * b[:, None, :]).reshape(x.shape[0], -1))


class MnistCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10, name="linear2")(nn.relu(nn.Dense(32, name="linear1")(x.reshape(x.shape[0], -1))))


def test_group_names_are_unique_and_each_mask_addresses_its_own_group():
  cnn, image = MnistCNN(), jnp.ones((1, 28, 28, 1))
  names = [g.name for g in pruning.trace(cnn, cnn.init(jax.random.key(0), image), image).groups]
  assert max(collections.Counter(names).values()) == 1
  assert {"params/Conv_0/bias:0", "params/linear1/bias:0"} <= set(names)  # Unique names stay as they were.
  model, x = OuterProduct(), jax.random.normal(jax.random.key(1), (2, 5))
  variables = model.init(jax.random.key(0), x)
  groups = {g.name: g.size for g in pruning.trace(model, variables, x).groups if g.group.status == "prunable"}
  assert groups == {"params/head/kernel:0[0]": 4, "params/head/kernel:0[1]": 6}
  masks = {"params/head/kernel:0[0]": np.arange(4) < 2, "params/head/kernel:0[1]": np.arange(6) < 3}
  narrow_model, narrow = rj.prune_params(model, variables, masks=masks, inputs=x)  # Checked.
  assert narrow["params"]["p"]["kernel"].shape == (5, 2) and narrow["params"]["q"]["kernel"].shape == (5, 3)
  assert narrow["params"]["head"]["kernel"].shape == (6, 3)
  narrow_groups = pruning.trace(narrow_model, narrow, x).groups  # The narrow model's groups: the same names.
  assert {g.name: g.size for g in narrow_groups if g.group.status == "prunable"} == {
      "params/head/kernel:0[0]": 2, "params/head/kernel:0[1]": 3}


class PaddedTokens(nn.Module):
  """A token model whose padding id 0 is masked out of its outputs."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.relu(norm()(nn.Dense(16)(nn.Embed(50, 8)(tokens))))
    return nn.Dense(4)(h) * (tokens != 0)[..., None]


class NnxTokens(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed, self.head = nnx.Embed(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, tokens):
    return self.head(self.embed(tokens))


def test_the_check_draws_valid_non_padding_tokens_and_refuses_a_wrong_token_model():
  model, spec = PaddedTokens(), jax.ShapeDtypeStruct((2, 6), jnp.int32)
  variables = filled(model.init(jax.random.key(0), jnp.ones((2, 6), jnp.int32)))
  traced = pruning.trace(model, variables, spec)
  (tokens,) = random_inputs(traced)
  assert tokens.min() >= 1 and tokens.max() < 50 and len(np.unique(tokens)) > 3  # Within the vocabulary.
  (small,) = random_inputs(pruning.trace(NnxTokens(nnx.Rngs(0)), None, spec))
  assert small.min() >= 1 and small.max() < 5  # nnx.Embed(5, ...): the table's size bounds the tokens.
  masks = pruning.channel_masks(model, variables, 0.5, inputs=spec)
  narrow_model, narrow = rj.prune_params(model, variables, masks=masks, inputs=spec)
  keep = pruning.check_masks(traced, masks)
  assert pruning.verify(traced, keep, narrow_model, narrow) < 1e-4
  wrong = jax.tree.map(np.array, narrow)  # By hand: the kept hidden units in the wrong order.
  wrong["params"]["Dense_0"]["kernel"] = wrong["params"]["Dense_0"]["kernel"][:, ::-1]
  with pytest.raises(ValueError, match="is not exact"):
    pruning.verify(traced, keep, narrow_model, wrong)


class AlwaysNaN(nn.Module):
  """A model whose every output is NaN (the log of a negative number): nothing for the check to compare."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(rj.BoundedScaleNorm(use_running_average=not train, name="norm")(nn.Dense(6, name="hidden")(x)))
    return jnp.log(-1.0 - nn.Dense(2, name="head")(h) ** 2)


def test_a_check_that_could_compare_nothing_refuses_instead_of_passing():
  model, x = AlwaysNaN(), jnp.ones((1, 4))
  variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x))
  variables["params"]["norm"]["scale_logit"] = np.array([-1e4, -1e4, 2.0, 2.0, 2.0, 2.0], np.float32)
  with pytest.raises(ValueError, match="the check compared nothing"):
    pruning.prune_params(model, variables, threshold=0.01, inputs=x, min_channels=1)
  narrow, _ = pruning.prune_params(model, variables, threshold=0.01, inputs=x, min_channels=1, check=False)
  assert narrow.pruned_overrides == {"hidden": {"features": 4}}
