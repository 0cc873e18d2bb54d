"""CIFAR-10 out of its JPEG tarball (train/<class>/*.jpg, test/<class>/*.jpg) for launch/gpu_demo.py: the whole
of it, or the first images of each class, extracted atomically and kept when a previous extraction completed.
Only the standard library is imported here: this runs before the project is installed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess


class TarballError(Exception):
  """A folder this module will not overwrite (gpu_demo.py prints it as one line, ``error: ...``)."""


def extract_all(tarball: pathlib.Path, folder: pathlib.Path) -> None:
  """The whole tarball into `folder` (atomically; kept when a previous extraction completed)."""
  if (folder / ".complete").exists() or ((folder / "train").is_dir() and (folder / "test").is_dir()):
    print(f"data: {folder} already holds CIFAR-10", flush=True)
    return
  partial = folder.with_name(folder.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  subprocess.run(["tar", "-xzf", str(tarball), "-C", str(partial)], check=True)
  (partial / ".complete").write_text(str(tarball) + "\n")
  os.replace(partial, folder)
  print(f"data: extracted {tarball} into {folder}", flush=True)


def extract_subset(tarball: pathlib.Path, folder: pathlib.Path, per_class: tuple[int, int]) -> None:
  """The first (by name) `per_class` = (train, test) images of each class into `folder`, same layout."""
  marker = folder / ".complete"
  if marker.exists() and marker.read_text().strip() == f"{tarball} {per_class}":
    return
  if folder.exists() and any(folder.iterdir()) and not marker.exists():
    raise TarballError(f"{folder} exists and was not made by this command; give another --data-dir or --work-dir")
  listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True, check=True).stdout
  groups: dict[tuple[str, str], list[str]] = {}
  for name in listing.splitlines():
    parts = name.removeprefix("./").split("/")
    if len(parts) == 3 and parts[0] in ("train", "test") and parts[2].endswith(".jpg"):
      groups.setdefault((parts[0], parts[1]), []).append(name)
  keep = dict(zip(("train", "test"), per_class, strict=True))
  chosen = [n for (split, _), names in sorted(groups.items()) for n in sorted(names)[: keep[split]]]
  partial = folder.with_name(folder.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  (partial / ".members").write_text("\n".join(chosen) + "\n")
  subprocess.run(["tar", "-xzf", str(tarball), "-C", str(partial), "-T", str(partial / ".members")], check=True)
  (partial / ".complete").write_text(f"{tarball} {per_class}\n")
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(partial, folder)
  print(f"data: {len(chosen)} images ({per_class[0]} train + {per_class[1]} test per class) in {folder}", flush=True)


def count_images(folder: pathlib.Path, split: str) -> int:
  """The JPEG images of `split` ("train" or "test") in `folder`."""
  return sum(1 for _ in (folder / split).glob("*/*.jpg"))
