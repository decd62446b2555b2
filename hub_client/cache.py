"""The download cache: pulled repos, one folder per hub, repo and commit.

Layout (under ``$PEFTKIT_HOME/hub-cache``, else ``~/.cache/peftkit/hub-cache``)::

    <hub key>/<namespace>/<name>/snapshots/<commit>/   the files of that commit
    <hub key>/<namespace>/<name>/refs/<revision>        the commit a branch pointed to when last pulled
    <hub key>/.tmp/                                     downloads in progress

A snapshot folder appears only by renaming a fully downloaded and verified
staging folder, so a partial download is never used; an interrupted one
leaves a staging folder that the next pull of that hub clears away.
Commits are immutable, so a snapshot never needs refreshing. ``refs`` let
offline mode resolve a branch name to the commit pulled last.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

from peftkit.core.fileio import create_temp_folder, write_text_atomic
from peftkit.core.offline import offline_setting as core_offline_setting
from peftkit.hub_rules.home import peftkit_home
from peftkit.hub_rules.names import is_commit_sha

from .backend import RemoteFile
from .errors import IntegrityError

_STALE_STAGING_S = 24 * 3600.0


def default_cache_dir() -> Path:
    """``$PEFTKIT_HOME/hub-cache``, else ``~/.cache/peftkit/hub-cache``."""
    return peftkit_home() / "hub-cache"


#: The variables that put the hub client offline.
OFFLINE_VARIABLES = ("PEFTKIT_OFFLINE", "HF_HUB_OFFLINE")


def offline_mode() -> bool:
    """``PEFTKIT_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value (1, true, yes, on)."""
    return offline_setting() is not None


def offline_setting() -> str | None:
    """The variable that turns offline mode on, as set (``"PEFTKIT_OFFLINE=1"``); ``None`` when online."""
    return core_offline_setting(OFFLINE_VARIABLES)


class PullCache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def repo_dir(self, hub_key: str, repo_id: str) -> Path:
        namespace, name = repo_id.split("/", 1)
        return self.root / hub_key / namespace / name

    def snapshot_dir(self, hub_key: str, repo_id: str, commit: str) -> Path:
        return self.repo_dir(hub_key, repo_id) / "snapshots" / commit

    def _ref_file(self, hub_key: str, repo_id: str, revision: str) -> Path:
        return self.repo_dir(hub_key, repo_id) / "refs" / quote(revision, safe="")

    def lookup(self, hub_key: str, repo_id: str, revision: str) -> tuple[str, Path] | None:
        """``(commit, folder)`` of a cached revision (a commit, or a branch as last pulled), else ``None``."""
        if is_commit_sha(revision):
            commit = revision
        else:
            ref = self._ref_file(hub_key, repo_id, revision)
            try:
                commit = ref.read_text(encoding="utf-8").strip()
            except OSError:
                return None
            if not is_commit_sha(commit):
                return None
        folder = self.snapshot_dir(hub_key, repo_id, commit)
        return (commit, folder) if folder.is_dir() else None

    def record_ref(self, hub_key: str, repo_id: str, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self._ref_file(hub_key, repo_id, revision)
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ref, commit + "\n")

    @contextlib.contextmanager
    def staging(self, hub_key: str) -> Iterator[Path]:
        """An empty folder on the cache's file system; removed on failure (and after a successful install)."""
        tmp_root = self.root / hub_key / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self._clear_stale(tmp_root)
        tmp = create_temp_folder(tmp_root, "pull-")  # becomes the snapshot: as readable as the user's own files
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _clear_stale(tmp_root: Path) -> None:
        now = time.time()
        for entry in tmp_root.iterdir():
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > _STALE_STAGING_S:
                    shutil.rmtree(entry, ignore_errors=True)

    def install(self, staging: Path, hub_key: str, repo_id: str, commit: str, *, replace: bool = False) -> Path:
        """Move a verified staging folder into place with one rename.

        An existing snapshot is kept (another pull got there first; commits
        are immutable), unless ``replace`` (it was found damaged).
        """
        final = self.snapshot_dir(hub_key, repo_id, commit)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir():
            if not replace:
                return final
            trash = Path(tempfile.mkdtemp(prefix="damaged-", dir=staging.parent))
            os.rmdir(trash)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            if not final.is_dir():
                raise
        return final


def verify_files(folder: Path, files: Sequence[RemoteFile], where: str, *, remove_extra: bool = True) -> None:
    """Check that ``folder`` holds ``files`` with their sizes and hashes (other files are
    deleted with ``remove_extra``, else ignored).

    The sha256 is checked where the hub gives one (every file of a peftkit
    store, LFS files on the Hugging Face Hub), else the git blob sha1 (the
    file's oid, which is also its ETag).
    """
    expected = {f.path for f in files}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    missing = sorted(expected - present)
    if missing:
        raise IntegrityError(f"{where}: the download lacks {', '.join(missing[:5])}; pull again")
    if remove_extra:
        for extra in sorted(present - expected):
            (folder / extra).unlink()
    for remote in files:
        path = folder / remote.path
        size = path.stat().st_size
        if size != remote.size:
            raise IntegrityError(f"{where}: {remote.path} has {size} bytes, the hub announced {remote.size}; "
                                 f"the download was cut short or changed in transit: pull again")
        sha256, git_sha1 = hash_file(path, size)
        if remote.sha256:
            if sha256 != remote.sha256.lower():
                raise IntegrityError(f"{where}: {remote.path} does not match its sha256 ({sha256} instead of "
                                     f"{remote.sha256}); the file was corrupted: pull again")
        elif remote.oid and len(remote.oid) == 40:
            if git_sha1 != remote.oid.lower():
                raise IntegrityError(f"{where}: {remote.path} does not match its git hash ({git_sha1} instead of "
                                     f"{remote.oid}); the file was corrupted: pull again")


def hash_file(path: Path, size: int) -> tuple[str, str]:
    """``(sha256, git blob sha1)`` of a file, in one read."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode())  # noqa: S324 - git's object id, not a security hash
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()
