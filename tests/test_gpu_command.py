"""The GPU demonstration command (launch/gpu_demo.sh): its tiny CPU mode end to end, its refusal of missing
inputs, its schedule planning, the bundle's package choice and the throughput benchmark's arithmetic."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import TEST_XLA_FLAG, real_cifar10_archive

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMAND = ["bash", str(REPO / "launch" / "gpu_demo.sh")]
PNG = b"\x89PNG\r\n\x1a\n"


def load(path: str):
  """A script of launch/ or benchmarks/ as a module."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, REPO / path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def run_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHON": sys.executable}
  # The command's tiny mode sets its own fast-compile flags unless XLA_FLAGS is set: not conftest's.
  flags = env.pop("XLA_FLAGS", "").replace(TEST_XLA_FLAG, "").strip()
  if flags:
    env["XLA_FLAGS"] = flags
  return subprocess.run([*COMMAND, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  archive = real_cifar10_archive()
  out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
  done = run_command(str(out), "--tiny", "--work-dir", str(work), "--tarball", str(archive), timeout=1200)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return out, done.stdout


def test_tiny_mode_compares_three_methods_at_both_ratios(tiny_run):
  out, stdout = tiny_run
  results = json.loads((out / "results.json").read_text())
  assert results["mode"] == "tiny" and results["ratios"] == [0.5, 0.9]
  assert set(results["methods"]) == {"rni", "l1", "ucs"}
  for summary in results["methods"].values():
    assert set(summary["ratios"]) == {"0.5", "0.9"}
    stages = [summary["trained"]] + [r[s] for r in summary["ratios"].values() for s in ("pruned", "finetuned")]
    for stage in stages:
      assert {"validation_accuracy", "test_accuracy"} <= set(stage)
      assert all(0.0 <= stage[k] <= 1.0 for k in ("validation_accuracy", "test_accuracy"))
    half, tenth = summary["ratios"]["0.5"]["pruned"], summary["ratios"]["0.9"]["pruned"]
    assert tenth["params_after"] < half["params_after"] < half["params_before"]
    assert summary["wall_s"] > 0
  plan = results["schedule"]
  assert plan["source"] == "measured" and plan["epochs"] == 1 and plan["finetune_epochs"] == 1
  assert f"-> {plan['epochs']} epochs + {plan['finetune_epochs']} fine-tune epochs per ratio" in stdout


def test_tiny_mode_writes_tables_figures_and_throughput(tiny_run):
  out, _ = tiny_run
  for name in ("results.md", "comparison.md", "gpu_throughput.md", "runs/rni/results.md", "logs/l1.log"):
    assert (out / name).stat().st_size > 0, name
  for name in ("importances.png", "accuracy_vs_ratio.png", "importances_per_epoch_ucs.png"):
    assert (out / name).read_bytes()[:8] == PNG, name
  markdown = (out / "results.md").read_text()
  assert all(f"| {m} | 1 | 90% |" in markdown for m in ("rni", "l1", "ucs"))
  throughput = json.loads((out / "gpu_throughput.json").read_text())
  jax_rows = [r for r in throughput["rows"] if r["impl"] == "jax" and "images_per_s" in r]
  assert jax_rows and all(r["images_per_s"] > 0 and r["train_gflop_per_image"] > 0 for r in jax_rows)
  assert throughput["device"]["platform"] == "cpu" and throughput["peak_tflops"] is None


def test_missing_bundle_stops_with_one_line_before_anything_runs(tmp_path):
  out = tmp_path / "out"
  done = run_command(str(out), "--bundle", str(tmp_path / "no_bundle"))
  assert done.returncode == 2 and out.exists() is False
  assert done.stderr.strip().splitlines() == [done.stderr.strip()]
  assert str(tmp_path / "no_bundle" / "wheels") in done.stderr and "build_gpu_bundle.sh" in done.stderr
  done = run_command(str(out), "--tiny", "--tarball", str(tmp_path / "cifar.tar.gz"))
  assert done.returncode == 2 and f"tarball {tmp_path / 'cifar.tar.gz'} not found" in done.stderr


def test_schedule_is_the_longest_that_fits_the_budget():
  demo = load("launch/gpu_demo.py")
  common = {"run_overhead_s": 40.0, "compile_s": 15.0, "train_images": 45_000, "eval_images": 15_000,
            "max_epochs": 160}
  slow, fast = (demo.plan_schedule(ips, budget_s=480.0, **common) for ips in (10_000.0, 20_000.0))
  for plan in (slow, fast):
    assert plan["predicted_s"] <= 480.0 < demo.plan_schedule(10_000.0, budget_s=1e9, **common)["predicted_s"]
    longer = demo.plan_schedule(plan["images_per_s"], budget_s=plan["predicted_s"] - 1e-6, **common)
    assert longer["epochs"] == plan["epochs"] - 1  # One more epoch would not fit.
    assert 1 <= plan["finetune_epochs"] < plan["epochs"]
  assert fast["epochs"] > slow["epochs"] > 5
  assert demo.plan_schedule(1.0, budget_s=1.0, **common)["epochs"] == 1  # Nothing fits: one epoch all the same.


def test_bundle_carries_what_the_gpu_machine_lacks_and_nothing_it_has(tmp_path):
  bundle = load("launch/gpu_bundle.py")
  present, carried = bundle.present_names(None), bundle.carried(None, None)
  assert {"jax", "numpy", "flax", "pyarrow"} <= present and "orbax-checkpoint" in carried  # Outdated there.
  build = {"setuptools", "wheel"}  # Carried always: pip's isolated build of the project needs them offline.
  assert not present & (set(carried) - build) and build <= set(carried)
  for requirement in bundle.project_requirements():
    name = bundle.canonicalize_name(bundle.Requirement(requirement).name)
    assert name in present or name in carried, name
  freeze = tmp_path / "freeze.txt"  # `pip freeze` on a machine that has only jax and the project's extras.
  freeze.write_text("jax==0.11.2\nML_Collections==1.1.0\n-e git+https://example/x#egg=y\n")
  assert bundle.present_names(freeze) == {"jax", "ml-collections"}
  assert "ml-collections" not in bundle.carried(None, freeze) and "flax" in bundle.carried(None, freeze)


def test_throughput_rates_skip_compilation_and_evaluation_epochs(tmp_path):
  bench = load("benchmarks/gpu_throughput.py")
  epochs = [{"epoch": 1, "step": 100, "epoch_seconds": 30.0}, {"epoch": 2, "step": 200, "epoch_seconds": 2.0},
            {"epoch": 3, "step": 300, "epoch_seconds": 2.0}, {"epoch": 4, "step": 400, "epoch_seconds": 5.0}]
  rate = bench.steady_rate(epochs, batch=64)
  assert rate["epochs_measured"] == [2, 3] and rate["images_per_s"] == pytest.approx(200 * 64 / 4.0)
  assert rate["step_ms"] == pytest.approx(20.0) and rate["note"] == ""
  row = bench.with_utilisation({**rate, "dtype": "bfloat16", "train_gflop_per_image": 1.0},
                               bench.peak_tflops("NVIDIA H100 80GB HBM3"))
  assert row["mfu"] == pytest.approx(3200 * 1e9 / 989.4e12) and row["mfu_fp32_peak"] is None
  source, into = tmp_path / "gpu.json", tmp_path / "results.json"
  source.write_text(json.dumps({"rows": [row]}))
  into.write_text(json.dumps({"results": {"train": []}}))
  bench.main(["--merge", str(source), "--into", str(into)])
  merged = json.loads(into.read_text())
  assert merged["results"] == {"train": []} and merged["gpu_throughput"]["rows"][0]["mfu"] == row["mfu"]
