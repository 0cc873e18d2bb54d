"""Where a program's time goes: compiling (tracing, lowering, XLA) against running, from jax.monitoring.

JAX reports every trace, lowering and XLA compilation as a time span with the function's name. A `Clock`
collects the spans that start while it is open; its `compile_seconds` is the length of their union (a jit
traced inside another's trace is not counted twice), and `compiles` lists the XLA compilations by
function, persistent-cache hits marked (they go through the same path and take milliseconds).
`compile_counts()` counts XLA compilations by function name since the first `Clock` or `compile_counts()` of
this process.

    with compile_clock.Clock() as clock:
      train_step(state, batch)
    print(clock.seconds, clock.compile_seconds, clock.as_dict()["compiled"])

`timed(seconds, name)` adds a block's wall time to ``seconds[name]``: the parts of a phase (read, analysis,
slicing, check, ...) that reports record beside its compile and run time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

from jax import monitoring

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
COMPILE_EVENTS = (TRACE_EVENT, LOWER_EVENT, BACKEND_EVENT)


@dataclasses.dataclass(frozen=True)
class Compilation:
  """One XLA compilation: the jitted function's name, its wall time and whether it came from the cache."""

  name: str
  seconds: float
  cache_hit: bool


class Clock:
  """Wall time and compile time of what runs while it is open (a context manager; clocks may nest)."""

  def __init__(self) -> None:
    self.spans: list[tuple[str, str, float, float]] = []  # (event, function name, start, end), time.time().
    self.cache_hits: list[float] = []
    self.start = self.end = 0.0

  def __enter__(self) -> Clock:
    _install()
    self.start = time.time()
    with _LOCK:
      _OPEN.append(self)
    return self

  def __exit__(self, *exc: Any) -> None:
    self.end = time.time()
    with _LOCK:
      _OPEN.remove(self)

  @property
  def seconds(self) -> float:
    """Wall time while open (so far, if still open)."""
    return (self.end or time.time()) - self.start

  @property
  def compile_seconds(self) -> float:
    """Wall time spent tracing, lowering and compiling: the union of the compile spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted((s, e) for event, _, s, e in self.spans if event in COMPILE_EVENTS):
      if end > reach:
        total += end - max(start, reach)
        reach = end
    return total

  @property
  def run_seconds(self) -> float:
    """Wall time not spent compiling."""
    return max(self.seconds - self.compile_seconds, 0.0)

  @property
  def compiles(self) -> list[Compilation]:
    """The XLA compilations, in order."""
    out = []
    for event, name, start, end in self.spans:
      if event == BACKEND_EVENT:
        hit = any(start <= t <= end for t in self.cache_hits)
        out.append(Compilation(name, end - start, hit))
    return out

  def as_dict(self) -> dict[str, Any]:
    """{'seconds', 'compile_seconds', 'run_seconds', 'compiles', 'cache_hits', 'compiled': {name: XLA seconds},
    'compile_counts': {name: XLA compilations}}."""
    compiles = self.compiles
    compiled: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for c in compiles:
      compiled[short_name(c.name)] += c.seconds
      counts[short_name(c.name)] += 1
    return {"seconds": self.seconds, "compile_seconds": self.compile_seconds, "run_seconds": self.run_seconds,
            "compiles": len(compiles), "cache_hits": sum(c.cache_hit for c in compiles),
            "compiled": dict(compiled), "compile_counts": dict(counts)}


def short_name(name: str) -> str:
  """'jit(train_chunk)' -> 'train_chunk'."""
  return name[4:-1] if name.startswith("jit(") and name.endswith(")") else name


def compile_counts() -> collections.Counter:
  """XLA compilations (persistent-cache hits included) by short function name, since the first `Clock` or
  `compile_counts()` of this process."""
  _install()
  with _LOCK:
    return collections.Counter(_COUNTS)


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
  """Adds the wall time of the block to ``seconds[name]`` (nothing if it raises)."""
  start = time.perf_counter()
  yield
  seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


_LOCK = threading.Lock()
_OPEN: list[Clock] = []
_COUNTS: collections.Counter = collections.Counter()
_INSTALLED = False


def _on_span(event: str, start: float, end: float, **kwargs: Any) -> None:
  if event not in COMPILE_EVENTS:
    return
  name = str(kwargs.get("fun_name", "?"))
  with _LOCK:
    if event == BACKEND_EVENT:
      _COUNTS[short_name(name)] += 1
    for clock in _OPEN:
      clock.spans.append((event, name, start, end))


def _on_event(event: str, **kwargs: Any) -> None:
  if event == CACHE_HIT_EVENT:
    now = time.time()
    with _LOCK:
      for clock in _OPEN:
        clock.cache_hits.append(now)


def _install() -> None:
  global _INSTALLED
  with _LOCK:
    if not _INSTALLED:
      monitoring.register_event_time_span_listener(_on_span)
      monitoring.register_event_listener(_on_event)
      _INSTALLED = True
