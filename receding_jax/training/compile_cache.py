"""JAX's persistent compilation cache for runs: compile each program once per machine, not once per process.

A rerun, a resume, a fine-tune of the same pruned widths and every process of a multi-process run find
what an earlier process compiled (XLA executables, keyed by the program, the compile options and the
devices) instead of compiling it again. ``config.compilation_cache_dir``: 'auto' (the default) is
``$XDG_CACHE_HOME/receding_jax/jax_compilation_cache`` (``~/.cache/...`` without XDG_CACHE_HOME); any other
path (local or gs://) is used as given; '' turns the cache off. A directory the user set for JAX itself
(``JAX_COMPILATION_CACHE_DIR``, or ``jax.config``) wins over the config. Clearing it is deleting the folder.
"""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

#: Programs that compile faster than this are not written to the cache (reading one back costs ~ms; jax's
#: default, 1 s, would leave out the evaluation and init programs, 0.2-1 s each on CPU).
MIN_COMPILE_SECONDS = 0.1
_MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def default_dir() -> pathlib.Path:
  """The 'auto' cache folder: ``$XDG_CACHE_HOME/receding_jax/jax_compilation_cache`` (or ``~/.cache/...``)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "receding_jax" / "jax_compilation_cache"


def resolve_dir(setting: str) -> str | None:
  """The folder `setting` (a config's ``compilation_cache_dir``) names: None for '' (off)."""
  if not setting:
    return None
  return os.fspath(default_dir()) if setting == "auto" else os.path.expanduser(setting)


def enable(config: ml_collections.ConfigDict) -> str | None:
  """Points JAX's persistent cache at the config's folder (see the module doc); returns the folder in use,
  or None when the cache is off. Call before the run compiles anything."""
  user_dir = jax.config.jax_compilation_cache_dir
  if user_dir:  # The user's own setting (JAX_COMPILATION_CACHE_DIR or jax.config) wins.
    return user_dir
  folder = resolve_dir(config.compilation_cache_dir)
  if folder is None:
    return None
  if "://" not in folder:
    os.makedirs(folder, exist_ok=True)
  if _MIN_COMPILE_ENV not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  compilation_cache.set_cache_dir(folder)
  compilation_cache.reset_cache()  # A process that compiled before now looks there too.
  return folder
