"""Runs a snippet of Python in a fresh interpreter that sees N simulated CPU devices."""

import os
import subprocess
import sys
import textwrap


def run_with_cpu_devices(code: str, num_devices: int = 8, timeout: float = 600) -> str:
  """Executes `code` with `num_devices` fake CPU devices; returns stdout, fails with its stderr."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  if result.returncode != 0:
    raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
  return result.stdout
