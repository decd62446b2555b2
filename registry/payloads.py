"""Parsing of the Hub's upload payloads: ``preupload`` JSON and the NDJSON commit.

The commit body is one JSON object per line (see docs/architecture.md, "The hub protocol")::

    {"key": "header", "value": {"summary": ..., "description": ..., "parentCommit": ...}}
    {"key": "file", "value": {"path": ..., "content": <base64>, "encoding": "base64"}}
    {"key": "deletedFile", "value": {"path": ...}}
    {"key": "deletedFolder", "value": {"path": ...}}

File contents are decoded and staged to temporary files line by line, so
memory holds one file at a time. Any error discards everything staged: a bad
payload writes nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from peftkit.hub_rules.names import is_commit_sha

from .blobs import StagedBlob
from .errors import MalformedPayload, PayloadTooLarge
from .messages import check_description, check_summary
from .names import validate_folder, validate_new_path, validate_path


#: The file that makes a folder an adapter (PEFT's, peftkit's and AdapterHub's layouts alike).
ADAPTER_CONFIG = "adapter_config.json"
MAX_ADAPTER_CONFIG_BYTES = 16 * 2**20


def check_adapter_config(path: str, content: bytes) -> None:
    """MalformedPayload when ``path`` is an ``adapter_config.json`` (in any folder) that is not a JSON object:
    no library loads an adapter from it, yet its card would list it in search as one. Refused before anything
    of the commit is written, so the hub never holds such a folder."""
    if path.rsplit("/", 1)[-1] != ADAPTER_CONFIG:
        return
    if len(content) > MAX_ADAPTER_CONFIG_BYTES:  # parsing is bounded: a config is a few KB
        raise MalformedPayload(f"file '{path}' is {len(content) / 2**20:.1f} MiB; an adapter config holds options, "
                               f"at most {MAX_ADAPTER_CONFIG_BYTES // 2**20} MiB here: put data in other files")
    try:
        data = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(f"file '{path}' is not valid JSON ({exc}): no adapter loads from it; fix the file and "
                               f"push again (nothing of this commit was written)") from None
    if not isinstance(data, dict):
        raise MalformedPayload(f"file '{path}' holds a JSON {type(data).__name__}, not an object: no adapter loads "
                               f"from it; fix the file and push again (nothing of this commit was written)")


@dataclass
class CommitPayload:
    summary: str = ""
    description: str = ""
    parent: str | None = None
    files: dict[str, StagedBlob] = field(default_factory=dict)
    deletions: list[str] = field(default_factory=list)


def decode_base64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedPayload(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPayload(f"{what}: content is not valid base64") from None


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedPayload(f"{what}: body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MalformedPayload(f"{what}: body must be a JSON object")
    return data


#: The largest file size a preupload may announce: the databases' 64-bit integer (a larger one would
#: overflow the quota's size lookup); no upload comes near it.
MAX_SIZE = 2**63 - 1


def parse_preupload(data: dict[str, Any], *, max_files: int | None = None) -> list[dict[str, Any]]:
    """Validate a preupload request; returns its ``files`` entries."""
    files = data.get("files")
    if not isinstance(files, list):
        raise MalformedPayload("preupload: 'files' must be a list of {path, sample, size}")
    if max_files is not None and len(files) > max_files:
        raise too_many_files(len(files), max_files, "preupload")
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise MalformedPayload(f"preupload: files[{i}] must be an object with a string 'path'")
        validate_new_path(entry["path"])
        if "sample" in entry:
            decode_base64(entry["sample"], f"preupload: sample of '{entry['path']}'")
        size = entry.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE):
            raise MalformedPayload(f"preupload: size of '{entry['path']}' must be an integer from 0 to {MAX_SIZE} "
                                   "(bytes)")
    return files


def too_many_files(count: int | None, max_files: int, what: str) -> PayloadTooLarge:
    """The 413 for a commit (or preupload) naming more files than one commit may carry (``count`` if known)."""
    return PayloadTooLarge(
        f"{what} names {count if count is not None else f'more than {max_files}'} files; this registry takes "
        f"at most {max_files} files (additions plus deletions) per commit: split the upload into several "
        f"commits of at most {max_files} files each (for example one upload_folder call per sub-folder, or "
        "several with allow_patterns)"
    )


def parse_commit(
    body: IO[bytes],
    stage: Callable[[bytes], StagedBlob],
    discard: Callable[[StagedBlob], None],
    *,
    max_files: int | None = None,
) -> CommitPayload:
    """Parse an NDJSON commit body, staging file contents as they come.

    ``max_files`` caps additions plus deletions: the body is refused (413) on
    the first operation past it, before anything is committed.
    """
    payload = CommitPayload()
    seen_header = False
    lineno = 0
    operations = 0
    try:
        for raw in body:
            lineno += 1
            if not raw.strip():
                continue
            operations += 1
            if max_files is not None and operations > max_files + 1:  # + the header line
                raise too_many_files(None, max_files, "the commit")
            try:
                item = json.loads(raw)  # from the bytes: no decoded copy of a line that may be a whole file
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise MalformedPayload(f"commit payload line {lineno} is not valid JSON ({exc.__class__.__name__})") from None
            raw = b""  # the parsed line is all that is kept of it
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict) or "key" not in item:
                raise MalformedPayload(f"commit payload line {lineno} must be an object {{\"key\": ..., \"value\": {{...}}}}")
            key, value = item["key"], item["value"]
            if key == "header":
                if seen_header:
                    raise MalformedPayload(f"commit payload line {lineno}: a second header")
                seen_header = True
                summary = value.get("summary", "")
                description = value.get("description", "") or ""
                parent = value.get("parentCommit")
                if not isinstance(summary, str) or not isinstance(description, str):
                    raise MalformedPayload("commit header: 'summary' and 'description' must be strings")
                check_summary(summary)
                check_description(description)
                if parent is not None and (not isinstance(parent, str) or not is_commit_sha(parent)):
                    raise MalformedPayload(f"commit header: parentCommit {parent!r} is not a 40-hex commit sha")
                payload.summary, payload.description, payload.parent = summary, description, parent
            elif key == "file":
                path = value.get("path")
                if not isinstance(path, str):
                    raise MalformedPayload(f"commit payload line {lineno}: file without a string 'path'")
                validate_new_path(path)
                encoding = value.get("encoding", "base64")
                if encoding != "base64":
                    raise MalformedPayload(f"file '{path}': unsupported encoding {encoding!r}; use 'base64'")
                # popped: while the bytes are decoded and staged, nothing else holds the base64 text
                content = decode_base64(value.pop("content", None), f"file '{path}'")
                check_adapter_config(path, content)
                old = payload.files.pop(path, None)
                if old is not None:
                    discard(old)
                payload.files[path] = stage(content)
                content = b""  # staged: not held while the next line is read
            elif key in ("deletedFile", "deletedFolder"):
                path = value.get("path")
                if not isinstance(path, str):
                    raise MalformedPayload(f"commit payload line {lineno}: {key} without a string 'path'")
                if key == "deletedFolder":
                    payload.deletions.append(validate_folder(path) + "/")
                else:
                    payload.deletions.append(validate_path(path))
            elif key == "lfsFile":
                raise MalformedPayload(
                    "this registry stores every file in the commit itself and never asks for LFS uploads; "
                    "send files as {'key': 'file'} (huggingface_hub does this when preupload answers 'regular')"
                )
            else:
                raise MalformedPayload(f"commit payload line {lineno}: unknown key {key!r}")
        if not seen_header:
            raise MalformedPayload("commit payload has no header line ({\"key\": \"header\", ...})")
    except BaseException:
        for blob in payload.files.values():
            discard(blob)
        raise
    return payload
