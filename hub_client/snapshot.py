"""A repo's files at one commit, pulled into the download cache, and a copy out of it.

Used by :func:`peftkit.hub_client.api.pull`, by composition at load time
(:mod:`peftkit.hub_client.compose`) and by the CLI's ``hub pull --to``.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .backend import HubBackend
from .cache import PullCache, offline_mode, verify_files
from .errors import HubError, IntegrityError, OfflineError
from .resolve import RepoRef


@dataclass(frozen=True)
class Pulled:
    """A pulled repo: the cached folder and the commit it holds."""

    path: Path
    repo_id: str
    revision: str
    commit: str
    hub: str
    from_cache: bool


#: Files a repo holds before anything was pushed to it (the Hugging Face Hub creates a repo with them).
GIT_ONLY_FILES = frozenset({".gitattributes"})


def pull_snapshot(backend: HubBackend, ref: RepoRef, *, cache_dir: str | Path | None = None,
                  progress: bool = True) -> Pulled:
    """``ref``'s files from ``backend`` in the pull cache (downloaded unless already cached), and where."""
    cache = PullCache(cache_dir)
    revision = ref.revision or "main"
    where = f"{ref.repo_id}@{revision} on {backend.address}"
    if backend.remote and offline_mode():
        hit = cache.lookup(backend.key, ref.repo_id, revision)
        if hit is None:
            raise OfflineError(
                f"{where} is not in the download cache ({cache.root}) and offline mode is on "
                f"(PEFTKIT_OFFLINE or HF_HUB_OFFLINE); pull it once while online, or unset those variables")
        return Pulled(hit[1], ref.repo_id, revision, hit[0], backend.address, True)
    commit = backend.resolve(ref.repo_id, revision)
    files = backend.list_files(ref.repo_id, commit)
    if all(f.path in GIT_ONLY_FILES for f in files):
        raise HubError(f"{where} holds no files (an empty repo): nothing to pull; push an adapter folder to it "
                       f"first (`peftkit hub push FOLDER {ref.repo_id}`)")
    folder = cache.snapshot_dir(backend.key, ref.repo_id, commit)
    if folder.is_dir():
        try:
            verify_files(folder, files, where, remove_extra=False)
        except IntegrityError as exc:
            warnings.warn(f"the cached copy is damaged ({exc}); downloading it again", stacklevel=3)
        else:
            cache.record_ref(backend.key, ref.repo_id, revision, commit)
            return Pulled(folder, ref.repo_id, revision, commit, backend.address, True)
    with cache.staging(backend.key) as staging:
        backend.download(ref.repo_id, commit, files, staging, progress=progress)
        verify_files(staging, files, where)
        folder = cache.install(staging, backend.key, ref.repo_id, commit, replace=folder.is_dir())
    cache.record_ref(backend.key, ref.repo_id, revision, commit)
    return Pulled(folder, ref.repo_id, revision, commit, backend.address, False)


def copy_snapshot(folder: Path, dest: str | Path) -> Path:
    """Copy a pulled folder to ``dest`` (replaced whole, atomically). Files and folders get the
    permissions a plain write would, not the cache's (an older cache kept them owner-only)."""
    from peftkit.core.fileio import atomic_folder

    dest = Path(dest).expanduser()
    with atomic_folder(dest) as tmp:
        for source in sorted(folder.rglob("*")):
            target = tmp / source.relative_to(folder)
            if source.is_dir():
                target.mkdir(exist_ok=True)
            else:
                shutil.copyfile(source, target)
    return dest
