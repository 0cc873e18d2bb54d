"""Figures of one or several experiment workdirs (PNG, no display needed).

matplotlib's object-oriented API draws them (`matplotlib.figure.Figure`, rendered to PNG by Agg): no
pyplot, so importing or using this module never changes the process's plotting backend (a notebook's stays
as it was) and never keeps figures open; matplotlib itself is imported on the first figure.

They read only what the loop writes, through `workdir`: ``metrics.jsonl`` (a 100-bin histogram of all
importances on [0, 1] per epoch) and ``results.json`` (accuracies per pruning ratio); they write through it
too (atomically, process 0, local or ``gs://``). Functions that compare runs take
``{label: [workdir, ...]}``: the workdirs of one label are seeds of one config, drawn as their mean (and
standard deviation as error bars).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from receding_jax.training import workdir as wd


def last_per_epoch(records: Sequence[Mapping]) -> list[dict]:
  """One record per epoch, in epoch order, the last of each epoch winning (a resumed epoch is logged again)."""
  by_epoch = {r["epoch"]: dict(r) for r in records if "epoch" in r}  # Phase lines have none.
  return [by_epoch[e] for e in sorted(by_epoch)]


def read_epochs(workdir: wd.PathLike) -> list[dict]:
  """The per-epoch lines of ``metrics.jsonl`` (`last_per_epoch`); FileNotFoundError when there are none."""
  epochs = last_per_epoch(wd.read_metrics(workdir))
  if not epochs:
    raise FileNotFoundError(f"{wd.metrics_path(workdir)} does not exist: {workdir} holds no training run")
  return epochs


def importance_distribution(groups: Mapping[str, Sequence[str]], path: wd.PathLike) -> None:
  """Overlaid histograms of the final importances of each label (seeds pooled; bimodality shows as two
  modes)."""
  fig, ax = _figure()
  edges = np.linspace(0.0, 1.0, 101)
  for label, workdirs in groups.items():
    counts = sum(np.asarray(read_epochs(w)[-1]["importance_histogram"], float) for w in workdirs)
    ax.stairs(counts / max(counts.sum(), 1.0), edges, label=label, fill=len(groups) == 1, alpha=0.8)
  ax.set(xlabel="importance (sigmoid(logit), or |gamma| clipped to 1)", ylabel="share of channels",
         title="importances at the end of training")
  ax.legend()
  _save(fig, path)


def importance_over_epochs(workdir: wd.PathLike, path: wd.PathLike) -> None:
  """Importance histograms of every epoch as a heat map (epochs down, importance across)."""
  epochs = read_epochs(workdir)
  counts = np.asarray([e["importance_histogram"] for e in epochs], float)
  fig, ax = _figure()
  image = ax.imshow(np.log1p(counts), aspect="auto", origin="lower", extent=(0, 1, 0.5, len(epochs) + 0.5),
                    cmap="viridis")
  ax.set(xlabel="importance", ylabel="epoch", title="importance histogram per epoch (log(1 + count))")
  fig.colorbar(image, ax=ax)
  _save(fig, path)


def accuracy_vs_ratio(
    groups: Mapping[str, Sequence[str]], path: wd.PathLike, metric: str = "test_accuracy",
    read: Callable[[str], dict] | None = None,
) -> Any:
  """`metric` right after one-shot pruning (dashed, squares) and after fine-tuning (solid, circles) per
  ratio, each in its own colour, and the trained (unpruned) network's as a dotted horizontal line; mean over
  the seeds of a label, their standard deviation as error bars. `read` gives a workdir's results (default:
  its results.json). Returns the figure (a `matplotlib.figure.Figure`)."""
  read = read or (lambda w: wd.read_results(w, required=True))
  fig, ax = _figure()
  for i, (label, workdirs) in enumerate(groups.items()):
    runs = [read(w) for w in workdirs]
    trained = [r["trained"][metric] for r in runs if metric in r.get("trained", {})]
    if len(trained) == len(runs):  # The fine-tuned colour, dotted: what fine-tuning tries to get back to.
      ax.axhline(mean_std(trained)[0] * 100, linestyle=":", color=f"C{2 * i}", label=f"{label} trained (unpruned)")
    for key, style, marker, color in (("pruned", "--", "s", f"C{2 * i + 1}"), ("finetuned", "-", "o", f"C{2 * i}")):
      points = []
      for ratio in sorted(runs[0]["ratios"], key=float):
        values = [r["ratios"][ratio][key][metric] for r in runs if key in r["ratios"].get(ratio, {})]
        if len(values) == len(runs):
          points.append((float(ratio), *mean_std(values)))
      if points:
        x, y, err = (np.asarray(v) * 100 for v in zip(*points, strict=True))
        ax.errorbar(x, y, yerr=err if len(runs) > 1 else None, fmt=style, marker=marker, color=color, capsize=3,
                    label=f"{label} {'fine-tuned' if key == 'finetuned' else 'pruned, no fine-tuning'}")
  ax.set(xlabel="channels pruned (%)", ylabel=f"{metric.replace('_', ' ')} (%)", title="accuracy vs pruning ratio")
  ax.legend(fontsize=7)
  _save(fig, path)
  return fig


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value) of the seeds of one config."""
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _figure():
  """(figure, axes) of one 6 x 3.5 in plot, outside pyplot (see the module doc)."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 3.5))
  return fig, fig.subplots()


def _save(fig, path: wd.PathLike) -> None:
  """The figure as PNG at `path` (local or gs://), written atomically by process 0."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, dpi=120, format="png")
  wd.write_bytes(path, png.getvalue())


def max_test_accuracy(epochs: Sequence[Mapping]) -> float | None:
  """The paper's convention: the best test accuracy over the epochs (the official code keeps the best-test
  epoch), or None unless test was evaluated every time an epoch was (`eval_test_every_epoch`, or no
  validation split). Only for putting our numbers beside the paper's: it chooses on test."""
  evaluated = [e for e in epochs if "validation_accuracy" in e or "test_accuracy" in e]
  if not evaluated or any("test_accuracy" not in e for e in evaluated):
    return None
  return max(float(e["test_accuracy"]) for e in evaluated)


def total_seconds(epochs: Sequence[Mapping]) -> float:
  """The epochs' wall times (`epoch_seconds`, evaluation included) summed over every attempt of a run."""
  return sum(float(e.get("epoch_seconds", 0.0)) for e in epochs)


def mac_epochs(epochs: Sequence[Mapping]) -> float | None:
  """Training cost in MAC-epochs: the MACs of one input of the network each epoch trained (`macs`, which
  falls as a run shrinks), summed over the epochs (the last attempt of each); None for runs recorded
  before epochs carried `macs`. Times examples per epoch x ~3 (forward and backward) gives the MACs spent."""
  last = last_per_epoch(list(epochs))
  if not last or any("macs" not in e for e in last):
    return None
  return float(sum(e["macs"] for e in last))

