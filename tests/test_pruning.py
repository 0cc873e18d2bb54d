"""prune_params: exactness on receded channels, scopes, counts, composition, bad input, checkpoints."""

import importlib.util
import json
import os
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import receding_jax as rj
from receding_jax import prune_params, pruning
from receding_jax.models import get_model, model_from_spec
from receding_jax.training import checkpointing, model_specs
from receding_jax.training import optimizer as recipe
from receding_jax.training.experiment import results_table
from receding_jax.training.pruned_checkpoint import format_report, prune_checkpoint

SMALL = {
    "cifar_vgg16": {"width_multiplier": 0.125},
    "cifar_resnet20": {"width_multiplier": 0.5},
    "cifar_resnet56": {"width_multiplier": 0.5},
    "resnet50": {"width_multiplier": 0.0625},
    "vgg16": {"width_multiplier": 0.0625, "hidden": 32},
}


def trained_looking(model, seed=0):
  """Variables with random logits/scales, biases and non-trivial running statistics (numpy)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.input_shape))))
  rng = np.random.default_rng(seed)

  def fill(path, spec):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 2.0, spec.shape).astype(np.float32)
    if name == "kernel":
      fan_in = int(np.prod(spec.shape[:-1]))
      return (rng.normal(size=spec.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return rng.normal(0.0, 1.0, spec.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def recede(model, variables, seed=1):
  """Drives the importance of a random ~40% of each group's channels to exactly zero (logit -1e4, or
  gamma = beta = 0); returns the new variables and the masks of the channels left alive."""
  rng = np.random.default_rng(seed)
  widths = pruning.group_widths(model, variables)
  variables = jax.tree.map(np.copy, variables)
  alive = {}
  for group, width in widths.items():
    mask = rng.uniform(size=width) > 0.4
    mask[rng.integers(width)] = True
    node = variables["params"]
    for name in group.split("/"):
      node = node[name]
    if "scale_logit" in node:
      node["scale_logit"][~mask] = -1e4
    else:
      node["scale"][~mask] = 0.0
      node["bias"][~mask] = 0.0
    alive[group] = mask
  return variables, alive


# Every architecture with bounded norms; the CIFAR ones with BatchNorm too (ImageNet slicing is the same).
EXACTNESS_CASES = [(name, "bounded") for name in SMALL] + [(n, "batch") for n in SMALL if n.startswith("cifar")]


@pytest.mark.parametrize("name, norm", EXACTNESS_CASES)
def test_pruning_receded_channels_keeps_the_eval_logits(name, norm):
  model = get_model(name, 10, norm=norm, **SMALL[name])
  variables, alive = recede(model, trained_looking(model))
  masks = pruning.channel_masks(model, variables, threshold=0.0, min_channels=1)
  assert {k: v.tolist() for k, v in masks.items()} == {k: v.tolist() for k, v in alive.items()}
  narrow_model, narrow_variables = prune_params(model, variables, masks=masks)
  assert pruning.group_widths(narrow_model, narrow_variables) == {k: int(m.sum()) for k, m in alive.items()}
  x = jax.random.normal(jax.random.key(0), (2, *model.input_shape))
  expected = model.apply(variables, x)
  got = narrow_model.apply(narrow_variables, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(jnp.abs(expected).max()))
  assert pruning.count_params(narrow_variables) < pruning.count_params(variables)


def test_global_scope_uses_one_threshold_and_local_scope_one_per_layer():
  model = get_model("cifar_vgg16", 10, width_multiplier=0.25)
  variables = trained_looking(model)
  variables["params"]["norm2"]["scale_logit"] -= 10.0  # One layer far less important than the rest.
  imps = pruning.group_importances(model, variables)
  glob = pruning.channel_masks(model, variables, 0.3, scope="global")
  local = pruning.channel_masks(model, variables, 0.3, scope="local")
  assert glob["norm2"].sum() == 3  # Emptied down to min_channels by the global threshold.
  threshold = np.quantile(np.concatenate(list(imps.values())), 0.3)  # Distinct importances: the official rule.
  for name, mask in glob.items():
    if name != "norm2":
      np.testing.assert_array_equal(mask, imps[name] > threshold)
  for name, mask in local.items():
    np.testing.assert_array_equal(mask, imps[name] > np.quantile(imps[name], 0.3))
    assert (~mask).sum() == int(np.floor(0.3 * (mask.size - 1))) + 1


def test_min_channels_is_respected_in_every_layer_and_keeps_the_most_important():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.5)
  variables = trained_looking(model)
  imps = pruning.group_importances(model, variables)
  masks = pruning.channel_masks(model, variables, 0.95, min_channels=3)
  for name, mask in masks.items():
    assert mask.sum() >= 3
    if mask.sum() == 3:
      assert set(np.flatnonzero(mask)) == set(np.argsort(-imps[name])[:3])


def test_ratio_zero_returns_the_same_architecture_and_variables():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.5)
  variables = trained_looking(model)
  narrow_model, narrow_variables = prune_params(model, variables, 0.0)
  assert pruning.group_widths(narrow_model, narrow_variables) == pruning.group_widths(model, variables)
  jax.tree.map(np.testing.assert_array_equal, narrow_variables, variables)


def test_pruning_twice_composes_into_one_pruning():
  model = get_model("cifar_vgg16", 10, width_multiplier=0.25)
  variables = trained_looking(model)
  first = pruning.channel_masks(model, variables, 0.3)
  mid_model, mid_variables = prune_params(model, variables, masks=first)
  second = pruning.channel_masks(mid_model, mid_variables, 0.4)
  twice_model, twice_variables = prune_params(mid_model, mid_variables, masks=second)
  combined = {}
  for name, mask in first.items():
    combined[name] = mask.copy()
    combined[name][np.flatnonzero(mask)] = second[name]
  once_model, once_variables = prune_params(model, variables, masks=combined)
  assert pruning.group_widths(once_model, once_variables) == pruning.group_widths(twice_model, twice_variables)
  jax.tree.map(np.testing.assert_array_equal, once_variables, twice_variables)


@pytest.mark.parametrize("name", ["cifar_vgg16", "cifar_resnet56"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_full_size_widths_and_counts_after_pruning(name, ratio):
  model = get_model(name, 10)
  variables = trained_looking(model)
  narrow_model, narrow_variables = prune_params(model, variables, ratio)
  widths = list(pruning.group_widths(model, variables).values())
  narrow_widths = list(pruning.group_widths(narrow_model, narrow_variables).values())
  kept = sum(narrow_widths) / sum(widths)
  assert abs(kept - (1 - ratio)) < 0.01 + 3 * len(widths) / sum(widths)  # min_channels may add a few.
  assert min(narrow_widths) >= 3
  # Counts from the sliced variables agree with the narrow architecture built from scratch.
  rebuilt = jax.eval_shape(lambda: narrow_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert pruning.count_params(narrow_variables) == pruning.count_params(rebuilt)
  macs, narrow_macs = pruning.count_macs(model), pruning.count_macs(narrow_model)
  masks = pruning.channel_masks(model, variables, ratio)
  assert pruning.count_macs(model, variables=variables, masks=masks) == narrow_macs
  if name == "cifar_vgg16":  # Every conv loses inputs and outputs: MACs fall about as kept^2.
    assert kept**2 * 0.8 < narrow_macs / macs < kept
  else:  # Only the inner width of each block: MACs fall linearly with kept channels.
    assert abs(narrow_macs / macs - kept) < 0.05


def test_mac_reduction_target_is_reached_with_the_smallest_ratio():
  model = get_model("cifar_vgg16", 10, width_multiplier=0.25)
  variables = trained_looking(model)
  macs = lambda masks: pruning.count_macs(model, variables=variables, masks=masks)
  full = pruning.count_macs(model)
  masks = pruning.channel_masks(model, variables, mac_reduction=0.6)
  assert macs(masks) <= 0.4 * full
  looser = pruning.channel_masks(model, variables, mac_reduction=0.55)
  assert macs(looser) > macs(masks)
  with pytest.raises(ValueError, match="impossible"):
    pruning.channel_masks(model, variables, mac_reduction=0.99, min_channels=3)


def test_optimizer_state_is_sliced_like_the_params():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.5)
  variables = trained_looking(model)
  tx = optax.sgd(0.1, momentum=0.9)
  state = tx.init(variables["params"])
  state = jax.tree.map(lambda x: x + 1.0, state)  # Non-zero momentum.
  masks = pruning.channel_masks(model, variables, 0.5)
  _, narrow_variables = prune_params(model, variables, masks=masks)
  narrow_state = pruning.prune_params_like(state, model, variables["params"], masks)
  trace = narrow_state[0].trace
  assert jax.tree.structure(trace) == jax.tree.structure(narrow_variables["params"])
  jax.tree.map(lambda t, p: np.testing.assert_array_equal(np.shape(t), np.shape(p)), trace, narrow_variables["params"])
  kept = np.flatnonzero(masks["stage0_block0/norm1"])
  np.testing.assert_array_equal(
      trace["stage0_block0"]["conv1"]["kernel"],
      np.asarray(state[0].trace["stage0_block0"]["conv1"]["kernel"])[..., kept],
  )
  tx.update(trace, tx.init(narrow_variables["params"]))  # The sliced state fits the narrow params.


QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"


def load_config(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def random_like(tree, seed):
  """Standard normal float32 leaves shaped like `tree`'s (numpy's generator: nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), tree)


