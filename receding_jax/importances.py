"""Per-channel neuron importances of every norm layer, and the summary that training logs.

Importance is what the pruner ranks channels by: sigmoid(logit) for a `BoundedScaleNorm` or a `BoundedGate`
(always in (0, 1)), |gamma| for a BatchNorm (unbounded). Linen variables and `flax.nnx` states are both read.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from receding_jax.norm import bounded_scale
from receding_jax.selection import (
    PyTree,
    batch_norm_scale_mask,
    bounded_logit_mask,
    is_nnx_state,
    path_names,
)


def neuron_importances(variables: PyTree) -> dict[str, jax.Array]:
  """Importances of every norm layer, keyed by the module's path ('stage1/block0/norm1').

  Args:
    variables: Linen variables ({'params': ..., 'batch_stats': ...}), a `flax.nnx.State` of a whole
      model (``nnx.state(model)``: parameters and batch statistics together), or the NNX model itself.
      With the statistics present, BatchNorm layers are identified exactly (see `selection.batch_norm_scale_mask`).

  Returns:
    A dict path -> float32 array of shape [channels]: sigmoid(logit) for bounded norms, |scale| for
    BatchNorms, in jax's pytree order of the parameters (dict keys sorted). An NNX state gives the same
    keys and values as the Linen variables of the same layout. A numpy leaf gives a numpy array, computed
    on the host (eager jax would compile a program per layer shape), within a few ulp of jax's.

  Raises:
    ValueError: the variables hold no norm layer at all (nothing to rank channels by).
  """
  if isinstance(variables, nnx.Module):
    variables = nnx.state(variables)
  if is_nnx_state(variables):
    params = variables
  elif isinstance(variables, Mapping) and "params" in variables:
    params = variables["params"]
  else:
    raise TypeError(
        "neuron_importances expects Flax variables with a 'params' entry or an nnx.State, got "
        f"{type(variables).__name__}"
    )
  logits = jax.tree.leaves(bounded_logit_mask(params))
  scales = jax.tree.leaves(batch_norm_scale_mask(variables))
  out = {}
  for (path, leaf), is_logit, is_scale in zip(
      jax.tree_util.tree_leaves_with_path(params), logits, scales, strict=True
  ):
    module = "/".join(path_names(path)[:-1])
    if is_logit or is_scale:
      out[module] = _importance(leaf, bool(is_logit))
  if not out:
    raise ValueError(
        "neuron_importances found no norm layer (no bounded-norm 'scale_logit' and no BatchNorm 'scale') in "
        "the variables; importances come from BoundedScaleNorm, BoundedGate or BatchNorm layers"
    )
  return out


def _importance(leaf, is_logit: bool):
  """sigmoid(logit) or |scale| in float32: a jax leaf with jax; a numpy leaf in numpy, as XLA:CPU computes
  it, 1 / (1 + exp(-x)) with subnormal results flushed to zero (receded channels' zeros stay zeros), the
  last bit or two of ~4% of values apart (XLA's exp is an approximation)."""
  if not isinstance(leaf, (np.ndarray, np.generic)):
    x = jnp.asarray(leaf, jnp.float32)
    return bounded_scale(x) if is_logit else jnp.abs(x)
  x = np.asarray(leaf, np.float32)
  if not is_logit:
    return np.abs(x)
  with np.errstate(over="ignore"):  # exp(-x) = inf for very negative logits: the importance is 0.
    value = np.float32(1) / (np.float32(1) + np.exp(-x.astype(np.float64)).astype(np.float32))
  return np.where(value < np.finfo(np.float32).tiny, np.float32(0), value)


def importance_summary(
    importances: Mapping[str, jax.Array], low: float = 0.05, high: float = 0.5
) -> dict[str, float]:
  """Share of all importances below `low` (receded) and above `high` (kept), plus count and mean.

  Bimodality, the method's signature, shows as large shares at both ends. Returns plain floats, keyed
  'fraction_below_<low>', 'fraction_above_<high>', 'count', 'mean'.
  """
  if not low <= high:
    raise ValueError(f"importance_summary needs low <= high, got low={low!r}, high={high!r}")
  values = np.concatenate([np.ravel(np.asarray(v, np.float32)) for v in importances.values()] or [[]])
  n = values.size
  return {
      f"fraction_below_{low:g}": float(np.mean(values < low)) if n else 0.0,
      f"fraction_above_{high:g}": float(np.mean(values > high)) if n else 0.0,
      "count": float(n),
      "mean": float(values.mean()) if n else 0.0,
  }
