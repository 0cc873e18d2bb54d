"""All benchmarks in one command: prints a table and writes JSON.

    python benchmarks/run.py [--quick] [--out benchmarks/results.json] [--only train,penalty,...]

Sections (medians over repeated runs after warm-up and compilation; ratios measured in the same run):
  train     training-step throughput (images/s), model FLOPs per step, achieved FLOP/s (and fraction of
            peak on a GPU), for cifar_vgg16 / cifar_resnet56 at batch 64 and 128 and resnet50 at 224 px;
            beside it PyTorch's step for the same CIFAR model and penalty when torch is installed.
  penalty   step time with the receding penalty vs. without, same model, interleaved.
  pruned    inference time of cifar_vgg16 / cifar_resnet56 unpruned vs. pruned 50% and 90%, next to FLOPs.
  prune     coupling analysis and `prune_params` wall time (resnet50 at 224 px, CIFAR VGG-16, ResNet-56).
  input     CIFAR-10 JPEG folder pipeline throughput (images/s) vs. what the training step consumes.
  placement training images/s with the splits resident on the devices (1 and 10 steps per dispatch) vs.
            streamed from the host by Grain, same model and batch.
  export    deployed latency (JAX on CPU, LiteRT 1 and 2 threads) and .tflite size of CIFAR VGG-16 / ResNet-56
            unpruned vs. pruned 50% and 90%, batch 1 and 64, beside the FLOP ratio (benchmarks/export_latency.py;
            needs the [export] extra). export_accuracy: a trained checkpoint's exports on the CIFAR-10 test split
            (--export_checkpoint, --cifar_folder). export_tiles: LiteRT time of a conv stack against its width.
  norm      the bounded norm's forward+backward (closed-form vs autodiff backward, flax BatchNorm, PyTorch, an
            elementwise pass) and the CIFAR steps with either backward (benchmarks/norm_speed.py).
  compile   whole runs in fresh processes: the quickstart cold and warm (persistent compilation cache), a CIFAR
            VGG-16 / ResNet-56 run, each phase's compile and run seconds and each function's compile time and
            count, against the target wall <= 3 x steady compute + 30 s; the pruning check's first-call cost
            (benchmarks/compile_time.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tarfile
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from compile_time import SHARED_CIFAR, bench_compile
from export_latency import bench_export, bench_export_accuracy, bench_export_tiles
from norm_speed import bench_norm

from receding_jax import pruning
from receding_jax.models import for_platform, get_model
from receding_jax.training import data, splits, steps, streaming
from receding_jax.training.paper_configs import paper_config

REPO = pathlib.Path(__file__).resolve().parents[1]
#: Peak dense FLOP/s of accelerators we know (bf16/tf32 tensor cores differ; float32 here).
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 67e12, "NVIDIA H200": 67e12}


def block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def cifar_trainer(model_name: str, batch: int, penalty: str = "rni", **model_overrides):
  config = paper_config("cifar10", model_name, "rni")
  config.optim.batch_size = batch
  config.penalty.kind = penalty
  for k, v in model_overrides.items():
    config.model[k] = v
  return config


def synthetic_batch(trainer, shape, batch, classes):
  rng = np.random.default_rng(0)
  local = {"image": rng.normal(size=(batch, *shape)).astype(np.float32),
           "label": rng.integers(0, classes, batch).astype(np.int32)}
  return data.as_chunk(local, trainer.mesh)


def step_runner(config, image_size=None):
  """(run one step, model): a jitted training step on a fixed synthetic batch, state carried along."""
  spec_overrides = {"input_shape": (image_size or 32, image_size or 32, 3)}
  model = get_model(config.model.name, config.dataset.num_classes, config.model.norm, **spec_overrides)
  trainer = steps.make_trainer(config, model, steps_per_epoch=1000)
  state = {"s": trainer.init()}
  batch = synthetic_batch(trainer, model.input_shape, config.optim.batch_size, config.dataset.num_classes)

  def run():
    state["s"], metrics = trainer.train(state["s"], batch)
    return metrics["loss"][-1]

  return run, model


def bench_train(quick: bool) -> list[dict]:
  rows = []
  cases = [("cifar_vgg16", 64), ("cifar_vgg16", 128), ("cifar_resnet56", 64), ("cifar_resnet56", 128)]
  if not quick:
    cases.append(("resnet50", 8))
  for name, batch in cases:
    if name == "resnet50":
      config = paper_config("imagenet2012", "resnet50", "rni")
      config.optim.batch_size = batch
      run, model = step_runner(config, image_size=224)
    else:
      run, model = step_runner(cifar_trainer(name, batch))
    seconds = median_seconds(run, repeats=3 if quick or name == "resnet50" else 7)
    flops = 2 * 3 * pruning.count_macs(model) * batch  # 2 FLOPs a MAC; backward ~ 2x forward.
    row = {"model": name, "batch": batch, "step_ms": 1e3 * seconds, "images_per_s": batch / seconds,
           "gflop_per_step": flops / 1e9, "gflop_per_s": flops / seconds / 1e9}
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
    if peak:
      row["fraction_of_peak"] = flops / seconds / peak
    if name.startswith("cifar"):
      row.update(_torch_step(name, batch, quick))
    rows.append(row)
  return rows


def _torch_step(name: str, batch: int, quick: bool) -> dict:
  try:
    import torch  # noqa: F401
  except ImportError:
    return {}
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from torch_reference import make_train_step

  seconds = median_seconds(make_train_step(name, batch), repeats=3 if quick else 5, warmup=1)
  return {"torch_step_ms": 1e3 * seconds, "torch_images_per_s": batch / seconds}


def bench_penalty(quick: bool) -> list[dict]:
  rows = []
  for name in ("cifar_vgg16", "cifar_resnet56"):
    with_penalty, _ = step_runner(cifar_trainer(name, 64, "rni"))
    without, _ = step_runner(cifar_trainer(name, 64, "none"))
    for fn in (with_penalty, without):
      block(fn()), block(fn())
    a, b = [], []
    for _ in range(5 if quick else 15):  # Interleaved, so drift of the machine hits both alike.
      for fn, times in ((with_penalty, a), (without, b)):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    rows.append({"model": name, "batch": 64, "with_penalty_ms": 1e3 * statistics.median(a),
                 "without_ms": 1e3 * statistics.median(b), "overhead": statistics.median(ratios) - 1.0})
  return rows


def random_importance_variables(model):
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *model.input_shape)))
  return jax.device_get(variables)


def bench_pruned(quick: bool) -> list[dict]:
  rows = []
  for name in ("cifar_vgg16", "cifar_resnet56"):
    model = for_platform(get_model(name, 10), jax.default_backend())  # What the trainer runs on this machine.
    variables = random_importance_variables(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32, 32, 3)), jnp.float32)
    base_macs = pruning.count_macs(model)
    base_seconds = None
    for ratio, multiple in ((0.0, 1), (0.5, 1), (0.5, 8), (0.9, 1), (0.9, 8)):
      narrow_model, narrow_vars = pruning.prune_params(model, variables, ratio, channel_multiple=multiple)
      forward = jax.jit(lambda v, x, m=narrow_model: m.apply(v, x))
      narrow_vars = jax.device_put(narrow_vars)
      seconds = median_seconds(lambda f=forward, v=narrow_vars, x=x: f(v, x), repeats=5 if quick else 15)
      base_seconds = base_seconds or seconds
      macs = pruning.count_macs(narrow_model)  # flop_ratio: the MAC ratio, which is the FLOP ratio.
      rows.append({"model": name, "ratio": ratio, "channel_multiple": multiple, "batch": 64,
                   "forward_ms": 1e3 * seconds, "flop_ratio": base_macs / macs, "speedup": base_seconds / seconds,
                   "speedup_over_flop_ratio": (base_seconds / seconds) / (base_macs / macs)})
  return rows


def bench_prune(quick: bool) -> list[dict]:
  """Coupling analysis (trace + union-find) and `prune_params` at 50%, numpy variables on the host: without
  the result check, and with it (the first call compiles every op of both models; later calls reuse them)."""
  rows = []
  for name in ("resnet50", "cifar_vgg16", "cifar_resnet56"):
    model = get_model(name, 1000 if name == "resnet50" else 10)
    variables = random_importance_variables(model)
    repeats = 3 if quick else 5
    start = time.perf_counter()
    pruning.prune_params(model, variables, 0.5)
    first = time.perf_counter() - start
    rows.append({
        "model": name, "ratio": 0.5,
        "analysis_s": median_seconds(lambda m=model, v=variables: pruning.trace(m, v), repeats, warmup=1),
        "prune_unchecked_s": median_seconds(
            lambda m=model, v=variables: pruning.prune_params(m, v, 0.5, check=False), repeats, warmup=1),
        "prune_checked_first_s": first,
        "prune_checked_s": median_seconds(lambda m=model, v=variables: pruning.prune_params(m, v, 0.5), repeats, 1),
    })
  return rows


def bench_input(quick: bool, train_rows: list[dict]) -> list[dict]:
  """The Grain streaming pipeline alone (decode, augment, batch on the host) over the CIFAR-10 JPEGs."""
  if not SHARED_CIFAR.exists():
    return [{"skipped": f"{SHARED_CIFAR} not found"}]
  with tempfile.TemporaryDirectory() as root:
    config = cifar_folder_config(root, 128)
    train_split = splits.load_split(config, "train", 0, 1)
    rows = []
    for epoch, label in ((0, "first epoch (reads and caches JPEGs)"), (1, "later epochs (cached)")):
      n, start = 0, time.perf_counter()
      for i, batch in enumerate(streaming.train_batches(train_split, config, epoch)):
        n += batch["image"].shape[0]
        if quick and i == 100:
          break
      rows.append({"pipeline": label, "images_per_s": n / (time.perf_counter() - start)})
  consumption = {f"{r['model']}@{r['batch']}": r["images_per_s"] for r in train_rows if r["model"].startswith("cifar")}
  for row in rows:
    row["vs_train_step"] = {k: row["images_per_s"] / v for k, v in consumption.items()}
  return rows


def cifar_folder_config(root: str, batch: int):
  """The CIFAR-10 JPEG folder extracted under `root`, for VGG-16 at 1/4 width (data costs show)."""
  with tarfile.open(SHARED_CIFAR) as tar:
    tar.extractall(root, filter="data")
  config = paper_config("cifar10", "cifar_vgg16", "rni")
  config.dataset.name, config.dataset.folder, config.optim.batch_size = "folder", root, batch
  config.model.width_multiplier = 0.25
  return config


def time_placement(config, placement: str, train_split, chunks: int) -> float:
  """Images/s of training through `data.train_feed` (median chunk time after a warm-up epoch's first chunks)."""
  from receding_jax.models import model_from_spec
  from receding_jax.training.config import model_spec

  mesh = steps.make_mesh()
  feed = data.train_feed(config, train_split, mesh, placement)
  trainer = steps.make_trainer(config, model_from_spec(model_spec(config)), feed.steps, mesh, prepare=feed.prepare)
  state, times, images = trainer.init(), [], 0
  iterator = feed.chunks(1, 0)
  for i in range(chunks + 2):
    start = time.perf_counter()
    state, metrics = trainer.train(state, next(iterator))
    jax.block_until_ready(metrics)
    if i >= 2:  # The first two: compilation and the pipeline's start.
      times.append(time.perf_counter() - start)
      images = len(metrics["loss"]) * config.optim.batch_size
  return images / statistics.median(times)


def bench_placement(quick: bool) -> list[dict]:
  """Training images/s with device-resident data (1 and 10 steps per dispatch) beside streamed data."""
  if not SHARED_CIFAR.exists():
    return [{"skipped": f"{SHARED_CIFAR} not found"}]
  rows = []
  with tempfile.TemporaryDirectory() as root:
    config = cifar_folder_config(root, 128)
    train_split = splits.load_split(config, "train", 0, 1)
    streamed = time_placement(config, "streaming", train_split, 5 if quick else 20)
    rows.append({"placement": "streaming (Grain, host)", "steps_per_dispatch": 1, "images_per_s": streamed,
                 "vs_streaming": 1.0})
    for k in (1, 10):
      config.data.steps_per_dispatch = k
      resident_rate = time_placement(config, "device", train_split, max(1, (5 if quick else 20) // k))
      rows.append({"placement": "device-resident", "steps_per_dispatch": k, "images_per_s": resident_rate,
                   "vs_streaming": resident_rate / streamed})
  return rows


def print_table(title: str, rows: list[dict]) -> None:
  print(f"\n## {title}")
  if not rows:
    return
  keys = list(dict.fromkeys(k for row in rows for k in row if not isinstance(row[k], dict)))
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for row in rows:
    cells = [f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys]
    print("| " + " | ".join(cells) + " |")
  for row in rows:
    for k, v in row.items():
      if isinstance(v, dict):
        print(f"  {k}: " + ", ".join(f"{a} {b:.3g}" for a, b in v.items()))


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()
  except OSError:
    return platform.processor() or platform.machine()


#: Sections of the results file that other scripts write (benchmarks/gpu_throughput.py --merge): kept on rewrite.
KEPT_SECTIONS = ("gpu_throughput",)


def kept_sections(path: pathlib.Path) -> dict:
  """The KEPT_SECTIONS of the results file at `path`, so that a CPU rerun keeps the merged GPU rows."""
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return {k: old[k] for k in KEPT_SECTIONS if k in old}


def previous_results(path: pathlib.Path) -> dict:
  """The sections already in the results file (kept when --only runs a subset)."""
  try:
    return json.loads(path.read_text()).get("results", {})
  except (OSError, ValueError):
    return {}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="fewer repeats, no resnet50 step")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
  parser.add_argument("--only", default="train,penalty,pruned,prune,input,placement,norm",
                      help="sections to run; the others' rows are kept from --out")
  parser.add_argument("--export_checkpoint", default=None, help="export_accuracy: a trained CIFAR-10 checkpoint")
  parser.add_argument("--cifar_folder", default="/tmp/cifar10-jpeg", help="export_accuracy: the extracted JPEGs")
  args = parser.parse_args()
  only = set(args.only.split(","))
  device = jax.devices()[0]
  report = {
      "machine": {"processor": _cpu_model(), "cpu_count": os.cpu_count(), "node": platform.node()},
      "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
      "jax": jax.__version__, "quick": args.quick, "results": {},
  }
  try:
    import torch

    report["torch"] = torch.__version__
  except ImportError:
    report["torch"] = None
  sections = [("train", "Training step", lambda: bench_train(args.quick)),
              ("penalty", "Receding-penalty overhead (batch 64)", lambda: bench_penalty(args.quick)),
              ("pruned", "Pruned inference (batch 64)", lambda: bench_pruned(args.quick)),
              ("prune", "prune_params wall time", lambda: bench_prune(args.quick)),
              ("input", "Input pipeline (CIFAR-10 JPEG folder, batch 128)",
               lambda: bench_input(args.quick, report["results"].get("train", []))),
              ("placement", "Training with device-resident vs streamed data (CIFAR-10 folder, VGG-16/4, batch 128)",
               lambda: bench_placement(args.quick)),
              ("export", "Deployed latency: JAX vs LiteRT (XNNPACK)", lambda: bench_export(args.quick)),
              ("export_tiles", "LiteRT cost against width (XNNPACK tiles)", lambda: bench_export_tiles(args.quick)),
              ("export_accuracy", "Exports on the CIFAR-10 test split",
               lambda: bench_export_accuracy(args.export_checkpoint, args.cifar_folder)),
              ("norm", "Bounded norm: closed-form vs autodiff backward", lambda: bench_norm(args.quick)),
              ("compile", "Compile against steady compute (whole runs, fresh processes)",
               lambda: bench_compile(args.quick))]
  for key, title, fn in sections:
    if key in only:
      print(f"\n[{key}] {title}...", flush=True)
      start = time.perf_counter()
      report["results"][key] = fn()
      print(f"[{key}] done in {time.perf_counter() - start:.1f} s", flush=True)
      print_table(title, report["results"][key])
      sys.stdout.flush()
  report.update(kept_sections(pathlib.Path(args.out)))
  report["results"] = {**previous_results(pathlib.Path(args.out)), **report["results"]}
  pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
