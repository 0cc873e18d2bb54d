"""The export's and the pruning check's comparisons run at full float32 precision (not TF32, the GPU default).

A CPU cannot compute in TF32, so these tests read the precision off the modules jax really compiled while the
export or the check ran (jax's IR dump): every matmul and convolution the comparisons compile asks for
HIGHEST, and the exported file keeps the default, which the machine that runs it chooses.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowered_modules import at_highest, compiled_modules, matmul_ops

from receding_jax import BoundedScaleNorm, deploy, prune_params


class Net(nn.Module):
  """conv -> norm -> ReLU -> conv -> mean -> dense; `cumulative` adds a cumsum, which the pruning check's host
  evaluation does not cover (so XLA runs that check)."""

  cumulative: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(BoundedScaleNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    y = nn.Dense(4)(nn.Conv(6, (3, 3), strides=2)(x).mean((1, 2)))
    return jnp.cumsum(y, axis=-1) if self.cumulative else y


def trained_looking(model, x, seed=0):
  rng = np.random.default_rng(seed)
  variables = model.init(jax.random.key(seed), x)
  vector = lambda v: np.abs(rng.normal(size=v.shape)) + 0.5  # Biases, norm parameters, variances > 0.
  return jax.tree.map(lambda v: (rng.normal(size=v.shape) if v.ndim > 1 else vector(v)).astype(np.float32), variables)


def test_the_export_compares_at_full_precision_and_the_file_keeps_the_default(tmp_path):
  model, x = Net(), jnp.ones((1, 8, 8, 3))
  variables = trained_looking(model, x)
  with compiled_modules() as modules:
    report = deploy.export_model(model, variables, tmp_path / "out", formats=("stablehlo",), inputs=x)
  assert report["folding"]["folded"] == {"BoundedScaleNorm_0": "Conv_0"}
  compared = {name: ops for name, text in modules.items() if "call_exported" not in name and (ops := matmul_ops(text))}
  assert all(at_highest(op) for ops in compared.values() for op in ops), compared
  # Both comparisons were seen: the reference (the unfolded model) and the folding check (the folded one).
  assert sorted(len(ops) for ops in compared.values()) == [3, 3]
  exported = jax.export.deserialize(bytearray((tmp_path / "out" / "model.stablehlo").read_bytes()))
  shipped = matmul_ops(exported.mlir_module())
  assert shipped and not any(at_highest(op) for op in shipped)  # Its 3 operations, once per platform.


@pytest.mark.parametrize("cumulative", [False, True], ids=["host evaluation", "xla"])
def test_the_pruning_check_compares_at_full_precision(cumulative):
  model, x = Net(cumulative), jnp.ones((1, 8, 8, 3))
  variables = trained_looking(model, x)
  with compiled_modules() as modules:
    _, narrow = prune_params(model, variables, 0.5, inputs=x)
  assert narrow["params"]["Conv_0"]["kernel"].shape[-1] == 4
  ops = [op for text in modules.values() for op in matmul_ops(text)]
  assert all(at_highest(op) for op in ops), ops
  # The host evaluation compiles no matmul; XLA's compiles both models' (wide and narrow: 3 each).
  assert len(ops) == (6 if cumulative else 0)
