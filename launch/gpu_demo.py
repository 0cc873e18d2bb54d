"""The GPU demonstration in one command (docs/gpu_demo.md): install offline, extract CIFAR-10, benchmark, then
VGG-16 on CIFAR-10 with rni vs l1 vs ucs on the longest schedule that fits the time budget, and compare.

    bash launch/gpu_demo.sh OUTPUT_DIR [--tiny] [--parts install,data,bench,demo,compare] [--epochs N]
        [--images-per-s X] [--demo-minutes 8] [--bench-minutes 2] [--data-dir /tmp/cifar10-jpeg] ...

Parts (all by default, in this order):
  install  pip install --no-index --find-links=.gpu_bundle/wheels -e ".[train]" (not in --tiny mode)
  data     CIFAR-10 from .gpu_bundle/data/cifar10-jpeg.tar.gz into --data-dir, and a small subset for the benchmark
  bench    benchmarks/gpu_throughput.py: images/s and MFU of the project's loop and of the PyTorch reference
  demo     configs/cifar10_folder.py:{rni,l1,ucs} at full width, batch 64, one-shot pruning at 50% and 90% and
           a short fine-tune; epochs from the measured images/s (or --epochs), printed before they start
  compare  python -m receding_jax.compare over the three workdirs; results.md, results.json, figures
OUTPUT_DIR receives results.md, results.json, comparison.md, importances.png, accuracy_vs_ratio.png,
importances_per_epoch_<method>.png, gpu_throughput.json/.md, runs/<method>/{results.md,metrics.jsonl} and
logs/; the workdirs (checkpoints) stay in --work-dir. A missing wheel folder or tarball stops it at once,
naming the file, before anything runs. Rerunning resumes: finished runs are not redone.

--tiny: the same command on a CPU in a few minutes (what tests/test_gpu_command.py runs): no install, a
30+10-images-per-class subset of the tarball (the bundle's, else ../shared/data's), VGG-16 at 1/16 width,
batch 32, one epoch, the three runs in parallel, XLA's fast-compile flags.
Only the standard library is imported here, and the sibling modules cifar_tarball.py (extraction) and
gpu_demo_results.py (the schedule and the results): this runs before the project is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

# The test loads this script by its file path, and gpu_demo.sh runs it as a script before the project is
# installed: its sibling modules are importable once this file's own folder is on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from cifar_tarball import TarballError, count_images, extract_all, extract_subset
from gpu_demo_results import METHODS, RATIOS, finetune_epochs, plan_schedule, print_schedule, write_results

REPO = pathlib.Path(__file__).resolve().parents[1]
TARBALL_NAME = "cifar10-jpeg.tar.gz"
SHARED_TARBALL = REPO.parent / "shared" / "data" / TARBALL_NAME
BUILD_HINT = "build it with `bash launch/build_gpu_bundle.sh` on a machine with internet (docs/gpu_demo.md)"
PARTS = ("install", "data", "bench", "demo", "compare")
DEMO_MODEL = "cifar_vgg16"
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@dataclasses.dataclass(frozen=True)
class Mode:
  """What differs between the GPU demonstration and its tiny CPU rehearsal."""

  name: str
  width: float
  batch: int
  validation_examples: int
  demo_per_class: tuple[int, int] | None  # (train, test) images per class; None = the whole dataset.
  bench_per_class: tuple[int, int]
  bench_models: str
  bench_batches: str
  bench_dtypes: str
  torch_steps: int  # At most this many steps a torch epoch (0 = all).
  max_epochs: int
  jobs: int  # Demo runs at once.
  eval_test_every_epoch: bool


GPU = Mode("gpu", 1.0, 64, 5000, None, (2000, 100), "cifar_vgg16,cifar_resnet56", "64,128", "float32,bfloat16", 0,
           160, 1, True)
TINY = Mode("tiny", 0.0625, 32, 50, (30, 10), (30, 10), "cifar_vgg16", "32", "float32", 1, 1, 3, False)


class DemoError(Exception):
  """Stops the command with one line, ``error: ...``."""


# ---------------------------------------------------------------------------------------------------
# Checks, install, data.


def tarball_path(args: argparse.Namespace, mode: Mode) -> pathlib.Path:
  """The CIFAR-10 tarball: --tarball, else the bundle's; in tiny mode ../shared/data's when the bundle has none."""
  if args.tarball:
    return pathlib.Path(args.tarball)
  bundled = pathlib.Path(args.bundle) / "data" / TARBALL_NAME
  return SHARED_TARBALL if mode is TINY and not bundled.exists() else bundled


def check_inputs(args: argparse.Namespace, mode: Mode, parts: list[str]) -> None:
  """DemoError naming the first missing input of the parts that will run."""
  wheels = pathlib.Path(args.bundle) / "wheels"
  if "install" in parts and not any(wheels.glob("*.whl")):
    raise DemoError(f"no wheel folder {wheels} (or no .whl in it): {BUILD_HINT}")
  tarball = tarball_path(args, mode)
  if {"data", "bench", "demo"} & set(parts) and not tarball.is_file():
    raise DemoError(f"CIFAR-10 tarball {tarball} not found: {BUILD_HINT}")


def run(cmd: list[str], env: dict | None = None, log: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  """`cmd` in the repository; output to the terminal, or to `log`."""
  if log is None:
    return subprocess.run(cmd, cwd=REPO, env=env)
  with open(log, "w") as f:
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def install(wheels: pathlib.Path) -> None:
  """The project with its [train] extra from `wheels` only; if pip's resolver refuses (a version bound the
  machine's packages miss), every wheel and the project without dependency checks, then an import check."""
  pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", f"--find-links={wheels}"]
  print(f"install: {' '.join(pip[2:])} -e '.[train]'", flush=True)
  if run([*pip, "-e", ".[train]"]).returncode:
    print("install: pip refused; installing every wheel and the project with --no-deps", flush=True)
    if run([*pip, "--no-deps", *map(str, sorted(wheels.glob("*.whl")))]).returncode or \
        run([*pip, "--no-deps", "-e", "."]).returncode:
      raise DemoError(f"pip could not install from {wheels} (see above)")
    run([sys.executable, "-m", "pip", "check"])
  check = subprocess.run([sys.executable, "-c", "import receding_jax.training.experiment, receding_jax.compare"],
                         cwd=REPO, capture_output=True, text=True)
  if check.returncode:
    last = (check.stderr.strip().splitlines() or ["?"])[-1]
    raise DemoError(f"the project does not import after installing from {wheels}: {last}")


