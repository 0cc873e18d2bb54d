"""Training throughput of the project's loop beside the PyTorch reference loop, on one GPU (or a CPU, tiny).

    python benchmarks/gpu_throughput.py --folder DIR --out OUT [--models cifar_vgg16,cifar_resnet56]
        [--batches 64,128] [--dtypes float32,bfloat16] [--epochs 3] [--width 1.0] [--budget-seconds S]
    python benchmarks/gpu_throughput.py --merge OUT/gpu_throughput.json [--into benchmarks/results.json]

DIR is a CIFAR-10 image folder (train/<class>/*.jpg, test/<class>/*.jpg), e.g. a subset of the tarball.
- jax rows: ``python -m receding_jax.main`` (configs/cifar10_folder.py:rni: bounded norms + receding penalty)
  trains on DIR for --epochs epochs, no validation split, evaluated only after the last epoch. images/s =
  steps x batch / ``epoch_seconds`` (WORKDIR/metrics.jsonl) over the epochs after the first (compilation)
  and before the last (evaluation). ``model.compute_dtype`` and ``data.placement`` are passed where this
  version of the loop has those keys (a row says so otherwise).
- torch rows: the official code's way, float32 (cuDNN convolutions use TF32, PyTorch's default): a
  torchvision ImageFolder + DataLoader with CPU augmentation (RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize), shuffled, ``--torch-workers`` processes, pinned memory; the same VGG-16 / ResNet-56
  with sigmoid-scaled BatchNorm and the receding penalty added to the loss (benchmarks/torch_reference.py),
  SGD Nesterov; ``loss.item()`` every step. images/s over the epochs after the first (worker start-up).
- MFU: training FLOPs per image = 3 x forward FLOPs (2 x the MACs of `receding_jax.count_macs`), times
  images/s, over the GPU's dense peak: bfloat16 rows against the BF16 tensor-core peak, float32 rows
  against the TF32 peak (XLA's and cuDNN's default for float32 convolutions), with the plain FP32 peak
  beside it. No peak is known for a CPU: MFU is left empty there.
Each case runs in its own process (a fresh GPU); the JSON and markdown are rewritten after every case, so a
run stopped by a time limit keeps what it measured. With --budget-seconds, a case whose predicted time
(the last of its kind) would end past the budget is recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

CHILD_ENV = dict(os.environ)  # The cases' environment: this process keeps JAX off the GPU (`main`).
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's receding_jax, whatever is installed.
CONFIG = REPO / "configs" / "cifar10_folder.py"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
#: Dense peak TFLOP/s per GPU (NVIDIA data sheets; SXM parts): matched on a substring of the device kind.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bfloat16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bfloat16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bfloat16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
#: The paper's receding-penalty settings per model (docs/method.md), for the torch loop.
TORCH_PENALTY = {"cifar_vgg16": (1e-3, 3.0), "cifar_resnet56": (1e-4, 0.0)}


def peak_tflops(device_kind: str) -> dict[str, float] | None:
  """The dense peaks of the first PEAK_TFLOPS key found in `device_kind`, or None (a CPU, an unknown GPU)."""
  return next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), None)


def train_gflop_per_image(model_name: str, width: float) -> float:
  """3 x forward FLOPs (2 FLOPs a MAC) of one 32x32 image, in GFLOP."""
  from receding_jax import count_macs
  from receding_jax.models import get_model

  return 3 * 2 * count_macs(get_model(model_name, 10, norm="bounded", width_multiplier=width)) / 1e9


def with_utilisation(row: dict, peak: dict[str, float] | None) -> dict:
  """`row` with achieved TFLOP/s and MFU (against the dtype's tensor-core peak; FP32 peak beside it)."""
  tflops = row["images_per_s"] * row["train_gflop_per_image"] / 1e3
  row = {**row, "tflop_per_s": tflops}
  if peak:
    basis = "bfloat16" if row["dtype"] == "bfloat16" else "tf32"
    row.update(mfu=tflops / peak[basis], mfu_basis=f"{basis} dense peak {peak[basis]:g} TFLOP/s",
               mfu_fp32_peak=tflops / peak["fp32"] if basis == "tf32" else None)
  return row


def rate(epochs: list[dict], batch: int, pick: list[int]) -> dict:
  """images/s, step time and epoch times over the epochs at indices `pick` of per-epoch records with
  'epoch', 'step' (cumulative) and 'epoch_seconds'."""
  steps = [e["step"] - (epochs[i - 1]["step"] if i else 0) for i, e in enumerate(epochs)]
  seconds, picked_steps = sum(epochs[i]["epoch_seconds"] for i in pick), sum(steps[i] for i in pick)
  return {"images_per_s": picked_steps * batch / seconds, "step_ms": 1e3 * seconds / picked_steps,
          "steady_epoch_s": seconds / len(pick), "first_epoch_s": epochs[0]["epoch_seconds"],
          "epochs_measured": [epochs[i]["epoch"] for i in pick]}


def steady_rate(epochs: list[dict], batch: int) -> dict:
  """`rate` over the epochs after the first (compilation) and before the last (evaluation); with fewer
  than three epochs, the last one, and a note of what it includes."""
  if not epochs:
    raise ValueError("no epoch was logged")
  pick = list(range(1, len(epochs) - 1)) or [len(epochs) - 1]
  note = {1: "one epoch: compilation included", 2: "second epoch: final evaluation included"}.get(len(epochs), "")
  return {**rate(epochs, batch, pick), "note": note}


def read_epochs(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl's records, one per epoch (the last of each)."""
  path = workdir / "metrics.jsonl"
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
  by_epoch = {r["epoch"]: r for r in records if "epoch_seconds" in r}
  return [by_epoch[e] for e in sorted(by_epoch)]


def known_config_keys() -> set[str]:
  from receding_jax.training.config import known_keys

  return set(known_keys())


def jax_command(case: dict, args: argparse.Namespace, workdir: pathlib.Path, known: set[str]) -> tuple[list, str]:
  """The `receding_jax.main` command line of one case, and a note on the keys this loop lacks."""
  overrides = {"model.name": case["model"], "model.width_multiplier": args.width, "model.compute_dtype": case["dtype"],
               "dataset.folder": args.folder, "dataset.validation_examples": 0, "checkpoint.keep_best": 0,
               "optim.batch_size": case["batch"], "optim.num_epochs": args.epochs, "phases": "('train',)",
               "eval_every_epochs": 10_000, "checkpoint.every_epochs": 10_000}
  if args.placement:
    overrides["data.placement"] = args.placement
  missing = [k for k in overrides if k not in known]
  if "model.compute_dtype" in missing and case["dtype"] != "float32":
    raise LookupError("this loop has no model.compute_dtype")
  cmd = [sys.executable, "-m", "receding_jax.main", f"--config={CONFIG}:rni", f"--workdir={workdir}",
         *(f"--config.{k}={v}" for k, v in overrides.items() if k in known)]
  return cmd, f"no config key {missing}" if missing else ""


def run_logged(cmd: list[str], log: pathlib.Path, env: dict | None = None) -> float:
  """Runs `cmd` with its output in `log`; returns its wall time. RuntimeError with the log's tail on failure."""
  start = time.perf_counter()
  with open(log, "w") as f:
    code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or CHILD_ENV, cwd=REPO).returncode
  if code:
    lines = [line for line in log.read_text().splitlines() if line.strip()] or ["(no output)"]
    tail = "\n".join(lines[-15:])
    raise RuntimeError(f"failed (exit status {code}, log {log.name}): {lines[-1].strip()}\n{tail}")
  return time.perf_counter() - start


def jax_case(case: dict, args: argparse.Namespace, work: pathlib.Path, known: set[str]) -> dict:
  name = f"jax_{case['model']}_b{case['batch']}_{case['dtype']}"
  workdir = work / name
  shutil.rmtree(workdir, ignore_errors=True)  # A fresh run: a finished one would return at once.
  cmd, note = jax_command(case, args, workdir, known)
  wall = run_logged(cmd, work / f"{name}.log")
  rate = steady_rate(read_epochs(workdir), case["batch"])
  row = {**case, "impl": "jax", "width": args.width, "placement": placement(workdir), **rate,
         "wall_s": wall, "overhead_s": wall - rate["steady_epoch_s"] * args.epochs,
         "compile_s": max(0.0, rate["first_epoch_s"] - rate["steady_epoch_s"])}
  row["note"] = "; ".join(x for x in (rate["note"], note) if x)
  return row


def placement(workdir: pathlib.Path) -> str:
  """The run's data.placement as its config.json records it ('default' for a loop without the key)."""
  try:
    return str(json.loads((workdir / "config.json").read_text())["data"]["placement"])
  except (OSError, KeyError, TypeError, ValueError):
    return "default"


def torch_case(case: dict, args: argparse.Namespace, work: pathlib.Path) -> dict:
  name = f"torch_{case['model']}_b{case['batch']}_{case['dtype']}"
  out = work / f"{name}.json"
  cmd = [sys.executable, __file__, "--torch-case", f"{case['model']},{case['batch']},{case['dtype']}",
         "--folder", args.folder, "--torch-epochs", str(args.torch_epochs), "--torch-steps", str(args.torch_steps),
         "--torch-workers", str(args.torch_workers), "--out", str(out)]
  wall = run_logged(cmd, work / f"{name}.log")
  return {**json.loads(out.read_text()), "wall_s": wall}


def torch_epochs(model_name: str, batch: int, dtype: str, folder: str, epochs: int, max_steps: int,
                 workers: int) -> dict:
  """Trains `epochs` epochs (at most `max_steps` steps each, 0 = all) the official code's way; the rate."""
  import torch
  from torch.nn import functional as F
  from torchvision import datasets
  from torchvision import transforms as T

  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from torch_reference import VGG, ResNet56, receding_penalty

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
  loader = torch.utils.data.DataLoader(
      datasets.ImageFolder(os.path.join(folder, "train"), transform), batch_size=batch, shuffle=True,
      num_workers=workers, pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
  model = {"cifar_vgg16": VGG, "cifar_resnet56": ResNet56}[model_name]().to(device).train()
  logits = [p for n, p in model.named_parameters() if n.endswith("logit")]
  rest = [p for n, p in model.named_parameters() if not n.endswith("logit")]
  opt = torch.optim.SGD([{"params": rest, "weight_decay": 1e-4}, {"params": logits, "lr": 1.0, "weight_decay": 0}],
                        lr=0.1, momentum=0.9, nesterov=True)
  strength, shift = TORCH_PENALTY[model_name]
  epochs_log = []
  for epoch in range(epochs):
    start, steps, running = time.perf_counter(), 0, 0.0
    for x, y in loader:
      x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
      opt.zero_grad(set_to_none=True)
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = F.cross_entropy(model(x), y)
      loss = loss + strength * receding_penalty(model, shift)
      loss.backward()
      opt.step()
      running += loss.item()
      steps += 1
      if max_steps and steps >= max_steps:
        break
    if device.type == "cuda":
      torch.cuda.synchronize()
    epochs_log.append({"epoch": epoch + 1, "steps": steps, "epoch_seconds": time.perf_counter() - start})
  records = [{**e, "step": sum(x["steps"] for x in epochs_log[: i + 1])} for i, e in enumerate(epochs_log)]
  measured = rate(records, batch, list(range(1, len(records))) or [0])  # No evaluation: every later epoch.
  note = "one epoch: worker start-up included" if len(records) == 1 else ""
  return {"model": model_name, "batch": batch, "dtype": dtype, "impl": "torch", "width": 1.0,
          "placement": f"DataLoader, {workers} workers", **measured, "note": note,
          "final_loss": running / max(steps, 1)}


def cases(args: argparse.Namespace) -> list[dict]:
  """Every case in priority order: by batch, then dtype, then model, each jax row followed by its torch row
  (so a short budget still compares both loops on both models at the first batch and dtype)."""
  out = []
  for batch in map(int, args.batches.split(",")):
    for dtype in args.dtypes.split(","):
      for model in args.models.split(","):
        out.append({"impl": "jax", "model": model, "batch": batch, "dtype": dtype})
        if args.torch and dtype in args.torch_dtypes.split(","):
          out.append({"impl": "torch", "model": model, "batch": batch, "dtype": dtype})
  return out


def device_info() -> dict:
  """The first JAX device of a fresh process (the cases' device), versions and the host's CPU."""
  code = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'platform': d.platform, "
          "'kind': d.device_kind, 'count': jax.device_count(), 'jax': jax.__version__}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CHILD_ENV, check=True)
  info = json.loads(out.stdout.strip().splitlines()[-1])
  with contextlib.suppress(md.PackageNotFoundError):
    info["torch"] = md.version("torch")
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
  cpu = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
  return {**info, "cpu": cpu[0] if cpu else platform.machine(), "cpu_count": os.cpu_count()}


def markdown(report: dict) -> str:
  """The rows as a markdown table, with the device and how the numbers were measured."""
  d = report["device"]
  lines = [f"Device: {d['kind']} ({d['platform']}), jax {d['jax']}, torch {d.get('torch')}, host {d['cpu']} "
           f"x {d['cpu_count']}. Training FLOPs per image = 3 x forward (2 x MACs of receding_jax.count_macs); "
           "MFU against the dense BF16 peak (bfloat16 rows) or TF32 peak (float32 rows; FP32 peak in brackets).",
           "", *(f"{note}\n" for note in report.get("notes", [])),
           "| impl | model | batch | dtype | width | data | images/s | step ms | train GFLOP/img | TFLOP/s | MFU "
           "| first epoch s | run s | note |", "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in report["rows"]:
    if "skipped" in r:
      lines.append(f"| {r['impl']} | {r['model']} | {r['batch']} | {r['dtype']} | | | | | | | | | | {r['skipped']} |")
      continue
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
    if r.get("mfu_fp32_peak") is not None:
      mfu += f" ({r['mfu_fp32_peak']:.0%})"
    lines.append(f"| {r['impl']} | {r['model']} | {r['batch']} | {r['dtype']} | {r['width']:g} | {r['placement']} | "
                 f"{r['images_per_s']:,.0f} | {r['step_ms']:.2f} | {r['train_gflop_per_image']:.3f} | "
                 f"{r['tflop_per_s']:.2f} | {mfu} | {r['first_epoch_s']:.1f} | {r['wall_s']:.1f} | {r['note']} |")
  return "\n".join(lines) + "\n"


def write(report: dict, out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "gpu_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
  (out / "gpu_throughput.md").write_text(markdown(report))


def run_cases(args: argparse.Namespace) -> dict:
  """Runs every case within the budget; returns the report (also written after each case)."""
  out, work = pathlib.Path(args.out), pathlib.Path(args.work or pathlib.Path(args.out) / "work")
  work.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  info = device_info()
  peak = peak_tflops(info["kind"]) if info["platform"] == "gpu" else None
  report = {"device": info, "peak_tflops": peak, "folder": args.folder, "epochs": args.epochs, "notes": args.notes,
            "rows": []}
  known, gflop, last_wall = known_config_keys(), {}, {}
  for case in cases(args):
    elapsed = time.perf_counter() - start
    if args.budget_seconds and elapsed + last_wall.get(case["impl"], 0.0) > args.budget_seconds:
      report["rows"].append({**case, "skipped": f"time budget ({args.budget_seconds:g} s) spent"})
      continue
    width = args.width if case["impl"] == "jax" else 1.0
    gflop.setdefault((case["model"], width), train_gflop_per_image(case["model"], width))
    try:
      row = jax_case(case, args, work, known) if case["impl"] == "jax" else torch_case(case, args, work)
    except (LookupError, RuntimeError) as e:
      report["rows"].append({**case, "skipped": str(e).splitlines()[0]})
      print(f"{case}: {e}", flush=True)
      continue
    last_wall[case["impl"]] = row["wall_s"]
    row = with_utilisation({**row, "train_gflop_per_image": gflop[(case["model"], width)]}, peak)
    report["rows"].append(row)
    print(f"{row['impl']} {row['model']} batch {row['batch']} {row['dtype']}: {row['images_per_s']:,.0f} images/s "
          f"({row['wall_s']:.0f} s)", flush=True)
    write(report, out)
  write(report, out)
  return report


def merge(source: pathlib.Path, into: pathlib.Path) -> None:
  """Puts `source` (a gpu_throughput.json) into `into` (benchmarks/results.json) as 'gpu_throughput'."""
  target = json.loads(into.read_text()) if into.exists() else {}
  target["gpu_throughput"] = json.loads(source.read_text())
  into.write_text(json.dumps(target, indent=2) + "\n")
  print(f"merged {source} ({len(target['gpu_throughput']['rows'])} rows) into {into}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--folder", help="CIFAR-10 image folder (train/, test/)")
  parser.add_argument("--out", help="output folder (gpu_throughput.json/.md); with --torch-case, the JSON file")
  parser.add_argument("--work", default="", help="workdirs and logs of the cases (default OUT/work)")
  parser.add_argument("--models", default="cifar_vgg16,cifar_resnet56")
  parser.add_argument("--batches", default="64,128")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--width", type=float, default=1.0, help="model.width_multiplier of the jax rows")
  parser.add_argument("--epochs", type=int, default=3, help="epochs of each jax case")
  parser.add_argument("--placement", default="", help="data.placement of the jax rows (default: the loop's)")
  parser.add_argument("--no-torch", dest="torch", action="store_false", help="no PyTorch rows")
  parser.add_argument("--torch-dtypes", default="float32")
  parser.add_argument("--torch-epochs", type=int, default=2)
  parser.add_argument("--torch-steps", type=int, default=0, help="at most this many steps an epoch (0 = all)")
  parser.add_argument("--torch-workers", type=int, default=max(1, min((os.cpu_count() or 2) - 2, 14)))
  parser.add_argument("--budget-seconds", type=float, default=0.0, help="skip cases that would end past this")
  parser.add_argument("--torch-case", default="", help=argparse.SUPPRESS)
  parser.add_argument("--merge", default="", help="a gpu_throughput.json to merge into --into")
  parser.add_argument("--into", default=str(REPO / "benchmarks" / "results.json"))
  args = parser.parse_args(argv)
  if args.merge:
    return merge(pathlib.Path(args.merge), pathlib.Path(args.into))
  if not args.folder or not args.out:
    parser.error("--folder and --out are required")
  if args.torch_case:
    model, batch, dtype = args.torch_case.split(",")
    result = torch_epochs(model, int(batch), dtype, args.folder, args.torch_epochs, args.torch_steps,
                          args.torch_workers)
    pathlib.Path(args.out).write_text(json.dumps(result))
    return None
  args.notes = []
  if args.torch and importlib_missing("torch", "torchvision"):
    args.notes.append(f"no PyTorch rows: {importlib_missing('torch', 'torchvision')} not installed")
    args.torch = False
  os.environ["JAX_PLATFORMS"] = "cpu"  # Only FLOP counting here: JAX on the GPU would preallocate its memory.
  report = run_cases(args)
  print(markdown(report))
  print(f"wrote {pathlib.Path(args.out) / 'gpu_throughput.json'} and gpu_throughput.md")
  return None


def importlib_missing(*names: str) -> list[str]:
  """Which of `names` are not installed."""
  missing = []
  for name in names:
    try:
      md.version(name)
    except md.PackageNotFoundError:
      missing.append(name)
  return missing


if __name__ == "__main__":
  main()