def trained_optimizer(tx, params, steps=2):
  """(params, state) after `steps` real updates of `tx` on random gradients: non-zero momentum."""
  state, update = tx.init(params), jax.jit(tx.update)
  for i in range(steps):
    updates, state = update(random_like(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def assert_trees_equal(a, b, rtol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7 if rtol else 0), a, b)


def recipe_config(kind):
  """The quickstart config (receding penalty, bounded norms), or its L1 twin on BatchNorm."""
  config = load_config(QUICKSTART)
  if kind == "l1":
    config.penalty.kind, config.penalty.strength, config.model.norm = "l1", 1e-2, "batch"
  return config


def assert_narrow_step_is_the_wide_step_sliced(tx, model, masks, wide, narrow, seed, rtol):
  """One update on random gradients: the narrow network's (updates, state) equal the wide one's, sliced."""
  (params, state), (narrow_params, narrow_state) = wide, narrow
  grads = random_like(params, seed)
  update = jax.jit(tx.update)
  wide_updates, wide_state = update(grads, state, params)
  updates, new_state = update(pruning.prune_params_like(grads, model, params, masks), narrow_state, narrow_params)
  assert_trees_equal(updates, pruning.prune_params_like(wide_updates, model, params, masks), rtol=rtol)
  assert_trees_equal(new_state, pruning.prune_params_like(wide_state, model, params, masks), rtol=rtol)
  return updates


@pytest.mark.parametrize("kind", ["rni", "l1"])
def test_the_training_recipes_optimizer_state_is_sliced_and_pruning_commutes_with_its_step(kind):
  """recipe.make_optimizer: chain(penalty, multi_transform(...)), momentum under MaskedNodes."""
  config = recipe_config(kind)
  model = get_model("cifar_vgg16", 10, norm=config.model.norm, width_multiplier=0.125)
  variables = jax.tree.map(jnp.asarray, trained_looking(model))
  tx = recipe.make_optimizer(config, steps_per_epoch=10)
  params, state = trained_optimizer(tx, variables["params"])
  variables = {**variables, "params": params}
  masks = pruning.channel_masks(model, variables, 0.5)
  narrow_model, narrow_variables = prune_params(model, variables, masks=masks)
  narrow_state = pruning.prune_params_like(state, model, params, masks)
  fresh = tx.init(narrow_variables["params"])
  assert jax.tree.structure(narrow_state) == jax.tree.structure(fresh)  # MaskedNodes where they were.
  assert [np.shape(x) for x in jax.tree.leaves(narrow_state)] == [np.shape(x) for x in jax.tree.leaves(fresh)]
  # The kept momentum entries are the old ones at the kept channels (conv1: kept inputs and outputs).
  default_trace = lambda s: s[1].inner_states["default"].inner_state[1][0].trace
  kept_in, kept_out = np.flatnonzero(masks["norm0"]), np.flatnonzero(masks["norm1"])
  old = np.asarray(default_trace(state)["conv1"]["kernel"])
  assert np.abs(old).max() > 0
  np.testing.assert_array_equal(default_trace(narrow_state)["conv1"]["kernel"], old[:, :, kept_in][..., kept_out])
  # One more step: the narrow step equals the wide step, sliced (every term is per channel).
  updates = assert_narrow_step_is_the_wide_step_sliced(
      tx, model, masks, (params, state), (narrow_variables["params"], narrow_state), seed=9, rtol=1e-6)
  stepped = {**narrow_variables, "params": optax.apply_updates(narrow_variables["params"], updates)}
  jax.eval_shape(lambda v: narrow_model.apply(v, jnp.zeros((1, 32, 32, 3)), train=False), stepped)


def test_adam_under_optax_masked_keeps_its_masked_nodes_and_count():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.25)
  variables = jax.tree.map(jnp.asarray, trained_looking(model))
  kernels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)
  others = lambda params: jax.tree.map(np.logical_not, kernels(params))
  tx = optax.chain(optax.masked(optax.adam(1e-2), kernels), optax.masked(optax.sgd(0.1, momentum=0.9), others))
  params, state = trained_optimizer(tx, variables["params"], steps=1)
  masks = pruning.channel_masks(model, {**variables, "params": params}, 0.5)
  _, narrow_variables = prune_params(model, {**variables, "params": params}, masks=masks)
  narrow_state = pruning.prune_params_like(state, model, params, masks)
  adam = narrow_state[0].inner_state[0]
  assert int(adam.count) == 1
  assert isinstance(adam.mu["stage0_block0"]["norm1"]["scale_logit"], optax.MaskedNode)
  kept = np.flatnonzero(masks["stage1_block2/norm1"])
  np.testing.assert_array_equal(adam.nu["stage1_block2"]["conv1"]["kernel"],
                                np.asarray(state[0].inner_state[0].nu["stage1_block2"]["conv1"]["kernel"])[..., kept])
  assert_narrow_step_is_the_wide_step_sliced(
      tx, model, masks, (params, state), (narrow_variables["params"], narrow_state), seed=5, rtol=1e-5)