# ---------------------------------------------------------------------------------------------------
# Benchmark and schedule.


def child_env(mode: Mode) -> dict[str, str]:
  """The environment of every process started here: tiny mode keeps JAX on the CPU and compiles fast."""
  env = dict(os.environ)
  if mode is TINY:
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("XLA_FLAGS", FAST_COMPILE_FLAGS)
  return env


def bench_command(args: argparse.Namespace, mode: Mode, folder: pathlib.Path, out: pathlib.Path,
                  only_demo_case: bool = False) -> list[str]:
  """benchmarks/gpu_throughput.py over `folder`: every case of `mode`, or only the demo's own (no torch)."""
  models, batches, dtypes = (DEMO_MODEL, str(mode.batch), "float32") if only_demo_case else \
      (mode.bench_models, mode.bench_batches, mode.bench_dtypes)
  cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--folder", str(folder), "--out", str(out),
         "--work", str(pathlib.Path(args.work_dir) / "bench_work"), "--models", models, "--batches", batches,
         "--dtypes", dtypes, "--width", str(mode.width), "--epochs", "3", "--torch-steps", str(mode.torch_steps)]
  if mode is TINY:
    cmd += ["--torch-workers", "1"]
  if only_demo_case:
    cmd.append("--no-torch")
  elif args.bench_minutes:
    cmd += ["--budget-seconds", str(60 * args.bench_minutes)]
  return cmd


