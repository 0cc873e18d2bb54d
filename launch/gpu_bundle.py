"""Builds the offline bundle for a GPU machine without internet (docs/gpu_demo.md): the wheels of exactly the
packages that `pip install -e ".[train]"` needs there and the machine lacks, plus the CIFAR-10 tarball.

    python launch/gpu_bundle.py [--bundle .gpu_bundle] [--present-freeze gpu_pip_freeze.txt] [--train "pkg ..."]

Which packages: the requirements of this project (setup.cfg: install_requires + the [train] extra), closed
over their dependencies as installed in *this* environment (the versions the project is tested with),
minus what the GPU machine has (PRESENT_ROOTS and their dependencies, or every package of a `pip freeze`
taken there), plus the build requirements of pyproject.toml with their dependencies (pip's isolated build of the project
needs them offline, and they need not be those installed here).
Each is fetched with ``pip download --no-deps`` for CPython 3.12 (the GPU machine's python3) on manylinux
x86_64 (a pure-Python sdist without a wheel is built with ``pip wheel --no-deps``). Prints every wheel and the
bundle's size, and exits 1 when wheels and tarball together exceed LIMIT_BYTES, naming the largest wheels.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import importlib.metadata as md
import json
import pathlib
import shutil
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
TARBALL_NAME = "cifar10-jpeg.tar.gz"
TARBALL_SHA256 = "d34c68f61cca57aa9144c8f25bda427abb9921bd642d5857a2fc1a6b4416f965"
SHARED_TARBALL = REPO.parent / "shared" / "data" / TARBALL_NAME
LIMIT_BYTES = 64 * 2**20  # What the device tool carries with the working tree, all paths together.
#: Installed on the GPU machine (with their dependencies): see docs/gpu_demo.md.
PRESENT_ROOTS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "pillow", "pyarrow",
                 "tensorboard", "torch", "torchvision")
#: On the GPU machine, but older than the [train] extra asks (seen there on 2026-11-27): carried all the same.
OUTDATED = ("orbax-checkpoint",)
PLATFORM_ARGS = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64", "--python-version", "3.12", "--implementation", "cp",
                 "--abi", "cp312")


def project_requirements(train: list[str] | None = None) -> list[str]:
  """install_requires and the [train] extra of setup.cfg (or `train` in its place)."""
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  base = cfg.get("options", "install_requires").split("\n")
  extra = train if train is not None else cfg.get("options.extras_require", "train").split("\n")
  return [r.strip() for r in [*base, *extra] if r.strip() and not r.strip().startswith("#")]


def build_requirements() -> list[str]:
  """[build-system].requires of pyproject.toml."""
  return tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]


def _applies(req: Requirement, extras: set[str]) -> bool:
  if req.marker is None:
    return True
  return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure(requirements: list[str]) -> dict[str, str | None]:
  """{canonical name: version installed here, or None if not installed here} of `requirements` and
  everything they need, read from this environment's metadata."""
  found: dict[str, str | None] = {}
  pending = [(Requirement(r), set()) for r in requirements]
  seen: set[tuple[str, frozenset]] = set()
  while pending:
    req, parent_extras = pending.pop()
    name = canonicalize_name(req.name)
    if not _applies(req, parent_extras) or (name, frozenset(req.extras)) in seen:
      continue
    seen.add((name, frozenset(req.extras)))
    try:
      dist = md.distribution(name)
    except md.PackageNotFoundError:
      found[name] = None
      continue
    found[name] = dist.version
    pending += [(Requirement(r), set(req.extras)) for r in dist.requires or []]
  return found


def present_names(freeze: pathlib.Path | None) -> set[str]:
  """Packages the GPU machine has: every line of its `pip freeze`, or PRESENT_ROOTS closed here."""
  if freeze is None:
    return set(closure(list(PRESENT_ROOTS))) - set(OUTDATED)
  names = set()
  for line in freeze.read_text().splitlines():
    line = line.strip()
    if line and not line.startswith(("#", "-")):
      names.add(canonicalize_name(line.split("@")[0].split("==")[0].split(" ")[0]))
  return names


