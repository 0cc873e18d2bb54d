"""The CPU training step's compile options (`receding_jax.cpu_compilation`): convolutions kept from YNNPACK."""

import re

import jax
import numpy as np
import pytest

from receding_jax import cpu_compilation
from receding_jax.models import get_model
from receding_jax.training import data, steps
from receding_jax.training.paper_configs import paper_config

WIDTH, BATCH = 0.5, 8  # The smallest ResNet-20 whose step XLA:CPU gives YNNPACK convolutions by default.


def ynn_convolutions(hlo_text: str) -> int:
  """How many `__ynn_fusion`s in a compiled module's text compute a convolution."""
  fused = re.findall(r'calls=(%[\w.\-]+), backend_config=\{"fusion_config":\{"kind":"__ynn_fusion"', hlo_text)
  bodies = {m[1]: m[2] for m in re.finditer(r"^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M)}
  return sum(" convolution(" in bodies[name] for name in fused)


def compiled_step(with_options: bool):
  """(trainer, initial state, batch, compiled train chunk text) for a half-width ResNet-20, batch 8. Without
  options: `XLA_FLAGS` names the option, so the trainer leaves it to the user (here: XLA's defaults, since
  the backend read its flags at start-up)."""
  with pytest.MonkeyPatch.context() as monkeypatch:
    if not with_options:
      monkeypatch.setenv("XLA_FLAGS", f"--{cpu_compilation.YNN_FUSION_OPTION}=LIBRARY_FUSION_TYPE_REDUCE")
    config = paper_config("cifar10", "cifar_resnet20", "rni")
    config.optim.batch_size, config.model.width_multiplier = BATCH, WIDTH
    model = get_model("cifar_resnet20", 10, "bounded", width_multiplier=WIDTH, input_shape=(32, 32, 3))
    trainer = steps.make_trainer(config, model, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  local = {"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, BATCH).astype(np.int32)}
  batch = data.as_chunk(local, trainer.mesh)
  state = trainer.init()
  return trainer, state, batch, trainer.train.lower(state, batch).compile().as_text()


@pytest.fixture(scope="module")
def steps_with_and_without_options():
  return compiled_step(True), compiled_step(False)


def test_the_cpu_train_step_keeps_convolutions_from_ynnpack(steps_with_and_without_options):
  (*_, with_options), (*_, without) = steps_with_and_without_options
  assert ynn_convolutions(without) > 0  # XLA's default does hand them over, so the check can fail.
  assert ynn_convolutions(with_options) == 0


def test_the_options_change_speed_not_results(steps_with_and_without_options):
  results = []
  for trainer, state, batch, _ in steps_with_and_without_options:
    new_state, metrics = trainer.train(jax.tree.map(np.array, state), batch)
    results.append((jax.device_get(new_state["params"]), float(metrics["loss"][-1])))
  (params, loss), (reference, reference_loss) = results
  assert loss == pytest.approx(reference_loss, rel=1e-5)
  moved = [np.abs(a - b).max() / (np.abs(b).max() + 1e-12) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(reference), strict=True)]
  assert max(moved) < 1e-4


def test_options_only_on_cpu_and_never_over_the_users_xla_flags(monkeypatch):
  assert cpu_compilation.training_compiler_options("cpu") == cpu_compilation.CPU_TRAINING_OPTIONS
  assert cpu_compilation.training_compiler_options("gpu") is None
  assert cpu_compilation.training_compiler_options("tpu") is None
  monkeypatch.setenv("XLA_FLAGS", f"--{cpu_compilation.YNN_FUSION_OPTION}= --xla_cpu_enable_fast_math=false")
  assert cpu_compilation.training_compiler_options("cpu") is None