def demo_row(report_path: pathlib.Path, mode: Mode) -> dict | None:
  """The benchmark row of the demo's own case (jax, VGG-16, its batch and width, float32), measured or
  failed ('skipped'); None if the report has none."""
  if not report_path.exists():
    return None
  for row in json.loads(report_path.read_text()).get("rows", []):
    if (row.get("impl"), row.get("model"), row.get("batch"), row.get("dtype")) == \
        ("jax", DEMO_MODEL, mode.batch, "float32") and row.get("width", mode.width) == mode.width:
      if "images_per_s" in row or str(row.get("skipped", "")).startswith("failed"):
        return row
  return None


def schedule(args: argparse.Namespace, mode: Mode, out: pathlib.Path, data: pathlib.Path, bench: pathlib.Path) -> dict:
  """Epochs from --epochs, or from a measured images/s (the benchmark's row, else a one-case measurement)."""
  train_images = count_images(data, "train") - mode.validation_examples
  eval_images = mode.validation_examples + (count_images(data, "test") if mode.eval_test_every_epoch else 0)
  if args.epochs:
    return {"epochs": args.epochs, "finetune_epochs": args.finetune_epochs or finetune_epochs(args.epochs),
            "source": "--epochs"}
  row = {"images_per_s": args.images_per_s, "overhead_s": 60.0, "compile_s": 20.0} if args.images_per_s else None
  for path in (out / "gpu_throughput.json", pathlib.Path(args.work_dir) / "gpu_throughput.json"):
    row = row or demo_row(path, mode)
  if row is not None and "images_per_s" not in row:
    raise DemoError(f"the benchmark of the demo's case {row['skipped']}; give --epochs or --images-per-s")
  if row is None:
    measure = pathlib.Path(args.work_dir) / "measure"
    print("schedule: no benchmark row for the demo's case; measuring it", flush=True)
    if run(bench_command(args, mode, bench, measure, only_demo_case=True), env=child_env(mode)).returncode:
      raise DemoError("measuring images/s failed (see above); give --epochs or --images-per-s")
    row = demo_row(measure / "gpu_throughput.json", mode)
    if row is None or "images_per_s" not in row:
      raise DemoError(f"no images/s in {measure / 'gpu_throughput.json'}; give --epochs or --images-per-s")
  plan = plan_schedule(row["images_per_s"], row["overhead_s"], row["compile_s"], 60 * args.demo_minutes,
                       train_images, eval_images, mode.max_epochs)
  if args.finetune_epochs:
    plan["finetune_epochs"] = args.finetune_epochs
  return {**plan, "source": "--images-per-s" if args.images_per_s else "measured"}


# ---------------------------------------------------------------------------------------------------
# The three runs and the comparison.


def known_keys(env: dict) -> set[str]:
  code = "import json; from receding_jax.training.config import known_keys; print(json.dumps(known_keys()))"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True)
  if out.returncode:
    raise DemoError(f"cannot read the config keys: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
  return set(json.loads(out.stdout.strip().splitlines()[-1]))


def demo_command(method: str, workdir: pathlib.Path, data: pathlib.Path, plan: dict, mode: Mode,
                 known: set[str]) -> list[str]:
  """`receding_jax.main` for one method: configs/cifar10_folder.py with the demo's overrides."""
  overrides = {"dataset.folder": data, "dataset.validation_examples": mode.validation_examples,
               "model.width_multiplier": mode.width, "optim.batch_size": mode.batch,
               "optim.num_epochs": plan["epochs"], "prune.ratios": RATIOS,
               "finetune.num_epochs": plan["finetune_epochs"],
               "eval_test_every_epoch": mode.eval_test_every_epoch}
  return [sys.executable, "-m", "receding_jax.main", f"--config={REPO / 'configs' / 'cifar10_folder.py'}:{method}",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items() if k in known)]


