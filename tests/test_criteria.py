"""Choosing channels: a ratio removes the share asked even where importances tie; MACs under their name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import receding_jax as rj
from receding_jax import BoundedScaleNorm, pruning
from receding_jax.pruning import criteria
from receding_jax.pruning.coupling import Group


def scored(name: str, importance: list[float], index: int) -> criteria.ScoredGroup:
  """A prunable group named `name` scored by one norm with `importance` (+inf: a channel that stays)."""
  size = len(importance)
  group = Group(index, size, (), np.zeros(size, bool), "prunable", ())
  return criteria.ScoredGroup(group, name, ((name, 0, size),), np.asarray(importance, np.float64), False)


def split(groups: list[criteria.ScoredGroup], masks: criteria.Masks) -> tuple[np.ndarray, np.ndarray]:
  """(kept finite importances, removed importances) of all `groups` together."""
  kept = np.concatenate([g.importance[masks[g.name] & np.isfinite(g.importance)] for g in groups])
  removed = np.concatenate([g.importance[~masks[g.name]] for g in groups])
  return kept, removed


@pytest.mark.parametrize("scope", criteria.SCOPES)
def test_a_ratio_prune_removes_the_share_asked_when_polarized_importances_tie(scope):
  polarized = scored("norm", [0.0] * 10 + [1.0] * 30, 0)  # Polarization's clamp to [0, 1].
  masks = criteria.ratio_masks([polarized], 0.5, scope, criteria.KeepRule(min_channels=3))
  assert masks["norm"].sum() == 20
  kept, removed = split([polarized], masks)
  assert kept.min() >= removed.max()


def test_a_global_ratio_prune_counts_over_all_groups_and_splits_ties_across_them():
  groups = [scored("a", [0.0] * 4 + [0.5] * 8 + [1.0] * 4, 0), scored("b", [0.5] * 8 + [1.0] * 8, 1),
            scored("c", [0.2, np.inf, 0.7, 0.5], 2)]  # 35 removable channels; c's second always stays.
  masks = criteria.ratio_masks(groups, 0.4, "global", criteria.KeepRule(min_channels=1))
  kept, removed = split(groups, masks)
  assert removed.size == 14 and kept.size == 21 and masks["c"][1]
  assert kept.min() >= removed.max()
  local = criteria.ratio_masks(groups, 0.4, "local", criteria.KeepRule(min_channels=1))
  assert [int((~local[g.name]).sum()) for g in groups] == [7, 7, 1]  # floor(0.4 x (16, 16, 3 - 1)) + 1.
  for g in groups:
    kept, removed = split([g], local)
    assert kept.min() >= removed.max()


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_without_ties_a_ratio_prune_removes_what_the_official_quantile_rule_removes(ratio):
  # METHOD.md section 5: keep iff importance > the ratio-quantile. With distinct importances, counting
  # removes exactly the channels that rule removes.
  values = np.random.default_rng(0).permutation(np.linspace(0.01, 0.99, 61))
  groups = [scored("a", values[:40], 0), scored("b", values[40:], 1)]
  masks = criteria.ratio_masks(groups, ratio, "global", criteria.KeepRule(min_channels=1))
  quantile = np.quantile(values, ratio)
  assert np.array_equal(np.concatenate([masks["a"], masks["b"]]), values > quantile)


class NormedMLP(nn.Module):
  """Dense 4 -> 8 (bounded norm) -> 2: 32 + 16 MACs per input row."""

  @nn.compact
  def __call__(self, x):
    hidden = BoundedScaleNorm(use_running_average=True, name="norm")(nn.Dense(8, name="hidden")(x))
    return nn.Dense(2, name="head")(nn.relu(hidden))


def test_macs_are_counted_under_their_name_and_the_flop_spellings_still_work_with_a_warning():
  model, x = NormedMLP(), jnp.ones((1, 4))
  variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x))
  variables["params"]["norm"]["scale_logit"] = np.linspace(-3.0, 3.0, 8, dtype=np.float32)
  assert pruning.count_macs(model, x, variables=variables) == 4 * 8 + 8 * 2
  masks = pruning.channel_masks(model, variables, inputs=x, mac_reduction=0.5)
  assert pruning.count_macs(model, x, variables=variables, masks=masks) <= 24 and masks["norm"].sum() == 4
  with pytest.warns(DeprecationWarning, match="count_macs"):
    assert rj.count_flops(model, x, variables=variables) == 48
  with pytest.warns(DeprecationWarning, match="mac_model"):
    assert pruning.flop_model(pruning.trace(model, variables, x).coupling)({}) == 48
  with pytest.warns(DeprecationWarning, match="mac_reduction"):
    old = pruning.channel_masks(model, variables, inputs=x, flop_reduction=0.5)
  assert old["norm"].tolist() == masks["norm"].tolist()
  with pytest.warns(DeprecationWarning, match="mac_reduction"):
    _, narrow = pruning.prune_params(model, variables, inputs=x, flop_reduction=0.5)
  assert narrow["params"]["hidden"]["kernel"].shape == (4, 4)