def carried(train: list[str] | None, freeze: pathlib.Path | None) -> dict[str, str]:
  """{name: pip requirement} of the packages to carry: pinned to the version installed here when it is."""
  present = present_names(freeze) | {"receding-jax"}
  roots = {canonicalize_name(Requirement(r).name): r for r in project_requirements(train)}
  out = {}
  for name, version in closure(list(roots.values())).items():
    if name not in present:
      out[name] = f"{name}=={version}" if version else roots.get(name, name)
  for r in build_requirements():  # Always, with their dependencies: pip's isolated build of the project.
    out[canonicalize_name(Requirement(r).name)] = r
  return dict(sorted(out.items()))


def _have(wheels: pathlib.Path, name: str, spec: str) -> bool:
  prefix = name.replace("-", "_").lower() + "-" + (spec.split("==")[1] + "-" if "==" in spec else "")
  return any(w.name.lower().startswith(prefix) for w in wheels.glob("*.whl"))


def fetch(spec: str, wheels: pathlib.Path, deps: bool = False) -> None:
  """A manylinux/py3 wheel of `spec` (and of its dependencies if `deps`) into `wheels`, or one built from its
  sdist."""
  pip = [sys.executable, "-m", "pip", "-q"]
  no_deps = [] if deps else ["--no-deps"]
  got = subprocess.run([*pip, "download", *no_deps, *PLATFORM_ARGS, "-d", str(wheels), spec],
                       capture_output=True, text=True)
  if got.returncode:
    built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), spec], capture_output=True, text=True)
    if built.returncode:
      raise SystemExit(f"error: no wheel for {spec}: {got.stderr.strip()[-300:]} / {built.stderr.strip()[-300:]}")


def copy_tarball(data: pathlib.Path) -> pathlib.Path:
  """The CIFAR-10 tarball from ../shared/data into the bundle, its sha256 checked."""
  target = data / TARBALL_NAME
  if not SHARED_TARBALL.exists():
    raise SystemExit(f"error: {SHARED_TARBALL} not found (see ../shared/data/README.md)")
  if not target.exists() or target.stat().st_size != SHARED_TARBALL.stat().st_size:
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARED_TARBALL, target)
  digest = hashlib.sha256(target.read_bytes()).hexdigest()
  if digest != TARBALL_SHA256:
    raise SystemExit(f"error: {target} has sha256 {digest}, expected {TARBALL_SHA256}")
  return target


def report(bundle: pathlib.Path, packages: dict[str, str]) -> int:
  """Prints every file with its size and the total; returns the total in bytes."""
  files = sorted((p for p in bundle.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
  for p in files:
    print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(bundle)}")
  total = sum(p.stat().st_size for p in files)
  print(f"bundle {bundle}: {len(packages)} packages, {len(files)} files, {total / 2**20:.2f} MiB "
        f"(limit {LIMIT_BYTES / 2**20:.0f} MiB)")
  return total


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--bundle", default=str(REPO / ".gpu_bundle"))
  parser.add_argument("--present-freeze", default=None, help="`pip freeze` of the GPU machine (default: PRESENT_ROOTS)")
  parser.add_argument("--train", default=None, help="space-separated requirements replacing setup.cfg's [train]")
  parser.add_argument("--list", action="store_true", help="only print the packages that would be carried")
  args = parser.parse_args(argv)
  bundle = pathlib.Path(args.bundle)
  packages = carried(args.train.split() if args.train is not None else None,
                     pathlib.Path(args.present_freeze) if args.present_freeze else None)
  print("carried: " + " ".join(packages.values()))
  if args.list:
    return
  wheels = bundle / "wheels"
  wheels.mkdir(parents=True, exist_ok=True)
  build = {canonicalize_name(Requirement(r).name) for r in build_requirements()}
  for name, spec in packages.items():
    if name in build or not _have(wheels, name, spec):
      fetch(spec, wheels, deps=name in build)
  copy_tarball(bundle / "data")
  (bundle / "bundle.json").write_text(json.dumps({"packages": packages}, indent=1) + "\n")
  if report(bundle, packages) > LIMIT_BYTES:
    raise SystemExit("error: the bundle is over the limit; drop the largest wheels above whose packages the GPU "
                     "machine has (--present-freeze) or that the [train] extra no longer needs")


if __name__ == "__main__":
  main()
