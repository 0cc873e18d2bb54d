"""Image folders shipped as a .tar.gz: extracted once into a cache folder, checked by their sha256.

``config.dataset.archive`` names the archive (a .tar.gz of ``<split>/<class>/*.jpg``, optionally under one
top-level folder); ``config.dataset.archive_sha256`` is its expected sha256 ('' = not checked). When
``dataset.name == 'folder'``, ``dataset.folder`` is '' and ``dataset.archive`` is set, the image folder is the
archive's extraction in ``$XDG_CACHE_HOME/receding_jax/datasets/<archive name>-<sha256[:16]>`` (``~/.cache/...``
without XDG_CACHE_HOME). It is extracted once, into a temporary folder beside it that is then renamed, so a
killed extraction never leaves a half folder that a later run would take as complete; processes of one
machine take turns through a lock file and the later ones find it done. Clearing it is deleting the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pathlib
import shutil
import tarfile
import tempfile

import ml_collections

from receding_jax.errors import InputError
from receding_jax.training import compile_cache

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # Of an image folder, any case, as tfds.ImageFolder.
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, once per process.


class ArchiveError(InputError):
  """``dataset.archive`` is missing, unreadable, or not the archive ``dataset.archive_sha256`` names."""


def cache_root() -> pathlib.Path:
  """``$XDG_CACHE_HOME/receding_jax/datasets`` (or ``~/.cache/...``): where archives are extracted."""
  return compile_cache.default_dir().parent / "datasets"


def sha256(path: pathlib.Path) -> str:
  """The file's sha256 (hex), computed once per process for a given size and modification time."""
  stat = path.stat()
  key = (os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns)
  if key not in _HASHES:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    _HASHES[key] = digest.hexdigest()
  return _HASHES[key]


def _checked_archive(dataset: ml_collections.ConfigDict) -> tuple[pathlib.Path, str]:
  """(the archive's path, its sha256); ArchiveError where it is not a file or its sha256 is not the one set."""
  path = pathlib.Path(os.path.expanduser(dataset.archive))
  if not path.is_file():
    raise ArchiveError(f"dataset.archive = {dataset.archive!r} is not a file: set it to the dataset's .tar.gz "
                       "with --config.dataset.archive=PATH (or set dataset.folder to an extracted image folder)")
  digest = sha256(path)
  expected = dataset.archive_sha256.lower()
  if expected and digest != expected:
    raise ArchiveError(f"dataset.archive = {dataset.archive!r} has sha256 {digest}, not dataset.archive_sha256 = "
                       f"{expected}: a damaged or different file; fetch it again or fix the setting")
  return path, digest


def extracted_folder(path: pathlib.Path, digest: str) -> pathlib.Path:
  """The cache folder that holds the archive at `path` (of sha256 `digest`) once extracted."""
  name = path.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz")
  return cache_root() / f"{name}-{digest[:16]}"


def has_images(split_dir: pathlib.Path) -> bool:
  """Whether `split_dir` has a class folder with at least one image (stops at the first)."""
  classes = (c for c in split_dir.iterdir() if c.is_dir()) if split_dir.is_dir() else ()
  return any(f.suffix.lower() in IMAGE_EXTENSIONS for c in classes for f in c.iterdir())


def _is_image_folder(root: pathlib.Path) -> bool:
  """Whether `root` holds ``<split>/<class>/<image>`` (stops at the first image)."""
  return any(has_images(s) for s in root.iterdir() if s.is_dir())


def _image_root(extracted: pathlib.Path) -> pathlib.Path:
  """`extracted`, or its single top-level folder where the archive wraps the image folder in one."""
  entries = list(extracted.iterdir())
  if not _is_image_folder(extracted) and len(entries) == 1 and entries[0].is_dir():
    return entries[0]
  return extracted


def _extract(path: pathlib.Path, target: pathlib.Path) -> None:
  """Extracts `path` into a temporary folder beside `target`, then renames its image folder to `target`."""
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
  try:
    try:
      with tarfile.open(path) as tar:
        tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError) as e:
      raise ArchiveError(f"dataset.archive = {os.fspath(path)!r} cannot be extracted: {e}") from None
    root = _image_root(staging)
    root.chmod(0o755)  # mkdtemp's folder is private; the cache is readable like an extracted tar.
    try:
      os.rename(root, target)
    except OSError:
      if not target.is_dir():  # Else another machine sharing the cache renamed its copy first.
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def ensure_extracted(dataset: ml_collections.ConfigDict) -> pathlib.Path:
  """The extracted image folder of ``dataset.archive``, extracting it first where no run has (saying which);
  ArchiveError (one line, naming the key) where the archive is missing or not the one its sha256 names."""
  path, digest = _checked_archive(dataset)
  target = extracted_folder(path, digest)
  if not target.is_dir():
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # Another process of this machine may be extracting it.
      if not target.is_dir():
        print(f"extracting {path} into {target} (once; later runs reuse it)", flush=True)
        _extract(path, target)
        return target
  print(f"dataset: {target}, extracted from {path}", flush=True)
  return target


def folder(dataset: ml_collections.ConfigDict) -> str:
  """The image folder a 'folder' dataset reads: ``dataset.folder``, or else the extraction of
  ``dataset.archive`` (which `ensure_extracted` made; not extracted here)."""
  if dataset.folder or not dataset.archive:
    return dataset.folder
  path, digest = _checked_archive(dataset)
  return os.fspath(extracted_folder(path, digest))
