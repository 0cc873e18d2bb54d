"""The workdir's files: their names, atomic writes, the metrics log, results, reports; locally and on gs://."""

import json
import os
import subprocess
import sys

import pytest
from fake_gcs import run_on_fake_gcs

from receding_jax.training import workdir as wd


def test_local_paths_are_made_absolute_and_uris_are_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(wd.path("runs/../q")) == os.fspath(tmp_path / "q") and wd.is_local("runs/q")
  assert os.fspath(wd.path("gs://bucket/runs/q")) == "gs://bucket/runs/q" and not wd.is_local("gs://bucket/q")
  assert os.fspath(wd.report_path(wd.pruned_dir("gs://b/r", 0.5))) == "gs://b/r/pruned_0.5/pruned/pruning_report.json"
  assert os.fspath(wd.finetune_dir("gs://b/r", 0.25)) == "gs://b/r/pruned_0.25/finetune"
  assert os.fspath(wd.pruned_eval_path("r", 0.5)) == os.fspath(tmp_path / "r" / "pruned_0.5" / "pruned_eval.json")


def test_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
  path = tmp_path / "sub" / "results.json"
  wd.write_json(path, {"a": 1})
  wd.write_json(str(path), {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2} and os.listdir(path.parent) == ["results.json"]
  assert wd.read_json(path) == {"a": 2} and wd.read_json(tmp_path / "missing.json") is None


def test_metrics_lines_are_appended_in_order_and_read_back(tmp_path):
  assert wd.read_metrics(tmp_path) == [] and wd.last_metrics(tmp_path) == {}
  for epoch in (1, 2, 2):
    wd.append_metrics(tmp_path, {"epoch": epoch, "loss": 1.0 / epoch})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 2]
  assert wd.read_metrics(tmp_path) == [json.loads(x) for x in lines]
  assert wd.last_metrics(tmp_path) == {"epoch": 2, "loss": 0.5}
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_results_reports_and_config_round_trip(tmp_path):
  assert wd.read_results(tmp_path) is None
  with pytest.raises(FileNotFoundError, match=r"results\.json does not exist"):
    wd.read_results(tmp_path, required=True)
  wd.write_results(tmp_path, {"ratios": {"0.5": {}}}, "| table |")
  assert wd.read_results(tmp_path, required=True) == {"ratios": {"0.5": {}}}
  assert (tmp_path / "results.md").read_text() == "| table |\n"
  pruned = wd.pruned_dir(tmp_path, 0.5)
  assert wd.read_report(pruned) is None and wd.is_empty(pruned)
  wd.write_report(pruned, {"params_after": 3})
  assert json.loads((tmp_path / "pruned_0.5" / "pruned" / "pruning_report.json").read_text()) == {"params_after": 3}
  assert not wd.is_empty(pruned)
  wd.write_config(tmp_path, {"seed": 1})
  assert wd.read_config(tmp_path) == {"seed": 1}
  wd.remove_tree(wd.ratio_dir(tmp_path, 0.5))
  assert not (tmp_path / "pruned_0.5").exists()


ON_GCS = """
import json, os
from etils import epath
from receding_jax.training import plots, workdir as wd

root = "gs://bucket/run"
wd.write_json(wd.best_eval_path(root), {"a": 1})
wd.write_json(wd.best_eval_path(root), {"a": 2})  # Replaces the object.
assert wd.read_json(wd.best_eval_path(root)) == {"a": 2}
histogram = [0] * 100
for epoch in (1, 2):
  wd.append_metrics(root, {"epoch": epoch, "importance_histogram": histogram})
assert [r["epoch"] for r in wd.read_metrics(root)] == [1, 2] and wd.last_metrics(root)["epoch"] == 2
wd.write_results(root, {"ratios": {}}, "| table |")
assert wd.read_results(root) == {"ratios": {}} and wd.results_table_path(root).read_text() == "| table |\\n"
wd.write_report(wd.pruned_dir(root, 0.5), {"params_after": 3})
assert wd.read_report(wd.pruned_dir(root, 0.5)) == {"params_after": 3}
plots.importance_over_epochs(root, wd.plots_dir(root) / "importances_per_epoch.png")
assert (wd.plots_dir(root) / "importances_per_epoch.png").read_bytes()[:4] == b"\\x89PNG"
wd.remove_tree(wd.ratio_dir(root, 0.5))
stored = sorted(fake_gcs.FakeGCS.store)
assert sys.modules["tensorflow"] is None
print(json.dumps(stored))
"""


def test_the_file_helpers_work_on_a_gs_workdir(tmp_path):
  result = run_on_fake_gcs(ON_GCS, cwd=tmp_path)
  stored = json.loads(result.stdout.strip().splitlines()[-1])
  assert stored == ["/bucket/run/best_eval.json", "/bucket/run/metrics.jsonl",
                    "/bucket/run/plots/importances_per_epoch.png", "/bucket/run/results.json",
                    "/bucket/run/results.md"]  # No temporary file left, the removed tree gone.
  assert os.listdir(tmp_path) == []  # Nothing went to the local disk.


KEEPS_BACKEND = """
import json, sys
import matplotlib
matplotlib.use("svg")  # A user's (a notebook's) own choice.
from receding_jax.training import experiment, plots, workdir as wd

root = sys.argv[1]
wd.append_metrics(root, {"epoch": 1, "importance_histogram": [1] * 100})
plots.importance_over_epochs(root, wd.plots_dir(root) / "importances_per_epoch.png")
print(json.dumps({"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_figures_leave_the_users_plotting_backend_alone(tmp_path):
  result = subprocess.run([sys.executable, "-c", KEEPS_BACKEND, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  state = json.loads(result.stdout.strip().splitlines()[-1])
  assert state == {"backend": "svg", "pyplot": False}
  assert (tmp_path / "plots" / "importances_per_epoch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
