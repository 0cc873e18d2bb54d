"""A checkpoint exported for deployment: the model its spec describes (pruned or not), in float32,
norms folded, as StableHLO and/or TFLite files verified against the JAX model (`deploy.export_model`).

Used by ``python -m receding_jax.export``. Any checkpoint the project writes works: a run's
``checkpoints``, a fine-tune's, a pruned checkpoint (``pruned_<ratio>/pruned``), of a zoo model or of a
factory named in its spec.

The training pipeline's normalisation (``config.dataset.mean``/``std``) is not in the checkpoint: it is
read from the run's ``config.json`` beside or above the checkpoint (``WORKDIR/checkpoints``,
``WORKDIR/pruned_<ratio>/pruned``, a fine-tune's ``.../finetune/checkpoints``), or given explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax

from receding_jax import deploy
from receding_jax.deploy import model_export
from receding_jax.deploy.preprocessing import Normalisation
from receding_jax.errors import InputError
from receding_jax.training import checkpointing, model_specs
from receding_jax.training import workdir as wd


def export_checkpoint(
    checkpoint_dir: wd.PathLike, output_dir: str | os.PathLike, formats: Sequence[str] = deploy.FORMATS, *,
    step: int | None = None, quantize: Sequence[str] = (), tflite_batch: int = 1,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None, include_preprocessing: bool = False,
) -> dict[str, Any]:
  """Exports step `step` (default newest) of the checkpoint at `checkpoint_dir` into the new folder
  `output_dir`; returns the export report. Bad requests fail before the checkpoint is read, a checkpoint
  whose spec names no model we can build fails before anything is written. `mean` and `std` (both or
  neither) override the run's config.json; `include_preprocessing` needs one of them (`deploy.export_model`)."""
  source_dir = wd.path(checkpoint_dir)
  if not source_dir.is_dir():
    raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir} does not exist")
  normalisation = find_normalisation(source_dir, mean, std)
  model_export.check_request(output_dir, tuple(formats), tuple(quantize), tflite_batch, include_preprocessing,
                             normalisation)
  state, spec, source_step = checkpointing.read_step(source_dir, step)
  spec = {**spec, "compute_dtype": "float32"} if "compute_dtype" in spec else spec
  try:
    model = model_specs.build_model(spec)
  except (TypeError, KeyError) as e:
    raise InputError(f"the checkpoint's model spec {spec} names no model this package can build: {e}") from None
  variables = {k: jax.device_get(state[k]) for k in ("params", "batch_stats") if k in state}
  return deploy.export_model(
      model, variables, output_dir, formats, inputs=model_specs.example_inputs(spec), quantize=quantize,
      tflite_batch=tflite_batch, normalisation=normalisation, include_preprocessing=include_preprocessing,
      extra_report={"source": os.fspath(source_dir), "source_step": source_step, "model_spec": spec},
  )


def find_normalisation(source_dir: wd.PathLike, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> Normalisation | None:
  """`mean` and `std` when given, else ``dataset.mean``/``std`` of the run's config.json
  (`workdir.config_of_checkpoints`), else None (unknown)."""
  if (mean is None) != (std is None):
    raise InputError("give both --mean and --std, or neither (then the run's config.json is read)")
  if mean is not None:
    return Normalisation(tuple(mean), tuple(std), "given (--mean, --std)")
  found = wd.config_of_checkpoints(source_dir)
  dataset = found[0].get("dataset") if found else None
  if isinstance(dataset, dict) and "mean" in dataset and "std" in dataset:
    return Normalisation(tuple(dataset["mean"]), tuple(dataset["std"]), os.fspath(found[1]))
  return None