def test_state_leaves_that_cannot_be_sliced_are_named():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.25)
  params = trained_looking(model)["params"]
  masks = pruning.channel_masks(model, {"params": params, **trained_looking(model)}, 0.5)
  kernel = params["stage0_block0"]["conv1"]["kernel"]
  # A pruned parameter's shape outside any subtree that mirrors the params: nothing would be sliced.
  with pytest.raises(ValueError, match=r"extra/1.*stage0_block0/conv1/kernel"):
    pruning.prune_params_like({"count": np.int32(3), "extra": [np.zeros(2), kernel]}, model, params, masks)
  # A subtree with the params' structure but other shapes (a factored state).
  flat = jax.tree.map(np.ravel, params)
  with pytest.raises(ValueError, match=r"moments/stage0_block0/conv1/kernel.*shape"):
    pruning.prune_params_like({"moments": flat}, model, params, masks)
  with pytest.raises(ValueError, match="lack"):  # Variables where the params belong.
    pruning.prune_params_like({"m": params}, model, {"params": params}, masks)
  # Nothing to slice and no leaf of a pruned shape: returned as it is.
  plain = optax.sgd(0.1).init(params)
  assert pruning.prune_params_like(plain, model, params, masks) == plain


def test_numpy_in_numpy_out_and_jax_in_jax_out():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.5)
  variables = trained_looking(model)
  _, out = prune_params(model, variables, 0.5)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(out))
  _, out = prune_params(model, jax.tree.map(jnp.asarray, variables), 0.5)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out))


