"""The figures' content, read back from their matplotlib objects."""

import matplotlib.colors

from receding_jax.training import plots


def test_accuracy_vs_ratio_shows_the_trained_accuracy_and_tells_pruned_from_fine_tuned(tmp_path):
  results = {"trained": {"test_accuracy": 0.95},
             "ratios": {"0.3": {"pruned": {"test_accuracy": 0.80}, "finetuned": {"test_accuracy": 0.94}},
                        "0.5": {"pruned": {"test_accuracy": 0.60}, "finetuned": {"test_accuracy": 0.92}}}}
  fig = plots.accuracy_vs_ratio({"run": ["w"]}, tmp_path / "a.png", read=lambda _: results)
  assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
  handles, labels = fig.axes[0].get_legend_handles_labels()
  by_label = dict(zip(labels, handles, strict=True))
  reference = by_label["run trained (unpruned)"]
  assert list(reference.get_ydata()) == [95.0, 95.0] and reference.get_linestyle() == ":"
  pruned, tuned = by_label["run pruned, no fine-tuning"].lines[0], by_label["run fine-tuned"].lines[0]
  assert list(pruned.get_ydata()) == [80.0, 60.0] and list(tuned.get_ydata()) == [94.0, 92.0]
  assert matplotlib.colors.to_hex(pruned.get_color()) != matplotlib.colors.to_hex(tuned.get_color())
  assert pruned.get_marker() != tuned.get_marker()
