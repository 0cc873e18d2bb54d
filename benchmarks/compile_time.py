"""Where a run's wall time goes: compilation against steady computation (`benchmarks/run.py --only compile`).

Each case runs ``python -m receding_jax.main`` in a fresh process, as a user would, and reads back what the
run records: the phase lines (wall, compile and run seconds, each function's XLA compile time and count) of
metrics.jsonl / results.json, and the epochs' times. "Steady compute" is the issue-22 yardstick: the median
epoch time x epochs, summed over training and every fine-tune; the target is wall <= 3 x steady + 30 s.

  quickstart        configs/quickstart.py, cold (an empty persistent compilation cache) and warm (a second run
                    in a new workdir on the same cache, as a rerun or another process of a run would be).
  cifar_vgg16 / cifar_resnet56
                    configs/cifar10_folder.py:rni at full width on a CIFAR-10 subset (100 train + 20 test images
                    per class, 1 epoch, pruned at 50% and 90%, 1-epoch fine-tunes), cold: every function's
                    compile time and count in a real CIFAR run.
  check             `prune_params` with and without its check, first call in a fresh process, CIFAR VGG-16 and
                    ResNet-56 (the target: the check costs at most 0.5 s).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
from cifar_tarball import extract_subset  # noqa: E402

from receding_jax.training import plots  # noqa: E402

#: The real CIFAR-10 archive: the tests' one setting (README, "Set-up"), else ../shared/data beside the repository.
SHARED_CIFAR = pathlib.Path(os.environ.get("RECEDING_JAX_CIFAR10_ARCHIVE")
                            or REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")


def _run_main(config: str, workdir: pathlib.Path, cache: pathlib.Path, *overrides: str) -> float:
  """Wall seconds of `python -m receding_jax.main` with its compilation cache in `cache` (RuntimeError on failure)."""
  env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "receding_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
  return wall


def steady_seconds(workdir: pathlib.Path) -> float:
  """Median epoch time x epochs of the training run and of every fine-tune under `workdir`."""
  runs = [plots.read_epochs(w) for w in (workdir, *sorted(workdir.glob("pruned_*/finetune")))]
  return sum(statistics.median(e["epoch_seconds"] for e in epochs) * len(epochs) for epochs in runs)


def run_row(case: str, config: str, workdir: pathlib.Path, cache: pathlib.Path, *overrides: str) -> dict:
  """One run's row: wall, steady compute, the target, and each phase's compile / run seconds."""
  wall = _run_main(config, workdir, cache, *overrides)
  results = json.loads((workdir / "results.json").read_text())
  steady = steady_seconds(workdir)
  compiled: dict[str, list[float]] = {}
  for phase in results["phases"]:
    for name, seconds in phase.get("compiled", {}).items():
      entry = compiled.setdefault(name, [0.0, 0])
      entry[0] += seconds
      entry[1] += phase.get("compile_counts", {}).get(name, 0)
  top = sorted(compiled.items(), key=lambda kv: -kv[1][0])[:8]
  return {
      "case": case, "wall_s": wall, "steady_s": steady, "target_s": 3 * steady + 30,
      "meets_target": wall <= 3 * steady + 30,
      "compile_s": sum(p["compile_seconds"] for p in results["phases"]),
      "phases": {p["phase"]: round(p["compile_seconds"], 2) for p in results["phases"]},
      "phase_run_s": {p["phase"]: round(p["run_seconds"], 2) for p in results["phases"]},
      "functions": {f"{name} x{count}": round(seconds, 2) for name, (seconds, count) in top},
  }


CHECK_CODE = """
import sys, time, jax, jax.numpy as jnp
from receding_jax.models import get_model
from receding_jax import pruning
model = get_model(sys.argv[1], 10)
variables = jax.device_get(jax.jit(model.init, static_argnames="train")(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                                       train=False))
start = time.perf_counter()
pruning.prune_params(model, variables, 0.5, check=sys.argv[2] == "1")
print(time.perf_counter() - start)
"""


def first_call_seconds(model: str, check: bool) -> float:
  """Wall seconds of the first `prune_params` of a fresh process (the model's init not counted)."""
  done = subprocess.run([sys.executable, "-c", CHECK_CODE, model, "1" if check else "0"], cwd=REPO, check=True,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return float(done.stdout.strip().splitlines()[-1])


def check_rows(repeats: int) -> list[dict]:
  """`prune_params` with and without the check, first call of a fresh process, medians of `repeats`
  (interleaved)."""
  rows = []
  for name in ("cifar_vgg16", "cifar_resnet56"):
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
      for check in (True, False):
        times[check].append(first_call_seconds(name, check))
    with_check, without = statistics.median(times[True]), statistics.median(times[False])
    rows.append({"case": f"check {name}", "first_call_check_s": with_check, "first_call_no_check_s": without,
                 "check_cost_s": with_check - without, "meets_target": with_check - without <= 0.5})
  return rows


def bench_compile(quick: bool) -> list[dict]:
  """The rows of the 'compile' section (see the module docstring)."""
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    quickstart = str(REPO / "configs" / "quickstart.py")
    rows.append(run_row("quickstart cold", quickstart, root / "q1", root / "cache"))
    rows.append(run_row("quickstart warm", quickstart, root / "q2", root / "cache"))
    if SHARED_CIFAR.exists():
      folder = root / "cifar"
      extract_subset(SHARED_CIFAR, folder, (100, 20))
      for model in ("cifar_vgg16",) if quick else ("cifar_vgg16", "cifar_resnet56"):
        overrides = [f"--config.dataset.folder={folder}", f"--config.model.name={model}",
                     "--config.model.width_multiplier=1.0", "--config.dataset.validation_examples=100",
                     "--config.optim.batch_size=64", "--config.optim.num_epochs=1", "--config.finetune.num_epochs=1",
                     "--config.prune.ratios=(0.5, 0.9)", "--config.checkpoint.keep_best=1",
                     "--config.penalty.relative_to_paper=False"]
        rows.append(run_row(f"{model} cold", str(REPO / "configs" / "cifar10_folder.py") + ":rni", root / model,
                            root / f"cache_{model}", *overrides))
  return rows + check_rows(1 if quick else 3)