def _tee(process: subprocess.Popen, log: pathlib.Path, prefix: str) -> threading.Thread:
  """A thread copying the process's output to `log` and, each line prefixed, to this terminal."""

  def copy():
    with open(log, "w") as f:
      for line in process.stdout:
        f.write(line)
        f.flush()
        print(prefix + line, end="", flush=True)

  thread = threading.Thread(target=copy, daemon=True)
  thread.start()
  return thread


def run_methods(commands: dict[str, list[str]], logs: pathlib.Path, jobs: int, env: dict) -> dict[str, float]:
  """Runs the commands, `jobs` at a time, output to logs/<method>.log and (prefixed) here; returns each
  one's wall seconds. DemoError naming the first that failed, with its log's last line."""
  logs.mkdir(parents=True, exist_ok=True)
  walls, pending, running = {}, list(commands), {}
  while pending or running:
    while pending and len(running) < jobs:
      method = pending.pop(0)
      print(f"demo: {method}: {' '.join(commands[method][2:])}", flush=True)
      process = subprocess.Popen(commands[method], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
      running[method] = (process, _tee(process, logs / f"{method}.log", f"[{method}] "), time.perf_counter())
    method = next((m for m, (p, _, _) in running.items() if p.poll() is not None), None)
    if method is None:
      time.sleep(0.5)
      continue
    process, thread, start = running.pop(method)
    thread.join()
    walls[method] = time.perf_counter() - start
    if process.returncode:
      for other, _, _ in running.values():
        other.terminate()
      tail = (logs / f"{method}.log").read_text().strip().splitlines()
      raise DemoError(f"the {method} run failed (exit status {process.returncode}, log {logs / method}.log): "
                      + (tail[-1] if tail else "no output"))
    print(f"demo: {method} finished in {walls[method]:.0f} s", flush=True)
  return walls


def compare(out: pathlib.Path, workdirs: dict[str, pathlib.Path], env: dict) -> str:
  """`python -m receding_jax.compare` into `out`; returns comparison.md."""
  cmd = [sys.executable, "-m", "receding_jax.compare", f"--workdirs={','.join(map(str, workdirs.values()))}",
         f"--labels={','.join(workdirs)}", f"--output_dir={out}"]
  if run(cmd, env=env, log=out / "logs" / "compare.log").returncode:
    raise DemoError(f"compare failed: see {out / 'logs' / 'compare.log'}")
  return (out / "comparison.md").read_text()


# ---------------------------------------------------------------------------------------------------
# The command.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("output_dir")
  parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal (no install; tiny data and width)")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
  parser.add_argument("--bundle", default=str(REPO / ".gpu_bundle"), help="holds wheels/ and data/" + TARBALL_NAME)
  parser.add_argument("--tarball", default="", help="CIFAR-10 tarball (default: the bundle's)")
  parser.add_argument("--data-dir", default="", help="where CIFAR-10 is extracted (default /tmp/cifar10-jpeg; "
                      "tiny: WORK_DIR/cifar10-tiny)")
  parser.add_argument("--work-dir", default="", help="workdirs, benchmark runs, the plan (default: runs/gpu_demo/"
                      "gpu or runs/gpu_demo/tiny, git-ignored; kept between calls on a warm machine)")
  parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: from the measured images/s)")
  parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune epochs (default: epochs / 8)")
  parser.add_argument("--images-per-s", type=float, default=0.0, help="plan with this rate instead of measuring")
  parser.add_argument("--demo-minutes", type=float, default=8.0, help="time budget of the three runs")
  parser.add_argument("--bench-minutes", type=float, default=2.0, help="time budget of the benchmark (0: none)")
  args = parser.parse_args(argv)
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  mode = TINY if args.tiny else GPU
  parts = [p for p in PARTS if p in args.parts.split(",") and not (p == "install" and mode is TINY)]
  try:
    check_inputs(args, mode, parts)
    demo(args, mode, parts)
  except (DemoError, TarballError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def prepare_data(args: argparse.Namespace, mode: Mode, work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(the demo's image folder, the benchmark's), extracted from the tarball unless already there."""
  tarball = tarball_path(args, mode)
  data = pathlib.Path(args.data_dir or (work / "cifar10-tiny" if mode is TINY else "/tmp/cifar10-jpeg"))
  bench = data if mode is TINY else work / "cifar10-bench"
  if mode.demo_per_class:
    extract_subset(tarball, data, mode.demo_per_class)
  else:
    extract_all(tarball, data)
  if bench != data:
    extract_subset(tarball, bench, mode.bench_per_class)
  return data, bench


def run_bench(args: argparse.Namespace, mode: Mode, bench: pathlib.Path, out: pathlib.Path, work: pathlib.Path) -> None:
  """The throughput benchmark into `out`, its results also kept in `work` for a later call."""
  command = bench_command(args, mode, bench, out)
  print("bench: " + " ".join(command[1:]), flush=True)
  if run(command, env=child_env(mode)).returncode:
    raise DemoError("the benchmark failed (see above)")
  for name in ("gpu_throughput.json", "gpu_throughput.md"):
    shutil.copyfile(out / name, work / name)


def stored_plan(work: pathlib.Path) -> dict:
  """The schedule of the demo that an earlier call ran (for --parts=compare alone)."""
  path = work / "plan.json"
  if not path.exists():
    raise DemoError(f"{path} not found: run the demo part first")
  return json.loads(path.read_text())


def demo(args: argparse.Namespace, mode: Mode, parts: list[str]) -> None:
  """Runs `parts` in order (see the module doc)."""
  start, env = time.perf_counter(), child_env(mode)
  out = pathlib.Path(args.output_dir).resolve()
  work = pathlib.Path(args.work_dir or REPO / "runs" / "gpu_demo" / mode.name).resolve()
  args.work_dir = str(work)
  out.mkdir(parents=True, exist_ok=True)
  work.mkdir(parents=True, exist_ok=True)
  if "install" in parts:
    install(pathlib.Path(args.bundle) / "wheels")
  if {"data", "bench", "demo"} & set(parts):
    data, bench = prepare_data(args, mode, work)
  if "bench" in parts:
    run_bench(args, mode, bench, out, work)
  if "demo" not in parts and "compare" not in parts:
    return
  plan = schedule(args, mode, out, data, bench) if "demo" in parts else stored_plan(work)
  print_schedule(plan, f"{DEMO_MODEL} width {mode.width:g}, batch {mode.batch}, float32, the project's loop",
                 tiny=mode is TINY)
  (work / "plan.json").write_text(json.dumps(plan))
  tag = f"{mode.name}_w{mode.width:g}_b{mode.batch}_e{plan['epochs']}_f{plan['finetune_epochs']}"
  workdirs = {m: work / "runs" / tag / m for m in METHODS}
  walls: dict[str, float] = {}
  if "demo" in parts:
    known = known_keys(env)
    commands = {m: demo_command(m, w, data, plan, mode, known) for m, w in workdirs.items()}
    walls = run_methods(commands, out / "logs", mode.jobs, env)
  if "compare" in parts:
    for name in ("gpu_throughput.json", "gpu_throughput.md"):  # Measured by an earlier call: into this output.
      if not (out / name).exists() and (work / name).exists():
        shutil.copyfile(work / name, out / name)
    comparison = compare(out, workdirs, env)
    header = {"mode": mode.name, "model": DEMO_MODEL, "width_multiplier": mode.width, "batch_size": mode.batch,
              "ratios": list(RATIOS), "runs_at_once": mode.jobs, "schedule": plan}
    report = write_results(out, header, workdirs, walls, comparison)
    print(comparison)
    print(f"wrote {out / 'results.md'} and results.json ({len(report['methods'])} methods) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
