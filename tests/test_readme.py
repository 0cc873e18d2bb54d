"""Every ```python block of README.md runs as written, each in a fresh namespace (the blocks are
self-contained, so a reader can paste any one of them alone), and leaves what it promises behind.

Each block is compiled with README.md's own line numbers, so a failure points at the README line.
"""

import contextlib
import io
import pathlib
import re

import jax
import numpy as np
import pytest

from receding_jax import count_params, pruning

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
  """(first line number, code) of every ```python block of the README."""
  text = README.read_text()
  return [(text[: m.start(1)].count("\n") + 1, m.group(1)) for m in FENCE.finditer(text)]


def run_block(line: int, code: str) -> tuple[dict, str]:
  """Executes `code` as README.md lines `line`... in a fresh namespace; returns it and what it printed."""
  namespace = {"__name__": f"readme_line_{line}"}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
  return namespace, out.getvalue()


BLOCKS = python_blocks()


def test_the_readme_has_its_examples():
  assert len(BLOCKS) >= 3  # Linen penalty, NNX penalty, pruning; a lost fence would skip them silently.


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code):
  ns, printed = run_block(line, code)
  assert printed.strip(), "every example prints its result"
  if "opt_state" in ns:  # Trained: every parameter is finite.
    params = ns["narrow_vars" if "narrow_vars" in ns else "variables"]["params"]
    assert all(bool(np.isfinite(leaf).all()) for leaf in jax.tree.leaves(params))
  if "importances" in ns:  # The Linen example: one bounded norm of 16 channels, importances in (0, 1).
    values = np.concatenate([np.ravel(v) for v in ns["importances"].values()])
    assert values.size == 16 and ((values > 0) & (values < 1)).all()
    assert "fraction_below_0.05" in printed
  if "optimizer" in ns:  # The NNX example: the penalty found the BatchNorm and only it.
    assert "'bn'" in printed and "'ln'" not in printed
    mask = ns["bn_scales"]
    assert [bool(x) for x in jax.tree.leaves(mask)].count(True) == 1
  if "removed" in ns:  # Shrinking mid-training: the 5 receded channels gone, the loss going on down.
    assert ns["removed"] == {"BoundedScaleNorm_0": 5} and ns["variables"]["params"]["Conv_0"]["kernel"].shape[-1] == 11
    assert all(b < a for a, b in zip(ns["losses"], ns["losses"][1:], strict=False))
  if "narrow_nnx" in ns:  # Bring your own model: the depthwise group halved in both frameworks.
    assert ns["narrow_linen_vars"]["params"]["Conv_1"]["kernel"].shape == (3, 3, 1, 12)
    assert ns["narrow_linen"].pruned_overrides["Conv_1"] == {"features": 12, "feature_group_count": 12}
    assert ns["narrow_nnx"].conv.kernel[...].shape == (3, 3, 3, 8) and ns["nnx_model"].conv.kernel[...].shape[-1] == 16
    assert "stream" in printed and "an axis of the model's input" in printed
  if "exported" in ns:  # The deploy example: all 19 norms folded, the file runs batch 5 and matches the model.
    folded, raw = printed.strip().split("\n")
    count, error = folded.split(" norms folded;")
    largest = float(np.abs(ns["narrow_model"].apply(ns["narrow_vars"], ns["x"])).max())
    assert int(count) == 19 and float(error) < 1e-4 * largest
    # The same model taking raw uint8 images, normalisation folded in, matches it on the normalised images.
    assert ns["raw_model"].in_avals[0].dtype == np.uint8 and float(raw.split("raw images:")[1]) < 1e-4 * largest
    return
  if "narrow_model" in ns:  # The pruning example: narrower, smaller, and its state fits its variables.
    model, narrow_model = ns["model"], ns["narrow_model"]
    narrow_widths = pruning.group_widths(narrow_model, ns["narrow_vars"])
    assert sum(narrow_widths.values()) < sum(pruning.group_widths(model, ns["variables"]).values())
    assert count_params(ns["narrow_vars"]) < count_params(ns["variables"])
    logits = narrow_model.apply(ns["narrow_vars"], ns["images"], train=False)
    assert logits.shape == (8, 10) and bool(np.isfinite(logits).all())
    shapes = lambda tree: [np.shape(x) for x in jax.tree.leaves(tree)]
    assert shapes(ns["narrow_opt_state"]) == shapes(ns["tx"].init(ns["narrow_vars"]["params"]))