def test_bad_input_is_refused_with_the_value_named():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.5)
  variables = trained_looking(model)
  for ratio in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=str(ratio)):
      prune_params(model, variables, ratio)
  with pytest.raises(ValueError, match="exactly one"):
    pruning.channel_masks(model, variables, 0.5, threshold=0.1)
  with pytest.raises(ValueError, match="'sideways'"):
    prune_params(model, variables, 0.5, scope="sideways")
  with pytest.raises(ValueError, match="min_channels"):
    prune_params(model, variables, 0.5, min_channels=0)
  name = "stage0_block0/norm1"
  with pytest.raises(ValueError, match=r"shape \(5,\).*8 channels"):
    prune_params(model, variables, masks={name: np.ones(5, bool)})
  with pytest.raises(ValueError, match="zero channels"):
    prune_params(model, variables, masks={name: np.zeros(8, bool)})
  with pytest.raises(ValueError, match="'nope'"):
    prune_params(model, variables, masks={"nope": np.ones(8, bool)})
  with pytest.raises(ValueError, match="either masks"):
    prune_params(model, variables, 0.5, masks={name: np.ones(8, bool)})
  other = trained_looking(get_model("cifar_resnet56", 10, width_multiplier=0.5))
  with pytest.raises(ValueError, match="stage0_block3"):
    prune_params(model, other, 0.5)
  vgg = trained_looking(get_model("cifar_vgg16", 10, width_multiplier=0.125))
  with pytest.raises(ValueError, match="lack"):
    prune_params(model, vgg, 0.5)
  wider = trained_looking(get_model("cifar_resnet20", 10))
  with pytest.raises(ValueError, match="shape"):
    prune_params(model, wider, 0.5)


def _save_run(directory, model, spec, variables, steps=(1, 2)):
  manager = checkpointing.make_manager(directory)
  for step in steps:
    checkpointing.save(manager, step, {**variables, "step": np.int64(step)}, spec)
  return manager


