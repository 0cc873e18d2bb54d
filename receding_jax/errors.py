"""The one error class that means "fix your input", so that callers can tell it from a bug.

A mistake in what the caller gave (a config value, a path, a checkpoint, a model the pruner cannot handle)
raises a subclass of `InputError`, a ValueError, naming the bad value. The command lines
(`receding_jax.main`, `prune_checkpoint`, `export`) print exactly these in one line, ``error: ...``, and
exit with status 2; every other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """A mistake in the caller's input that they can fix; the message names the bad value."""
