"""The command lines' two kinds of failure: a mistake in the input is one line and exit status 2, anything
else (a bug, in our code or in the user's model) keeps its traceback."""

import jax
import numpy as np
import pytest
from test_pruning import USER_MODEL, _save_run

from receding_jax.errors import InputError
from receding_jax.prune_checkpoint import main as prune_main
from receding_jax.training import model_specs

BROKEN_MODEL = USER_MODEL + '''

class Broken(TinyNet):
  def __call__(self, x, train=False):
    raise ValueError("a bug inside the user's model")


def make_broken():
  return Broken()
'''


@pytest.fixture
def user_run(tmp_path, monkeypatch):
  (tmp_path / "cli_error_nets.py").write_text(BROKEN_MODEL)
  monkeypatch.syspath_prepend(str(tmp_path))
  model = model_specs.import_factory("cli_error_nets:make_net")()
  variables = jax.tree.map(np.array, model.init(jax.random.key(1), np.zeros((1, 6, 6, 2), np.float32)))
  _save_run(tmp_path / "run", model, {}, variables)
  return tmp_path


def prune_args(root, *extra):
  return ["--checkpoint_dir", str(root / "run"), "--output_dir", str(root / "out"), "--input_shape", "6,6,2", *extra]


@pytest.mark.parametrize("extra, line", [
    (["--ratio", "1.5", "--model", "cli_error_nets:make_net"], "error: ratio must be a number in [0, 1), got 1.5"),
    (["--ratio", "0.5", "--model", "cli_error_nets:missing"],
     "error: cannot import the model factory 'cli_error_nets:missing'"),
    (["--ratio", "0.5", "--model", "cli_error_nets:make_net", "--step", "7"], "error: no checkpoint step 7 in "),
])
def test_prune_checkpoint_reports_bad_input_in_one_line_with_status_2_and_writes_nothing(user_run, capsys, extra, line):
  with pytest.raises(SystemExit) as exit_info:
    prune_main(prune_args(user_run, *extra))
  error = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and error.count("\n") == 0 and error.startswith(line), error
  assert not (user_run / "out").exists()


def test_prune_checkpoint_lets_a_bug_through_with_its_traceback_not_as_a_user_error(user_run, capsys):
  # A ValueError raised by the model's own code is not a mistake in the command's input: it must surface
  # as itself (a traceback, status 1), not as `error: ...` with status 2 that hides where it came from.
  with pytest.raises(ValueError, match="a bug inside the user's model") as raised:
    prune_main(prune_args(user_run, "--ratio", "0.5", "--model", "cli_error_nets:make_broken"))
  assert not isinstance(raised.value, InputError)
  assert "error:" not in capsys.readouterr().err and not (user_run / "out").exists()
