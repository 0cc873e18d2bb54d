"""Deployed latency, size and accuracy of pruned networks (the `export` and `export_accuracy` sections of run.py).

`bench_export`: CIFAR VGG-16 and ResNet-56, unpruned and pruned 50% / 90% (random importances, global
scope, with and without channel_multiple=8), batch 1 and 64: the JAX model under jit on the CPU, and the
exported LiteRT model (norms folded, XNNPACK) on 1 and 2 threads; speed-ups against the unpruned model in
the same runtime, beside the FLOP ratio, and the .tflite size.

`bench_export_accuracy`: a trained checkpoint exported to StableHLO and TFLite, all three run on the
CIFAR-10 test split (the JPEG folder of ../shared/data, normalised with the run's config): accuracy and
the fraction of images on which each export predicts what JAX predicts.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from receding_jax import deploy, pruning
from receding_jax.deploy import litert, stablehlo
from receding_jax.models import for_platform, get_model
from receding_jax.pruning import models as pruning_models

VARIANTS = ((0.0, 1), (0.5, 1), (0.5, 8), (0.9, 1), (0.9, 8))


def _median_ms(fn, repeats: int) -> float:
  """`run.median_seconds` in milliseconds (imported here: run.py imports this module)."""
  from run import median_seconds

  return 1e3 * median_seconds(fn, repeats)


def _litert_ms(model: bytes, x: np.ndarray, threads: int, repeats: int) -> float:
  interp = litert.interpreter(model, threads)
  interp.set_tensor(interp.get_input_details()[0]["index"], x)
  return _median_ms(interp.invoke, repeats)


def _variant_rows(name: str, model, variables, ratio: float, multiple: int, quick: bool) -> list[dict]:
  """One row per batch size for `model` pruned at `ratio` (0: unpruned)."""
  narrow, narrow_vars = pruning.prune_params(model, variables, ratio, channel_multiple=multiple)
  kwargs = pruning_models.eval_kwargs(narrow, None)
  folds = deploy.find_folds(narrow, narrow_vars, (jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),), kwargs)
  infer = deploy.folded_function(narrow, narrow_vars, folds, kwargs)
  fast = for_platform(narrow, jax.default_backend())  # JAX at its best here (on CPU: the CPU formulation).
  forward = jax.jit(lambda v, x: fast.apply(v, x, **kwargs))
  device_vars = jax.device_put(narrow_vars)
  rows = []
  for batch in (1, 64):
    repeats = (5 if quick else 11) if batch == 64 else (20 if quick else 50)
    x = np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype(np.float32)
    model_bytes = litert.to_tflite(infer, x.shape)
    x_device = jnp.asarray(x)
    rows.append({
        "model": name, "ratio": ratio, "channel_multiple": multiple, "batch": batch,
        "macs": pruning.count_macs(narrow), "tflite_bytes": len(model_bytes),
        "jax_ms": _median_ms(lambda x=x_device: forward(device_vars, x).block_until_ready(), repeats),
        "litert_1t_ms": _litert_ms(model_bytes, x, 1, repeats),
        "litert_2t_ms": _litert_ms(model_bytes, x, 2, repeats),
    })
  return rows


def bench_export(quick: bool) -> list[dict]:
  """Latency rows with speed-ups against the unpruned row of the same model, batch and runtime."""
  rows = []
  for name in ("cifar_vgg16", "cifar_resnet56"):
    model = get_model(name, 10)
    variables = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    for ratio, multiple in VARIANTS:
      rows += _variant_rows(name, model, variables, ratio, multiple, quick)
  base = {(r["model"], r["batch"]): r for r in rows if r["ratio"] == 0.0}
  for row in rows:
    ref = base[(row["model"], row["batch"])]
    row["flop_ratio"] = ref["macs"] / row["macs"]  # The MAC ratio, which is the FLOP ratio.
    for runtime in ("jax", "litert_1t", "litert_2t"):
      speedup = ref[f"{runtime}_ms"] / row[f"{runtime}_ms"]
      row[f"{runtime}_speedup"] = speedup
      row[f"{runtime}_speedup_over_flop_ratio"] = speedup / row["flop_ratio"]
  return rows


def cifar_test_images(folder: pathlib.Path, mean, std) -> tuple[np.ndarray, np.ndarray]:
  """The CIFAR-10 test split of an extracted JPEG folder ([N, 32, 32, 3] normalised float32, labels)."""
  from PIL import Image

  classes = sorted(p.name for p in (folder / "test").iterdir())
  files = [(f, label) for label, c in enumerate(classes) for f in sorted((folder / "test" / c).glob("*.jpg"))]
  images = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0 for f, _ in files])
  return ((images - np.asarray(mean)) / np.asarray(std)).astype(np.float32), np.array([label for _, label in files])


def bench_export_accuracy(checkpoint_dir: str, folder: str) -> list[dict]:
  """Accuracy and agreement with JAX of a checkpoint's exports on the whole CIFAR-10 test split."""
  from receding_jax.training import checkpointing, model_specs
  from receding_jax.training.exported_checkpoint import export_checkpoint

  if not checkpoint_dir:
    raise SystemExit("the export_accuracy section needs --export_checkpoint=DIR (a trained CIFAR-10 checkpoint)")
  workdir = pathlib.Path(checkpoint_dir).resolve()
  config = next(json.loads((p / "config.json").read_text()) for p in workdir.parents if (p / "config.json").exists())
  images, labels = cifar_test_images(pathlib.Path(folder), config["dataset"]["mean"], config["dataset"]["std"])
  state, spec = checkpointing.restore(checkpointing.make_manager(workdir, create=False))
  model = model_specs.build_model(spec)
  variables = {k: state[k] for k in ("params", "batch_stats") if k in state}
  forward = jax.jit(lambda x: model.apply(variables, x, **pruning_models.eval_kwargs(model, None)))
  predictions = {"jax": np.concatenate([np.asarray(forward(images[i:i + 500])) for i in range(0, len(images), 500)])}
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "export"
    report = export_checkpoint(workdir, out, quantize=("float16", "int8"), tflite_batch=100)
    predictions["stablehlo"] = stablehlo.run_stablehlo((out / "model.stablehlo").read_bytes(), images)
    for name in ("model.tflite", "model_float16.tflite", "model_int8.tflite"):
      predictions[name] = litert.run_tflite((out / name).read_bytes(), images, num_threads=2)
  reference = predictions["jax"].argmax(-1)
  return [{"checkpoint": str(workdir), "runtime": name, "images": len(labels),
           "accuracy": float(np.mean(p.argmax(-1) == labels)),
           "same_predictions_as_jax": float(np.mean(p.argmax(-1) == reference)),
           "params": pruning.count_params(variables), "file_bytes": report["files"].get(name, {}).get("bytes")}
          for name, p in predictions.items()]


