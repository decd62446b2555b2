"""JSON shapes of the Hub API, built from store objects.

Field names follow what ``huggingface_hub`` 2.4 parses (``ModelInfo``,
``RepoFile``/``RepoFolder``, ``GitCommitInfo``, ``GitRefs``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .folders import ancestors
from .hashing import folder_oid
from .store import CommitInfo, FileEntry, RepoInfo


def iso(dt: datetime) -> str:
    """The Hub's timestamp format: ``2024-05-01T12:00:00.123Z``."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def model_json(
    info: RepoInfo,
    *,
    files: list[FileEntry] | None = None,
    card_data: bool = True,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "_id": info.repo_id,
        "id": info.repo_id,
        "modelId": info.repo_id,
        "author": info.namespace,
        "sha": info.sha,
        "lastModified": iso(info.last_modified),
        "createdAt": iso(info.created_at),
        "private": info.private,
        "gated": False,
        "disabled": False,
        "downloads": info.downloads,
        "likes": 0,
        "library_name": info.library_name,
        "tags": list(info.tags),
        "pipeline_tag": info.pipeline_tag,
    }
    if card_data and info.card:
        data["cardData"] = info.card
    if files is not None:
        data["siblings"] = [{"rfilename": f.path, "size": f.size, "blobId": f.oid} for f in files]
        data["usedStorage"] = sum(f.size for f in files)
    return data


def json_array_within(items: Iterable[Any], budget_bytes: int) -> tuple[bytes, int]:
    """A compact JSON array of the first ``items`` that fit in ``budget_bytes`` (always at least one, so a
    client paging through them moves on), and how many it holds.

    ``items`` is consumed lazily: those past the budget are never built.
    """
    parts: list[bytes] = []
    size = 2
    for item in items:
        part = json.dumps(item, separators=(",", ":")).encode("utf-8")
        if parts and size + 1 + len(part) > budget_bytes:
            break
        parts.append(part)
        size += len(part) + (1 if len(parts) > 1 else 0)
    return b"[" + b",".join(parts) + b"]", len(parts)


def file_item(entry: FileEntry) -> dict[str, Any]:
    return {"type": "file", "oid": entry.oid, "size": entry.size, "path": entry.path}


def folder_item(folder: str, under: list[FileEntry]) -> dict[str, Any]:
    """A folder entry; its oid covers every file ``under`` it (at any depth)."""
    return {"type": "directory", "oid": folder_oid(folder, [(e.path, e.oid) for e in under]), "size": 0, "path": folder}


def tree_json(files: dict[str, FileEntry], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries of the tree API under ``prefix`` ('' for the root), folders included.

    One pass over the files groups them by folder (O(files x depth)); no
    folder rescans the whole tree.
    """
    base = prefix.rstrip("/") + "/" if prefix else ""
    under_folder: dict[str, list[FileEntry]] = {}
    out: list[dict[str, Any]] = []
    for path, entry in files.items():
        if not path.startswith(base):
            continue
        rel = path[len(base) :]
        if recursive:
            for folder in ancestors(rel):
                under_folder.setdefault(base + folder, []).append(entry)
            out.append(file_item(entry))
        elif "/" in rel:
            under_folder.setdefault(base + rel[: rel.index("/")], []).append(entry)
        else:
            out.append(file_item(entry))
    out += [folder_item(folder, under) for folder, under in under_folder.items()]
    return sorted(out, key=lambda item: item["path"])


def commit_json(commit: CommitInfo) -> dict[str, Any]:
    return {
        "id": commit.sha,
        "title": commit.message,
        "message": commit.description,
        "authors": [{"user": commit.author}] if commit.author else [],
        "date": iso(commit.created_at),
        "parents": [commit.parent] if commit.parent else [],
    }


def refs_json(branches: dict[str, str], tags: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": sha} for n, sha in branches.items()],
        "converts": [],
        "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": sha} for n, sha in (tags or {}).items()],
        "pullRequests": [],
    }
