"""Export for deployment without TensorFlow: norm folding, StableHLO files, the command, bad requests.

The TFLite half needs the [export] extra and lives in test_export_litert.py (marked ``export``).
"""

import importlib.util
import json
import os
import re
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from receding_jax import BoundedScaleNorm, NnxBoundedScaleNorm, deploy, prune_params
from receding_jax.deploy import litert, stablehlo
from receding_jax.export import main as export_main
from receding_jax.training import augment, checkpointing, model_specs
from receding_jax.training.pruned_checkpoint import prune_checkpoint


class Net(nn.Module):
  """Norms after a conv without bias, a conv with bias, a dense layer, and one after a ReLU (no fold)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.relu(BoundedScaleNorm(use_running_average=not train)(x))
    x = nn.Conv(6, (3, 3), strides=2)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = BoundedScaleNorm(use_running_average=not train, name="after_relu")(x).mean((1, 2))
    return nn.BatchNorm(use_running_average=not train)(nn.Dense(5)(x))


class Residual(nn.Module):
  """A conv whose output a norm reads and a residual add reads too: folding it would change the add."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(3, (3, 3))(x)
    return (BoundedScaleNorm(use_running_average=not train)(y) + y).mean((1, 2))


EXAMPLE = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)


def trained_looking(model, shape=(2, 8, 8, 3), seed=0):
  """Variables with random weights and running statistics far from init (so folding has work to do)."""
  variables = model.init(jax.random.key(seed), jnp.zeros(shape))
  rng = np.random.default_rng(seed)
  def perturb(path, leaf):
    if path[-1].key == "var":
      return rng.uniform(0.2, 3.0, leaf.shape).astype(np.float32)
    return (np.asarray(leaf) + rng.normal(0, 0.5, leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(perturb, variables)


def test_each_norm_after_a_layer_folds_into_it_and_the_others_say_why_not():
  variables = trained_looking(Net())
  found = deploy.find_folds(Net(), variables, (jnp.zeros((1, 8, 8, 3)),), {"train": False})
  assert {f.norm: f.layer for f in found.folds} == {
      ("BoundedScaleNorm_0",): ("Conv_0",), ("BatchNorm_0",): ("Conv_1",), ("BatchNorm_1",): ("Dense_0",)}
  assert list(found.unfolded) == [("after_relu",)] and "not the output" in found.unfolded[("after_relu",)]
  # The bounded norm's slope is sigmoid(logit) / sqrt(var + eps), as the module computes it.
  norm = variables["params"]["BoundedScaleNorm_0"]["scale_logit"]
  var = variables["batch_stats"]["BoundedScaleNorm_0"]["var"]
  np.testing.assert_allclose(found.folds[0].scale, jax.nn.sigmoid(norm) / np.sqrt(var + 1e-5), rtol=1e-5)


def test_the_folded_network_computes_the_same_without_the_folded_norms_maths():
  model, variables = Net(), trained_looking(Net())
  found = deploy.find_folds(model, variables, (jnp.zeros((1, 8, 8, 3)),), {"train": False})
  infer = deploy.folded_function(model, variables, found, {"train": False})
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  np.testing.assert_allclose(infer(x), model.apply(variables, x), rtol=1e-5, atol=1e-5)
  def primitives(fn):
    return [str(e.primitive) for e in jax.make_jaxpr(fn)(x).eqns]
  unfolded = primitives(lambda v: model.apply(variables, v))
  folded = primitives(infer)
  assert unfolded.count("rsqrt") == 4 and folded.count("rsqrt") == 1  # Only the norm after the ReLU is left.
  assert unfolded.count("logistic") == 2 and folded.count("logistic") == 1


def test_a_layer_output_with_another_reader_is_exported_unfolded(tmp_path):
  model = Residual()
  variables = trained_looking(model)
  report = deploy.export_model(model, variables, tmp_path / "out", formats=("stablehlo",), inputs=EXAMPLE)
  assert report["folding"]["folded"] == {}
  assert "another reader" in report["folding"]["unfolded"]["BoundedScaleNorm_0"]
  assert report["files"]["model.stablehlo"]["relative_error"] <= deploy.TOLERANCE


def test_the_stablehlo_file_runs_any_batch_size_and_matches_the_model(tmp_path):
  model, variables = Net(), trained_looking(Net())
  report = deploy.export_model(model, variables, tmp_path / "out", formats=("stablehlo",), inputs=EXAMPLE)
  assert sorted(os.listdir(tmp_path)) == ["out"]  # No staging folder left beside it.
  assert sorted(os.listdir(tmp_path / "out")) == ["export_report.json", "model.stablehlo"]
  assert json.loads((tmp_path / "out" / "export_report.json").read_text()) == report
  exported = jax.export.deserialize(bytearray((tmp_path / "out" / "model.stablehlo").read_bytes()))
  assert set(exported.platforms) == set(stablehlo.PLATFORMS)
  for batch in (1, 5):
    x = jax.random.normal(jax.random.key(batch), (batch, 8, 8, 3))
    np.testing.assert_allclose(exported.call(x), model.apply(variables, x), rtol=1e-5, atol=1e-5)
  assert report["input_shape"] == [8, 8, 3] and len(report["folding"]["folded"]) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"formats": ("onnx",)}, "unknown export format in onnx"),
    ({"formats": ()}, "unknown export format"),
    ({"formats": ("stablehlo",), "quantize": ("float16",)}, "applies to the tflite format"),
    ({"formats": ("tflite",), "quantize": ("int4",)}, "unknown quantization in int4"),
    ({"formats": ("stablehlo",), "tflite_batch": 0}, "tflite_batch must be a positive int, got 0"),
])
def test_bad_requests_are_refused_before_anything_is_written(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    deploy.export_model(Net(), trained_looking(Net()), tmp_path / "out", inputs=jnp.zeros((1, 8, 8, 3)), **kwargs)
  assert os.listdir(tmp_path) == []


def test_an_existing_output_folder_is_never_touched(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="exists"):
    deploy.export_model(Net(), trained_looking(Net()), tmp_path / "out", formats=("stablehlo",),
                        inputs=jnp.zeros((1, 8, 8, 3)))
  assert os.listdir(tmp_path / "out") == ["keep.txt"]


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here")
def test_tflite_without_the_export_extra_says_what_to_install(tmp_path):
  with pytest.raises(deploy.MissingExportTools, match=r"pip install -e '\.\[export\]'"):
    deploy.export_model(Net(), trained_looking(Net()), tmp_path / "out", inputs=jnp.zeros((1, 8, 8, 3)))
  assert os.listdir(tmp_path) == []


SPEC = {"name": "cifar_resnet20", "num_classes": 10, "norm": "bounded", "overrides": {"width_multiplier": 0.25}}


def save_run(directory, saved_spec=SPEC):
  """A one-step run of the zoo model `SPEC` with trained-looking variables, saved with `saved_spec`."""
  variables = trained_looking(model_specs.build_model(SPEC), (1, 32, 32, 3))
  manager = checkpointing.make_manager(directory)
  checkpointing.save(manager, 3, {**variables, "step": np.int64(3)}, saved_spec)
  manager.close()
  return variables


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A zoo run, its 50% pruned checkpoint, and a run whose spec names no model."""
  root = tmp_path_factory.mktemp("runs")
  save_run(root / "run")
  save_run(root / "odd", {**SPEC, "name": "resnet_unknown"})
  prune_checkpoint(root / "run", root / "pruned", ratio=0.5)
  return root


def test_the_command_exports_a_pruned_checkpoint_that_matches_it(runs, tmp_path, capsys):
  export_main(["--checkpoint_dir", str(runs / "pruned"), "--output_dir", str(tmp_path / "deploy"),
               "--format", "stablehlo"])
  assert "model.stablehlo" in capsys.readouterr().out
  state, spec = checkpointing.restore(checkpointing.make_manager(runs / "pruned", create=False))
  narrow = model_specs.build_model(spec)
  report = json.loads((tmp_path / "deploy" / "export_report.json").read_text())
  assert report["model_spec"]["pruned"] == spec["pruned"] and report["source_step"] == 0
  assert len(report["folding"]["folded"]) == 19 and not report["folding"]["unfolded"]  # Every norm of ResNet-20.
  # No config.json beside or above the checkpoint, no --mean/--std: the report says what it cannot know.
  assert report["preprocessing"]["normalisation"] == "unknown" and report["preprocessing"]["input_dtype"] == "float32"
  assert report["preprocessing"]["num_classes"] == 10 and report["preprocessing"]["input_shape"] == [32, 32, 3]
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  expected = narrow.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, x)
  got = stablehlo.run_stablehlo((tmp_path / "deploy" / "model.stablehlo").read_bytes(), x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint_dir", "{runs}/missing", "--output_dir", "{tmp}/out", "--format", "stablehlo"],
     "checkpoint_dir .*missing does not exist"),
    (["--checkpoint_dir", "{runs}/run", "--output_dir", "{runs}/pruned"], "exists; refusing to overwrite"),
    (["--checkpoint_dir", "{runs}/run", "--output_dir", "{tmp}/out", "--format", "onnx"], "unknown export format"),
    (["--checkpoint_dir", "{runs}/odd", "--output_dir", "{tmp}/out", "--format", "stablehlo"],
     "unknown model 'resnet_unknown'"),
    (["--checkpoint_dir", "{runs}/run", "--output_dir", "{tmp}/out", "--format", "stablehlo",
      "--include_preprocessing"], "include_preprocessing needs the normalisation.*pass --mean and --std"),
    (["--checkpoint_dir", "{runs}/run", "--output_dir", "{tmp}/out", "--format", "stablehlo", "--mean", "0.5"],
     "give both --mean and --std"),
    (["--checkpoint_dir", "{runs}/run", "--output_dir", "{tmp}/out", "--format", "stablehlo", "--mean", "0.5,0.5",
      "--std", "0.2,0.2"], r"mean \(0.5, 0.5\) has 2 values; the model's input has 3 channels"),
])
def test_the_command_refuses_bad_input_in_one_line_before_writing(runs, tmp_path, capsys, argv, message):
  before = sorted(os.listdir(tmp_path)), sorted(os.listdir(runs / "pruned"))
  with pytest.raises(SystemExit) as exit_info:
    export_main([a.format(tmp=tmp_path, runs=runs) for a in argv])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip()
  assert error.count("\n") == 0 and error.startswith("error: ")
  assert re.search(message, error), error
  assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(runs / "pruned"))) == before


def test_the_command_folds_the_runs_normalisation_into_a_model_of_raw_uint8_images(runs, tmp_path, capsys):
  workdir = tmp_path / "work"  # A run's layout: WORKDIR/config.json, WORKDIR/pruned_0.5/pruned.
  shutil.copytree(runs / "pruned", workdir / "pruned_0.5" / "pruned")
  dataset = {"image_size": 32, "augment": "none", "mean": [0.3, 0.45, 0.5], "std": [0.4, 0.25, 0.2]}
  (workdir / "config.json").write_text(json.dumps({"seed": 0, "dataset": dataset}))
  export_main(["--checkpoint_dir", str(workdir / "pruned_0.5" / "pruned"), "--output_dir", str(tmp_path / "deploy"),
               "--format", "stablehlo", "--include_preprocessing"])
  assert "raw uint8 pixels" in capsys.readouterr().out
  report = json.loads((tmp_path / "deploy" / "export_report.json").read_text())
  assert report["preprocessing"]["normalisation"] == {
      "mean": [0.3, 0.45, 0.5], "std": [0.4, 0.25, 0.2], "source": str(workdir / "config.json")}
  assert report["preprocessing"]["input_dtype"] == "uint8" and report["preprocessing"]["included"]
  exported = jax.export.deserialize(bytearray((tmp_path / "deploy" / "model.stablehlo").read_bytes()))
  assert exported.in_avals[0].dtype == jnp.uint8
  raw = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  pipeline = augment.Preprocessing.from_config(ml_collections.ConfigDict({"dataset": dataset}))
  state, spec = checkpointing.restore(checkpointing.make_manager(runs / "pruned", create=False))
  expected = model_specs.build_model(spec).apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                                                 pipeline.normalize(raw))
  np.testing.assert_allclose(exported.call(raw), expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))


def test_a_missing_converter_points_to_the_stablehlo_format(runs, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # As without the [export] extra.
  with pytest.raises(SystemExit) as exit_info:
    export_main(["--checkpoint_dir", str(runs / "run"), "--output_dir", str(tmp_path / "out")])
  error = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and error.count("\n") == 0 and "--format=stablehlo" in error
  assert os.listdir(tmp_path) == []


@pytest.mark.export
def test_tflite_export_of_a_pruned_checkpoint_runs_in_litert_with_builtin_ops_only(runs, tmp_path, capfd):
  from ai_edge_litert.interpreter import Interpreter

  export_main(["--checkpoint_dir", str(runs / "pruned"), "--output_dir", str(tmp_path / "pruned"), "--format",
               "tflite", "--quantize", "float16,int8", "--tflite_batch", "2"])
  export_main(["--checkpoint_dir", str(runs / "run"), "--output_dir", str(tmp_path / "full"), "--format", "tflite",
               "--include_preprocessing", "--mean", "0.5", "--std", "0.25"])
  assert capfd.readouterr().err == ""  # No converter or TensorFlow log lines.
  full = json.loads((tmp_path / "full" / "export_report.json").read_text())
  assert full["preprocessing"]["normalisation"] == {"mean": [0.5], "std": [0.25], "source": "given (--mean, --std)"}
  assert full["files"]["model.tflite"]["held_to_tolerance"]  # Verified on uint8 images against the JAX model.
  full_input = Interpreter(model_path=str(tmp_path / "full" / "model.tflite")).get_input_details()[0]
  assert full_input["dtype"] == np.uint8 and list(full_input["shape"]) == [1, 32, 32, 3]
  report = json.loads((tmp_path / "pruned" / "export_report.json").read_text())
  assert sorted(report["files"]) == ["model.tflite", "model_float16.tflite", "model_int8.tflite"]
  main = report["files"]["model.tflite"]
  assert main["held_to_tolerance"] and main["relative_error"] <= deploy.TOLERANCE
  assert main["operators"]["CONV_2D"] == 19 and not litert.non_builtin(list(main["operators"]))
  sizes = {name: (tmp_path / "pruned" / name).stat().st_size for name in report["files"]}
  assert sizes["model_float16.tflite"] < 0.9 * sizes["model.tflite"]  # Small layers keep float32 biases.
  assert sizes["model.tflite"] < 0.8 * (tmp_path / "full" / "model.tflite").stat().st_size

  interpreter = Interpreter(model_path=str(tmp_path / "pruned" / "model.tflite"), num_threads=2)
  interpreter.allocate_tensors()
  source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  assert list(source["shape"]) == [2, 32, 32, 3]
  x = np.random.default_rng(7).normal(size=(2, 32, 32, 3)).astype(np.float32)
  interpreter.set_tensor(source["index"], x)
  interpreter.invoke()
  state, spec = checkpointing.restore(checkpointing.make_manager(runs / "pruned", create=False))
  expected = model_specs.build_model(spec).apply({"params": state["params"], "batch_stats": state["batch_stats"]}, x)
  scale = float(np.abs(expected).max())
  np.testing.assert_allclose(interpreter.get_tensor(target["index"]), expected, rtol=0, atol=deploy.TOLERANCE * scale)



class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = NnxBoundedScaleNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.conv(x))).mean((1, 2)))


def test_a_pruned_nnx_model_exports_in_eval_mode_and_stays_untouched(tmp_path):
  model = NnxNet(nnx.Rngs(0))
  model.norm.mean[...] = jnp.linspace(-1.0, 1.0, 8)  # Running statistics far from a batch's own.
  narrow, _ = prune_params(model, None, 0.5, inputs=EXAMPLE)
  report = deploy.export_model(narrow, None, tmp_path / "out", formats=("stablehlo",), inputs=EXAMPLE)
  assert not narrow.norm.use_running_average  # The export ran on a copy.
  exported = jax.export.deserialize(bytearray((tmp_path / "out" / "model.stablehlo").read_bytes()))
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  narrow.eval()
  np.testing.assert_allclose(exported.call(x), narrow(x), rtol=1e-5, atol=1e-5)
  assert report["folding"]["folded"] == {} and "NNX" in report["folding"]["unfolded"]["*"]
