"""receding-jax: Receding Neuron Importances for structured pruning (Suteu & Guo, 2022) in JAX/Flax.

The library (norm, gate and nnx_norm, penalties, importances, models, pruning) depends only on jax, flax and
optax; the training loop (`receding_jax.training`) and the command-line modules build on it.
"""

from receding_jax.gate import BoundedGate
from receding_jax.importances import importance_summary, neuron_importances
from receding_jax.nnx_norm import NnxBoundedGate, NnxBoundedScaleNorm
from receding_jax.norm import BoundedScaleNorm
from receding_jax.penalties import (
    add_l1_penalty,
    add_polarization_penalty,
    add_receding_penalty,
    l1_penalty,
    polarization_penalty,
    project_to_interval,
    receding_penalty,
)
from receding_jax.pruning import (
    Shrunk,
    channel_masks,
    count_macs,
    count_params,
    prune_params,
    prune_params_like,
    shrink,
)
from receding_jax.pruning import (
    count_flops as count_flops,  # Deprecated name of count_macs (warns when called).
)
from receding_jax.selection import batch_norm_scale_mask, bounded_logit_mask

__version__ = "0.1.0"

__all__ = [
    "BoundedGate",
    "BoundedScaleNorm",
    "NnxBoundedGate",
    "NnxBoundedScaleNorm",
    "Shrunk",
    "add_l1_penalty",
    "add_polarization_penalty",
    "add_receding_penalty",
    "batch_norm_scale_mask",
    "bounded_logit_mask",
    "channel_masks",
    "count_macs",
    "count_params",
    "importance_summary",
    "l1_penalty",
    "neuron_importances",
    "polarization_penalty",
    "project_to_interval",
    "prune_params",
    "prune_params_like",
    "receding_penalty",
    "shrink",
]
