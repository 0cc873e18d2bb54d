"""The paper's prunable set on the zoo ResNet-50: block-inner channels only, although the library, whose
streams are residual joins, would also prune the stem (read by the first block's conv1 and its projection)."""

import numpy as np
import pytest
from test_pruning import _save_run, trained_looking

from receding_jax import pruning
from receding_jax.errors import InputError
from receding_jax.models import get_model
from receding_jax.training.pruned_checkpoint import prune_checkpoint


@pytest.fixture(scope="module")
def small_resnet50():
  model = get_model("resnet50", 10, stage_widths=(4, 4, 8, 8), input_shape=(32, 32, 3))
  return model, trained_looking(model)


def test_the_library_prunes_the_resnet50_stem_and_keep_groups_leaves_it_whole(small_resnet50):
  model, variables = small_resnet50
  everything = pruning.channel_masks(model, variables, 0.5)
  assert "stem_norm" in everything and not everything["stem_norm"].all()
  paper = pruning.channel_masks(model, variables, 0.5, keep_groups=model.PAPER_UNPRUNED)
  assert "stem_norm" not in paper and set(paper) == set(everything) - {"stem_norm"}
  with pytest.raises(InputError, match=r"keep_groups names groups the model does not have: \['stem_nrom'\]"):
    pruning.channel_masks(model, variables, 0.5, keep_groups=("stem_nrom",))


def test_the_experiments_pruning_of_a_zoo_resnet50_keeps_its_stem(small_resnet50, tmp_path):
  model, variables = small_resnet50
  spec = {"name": "resnet50", "num_classes": 10,
          "overrides": {"stage_widths": [4, 4, 8, 8], "input_shape": [32, 32, 3]}}
  _save_run(tmp_path / "run", model, spec, variables, steps=(1,))
  report = prune_checkpoint(tmp_path / "run", tmp_path / "pruned", ratio=0.5)
  assert "stem_norm" not in report["groups"] and len(report["groups"]) == 2 * 16  # Two inner widths a block.
  assert report["macs_after"] < report["macs_before"]
  assert np.all(np.asarray(report["widths_after"]) <= np.asarray(report["widths_before"]))