def test_command_line_pruning_of_a_checkpoint_restores_and_evaluates_without_the_original(tmp_path, capsys):
  spec = {"name": "cifar_vgg16", "num_classes": 10, "norm": "bounded", "overrides": {"width_multiplier": 0.125}}
  model = model_from_spec(spec)
  variables, alive = recede(model, trained_looking(model))
  _save_run(tmp_path / "run", model, spec, variables)
  from receding_jax.prune_checkpoint import main

  main(["--checkpoint_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "pruned"), "--threshold", "0.0",
        "--min_channels", "1"])
  printed = capsys.readouterr().out
  assert "| parameters |" in printed and "| MACs (one input) |" in printed
  report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
  # Where the time went: one line, compile apart from run, and the report's parts (read, prune, count, save).
  phase = next(line for line in printed.splitlines() if line.startswith("prune: "))
  assert "= compile " in phase and "+ run " in phase and "check " in phase
  assert set(report["seconds"]) == {"read", "analysis", "slicing", "check", "count", "save"}
  assert report["widths_after"] == [int(m.sum()) for m in alive.values()]
  assert report["source_step"] == 2 and report["params_after"] < report["params_before"]

  state, narrow_spec = checkpointing.restore(checkpointing.make_manager(tmp_path / "pruned", create=False))
  narrow_model = model_specs.build_model(narrow_spec)
  assert "pruned" in narrow_spec and "widths" not in narrow_spec["overrides"]  # Widths by path, in JSON.
  narrow_variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  assert list(pruning.group_widths(narrow_model, narrow_variables).values()) == report["widths_after"]
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  narrow = narrow_model.apply(narrow_variables, x)
  np.testing.assert_allclose(narrow, model.apply(variables, x), rtol=1e-4, atol=1e-5)
  assert pruning.count_macs(narrow_model) == report["macs_after"]
  assert report["removed_fraction"] == 1 - sum(report["widths_after"]) / sum(report["widths_before"])


def test_checkpoint_pruning_refuses_bad_input_before_writing(tmp_path):
  spec = {"name": "cifar_resnet20", "num_classes": 10, "overrides": {"width_multiplier": 0.5}}
  model = model_from_spec(spec)
  _save_run(tmp_path / "run", model, spec, trained_looking(model), steps=(3,))
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="busy"):
    prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "busy"), ratio=0.5)
  assert os.listdir(tmp_path / "busy") == ["keep.txt"]
  with pytest.raises(FileNotFoundError, match="missing"):
    prune_checkpoint(str(tmp_path / "missing"), str(tmp_path / "out"), ratio=0.5)
  with pytest.raises(FileNotFoundError, match="step 7"):
    prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), step=7, ratio=0.5)
  with pytest.raises(ValueError, match=r"1\.2"):
    prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), ratio=1.2)
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
  # A damaged checkpoint is reported as such, naming the step.
  step_dir = tmp_path / "run" / "3" / "state"
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(ValueError, match="step 3"):
    prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "out2"), ratio=0.5)


