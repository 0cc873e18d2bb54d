"""Structured pruning of any Flax model (Linen or NNX): analysis -> criteria -> slicing and rebuild.

- `coupling` (with `relations` and `rules`): which parameter axes index the same channels, found from the
  jaxpr of the model's inference function; a rule per primitive, `register_rule` for more.
- `criteria`: groups scored by their norms; masks by ratio (global/local), threshold or FLOP target.
- `slicing`, `optimizer_state`: variables and optimizer states without the removed channels.
- `rebuild`: the narrow Linen model (width attributes rewritten by path) or NNX model (a narrowed clone).
- `api`: `channel_masks`, `prune_params`, `prune_params_like`, `count_flops`, `count_params`.
"""

from receding_jax.pruning.api import (
    channel_masks,
    check_masks,
    count_flops,
    count_params,
    group_importances,
    group_widths,
    prune_params,
    prune_params_like,
    verify,
)
from receding_jax.pruning.coupling import Coupling, Factor, Group, analyze
from receding_jax.pruning.criteria import SCOPES, KeepRule, ScoredGroup, flop_model
from receding_jax.pruning.models import Traced, trace
from receding_jax.pruning.rebuild import narrow_linen, narrow_nnx
from receding_jax.pruning.rules import register_rule

__all__ = [
    "SCOPES",
    "Coupling",
    "Factor",
    "Group",
    "KeepRule",
    "ScoredGroup",
    "Traced",
    "analyze",
    "channel_masks",
    "check_masks",
    "count_flops",
    "count_params",
    "flop_model",
    "group_importances",
    "group_widths",
    "narrow_linen",
    "narrow_nnx",
    "prune_params",
    "prune_params_like",
    "register_rule",
    "trace",
    "verify",
]
