"""The layout of a run's workdir, and the one module that reads and writes its files.

  config.json                        the run's config (`workdir_files.check_config` refuses another one)
  lock                               held by the running process (`workdir_files.hold`)
  checkpoints/                       orbax (`checkpointing`)
  metrics.jsonl                      one JSON line per epoch, and one per phase of the experiment ('phase':
                                     its compile and run seconds) (`append_metrics`, `read_metrics`)
  events.out.tfevents.*              TensorBoard (`metric_writer`)
  best_eval.json                     with prune.source 'best': that checkpoint's accuracies
  pruned_<ratio>/pruned/             the pruned network (step 0) and its pruning_report.json
  pruned_<ratio>/pruned_eval.json    its accuracy before any fine-tuning
  pruned_<ratio>/finetune/           the fine-tuning run: a workdir of its own
  results.md, results.json           written last (`write_results`); results.json marks the run finished
  plots/*.png                        figures (`plots`)

Every path is an `etils.epath.Path`, so a workdir is a local directory or a ``gs://`` path (epath's
backend: TensorFlow's gfile while tensorflow is installed, else fsspec with gcsfs). Writes happen on
process 0 only and are atomic: a temporary file beside the target, renamed over it, so a kill never leaves
half a file (on an object store every object appears whole anyway).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

PathLike = str | os.PathLike

CONFIG_NAME = "config.json"
LOCK_NAME = "lock"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
RESULTS_TABLE_NAME = "results.md"
BEST_EVAL_NAME = "best_eval.json"
REPORT_NAME = "pruning_report.json"
PRUNED_EVAL_NAME = "pruned_eval.json"


def is_writer() -> bool:
  """True on the process that writes files and deletes them (process 0)."""
  return jax.process_index() == 0


def is_local(path: PathLike) -> bool:
  """False for a URI (``gs://bucket/run``), True for a path on a local or mounted filesystem."""
  return "://" not in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path`: a local path made absolute, a URI as given."""
  return epath.Path(p) if not is_local(p) else epath.Path(p).absolute()


# ---------------------------------------------------------------------------------------------------
# Names: every file and directory of a workdir.


def config_path(workdir: PathLike) -> epath.Path:
  return path(workdir) / CONFIG_NAME


def lock_path(workdir: PathLike) -> epath.Path:
  return path(workdir) / LOCK_NAME


def checkpoint_dir(workdir: PathLike) -> epath.Path:
  return path(workdir) / "checkpoints"


def metrics_path(workdir: PathLike) -> epath.Path:
  return path(workdir) / METRICS_NAME


def best_eval_path(workdir: PathLike) -> epath.Path:
  return path(workdir) / BEST_EVAL_NAME


def ratio_dir(workdir: PathLike, ratio: float) -> epath.Path:
  """Everything of pruning ratio `ratio`: ``pruned_0.5``."""
  return path(workdir) / f"pruned_{ratio:g}"


def pruned_dir(workdir: PathLike, ratio: float) -> epath.Path:
  """The pruned checkpoint of `ratio` (with its report)."""
  return ratio_dir(workdir, ratio) / "pruned"


def pruned_eval_path(workdir: PathLike, ratio: float) -> epath.Path:
  return ratio_dir(workdir, ratio) / PRUNED_EVAL_NAME


def finetune_dir(workdir: PathLike, ratio: float) -> epath.Path:
  """The workdir of fine-tuning the pruned network of `ratio`."""
  return ratio_dir(workdir, ratio) / "finetune"


def report_path(checkpoint_directory: PathLike) -> epath.Path:
  """The pruning report beside a pruned checkpoint."""
  return path(checkpoint_directory) / REPORT_NAME


def results_path(workdir: PathLike) -> epath.Path:
  return path(workdir) / RESULTS_NAME


def results_table_path(workdir: PathLike) -> epath.Path:
  return path(workdir) / RESULTS_TABLE_NAME


def plots_dir(workdir: PathLike) -> epath.Path:
  return path(workdir) / "plots"


# ---------------------------------------------------------------------------------------------------
# Reading and writing.


def read_json(p: PathLike) -> Any:
  """The JSON value at `p`, or None when there is no such file."""
  p = path(p)
  return json.loads(p.read_text()) if p.exists() else None


def write_bytes(p: PathLike, data: bytes) -> None:
  """Atomically writes `data` to `p` (parents created) on process 0; a no-op elsewhere."""
  if not is_writer():
    return
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f"{p.name}.tmp{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(p)


def write_text(p: PathLike, text: str) -> None:
  """Atomically writes `text` (UTF-8) to `p` on process 0."""
  write_bytes(p, text.encode())


def write_json(p: PathLike, value: Any) -> None:
  """Atomically writes `value` as indented JSON with sorted keys on process 0."""
  write_text(p, json.dumps(value, indent=2, sort_keys=True) + "\n")


def remove_tree(p: PathLike) -> None:
  """Deletes the directory (or file) `p` if it exists, on process 0."""
  p = path(p)
  if not is_writer() or not p.exists():
    return
  if p.is_dir():
    p.rmtree()
  else:
    p.unlink()


def is_empty(directory: PathLike) -> bool:
  """True when `directory` does not exist or holds nothing."""
  directory = path(directory)
  return not directory.exists() or not any(directory.iterdir())


def append_metrics(workdir: PathLike, record: Mapping[str, Any]) -> None:
  """Appends `record` as one line of ``metrics.jsonl`` on process 0. The file is rewritten whole and
  atomically (object stores cannot append), so a kill never leaves half a line."""
  if not is_writer():
    return
  p = metrics_path(workdir)
  previous = p.read_text() if p.exists() else ""
  write_text(p, previous + json.dumps(dict(record)) + "\n")


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
  """Every line of ``metrics.jsonl`` in order (a resumed epoch may appear twice); [] when there is none."""
  p = metrics_path(workdir)
  return [json.loads(line) for line in p.read_text().splitlines() if line] if p.exists() else []


def last_metrics(workdir: PathLike) -> dict[str, Any]:
  """The last epoch line of ``metrics.jsonl`` (the newest epoch logged), {} when there is none."""
  records = [r for r in read_metrics(workdir) if "epoch" in r]
  return records[-1] if records else {}


def read_phases(workdir: PathLike) -> list[dict[str, Any]]:
  """The phase lines of ``metrics.jsonl`` (those with a 'phase': its wall, compile and run seconds), in order,
  every attempt's."""
  return [r for r in read_metrics(workdir) if "phase" in r]


def read_config(workdir: PathLike) -> dict[str, Any] | None:
  """The config recorded in ``config.json`` (as JSON), or None."""
  return read_json(config_path(workdir))


def config_of_checkpoints(checkpoint_dir: PathLike) -> tuple[dict[str, Any], epath.Path] | None:
  """(config as JSON, its path) of the run that wrote the checkpoints in `checkpoint_dir`: the nearest
  ``config.json`` in it, its parent or its grandparent (``W/checkpoints``, ``W/pruned_R/pruned`` and
  ``W/pruned_R/finetune/checkpoints`` all have one there); None when there is none."""
  here = path(checkpoint_dir)
  for folder in (here, here.parent, here.parent.parent):
    recorded = read_config(folder)
    if isinstance(recorded, dict):
      return recorded, config_path(folder)
  return None


def write_config(workdir: PathLike, config: Mapping[str, Any]) -> None:
  write_json(config_path(workdir), dict(config))


def read_report(checkpoint_directory: PathLike) -> dict[str, Any] | None:
  """The pruning report of a pruned checkpoint, or None (it is written last: None = not complete)."""
  return read_json(report_path(checkpoint_directory))


def write_report(checkpoint_directory: PathLike, report: Mapping[str, Any]) -> None:
  write_json(report_path(checkpoint_directory), dict(report))


def read_results(workdir: PathLike, *, required: bool = False) -> dict[str, Any] | None:
  """``results.json``, or None when absent (FileNotFoundError instead when `required`)."""
  results = read_json(results_path(workdir))
  if results is None and required:
    raise FileNotFoundError(f"{results_path(workdir)} does not exist: run the prune phase in {workdir} first")
  return results


def write_results(workdir: PathLike, results: Mapping[str, Any], table: str) -> None:
  """``results.md`` (`table`), then ``results.json``: last, since it marks the run finished."""
  write_text(results_table_path(workdir), table.rstrip("\n") + "\n")
  write_json(results_path(workdir), dict(results))