def test_checkpoint_pruning_command_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
  from receding_jax.prune_checkpoint import main

  spec = {"name": "cifar_resnet20", "num_classes": 10, "overrides": {"width_multiplier": 0.25}}
  model = model_from_spec(spec)
  _save_run(tmp_path / "run", model, spec, trained_looking(model), steps=(3,))
  manifest = tmp_path / "run" / "3" / "state" / "manifest.ocdbt"
  manifest.write_bytes(manifest.read_bytes()[:10])
  with pytest.raises(SystemExit) as exit_info:
    main(["--checkpoint_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "out"), "--ratio", "0.5"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
      f"error: checkpoint step 3 in {tmp_path / 'run'} is damaged: a truncated or corrupt file ({manifest}: ")
  assert not (tmp_path / "out").exists()


def test_report_table_shows_ratios_and_reads_reports_from_before_the_macs_rename():
  report = {"params_before": 100, "params_after": 40, "macs_before": 1000, "macs_after": 250,
            "widths_before": [8, 8], "widths_after": [4, 3]}
  table = format_report(report)
  assert "| parameters | 100 | 40 | 0.400 |" in table
  assert "| MACs (one input) | 1,000 | 250 | 0.250 |" in table
  old = {k.replace("macs_", "flops_"): v for k, v in report.items()}  # A pruning_report.json of an older run.
  assert format_report(old) == table
  results = {"trained": {"test_accuracy": 0.9}, "ratios": {"0.5": {"pruned": {"report": old}, "finetuned": {}}}}
  assert "| 40/100 | 0.250 |" in results_table(results)  # results.md re-printed from an older results.json.


def test_channel_multiple_rounds_kept_widths_up_with_the_next_most_important_channels():
  model = get_model("cifar_resnet20", 10)  # Inner widths 16/32/64.
  variables = trained_looking(model)
  imps = pruning.group_importances(model, variables)
  plain = pruning.channel_masks(model, variables, 0.6)
  rounded = pruning.channel_masks(model, variables, 0.6, channel_multiple=8)
  for name, mask in rounded.items():
    kept, before = int(mask.sum()), int(plain[name].sum())
    assert kept % 8 == 0 or kept == mask.size
    assert before <= kept < before + 8
    assert np.all(mask[plain[name]])  # Everything kept before is still kept ...
    added = mask & ~plain[name]
    if added.any():  # ... and the additions are the most important of the rest.
      assert imps[name][added].min() >= imps[name][~mask].max(initial=-np.inf)
  with pytest.raises(ValueError, match="channel_multiple"):
    pruning.channel_masks(model, variables, 0.6, channel_multiple=0)


USER_MODEL = '''
import flax.linen as nn
from receding_jax import BoundedScaleNorm


class TinyNet(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(BoundedScaleNorm(use_running_average=not train, name="n1")(nn.Conv(self.width, (3, 3), name="c1")(x)))
    x = nn.relu(BoundedScaleNorm(use_running_average=not train, name="n2")(nn.Conv(self.width, (3, 3), name="c2")(x)))
    return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def make_net():
  return TinyNet()
'''


def test_command_line_prunes_a_model_named_by_its_factory_and_the_result_reloads(tmp_path, monkeypatch, capsys):
  (tmp_path / "user_nets.py").write_text(USER_MODEL)
  monkeypatch.syspath_prepend(str(tmp_path))
  from receding_jax.prune_checkpoint import main
  from receding_jax.training.model_specs import build_model, import_factory

  model = import_factory("user_nets:make_net")()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  variables = jax.tree.map(np.array, model.init(jax.random.key(1), x))
  variables["params"]["n1"]["scale_logit"][:3] = -1e4  # Three channels receded to importance 0.
  _save_run(tmp_path / "run", model, {}, variables)
  with pytest.raises(SystemExit):  # A factory that cannot be imported: one line, nothing written.
    main(["--checkpoint_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "bad"), "--threshold", "0.01",
          "--model", "user_nets:missing", "--input_shape", "6,6,2"])
  assert "cannot import the model factory 'user_nets:missing'" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()
  main(["--checkpoint_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "pruned"), "--threshold", "0.01",
        "--model", "user_nets:make_net", "--input_shape", "6,6,2"])
  report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
  assert report["groups"] == ["n1", "n2"] and report["widths_after"][0] == 5
  state, spec = checkpointing.restore(checkpointing.make_manager(tmp_path / "pruned", create=False))
  assert spec == {"factory": "user_nets:make_net", "input_shape": [6, 6, 2], "pruned": {"c1": {"features": 5}}}
  narrow = build_model(spec)
  narrow_variables = {k: state[k] for k in ("params", "batch_stats")}
  np.testing.assert_allclose(narrow.apply(narrow_variables, x), model.apply(variables, x), rtol=1e-5, atol=1e-6)


def _lax_program(x, w, g, idx):
  """Primitives the check's host evaluation covers, with the parameters that change their semantics."""
  dn = ("NHWC", "HWIO", "NHWC")
  a = jax.lax.conv_general_dilated(x, w, (2, 1), ((1, 2), (0, 1)), rhs_dilation=(2, 1), dimension_numbers=dn)
  b = jax.lax.conv_general_dilated(x, g, (1, 1), ((1, 1), (2, 0)), lhs_dilation=(2, 2), feature_group_count=2,
                                   dimension_numbers=dn)
  c = jax.lax.conv_general_dilated(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), "VALID")
  pooled = nn.avg_pool(b, (3, 3), (2, 2), "SAME") + nn.max_pool(b, (2, 2), (2, 2), "SAME")
  padded = jax.lax.pad(x, 0.5, ((1, -1, 1), (0, 2, 0), (-1, 1, 2), (0, 0, 0)))[:, ::2, 1:, :]
  attention = nn.softmax(jnp.einsum("bqc,bkc->bqk", a.reshape(1, -1, 6), c.reshape(1, -1, 6))[:, :5, :7])
  left, right = jnp.split(padded, [1], axis=-1)
  window = jax.lax.dynamic_update_slice(jax.lax.dynamic_slice(b, (0, idx, 1, 0), (1, 3, 3, 4)), left[:, :2, :2],
                                        (0, idx, 0, 0))
  ints = jnp.arange(-7, 8) // 3 + jax.lax.rem(jnp.arange(-7, 8), 4) + jnp.argmax(attention, -1).sum()
  return (nn.gelu(jnp.clip(pooled, -1.0, 1.0)), jnp.where(right > 0.3, right, -right).sum((1, 2)), attention,
          window.max(), jnp.concatenate([a.ravel(), c.ravel()]).min(), ints, jax.nn.logsumexp(c, axis=(1, 2)))


