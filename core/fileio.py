"""Atomic file and folder writes: a failure never leaves a half-written file or folder."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, TypeVar

#: Names tried before giving up on a unique temporary name (each has 48 random bits).
_NAME_ATTEMPTS = 100
_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
T = TypeVar("T")


def _unique(parent: Path, prefix: str, suffix: str, create: Callable[[Path], T]) -> tuple[Path, T]:
    for _ in range(_NAME_ATTEMPTS):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return candidate, create(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary name in {parent} ({prefix}*{suffix} all taken)")


def create_temp_file(parent: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """A new, empty file in ``parent``, open for writing: ``(fd, path)``.

    Unlike ``tempfile.mkstemp`` (always ``0o600``) it gets the mode a plain
    ``open(path, "w")`` would (``0o666`` less the umask, default ACLs applied),
    so a file renamed into place from it is as readable as any other file
    the user writes. Private files (tokens) chmod it themselves.
    """
    path, fd = _unique(Path(parent), prefix, suffix, lambda p: os.open(p, _FILE_FLAGS, 0o666))
    return fd, path


def create_temp_folder(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """A new, empty folder in ``parent`` with the mode ``mkdir`` gives (``0o777`` less the umask),
    not ``tempfile.mkdtemp``'s owner-only ``0o700``."""
    path, _ = _unique(Path(parent), prefix, suffix, lambda p: os.mkdir(p, 0o777))
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the system reports it (Linux:
    ``/proc/self/status``). Elsewhere it is read once, by setting and restoring it, and remembered:
    ``os.umask`` changes the whole process, so toggling it on every call could race other threads."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_read_once()


@functools.lru_cache(maxsize=1)
def _umask_read_once() -> int:
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def apply_normal_modes(root: str | os.PathLike) -> None:
    """Give ``root``, the folders under it ``0o777`` and its files ``0o666``, less the umask: the
    permissions a plain write gives. For folders other libraries wrote (safetensors 0.8 writes
    owner-only files), so a saved model is as readable as the user's other files."""
    umask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.
    The file gets the permissions a plain write would (see :func:`create_temp_file`)."""
    path = Path(path)
    fd, tmp = create_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``
    in one rename (the old folder is removed afterwards), on failure it is deleted.
    The folder gets the permissions a plain ``mkdir`` would (see :func:`create_temp_folder`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_folder(path.parent, f".{path.name}.", ".tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = create_temp_folder(path.parent, f".{path.name}.", ".old")
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_folder_json(folder: str | os.PathLike, name: str, what: str) -> object:
    """The JSON file ``name`` of a saved ``what`` folder (a fusion, a composition), or an
    AdapterLoadError saying what is missing or damaged."""
    import json

    from .errors import AdapterLoadError

    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        raise AdapterLoadError(f"{str(folder)!r} is not a {what} folder: it has no {name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise AdapterLoadError(f"{path} is not valid JSON ({exc}); save the {what} again") from None
