"""The one-minute demo's refusal without scikit-learn (its training is exercised by hand: it takes a minute)."""

import sys

import pytest

from receding_jax import demo


def test_the_demo_without_scikit_learn_says_what_to_install_in_one_line(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now raises ImportError.
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  with pytest.raises(SystemExit) as exit_info:
    demo.main(steps=1)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  error = captured.err.strip()
  assert error.count("\n") == 0 and error.startswith("error: ") and "pip install scikit-learn" in error
  assert "[train]" in error and captured.out == ""