def test_the_checks_host_evaluation_computes_what_xla_computes():
  rng = np.random.default_rng(0)
  args = (rng.normal(size=(1, 7, 6, 4)).astype(np.float32), rng.normal(size=(3, 2, 4, 6)).astype(np.float32),
          rng.normal(size=(3, 3, 2, 4)).astype(np.float32), np.int32(20))  # 20 is clamped into range.
  expected = jax.tree.leaves(jax.jit(_lax_program)(*args))
  got = pruning.checking.evaluate(jax.make_jaxpr(_lax_program)(*args), *args)
  for e, g in zip(expected, got, strict=True):
    assert g.dtype == e.dtype and g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5)
  for name in SMALL:  # Every zoo model, in the CPU formulation (the CIFAR VGG's small maps: patches and matmul).
    model = get_model(name, 10, cpu_friendly=True, **SMALL[name])
    variables = trained_looking(model)
    x = rng.normal(size=(2, *model.input_shape)).astype(np.float32)
    closed = jax.make_jaxpr(lambda v, x, model=model: model.apply(v, x))(variables, x)
    (got,) = pruning.checking.evaluate(closed, *jax.tree.leaves(variables), x)
    with jax.default_matmul_precision("highest"):
      expected = model.apply(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
  with pytest.raises(pruning.checking.Unsupported, match="bfloat16"):  # Left to XLA.
    pruning.checking.evaluate(jax.make_jaxpr(lambda x: x * 2)(jnp.ones(3, jnp.bfloat16)), np.ones(3, jnp.bfloat16))


def wrong_slicing(slice_tree):
  """`slicing.slice_tree` that keeps the right number of entries of the first sliced leaf, in the wrong order."""
  def wrong(tree, coupling, keep):
    wide, (leaves, treedef) = jax.tree.leaves(tree), jax.tree.flatten(slice_tree(tree, coupling, keep))
    i = next(i for i, (a, b) in enumerate(zip(wide, leaves, strict=True)) if np.shape(a) != np.shape(b))
    axis = next(d for d, (m, n) in enumerate(zip(np.shape(wide[i]), np.shape(leaves[i]), strict=True)) if m != n)
    leaves[i] = np.roll(np.asarray(leaves[i]), 1, axis=axis)
    return jax.tree.unflatten(treedef, leaves)
  return wrong


@pytest.mark.parametrize("evaluation", ["host", "xla"])
def test_the_check_refuses_a_wrong_slicing_or_rebuild(monkeypatch, evaluation):
  if evaluation == "xla":  # As for a model with a primitive the host evaluation does not cover.
    monkeypatch.setattr(pruning.checking, "evaluate", mock_unsupported)
  model = get_model("cifar_resnet20", 10, width_multiplier=0.5)
  variables = trained_looking(model)
  narrow_model, narrow_variables = prune_params(model, variables, 0.5)  # Right: passes.
  with monkeypatch.context() as patch:
    patch.setattr(pruning.api.slicing, "slice_tree", wrong_slicing(pruning.slicing.slice_tree))
    with pytest.raises(ValueError, match=r"differ .* by [0-9.e+-]+: the pruning of modules .* is not exact"):
      prune_params(model, variables, 0.5)
  with monkeypatch.context() as patch:  # One narrowed conv keeps its wide width: its kernel does not fit.
    overrides = pruning.rebuild.linen_overrides
    patch.setattr(pruning.rebuild, "linen_overrides", lambda *a: dict(list(overrides(*a).items())[1:]))
    with pytest.raises(ValueError, match=r"the narrow model does not run: .*shape"):
      prune_params(model, variables, 0.5)
  assert pruning.group_widths(narrow_model, narrow_variables) != pruning.group_widths(model, variables)


def mock_unsupported(*args):
  raise pruning.checking.Unsupported("mocked")


def test_the_check_runs_the_narrow_model_with_the_apply_kwargs():
  class Scaled(nn.Module):  # `gain` is no eval-mode flag: only apply_kwargs sets it.
    @nn.compact
    def __call__(self, x, gain=1.0):
      x = nn.relu(rj.BoundedScaleNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
      return nn.Dense(2)(x.mean((1, 2)) * gain)

  model, x = Scaled(), jnp.ones((1, 6, 6, 3))
  variables = trained_looking_from(model.init(jax.random.key(0), x))
  narrow_model, narrow = prune_params(model, variables, 0.5, inputs=x, apply_kwargs={"gain": 3.0})
  assert narrow["params"]["Conv_0"]["kernel"].shape[-1] == 4
  at = lambda gain: np.asarray(narrow_model.apply(narrow, x, gain=gain))
  assert np.all(np.isfinite(at(1.0)))  # Positive running variances: the check compared real numbers.
  np.testing.assert_allclose(at(3.0) - at(0.0), 3.0 * (at(1.0) - at(0.0)), rtol=1e-4, atol=1e-5)  # The bias.


def trained_looking_from(variables, seed=0):
  """Random variables of the shapes of `variables`; running variances positive (a negative one makes every
  output NaN, and a check would then compare nothing)."""
  rng = np.random.default_rng(seed)

  def fill(path, v):
    if getattr(path[-1], "key", None) == "var":
      return rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
    return rng.normal(size=v.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)


def test_a_narrow_linen_model_checks_parameter_shapes_without_tracing_initializers():
  calls = []

  def counted(key, shape, dtype=jnp.float32):
    calls.append(tuple(shape))
    return jax.random.normal(key, shape, dtype) * 0.1

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = rj.BoundedScaleNorm(use_running_average=True)(nn.Conv(8, (3, 3), kernel_init=counted)(x))
      return nn.Dense(2, kernel_init=counted)(nn.relu(x).mean((1, 2)))

  model, x = Net(), jnp.ones((1, 6, 6, 3))
  variables = trained_looking_from(model.init(jax.random.key(0), x))
  narrow_model, narrow = prune_params(model, variables, 0.5, inputs=x)
  calls.clear()
  model.apply(variables, x)
  assert calls == [(3, 3, 3, 8), (8, 2)]  # flax traces each initializer to check the shapes it holds.
  calls.clear()
  assert narrow_model.apply(narrow, x).shape == (1, 2) and calls == []
  with pytest.raises(flax.errors.ScopeParamShapeError):  # Checked all the same.
    narrow_model.apply(variables, x)
  assert narrow_model.init(jax.random.key(0), x)["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 4)


def test_importances_of_host_variables_are_computed_on_the_host_as_in_jax():
  model = get_model("cifar_resnet20", 10, width_multiplier=0.5)
  variables = trained_looking(model)
  variables["params"]["stage0_block0"]["norm1"]["scale_logit"][:4] = [-1e4, -95.0, 1e4, 0.0]
  host = rj.neuron_importances(variables)
  device = rj.neuron_importances(jax.tree.map(jnp.asarray, variables))
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in host.values())
  for name, value in device.items():  # Within a few ulp of XLA's float32 sigmoid.
    np.testing.assert_allclose(host[name], value, rtol=5e-7, atol=0)
  # sigmoid(-95) is subnormal: XLA flushes it to zero, and so does the host.
  assert host["stage0_block0/norm1"][:4].tolist() == device["stage0_block0/norm1"][:4].tolist() == [0, 0, 1, 0.5]


def test_the_check_compares_infinities_and_skips_what_the_reference_leaves_undefined():
  difference = pruning.checking._difference
  assert difference(np.array([np.inf, 1.0, 5.0]), np.array([np.inf, np.nan, 5.0])) == 0.0
  assert difference(np.array([np.nan, 1.0]), np.array([2.0, 1.0])) == np.inf
  assert difference(np.array([-np.inf, 0.0]), np.array([np.inf, 0.0])) == np.inf
  assert difference(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == 0.5


def test_best_step_is_the_logged_best_validation_accuracy_else_the_newest_and_says_why(tmp_path, capsys):
  from receding_jax.prune_checkpoint import main
  from receding_jax.training.evaluation import choose_step

  spec = {"name": "cifar_vgg16", "num_classes": 10, "norm": "bounded", "overrides": {"width_multiplier": 0.125}}
  model = model_from_spec(spec)
  _save_run(tmp_path / "checkpoints", model, spec, recede(model, trained_looking(model))[0], steps=(1, 2, 3))
  step, why = choose_step(tmp_path / "checkpoints", "best")  # No metrics.jsonl: the newest, and why.
  assert step == 3 and "recorded no validation accuracy" in why and "falls back to the latest" in why
  lines = [{"epoch": e, "step": e, "validation_accuracy": a} for e, a in ((1, 0.9), (2, 0.75), (3, 0.5))]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  assert choose_step(tmp_path / "checkpoints", "latest")[0] == 3
  main(["--checkpoint_dir", str(tmp_path / "checkpoints"), "--output_dir", str(tmp_path / "pruned"), "--ratio", "0.5"])
  printed = capsys.readouterr().out  # Step 1 (the best logged) is no longer kept: the manager keeps the last 2.
  assert (f"pruning step 2 of {tmp_path / 'checkpoints'}: the best validation accuracy (0.7500, epoch 2) among kept "
          "steps [2, 3]") in printed
  assert json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())["source_step"] == 2