def bench_export_tiles(quick: bool) -> list[dict]:
  """LiteRT time of six 3x3 convolutions c -> c on a 32x32 map (batch 1, 1 thread) for widths around
  multiples of 8: how XNNPACK's cost steps with the width (FLOPs grow as c^2). Round-robin timing."""
  import flax.linen as nn

  class Stack(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
      for i in range(6):
        x = nn.relu(nn.Conv(self.width, (3, 3), name=f"conv{i}")(x))
      return x

  interpreters = {}
  for width in (4, 5, 8, 9, 11, 16, 17, 24, 25):
    stack = Stack(width)
    params = stack.init(jax.random.key(0), jnp.zeros((1, 32, 32, width)))
    interp = litert.interpreter(litert.to_tflite(lambda x, s=stack, p=params: s.apply(p, x), (1, 32, 32, width)), 1)
    interp.set_tensor(interp.get_input_details()[0]["index"], np.ones((1, 32, 32, width), np.float32))
    interpreters[width] = interp
  times: dict[int, list[float]] = {w: [] for w in interpreters}
  for _ in range(100 if quick else 300):
    for width, interp in interpreters.items():
      start = time.perf_counter()
      interp.invoke()
      times[width].append(time.perf_counter() - start)
  return [{"layers": "6 x conv3x3 c->c, 32x32, batch 1, 1 thread", "width": w,
           "litert_ms": 1e3 * statistics.median(t), "ms_per_width_squared": 1e3 * statistics.median(t) / w**2}
          for w, t in times.items()]
