"""Structured pruning of any Flax model (Linen or NNX): analysis -> criteria -> slicing and rebuild.

- `coupling` (with `relations` and `rules`): which parameter axes index the same channels, found from the
  jaxpr of the model's inference function; a rule per primitive, ``rules=`` for one call, `register_rule`
  for every call; `attention` marks `jax.nn.dot_product_attention`'s head dimensions for the analysis.
- `criteria`: groups scored by their norms; masks by ratio (global/local), threshold or MAC target.
- `slicing`, `optimizer_state`: variables and optimizer states without the removed channels.
- `rebuild`: the narrow Linen model (width attributes rewritten by path) or NNX model (a narrowed clone).
- `shrinking`: `shrink`, the narrow (model, variables, optimizer state) mid-training, from one trace.
- `api`: `channel_masks`, `prune_params`, `prune_params_like`, `count_macs`, `count_params` (`count_flops` and
  `flop_model`: deprecated names of `count_macs` and `mac_model`, which count multiply-accumulates).
"""

from receding_jax.pruning.api import (
    channel_masks,
    check_masks,
    count_macs,
    count_params,
    group_importances,
    group_widths,
    prune_params,
    prune_params_like,
    verify,
)
from receding_jax.pruning.api import (
    count_flops as count_flops,  # Deprecated name of count_macs (warns when called).
)
from receding_jax.pruning.coupling import Coupling, Factor, Group, analyze
from receding_jax.pruning.criteria import SCOPES, KeepRule, ScoredGroup, mac_model
from receding_jax.pruning.criteria import flop_model as flop_model  # Deprecated name of mac_model (warns).
from receding_jax.pruning.models import Traced, trace
from receding_jax.pruning.rebuild import narrow_linen, narrow_nnx
from receding_jax.pruning.rules import register_rule
from receding_jax.pruning.shrinking import Shrunk, shrink

__all__ = [
    "SCOPES",
    "Coupling",
    "Factor",
    "Group",
    "KeepRule",
    "ScoredGroup",
    "Shrunk",
    "Traced",
    "analyze",
    "channel_masks",
    "check_masks",
    "count_macs",
    "count_params",
    "group_importances",
    "group_widths",
    "mac_model",
    "narrow_linen",
    "narrow_nnx",
    "prune_params",
    "prune_params_like",
    "register_rule",
    "shrink",
    "trace",
    "verify",
]
