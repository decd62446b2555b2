"""The registry store: adapter repos with immutable commits, on one local folder.

This is the in-process API. The HTTP server (``peftkit registry serve``) is a
thin layer over it, and peftkit's embedded local hub uses it directly::

    from peftkit.registry import RegistryStore

    store = RegistryStore("~/.cache/peftkit/hub")
    store.create_repo("alice/sentiment-lora", exist_ok=True)
    sha = store.commit("alice/sentiment-lora", {"adapter_config.json": b"{...}",
                                                 "adapter_model.safetensors": Path("w.safetensors")},
                       message="Add adapter")
    store.read_file("alice/sentiment-lora", "adapter_config.json")
    store.search("sentiment", base_model="meta-llama/Llama-3.2-1B", method="lora")

Guarantees:

* Commits are immutable and content-addressed; a branch (``main``) is a
  pointer to a commit. Revisions are branch names or full 40-hex commit shas.
* A commit is atomic: file content is staged first (see
  :mod:`peftkit.registry.blob_storage`: a temporary file, or with S3 an
  upload under its final key), then one database transaction publishes the
  blobs (``os.replace``; with S3 a check that the object is there), writes the
  tree and the commit and moves the branch. A crash at any point leaves the
  branch at its previous commit; at worst an unreferenced blob stays behind,
  which no read can reach and :meth:`RegistryStore.gc` deletes.
* Safe for many threads in one process and several processes on one folder
  (SQLite WAL; writers are serialised).

The store does no authentication: callers (the HTTP layer) decide who may see
and change what. :meth:`RegistryStore.search` takes ``visible_to`` to hide
private repos.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Union

from peftkit.hub_rules.cards import PEFTKIT_RECORD_FILE
from peftkit.hub_rules.names import TAG_PREFIX, is_commit_sha

from .accounts import Accounts
from .blob_location import open_blob_storage, refuse_blob_folder_without_blobs
from .blob_storage import BlobStorage
from .blobs import BlobStore, StagedBlob
from .cards import RepoMetadata, extract_metadata, normalize_task
from .database_url import open_database
from .pg_schema import document_of, tsquery_of
from .quotas import (
    Quotas,
    add_blobs,
    add_metadata,
    commit_cost,
    empty_repo_cost,
    hold_tree,
    holds_tree,
    new_blobs,
    recount_repo,
    ref_cost,
    repo_split,
    start_repo,
    tree_cost,
)
from .folders import ancestors, clash, folder_set, under_any
from .fsck import fsck_database
from .gc import GcReport, collect_garbage, referenced_blobs
from .identity import BlobStoreMismatch, ForeignBlobStore, check_blob_store  # noqa: F401 - both re-exported
from .errors import (
    BadRequest,
    Conflict,
    EntryNotFound,
    InvalidPath,
    InvalidRevision,
    ParentCommitMismatch,
    PayloadTooLarge,
    RepoExists,
    RepoNotFound,
    RevisionNotFound,
)
from .hashing import commit_oid, tree_oid
from .names import (
    split_repo_id,
    validate_branch,
    validate_folder,
    validate_new_path,
    validate_path,
    validate_revision,
    validate_tag,
)

DEFAULT_BRANCH = "main"
MAX_SEARCH_LIMIT = 1000
# A search's text and tag filters are bounded: each tag is one more clause of the query (SQLite refuses
# expressions over 1,000 deep) and the text becomes a LIKE pattern (SQLite refuses those over 50,000 bytes).
MAX_SEARCH_TEXT = 1000
MAX_SEARCH_TAGS = 32
_MAX_INDEXED_FILE_BYTES = 1 << 20
# Files a branch of one repo may hold (the Hugging Face Hub's advice too). Every model info, tree listing and
# adapter page reads all of them, and every commit writes its tree's rows again: without a bound, commits of
# 20,000 files each grew a repo until each of those cost seconds (100,000 files: a 9 MB model info).
MAX_REPO_FILES = 100_000
# Branches and tags one repo may hold together: the refs listing and the adapter page read them all.
MAX_REPO_REFS = 1_000

FileContent = Union[bytes, bytearray, memoryview, str, os.PathLike, StagedBlob]

_SORT_ALIASES = {
    "downloads": "downloads",
    "likes": "downloads",
    "trending": "downloads",
    "trendingScore": "downloads",
    "trending_score": "downloads",
    "recent": "recent",
    "lastModified": "recent",
    "last_modified": "recent",
    "modified": "recent",
    "created": "created",
    "createdAt": "created",
    "created_at": "created",
    "relevance": "relevance",
    "name": "name",
    "id": "name",
}


def _client_key(address: str) -> str:
    """Who a download is counted for: the IPv4 address, or the /64 network of an IPv6 one (a
    single host commonly holds a whole /64, so counting its addresses apart would let it inflate counts)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. ``oid`` is the git blob sha1, ``sha256`` the blob address."""

    path: str
    size: int
    sha256: str
    oid: str


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    repo_id: str
    parent: str | None
    tree: str
    message: str
    description: str
    author: str
    created_at: datetime


@dataclass(frozen=True)
class RepoInfo:
    """A repo as of one revision (by default its ``main`` head)."""

    repo_id: str
    namespace: str
    name: str
    private: bool
    owner: str | None
    created_at: datetime
    last_modified: datetime
    downloads: int
    sha: str
    library_name: str | None = None
    pipeline_tag: str | None = None
    tags: tuple[str, ...] = ()
    base_models: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    card: dict[str, Any] = field(default_factory=dict)


_FACET_KINDS = ("base_model", "method", "task", "dataset", "license", "tag", "author")


@dataclass(frozen=True)
class SearchFacets:
    """What :meth:`RegistryStore.search_facets` counts: all hits, and ``{kind: [(value, hits), ...]}``
    among the ``counted`` most downloaded of them."""

    total: int
    counts: dict[str, list[tuple[str, int]]]
    counted: int


class RegistryStore:
    """Adapter repos on local disk. See the module docstring for the guarantees."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        database: str | None = None,
        blobs: str | os.PathLike[str] | None = None,
        namespace_quota: int | None = None,
        clean_staging: bool = True,
    ) -> None:
        """Open (creating if needed) the store in ``root``.

        ``fsync=False`` skips flushing blob files to the disk before their
        commit is recorded: faster for bulk imports and tests, but a power
        loss (not a process crash) may then lose the newest blobs.

        ``database``: a ``postgresql://`` URL to keep the metadata in
        PostgreSQL (several servers, on several hosts, may share it) instead
        of ``root/registry.db``. ``blobs``: the folder holding ``blobs/`` and
        ``tmp/`` (default ``root``), or ``s3://bucket/prefix`` for S3-compatible
        object storage (staged through ``root/tmp``); servers sharing a database
        must share it. A bucket that cannot be reached raises at once.

        ``namespace_quota``: the bytes each namespace may store unless ``quotas.set`` gave it its own
        limit (None: no limit); see :mod:`peftkit.registry.quotas` for what counts.

        ``clean_staging=False`` leaves the staging files crashed writers left (older than an hour) for
        :meth:`gc_report` to remove and count (``registry gc``; a dry run then deletes nothing).
        """
        self.root = Path(os.path.expanduser(os.fspath(root)))
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new data folder: its owner's only
        self.db = open_database(database, self.root)
        try:
            refuse_blob_folder_without_blobs(blobs, self.root, self.db, shared_database=database is not None)
            #: What every server of this registry shares besides the database (the web pages' secret too).
            self.blobs: BlobStorage = open_blob_storage(blobs, self.root, fsync=fsync)
            # A store whose marker names another registry is refused here, before any work; an unmarked
            # one is marked as this registry's where that is safe (see peftkit.registry.identity).
            check_blob_store(self.blobs, self.db, beside_database=blobs is None and database is None)
        except BaseException:
            self.db.close()
            raise
        self.accounts = Accounts(self.db)
        #: Files a branch may hold after a commit; more get PayloadTooLarge (413) and nothing is written.
        self.max_repo_files = MAX_REPO_FILES
        #: Branches and tags a repo may hold together; creating one more gets PayloadTooLarge (413).
        self.max_repo_refs = MAX_REPO_REFS
        #: Storage limits per namespace; a commit or move over one raises QuotaExceeded (413).
        self.quotas = Quotas(self.db, namespace_quota)
        if clean_staging:
            self.blobs.cleanup_tmp()

    @property
    def registry_id(self) -> str:
        """This registry's id: kept in its database, named by its blob store's marker."""
        return self.db.registry_id

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "RegistryStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fts5(self) -> bool:
        """Whether free-text search uses SQLite FTS5 (else a slower LIKE scan)."""
        return self.db.fts5

    def _checkpoint(self, point: str) -> None:
        """No-op hook between the steps of a commit; tests replace it to inject crashes.

        Points: ``"staged"`` (content in temporary files, no transaction yet),
        ``"published"`` (blobs moved into place inside the transaction),
        ``"before_commit"`` (metadata written, transaction not yet committed).
        """

    # ------------------------------------------------------------------ rows
    @staticmethod
    def _repo_row(conn: sqlite3.Connection, repo_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM repos WHERE repo_id = ?", (repo_id,)).fetchone()
        if row is None:
            raise RepoNotFound(f"repository '{repo_id}' not found")
        return row

    @staticmethod
    def _branch_head(conn: sqlite3.Connection, repo: sqlite3.Row, branch: str) -> str:
        row = conn.execute("SELECT commit_sha FROM refs WHERE repo = ? AND name = ?", (repo["id"], branch)).fetchone()
        if row is None:
            raise RevisionNotFound(f"revision '{branch}' not found in '{repo['repo_id']}'")
        return row["commit_sha"]

    @staticmethod
    def _tag_target(conn: sqlite3.Connection, repo: sqlite3.Row, tag: str) -> str | None:
        row = conn.execute("SELECT commit_sha FROM tags WHERE repo = ? AND name = ?", (repo["id"], tag)).fetchone()
        return row["commit_sha"] if row else None

    def _resolve(self, conn: sqlite3.Connection, repo: sqlite3.Row, revision: str) -> str:
        """A commit sha, ``refs/tags/<tag>``, or a name: a branch, else a tag (they never share a name)."""
        revision = validate_revision(revision)
        if is_commit_sha(revision):
            row = conn.execute(
                "SELECT sha FROM commits WHERE sha = ? AND repo = ?", (revision, repo["id"])
            ).fetchone()
            if row is None:
                # A 40-hex branch name is refused at creation, so this is an unknown commit.
                raise RevisionNotFound(f"revision '{revision}' not found in '{repo['repo_id']}'")
            return revision
        if revision.startswith(TAG_PREFIX):
            sha = self._tag_target(conn, repo, revision[len(TAG_PREFIX) :])
            if sha is None:
                raise RevisionNotFound(f"revision '{revision}' not found in '{repo['repo_id']}'")
            return sha
        row = conn.execute("SELECT commit_sha FROM refs WHERE repo = ? AND name = ?", (repo["id"], revision)).fetchone()
        sha = row["commit_sha"] if row else self._tag_target(conn, repo, revision)
        if sha is None:
            raise RevisionNotFound(f"revision '{revision}' not found in '{repo['repo_id']}'")
        return sha

    def _commit_branch(self, conn: sqlite3.Connection, repo: sqlite3.Row, branch: str) -> str:
        """The head of ``branch``, which a commit will move; a tag or an unknown name is refused."""
        tag = branch[len(TAG_PREFIX) :] if branch.startswith(TAG_PREFIX) else branch
        row = conn.execute("SELECT commit_sha FROM refs WHERE repo = ? AND name = ?", (repo["id"], branch)).fetchone()
        if row is None and self._tag_target(conn, repo, tag) is not None:
            raise InvalidRevision(
                f"'{tag}' is a tag of '{repo['repo_id']}', and tags do not move: commit to a branch such as "
                f"'{DEFAULT_BRANCH}', then tag the new commit"
            )
        return self._branch_head(conn, repo, branch)

    @staticmethod
    def _tree_of(conn: sqlite3.Connection, commit_sha: str) -> str:
        return conn.execute("SELECT tree FROM commits WHERE sha = ?", (commit_sha,)).fetchone()["tree"]

    @staticmethod
    def _entries(conn: sqlite3.Connection, tree: str) -> dict[str, FileEntry]:
        rows = conn.execute(
            "SELECT path, size, sha256, oid FROM tree_entries WHERE tree = ? ORDER BY path", (tree,)
        ).fetchall()
        return {r["path"]: FileEntry(r["path"], r["size"], r["sha256"], r["oid"]) for r in rows}

    def _info_from_row(self, row: sqlite3.Row, sha: str, meta: Mapping[str, Any], card: dict[str, Any]) -> RepoInfo:
        return RepoInfo(
            repo_id=row["repo_id"],
            namespace=row["namespace"],
            name=row["name"],
            private=bool(row["private"]),
            owner=row["owner"],
            created_at=_dt(row["created_at"]),
            last_modified=_dt(row["last_modified"]),
            downloads=row["downloads"],
            sha=sha,
            library_name=meta.get("library_name"),
            pipeline_tag=meta.get("pipeline_tag"),
            tags=tuple(meta.get("tags") or ()),
            base_models=tuple(meta.get("base_models") or ()),
            methods=tuple(meta.get("methods") or ()),
            tasks=tuple(meta.get("tasks") or ()),
            datasets=tuple(meta.get("datasets") or ()),
            card=card,
        )

    def _read_small(self, entry: FileEntry | None) -> bytes | None:
        if entry is None:
            return None
        with self.blobs.open(entry.sha256) as f:
            return f.read(_MAX_INDEXED_FILE_BYTES)

    def _metadata_for(self, entries: Mapping[str, FileEntry]) -> RepoMetadata:
        return extract_metadata(self._read_small(entries.get("README.md")), self._read_small(entries.get("adapter_config.json")),
                                self._read_small(entries.get(PEFTKIT_RECORD_FILE)))

    # ----------------------------------------------------------------- repos
    def create_repo(
        self, repo_id: str, *, private: bool = False, owner: str | None = None, exist_ok: bool = False
    ) -> RepoInfo:
        """Create an empty repo (one empty initial commit on ``main``).

        Raises :class:`RepoExists` (HTTP 409) when it exists, unless
        ``exist_ok``; an existing repo is returned unchanged.
        """
        namespace, name = split_repo_id(repo_id)
        now = time.time()
        with self.db.write() as conn:
            existing = conn.execute("SELECT repo_id FROM repos WHERE repo_id = ?", (repo_id,)).fetchone()
            if existing is not None:
                if not exist_ok:
                    raise RepoExists(
                        f"repository '{existing['repo_id']}' already exists; pick another name or pass exist_ok",
                        repo_id=existing["repo_id"],
                    )
            else:
                cost = empty_repo_cost(commit_cost("initial commit", "", owner or ""), DEFAULT_BRANCH)
                self.quotas.check(conn, namespace, 0, f"creating '{repo_id}' adds", metadata=cost)
                conn.execute(
                    "INSERT INTO repos(repo_id, namespace, name, private, owner, created_at, last_modified)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (repo_id, namespace, name, int(private), owner, now, now),
                )
                conn.execute("DELETE FROM repo_redirects WHERE old_id = ?", (repo_id,))
                repo = self._repo_row(conn, repo_id)
                tree = tree_oid(())
                sha = commit_oid(
                    repo_id=repo_id, tree=tree, parent=None, author=owner or "", timestamp=now,
                    message="initial commit", description="",
                )
                conn.execute(
                    "INSERT INTO commits(sha, repo, parent, tree, message, description, author, created_at)"
                    " VALUES (?, ?, NULL, ?, 'initial commit', '', ?, ?)",
                    (sha, repo["id"], tree, owner or "", now),
                )
                conn.execute("INSERT INTO refs(repo, name, commit_sha) VALUES (?, ?, ?)", (repo["id"], DEFAULT_BRANCH, sha))
                start_repo(conn, repo["id"], cost, tree)
                self._index(conn, repo, RepoMetadata())
        return self.repo_info(repo_id)

    def repo_exists(self, repo_id: str) -> bool:
        with self.db.connection() as conn:
            return conn.execute("SELECT 1 FROM repos WHERE repo_id = ?", (repo_id,)).fetchone() is not None

    def set_private(self, repo_id: str, private: bool) -> None:
        with self.db.write() as conn:
            repo = self._repo_row(conn, repo_id)
            conn.execute("UPDATE repos SET private = ? WHERE id = ?", (int(private), repo["id"]))

    def delete_repo(self, repo_id: str, *, missing_ok: bool = False) -> bool:
        """Delete the repo, its history, and every blob no other repo references; returns whether there was one
        (False only with ``missing_ok``)."""
        with self.db.write() as conn:
            row = conn.execute("SELECT * FROM repos WHERE repo_id = ?", (repo_id,)).fetchone()
            if row is None:
                if missing_ok:
                    return False
                raise RepoNotFound(f"repository '{repo_id}' not found")
            trees = [r["tree"] for r in conn.execute("SELECT DISTINCT tree FROM commits WHERE repo = ?", (row["id"],))]
            conn.execute("DELETE FROM repo_search WHERE rowid = ?", (row["id"],))
            conn.execute("DELETE FROM repos WHERE id = ?", (row["id"],))  # cascades
            blobs = self._drop_unused_trees(conn, trees)
        self._delete_unreferenced_blobs(blobs)
        return True

    @staticmethod
    def _blob_referenced(conn: sqlite3.Connection, sha256: str) -> bool:
        return conn.execute("SELECT 1 FROM tree_entries WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None

    def repo_info(self, repo_id: str, revision: str | None = None) -> RepoInfo:
        """Info about the repo at ``revision`` (default: the ``main`` head, served from the index)."""
        with self.db.read() as conn:
            row = self._repo_row(conn, repo_id)
            head = self._branch_head(conn, row, DEFAULT_BRANCH)
            sha = head if revision is None else self._resolve(conn, row, revision)
            if sha == head:
                m = conn.execute("SELECT meta_json, card_json FROM repo_meta WHERE repo = ?", (row["id"],)).fetchone()
                meta = json.loads(m["meta_json"]) if m else {}
                card = json.loads(m["card_json"]) if m else {}
                return self._info_from_row(row, sha, meta, card)
            entries = self._entries(conn, self._tree_of(conn, sha))
        md = self._metadata_for(entries)
        return self._info_from_row(row, sha, md.to_json(), md.card)

    # ------------------------------------------------------------- revisions
    def resolve_revision(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        """The commit sha a branch name or commit sha points to."""
        with self.db.read() as conn:
            return self._resolve(conn, self._repo_row(conn, repo_id), revision)

    def branch_head(self, repo_id: str, branch: str = DEFAULT_BRANCH) -> str:
        """The head of ``branch``, which a commit would move: a tag, a sha or an unknown name is refused."""
        if is_commit_sha(branch):
            raise InvalidRevision(f"cannot commit to commit '{branch}': commits go to a branch such as 'main'")
        with self.db.read() as conn:
            return self._commit_branch(conn, self._repo_row(conn, repo_id), validate_revision(branch))

    def list_branches(self, repo_id: str) -> dict[str, str]:
        with self.db.read() as conn:
            repo = self._repo_row(conn, repo_id)
            rows = conn.execute("SELECT name, commit_sha FROM refs WHERE repo = ? ORDER BY name", (repo["id"],))
            return {r["name"]: r["commit_sha"] for r in rows}

    def create_branch(self, repo_id: str, branch: str, *, revision: str = DEFAULT_BRANCH, exist_ok: bool = False) -> str:
        """Create ``branch`` pointing at ``revision``; returns that commit sha."""
        validate_branch(branch)
        with self.db.write() as conn:
            repo = self._repo_row(conn, repo_id)
            sha = self._resolve(conn, repo, revision)
            if self._tag_target(conn, repo, branch) is not None:
                raise Conflict(f"'{branch}' is already a tag of '{repo_id}'; pick another branch name")
            exists = conn.execute("SELECT 1 FROM refs WHERE repo = ? AND name = ?", (repo["id"], branch)).fetchone()
            if exists:
                if exist_ok:
                    return self._branch_head(conn, repo, branch)
                raise RepoExists(f"branch '{branch}' already exists in '{repo_id}'", repo_id=repo_id)
            self._check_room_for_a_ref(conn, repo)
            self.quotas.check(conn, repo["namespace"], 0, f"branch '{branch}' adds", metadata=ref_cost(branch))
            conn.execute("INSERT INTO refs(repo, name, commit_sha) VALUES (?, ?, ?)", (repo["id"], branch, sha))
            add_metadata(conn, repo["id"], ref_cost(branch))
            return sha

    def delete_branch(self, repo_id: str, branch: str) -> None:
        if branch == DEFAULT_BRANCH:
            raise InvalidRevision(f"the default branch '{DEFAULT_BRANCH}' cannot be deleted")
        with self.db.write() as conn:
            repo = self._repo_row(conn, repo_id)
            self._branch_head(conn, repo, branch)
            conn.execute("DELETE FROM refs WHERE repo = ? AND name = ?", (repo["id"], branch))
            add_metadata(conn, repo["id"], -ref_cost(branch))

    # ------------------------------------------------------------------ tags
    def list_tags(self, repo_id: str) -> dict[str, str]:
        """Tag name -> commit sha, sorted by name."""
        with self.db.read() as conn:
            repo = self._repo_row(conn, repo_id)
            rows = conn.execute("SELECT name, commit_sha FROM tags WHERE repo = ? ORDER BY name", (repo["id"],))
            return {r["name"]: r["commit_sha"] for r in rows}

    def create_tag(
        self, repo_id: str, tag: str, *, revision: str = DEFAULT_BRANCH, message: str = "", exist_ok: bool = False
    ) -> str:
        """Tag the commit ``revision`` points to (a branch head, a tag, a sha); returns that commit sha.

        An existing tag is :class:`Conflict` (409) unless ``exist_ok``; a tag
        never takes the name of a branch.
        """
        validate_tag(tag)
        with self.db.write() as conn:
            repo = self._repo_row(conn, repo_id)
            sha = self._resolve(conn, repo, revision)
            existing = self._tag_target(conn, repo, tag)
            if existing is not None:
                if exist_ok:
                    return existing
                raise Conflict(f"tag '{tag}' already exists in '{repo['repo_id']}' (at {existing}); delete it first")
            if conn.execute("SELECT 1 FROM refs WHERE repo = ? AND name = ?", (repo["id"], tag)).fetchone():
                raise Conflict(f"'{tag}' is a branch of '{repo['repo_id']}'; a tag needs a name no branch has")
            self._check_room_for_a_ref(conn, repo)
            cost = ref_cost(tag, message or "")
            self.quotas.check(conn, repo["namespace"], 0, f"tag '{tag}' adds", metadata=cost)
            conn.execute(
                "INSERT INTO tags(repo, name, commit_sha, message, created_at) VALUES (?, ?, ?, ?, ?)",
                (repo["id"], tag, sha, message or "", time.time()),
            )
            add_metadata(conn, repo["id"], cost)
            return sha

    def _check_room_for_a_ref(self, conn: Any, repo: Any) -> None:
        """PayloadTooLarge when ``repo`` holds ``max_repo_refs`` branches and tags already (checked inside the
        write transaction, which excludes every other writer: concurrent creations cannot overshoot)."""
        held = sum(conn.execute(f"SELECT COUNT(*) AS n FROM {table} WHERE repo = ?", (repo["id"],)).fetchone()["n"]
                   for table in ("refs", "tags"))
        if held >= self.max_repo_refs:
            raise PayloadTooLarge(
                f"'{repo['repo_id']}' holds {held:,} branches and tags, the most a repo may hold (every listing of "
                f"its refs and its page read them all): delete branches or tags you no longer need first")

    def delete_tag(self, repo_id: str, tag: str) -> None:
        if tag.startswith(TAG_PREFIX):
            tag = tag[len(TAG_PREFIX) :]
        with self.db.write() as conn:
            repo = self._repo_row(conn, repo_id)
            row = conn.execute("SELECT name, message FROM tags WHERE repo = ? AND name = ?",
                               (repo["id"], tag)).fetchone()
            if row is None:
                raise RevisionNotFound(f"tag '{tag}' not found in '{repo['repo_id']}'")
            conn.execute("DELETE FROM tags WHERE repo = ? AND name = ?", (repo["id"], tag))
            add_metadata(conn, repo["id"], -ref_cost(row["name"], row["message"]))

    # ------------------------------------------------------------- renaming
    def move_repo(self, from_id: str, to_id: str) -> RepoInfo:
        """Rename ``from_id`` to ``to_id`` (another name, another namespace, or both).

        History, branches and tags move with it. Reads of the old name are
        redirected (see :meth:`redirect_of`) until a repo is created there.
        """
        namespace, name = split_repo_id(to_id)
        with self.db.write() as conn:
            repo = self._repo_row(conn, from_id)
            clash = conn.execute("SELECT id, repo_id FROM repos WHERE repo_id = ?", (to_id,)).fetchone()
            if clash is not None and clash["id"] != repo["id"]:
                raise RepoExists(f"repository '{clash['repo_id']}' already exists; pick another name",
                                 repo_id=clash["repo_id"])
            if repo["namespace"].lower() != namespace.lower():  # its files and metadata start counting there
                files, metadata = repo_split(conn, repo["id"])
                self.quotas.check(conn, namespace, files, f"moving '{repo['repo_id']}' adds", metadata=metadata)
            conn.execute(
                "UPDATE repos SET repo_id = ?, namespace = ?, name = ?, last_modified = ? WHERE id = ?",
                (to_id, namespace, name, time.time(), repo["id"]),
            )
            conn.execute("DELETE FROM repo_redirects WHERE old_id = ?", (to_id,))
            if repo["repo_id"].lower() != to_id.lower():
                conn.execute(
                    "INSERT INTO repo_redirects(old_id, repo) VALUES (?, ?)"
                    " ON CONFLICT(old_id) DO UPDATE SET old_id = excluded.old_id, repo = excluded.repo",
                    (repo["repo_id"], repo["id"]),
                )
            words = self._repo_words(self._repo_row(conn, to_id))
            if self.db.kind == "postgresql":
                conn.execute(
                    "UPDATE repo_search SET repo_words = ?, doc = to_tsvector('simple', ?) WHERE rowid = ?",
                    (words, document_of(words, self._search_body(conn, repo["id"])), repo["id"]),
                )
            else:
                conn.execute("UPDATE repo_search SET repo_words = ? WHERE rowid = ?", (words, repo["id"]))
        return self.repo_info(to_id)

    def redirect_of(self, repo_id: str) -> str | None:
        """The current id of a repo once called ``repo_id`` (moved since), or None."""
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT r.repo_id FROM repo_redirects d JOIN repos r ON r.id = d.repo WHERE d.old_id = ?", (repo_id,)
            ).fetchone()
            return row["repo_id"] if row else None

    # ------------------------------------------------------------- squashing
    def super_squash(self, repo_id: str, branch: str = DEFAULT_BRANCH, *, message: str = "", author: str = "") -> str:
        """Replace the history of ``branch`` by one commit holding its current files; returns its sha.

        Commits no branch or tag reaches any more are deleted, and so are the
        blobs only they held (the space is freed). Irreversible.
        """
        branch = validate_branch(branch[len("refs/heads/") :] if branch.startswith("refs/heads/") else branch)
        with self.db.write() as conn:
            repo = self._repo_row(conn, repo_id)
            head = self._commit_branch(conn, repo, branch)
            tree = self._tree_of(conn, head)
            now = time.time()
            message = message or f"Super-squash branch '{branch}'"
            sha = commit_oid(
                repo_id=repo["repo_id"], tree=tree, parent=None, author=author, timestamp=now,
                message=message, description="",
            )
            conn.execute(
                "INSERT INTO commits(sha, repo, parent, tree, message, description, author, created_at)"
                " VALUES (?, ?, NULL, ?, ?, '', ?, ?)",
                (sha, repo["id"], tree, message, author, now),
            )
            conn.execute("UPDATE refs SET commit_sha = ? WHERE repo = ? AND name = ?", (sha, repo["id"], branch))
            conn.execute("UPDATE repos SET last_modified = ? WHERE id = ?", (now, repo["id"]))
            blobs = self._drop_unreachable_commits(conn, repo["id"])
            recount_repo(conn, repo["id"])  # the dropped commits' files count no more
        self._delete_unreferenced_blobs(blobs)
        return sha

    def _drop_unreachable_commits(self, conn: sqlite3.Connection, repo: int) -> set[str]:
        """Delete the repo's commits no branch or tag reaches, and trees no commit uses; returns their blobs."""
        parent_of = {r["sha"]: r["parent"] for r in conn.execute("SELECT sha, parent FROM commits WHERE repo = ?", (repo,))}
        todo = [r[0] for r in conn.execute(
            "SELECT commit_sha FROM refs WHERE repo = ? UNION SELECT commit_sha FROM tags WHERE repo = ?", (repo, repo)
        )]
        reachable: set[str] = set()
        while todo:
            sha = todo.pop()
            if sha in reachable or sha not in parent_of:
                continue
            reachable.add(sha)
            if parent_of[sha]:
                todo.append(parent_of[sha])
        doomed = [sha for sha in parent_of if sha not in reachable]
        trees = {r["tree"] for sha in doomed for r in conn.execute("SELECT tree FROM commits WHERE sha = ?", (sha,))}
        conn.executemany("DELETE FROM commits WHERE sha = ?", [(sha,) for sha in doomed])
        return self._drop_unused_trees(conn, trees)

    def _drop_unused_trees(self, conn: sqlite3.Connection, trees: Iterable[str]) -> set[str]:
        """Delete the entries of ``trees`` no commit uses any more; returns the blobs they named."""
        blobs: set[str] = set()
        for tree in trees:
            if conn.execute("SELECT 1 FROM commits WHERE tree = ? LIMIT 1", (tree,)).fetchone() is None:
                blobs.update(r["sha256"] for r in conn.execute("SELECT sha256 FROM tree_entries WHERE tree = ?", (tree,)))
                conn.execute("DELETE FROM tree_entries WHERE tree = ?", (tree,))
        return blobs

    def _delete_unreferenced_blobs(self, blobs: set[str]) -> None:
        # Unlink only once the deletion is committed, and inside a write
        # transaction: blobs are published only by write transactions, so no
        # writer (in this process or another) can start using one meanwhile.
        if not blobs:
            return
        with self.db.write() as conn:
            for sha in blobs:
                if not self._blob_referenced(conn, sha):
                    self.blobs.delete(sha)

    def get_commit(self, repo_id: str, sha: str) -> CommitInfo:
        with self.db.read() as conn:
            repo = self._repo_row(conn, repo_id)
            row = conn.execute("SELECT * FROM commits WHERE sha = ? AND repo = ?", (sha, repo["id"])).fetchone()
            if row is None:
                raise RevisionNotFound(f"revision '{sha}' not found in '{repo['repo_id']}'")
            return self._commit_info(repo["repo_id"], row)

    @staticmethod
    def _commit_info(repo_id: str, row: sqlite3.Row) -> CommitInfo:
        return CommitInfo(
            sha=row["sha"], repo_id=repo_id, parent=row["parent"], tree=row["tree"], message=row["message"],
            description=row["description"], author=row["author"], created_at=_dt(row["created_at"]),
        )

    def list_commits(
        self, repo_id: str, revision: str = DEFAULT_BRANCH, *, limit: int | None = None, offset: int = 0
    ) -> list[CommitInfo]:
        """History reachable from ``revision``, newest first (the parent chain), skipping the ``offset``
        newest. Only the returned commits' rows are read: the walk to ``offset`` follows parent ids alone,
        so a deep page does not hold every message before it."""
        end = -1 if limit is None else offset + limit
        with self.db.read() as conn:
            repo = self._repo_row(conn, repo_id)
            start = self._resolve(conn, repo, revision)
            rows = conn.execute(
                "WITH RECURSIVE chain(sha, depth) AS ("
                "  SELECT sha, 0 FROM commits WHERE sha = ?"
                "  UNION ALL"
                "  SELECT c.parent, chain.depth + 1 FROM commits c JOIN chain ON c.sha = chain.sha"
                "  WHERE c.parent IS NOT NULL AND (? < 0 OR chain.depth + 1 < ?)"
                ") SELECT c.* FROM chain JOIN commits c ON c.sha = chain.sha WHERE chain.depth >= ?"
                " ORDER BY chain.depth",
                (start, end, end, offset),
            ).fetchall()
            return [self._commit_info(repo["repo_id"], r) for r in rows]

    # ----------------------------------------------------------------- files
    def list_files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> list[FileEntry]:
        """All files at ``revision``, sorted by path."""
        return list(self.snapshot(repo_id, revision)[1].values())

    def snapshot(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> tuple[str, dict[str, FileEntry]]:
        """``(commit_sha, {path: FileEntry})`` read in one consistent transaction."""
        with self.db.read() as conn:
            repo = self._repo_row(conn, repo_id)
            sha = self._resolve(conn, repo, revision)
            return sha, self._entries(conn, self._tree_of(conn, sha))

    def path_entries(
        self, repo_id: str, paths: Iterable[str], revision: str = DEFAULT_BRANCH
    ) -> tuple[str, dict[str, FileEntry], dict[str, list[FileEntry]]]:
        """``(commit_sha, files, folders)`` for the given paths, read in one transaction.

        ``files`` maps each path that is a file to its entry; ``folders`` maps
        each path that is a folder to every file under it. Paths that are
        neither are left out. Index lookups only: the cost grows with the
        paths asked and the files under the folders asked, not the repo's size.
        """
        wanted = list(dict.fromkeys(validate_path(p) for p in paths))
        files: dict[str, FileEntry] = {}
        folders: dict[str, list[FileEntry]] = {}
        with self.db.read() as conn:
            repo = self._repo_row(conn, repo_id)
            sha = self._resolve(conn, repo, revision)
            tree = self._tree_of(conn, sha)
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                rows = conn.execute(
                    f"SELECT path, size, sha256, oid FROM tree_entries WHERE tree = ? AND path IN ({','.join('?' * len(chunk))})",  # noqa: S608
                    (tree, *chunk),
                )
                files.update((r["path"], FileEntry(r["path"], r["size"], r["sha256"], r["oid"])) for r in rows)
            asked = {path for path in wanted if path not in files}
            for path in asked:
                if any(folder in asked for folder in ancestors(path)):
                    continue  # inside another asked folder: filled from that folder's rows, not read again
                # Everything under 'a/b/' sorts between 'a/b/' and 'a/b0' ('0' follows '/'): a range scan.
                rows = conn.execute(
                    "SELECT path, size, sha256, oid FROM tree_entries WHERE tree = ? AND path >= ? AND path < ?"
                    " ORDER BY path",
                    (tree, path + "/", path + "0"),
                )
                for r in rows:
                    entry = FileEntry(r["path"], r["size"], r["sha256"], r["oid"])
                    for folder in ancestors(entry.path):
                        if folder in asked:
                            folders.setdefault(folder, []).append(entry)
        return sha, files, {path: folders[path] for path in wanted if path in folders}

    def file_entry(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> tuple[str, FileEntry]:
        """``(commit_sha, entry)`` for one file; :class:`EntryNotFound` carries the commit when missing."""
        validate_path(path)
        with self.db.read() as conn:
            repo = self._repo_row(conn, repo_id)
            sha = self._resolve(conn, repo, revision)
            row = conn.execute(
                "SELECT path, size, sha256, oid FROM tree_entries WHERE tree = ? AND path = ?",
                (self._tree_of(conn, sha), path),
            ).fetchone()
        if row is None:
            raise EntryNotFound(f"file '{path}' not found in '{repo_id}' at revision '{revision}'", commit=sha)
        return sha, FileEntry(row["path"], row["size"], row["sha256"], row["oid"])

    def blob_path(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> Path:
        """Path of the immutable blob holding ``path`` at ``revision``, with blobs in a folder. Never write to it.

        With blobs in S3 there is no such path: :meth:`open_file` reads any store.
        """
        if not isinstance(self.blobs, BlobStore):
            raise TypeError(f"blobs in {self.blobs.describe()} have no local path; use RegistryStore.open_file")
        _, entry = self.file_entry(repo_id, path, revision)
        return self.blobs.path(entry.sha256)

    def open_file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> BinaryIO:
        """The content of ``path`` at ``revision``, open for reading (seekable, streamed); the caller closes it."""
        _, entry = self.file_entry(repo_id, path, revision)
        return self.blobs.open(entry.sha256)

    def read_file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> bytes:
        with self.open_file(repo_id, path, revision) as f:
            return f.read()

    def export_snapshot(self, repo_id: str, dest: str | os.PathLike[str], revision: str = DEFAULT_BRANCH) -> str:
        """Write the files at ``revision`` into ``dest`` (each file atomically); returns the commit sha."""
        sha, entries = self.snapshot(repo_id, revision)
        dest = Path(dest)
        for entry in entries.values():
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with self.blobs.open(entry.sha256) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        return sha

    # --------------------------------------------------------------- commits
    def stage(self, content: FileContent, *, sync: bool | None = None) -> StagedBlob:
        """Hash and stage content (bytes, text, or a path to a local file) for a later commit.

        ``sync=False`` (bytes and text only) leaves flushing to
        ``self.blobs.sync_staged(...)``, which the caller must run before the commit.
        """
        if isinstance(content, StagedBlob):
            return content
        if isinstance(content, str):
            content = content.encode("utf-8")
        if isinstance(content, (bytes, bytearray, memoryview)):
            return self.blobs.stage_bytes(bytes(content), sync=sync)
        if isinstance(content, os.PathLike):
            return self.blobs.stage_file(content)
        raise TypeError(f"file content must be bytes, str, a path or a StagedBlob, not {type(content).__name__}")

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, FileContent] | None = None,
        deletions: Iterable[str] = (),
        message: str = "Update files",
        *,
        revision: str = DEFAULT_BRANCH,
        parent: str | None = None,
        description: str = "",
        author: str = "",
    ) -> str:
        """Add/replace ``files`` and delete ``deletions`` on branch ``revision`` in one commit.

        ``files`` maps repo paths to bytes, ``str`` (UTF-8), a local file path
        or a :class:`StagedBlob`. A deletion ending in ``/`` deletes a folder.
        Deletions apply before additions. ``parent``, when given, must be the
        branch head (else :class:`ParentCommitMismatch`): optimistic locking.
        Returns the new commit sha.
        """
        files = dict(files or {})
        deletions = list(deletions)
        split_repo_id(repo_id)
        for path in files:
            validate_new_path(path)
        for path in deletions:
            (validate_folder if path.endswith("/") else validate_path)(path)
        if is_commit_sha(revision):
            raise InvalidRevision(f"cannot commit to commit '{revision}': commits go to a branch such as 'main'")
        branch = validate_revision(revision)
        if parent is not None and not is_commit_sha(parent):
            raise BadRequest(f"parent commit {parent!r} is not a 40-hex commit sha")
        message = message or "Update files"
        with self.db.read() as conn:  # fail fast before staging any content
            self._commit_branch(conn, self._repo_row(conn, repo_id), branch)

        staged: dict[str, StagedBlob] = {}
        try:
            for path, content in files.items():
                staged[path] = self.stage(content)
            self._checkpoint("staged")
            with self.db.write() as conn:
                repo = self._repo_row(conn, repo_id)
                head = self._commit_branch(conn, repo, branch)
                if parent is not None and parent != head:
                    raise ParentCommitMismatch(
                        f"branch '{branch}' of '{repo_id}' moved: its head is {head}, not the parent commit "
                        f"{parent}; fetch the new head and retry"
                    )
                head_row = conn.execute("SELECT tree, created_at FROM commits WHERE sha = ?", (head,)).fetchone()
                entries = self._entries(conn, head_row["tree"])
                self._apply_deletions(entries, deletions, repo_id, head)
                self._check_no_file_folder_clash(entries, staged)
                for path, blob in staged.items():
                    entries[path] = FileEntry(path, blob.size, blob.sha256, blob.oid)
                if len(entries) > self.max_repo_files:
                    raise PayloadTooLarge(
                        f"after this commit '{repo['repo_id']}' would hold {len(entries):,} files on branch "
                        f"'{branch}'; a repo holds at most {self.max_repo_files:,} (each listing of it sends them "
                        "all): delete files in the same commit, or put the rest in another repo"
                    )
                # Only staged files can be new to the repo (the others are its head's); the commit's metadata, and
                # its tree's when the repo holds no commit of it yet. Checked inside this transaction, which
                # excludes every other writer: concurrent commits cannot overshoot.
                added = new_blobs(conn, repo["id"], {blob.sha256: blob.size for blob in staged.values()})
                tree = tree_oid((e.path, e.oid) for e in entries.values())
                metadata = commit_cost(message, description, author)
                if not holds_tree(conn, repo["id"], tree):
                    metadata += tree_cost(entries)
                self.quotas.check(conn, repo["namespace"], sum(added.values()), metadata=metadata)
                for blob in staged.values():
                    self.blobs.publish(blob)
                self._checkpoint("published")

                if conn.execute("SELECT 1 FROM tree_entries WHERE tree = ? LIMIT 1", (tree,)).fetchone() is None:
                    conn.executemany(
                        "INSERT INTO tree_entries(tree, path, sha256, oid, size) VALUES (?, ?, ?, ?, ?)",
                        [(tree, e.path, e.sha256, e.oid, e.size) for e in entries.values()],
                    )
                now = max(time.time(), head_row["created_at"] + 1e-6)  # history stays ordered
                sha = commit_oid(
                    repo_id=repo["repo_id"], tree=tree, parent=head, author=author, timestamp=now,
                    message=message, description=description,
                )
                conn.execute(
                    "INSERT INTO commits(sha, repo, parent, tree, message, description, author, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (sha, repo["id"], head, tree, message, description, author, now),
                )
                conn.execute("UPDATE refs SET commit_sha = ? WHERE repo = ? AND name = ?", (sha, repo["id"], branch))
                conn.execute("UPDATE repos SET last_modified = ? WHERE id = ?", (now, repo["id"]))
                add_blobs(conn, repo["id"], added)
                hold_tree(conn, repo["id"], tree)
                add_metadata(conn, repo["id"], metadata)
                if branch == DEFAULT_BRANCH:
                    self._index(conn, repo, self._metadata_for(entries))
                self._checkpoint("before_commit")
            return sha
        finally:
            for blob in staged.values():
                self.blobs.discard(blob)  # no-op for published blobs

    @staticmethod
    def _apply_deletions(entries: dict[str, FileEntry], deletions: list[str], repo_id: str, head: str) -> None:
        folders = [p.rstrip("/") for p in deletions if p.endswith("/")]
        for path in deletions:
            if not path.endswith("/"):
                if path not in entries:
                    raise EntryNotFound(
                        f"A file with this name doesn't exist: '{path}' in '{repo_id}'", commit=head
                    )
                del entries[path]
        if folders:
            existing = folder_set(entries)
            for folder in folders:
                if folder not in existing:
                    raise EntryNotFound(f"folder '{folder}/' not found in '{repo_id}'; nothing to delete", commit=head)
            for p in under_any(list(entries), folders):
                del entries[p]

    @staticmethod
    def _check_no_file_folder_clash(entries: Mapping[str, FileEntry], added: Mapping[str, Any]) -> None:
        found = clash(entries, added)
        if found is not None:
            path, file_folder = found
            if file_folder is not None:
                raise InvalidPath(f"cannot add '{path}': '{file_folder}' is a file, not a folder")
            raise InvalidPath(f"cannot add file '{path}': a folder with that name exists")

    # ----------------------------------------------------------------- index
    def _index(self, conn: sqlite3.Connection, repo: sqlite3.Row, md: RepoMetadata) -> None:
        """Replace the search entry of ``repo`` (its main head) inside the caller's transaction."""
        rid = repo["id"]
        conn.execute(
            "INSERT INTO repo_meta(repo, library_name, pipeline_tag, card_json, meta_json) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(repo) DO UPDATE SET library_name = excluded.library_name,"
            " pipeline_tag = excluded.pipeline_tag, card_json = excluded.card_json, meta_json = excluded.meta_json",
            (rid, md.library_name, md.pipeline_tag, json.dumps(md.card), json.dumps(md.to_json())),
        )
        conn.execute("DELETE FROM facets WHERE repo = ?", (rid,))
        conn.executemany(
            "INSERT INTO facets(kind, value, repo) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [(k, v, rid) for k, v in md.facets()],
        )
        conn.execute("DELETE FROM repo_search WHERE rowid = ?", (rid,))
        words, body = self._repo_words(repo), md.search_text()
        if self.db.kind == "postgresql":
            conn.execute(
                "INSERT INTO repo_search(rowid, repo_words, body, doc) VALUES (?, ?, ?, to_tsvector('simple', ?))",
                (rid, words, body, document_of(words, body)),
            )
        else:
            conn.execute("INSERT INTO repo_search(rowid, repo_words, body) VALUES (?, ?, ?)", (rid, words, body))

    @staticmethod
    def _search_body(conn: Any, rid: int) -> str:
        row = conn.execute("SELECT body FROM repo_search WHERE rowid = ?", (rid,)).fetchone()
        return row["body"] if row else ""

    @staticmethod
    def _repo_words(repo: sqlite3.Row) -> str:
        """What free-text search matches a repo's name against."""
        return " ".join(
            sorted({repo["repo_id"], repo["namespace"], repo["name"], re.sub(r"[-_.]+", " ", repo["name"])})
        )

    def reindex(self) -> int:
        """Rebuild the search index of every repo from its files (after an upgrade of the extraction rules)."""
        with self.db.read() as conn:
            ids = [r["repo_id"] for r in conn.execute("SELECT repo_id FROM repos")]
        for repo_id in ids:
            try:
                _, entries = self.snapshot(repo_id)
            except RepoNotFound:
                continue
            try:
                md = self._metadata_for(entries)
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"cannot reindex {repo_id}: its card or config is missing from {self.blobs.describe()} ({exc})"
                ) from exc
            with self.db.write() as conn:
                row = conn.execute("SELECT * FROM repos WHERE repo_id = ?", (repo_id,)).fetchone()
                if row is not None:
                    self._index(conn, row, md)
        return len(ids)

    # ---------------------------------------------------------------- search
    def _search_where(
        self,
        text: str | None,
        *,
        base_model: str | None,
        method: str | None,
        task: str | None,
        tags: Iterable[str],
        author: str | None,
        library: str | None,
        visible_to: Collection[str] | None,
        relevance: bool = False,
    ) -> tuple[list[str], list[Any], str, list[Any]]:
        """The WHERE clauses (over ``repos r``) and parameters of a search, shared by :meth:`search` and
        :meth:`search_facets`; with ``relevance``, a join ranking the text matches (and its parameters)."""
        tags = list(tags)
        if len(tags) > MAX_SEARCH_TAGS:
            raise BadRequest(f"the search combines {len(tags)} tags (filter values); at most {MAX_SEARCH_TAGS} "
                             "can be combined: remove some")
        if text is not None and len(text) > MAX_SEARCH_TEXT:
            raise BadRequest(f"the search text is {len(text)} characters long; at most {MAX_SEARCH_TEXT} are "
                             "searched: shorten it")
        where: list[str] = []
        params: list[Any] = []
        joins = ""
        order_params: list[Any] = []
        if visible_to is not None:
            namespaces = sorted({n.lower() for n in visible_to})
            if namespaces:
                where.append(f"(r.private = 0 OR lower(r.namespace) IN ({','.join('?' * len(namespaces))}))")
                params += namespaces
            else:
                where.append("r.private = 0")
        if author:
            where.append("r.namespace = ?")
            params.append(author)

        def facet(kind: str, values: list[str]) -> None:
            where.append(
                f"r.id IN (SELECT repo FROM facets WHERE kind = ? AND value IN ({','.join('?' * len(values))}))"
            )
            params.extend([kind, *values])

        if base_model:
            facet("base_model", [base_model])
        if method:
            facet("method", [method.lower()])
        if task:
            facet("task", normalize_task(task))
        if library:
            facet("library", [library])
        for tag in tags:
            facet("tag", [tag])

        if text is not None and text.strip():
            clause, text_params, joins, order_params = self._text_where(text.strip(), relevance)
            where.append(clause)
            params += text_params

        return where, params, joins, order_params

    def _text_where(self, text: str, relevance: bool) -> tuple[str, list[Any], str, list[Any]]:
        """The WHERE clause (over ``repos r``) matching free ``text``, its parameters, and with
        ``relevance`` a join ranking the matches (and its parameters): PostgreSQL's full-text search,
        SQLite's FTS5, or LIKE where the sqlite3 build lacks FTS5."""
        where: list[str] = []
        params: list[Any] = []
        joins = ""
        order_params: list[Any] = []
        words = re.findall(r"\w+", text)
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = tsquery_of(text) if self.db.kind == "postgresql" else None
        if query is not None:
            where.append(
                "(r.id IN (SELECT rowid FROM repo_search WHERE doc @@ to_tsquery('simple', ?))"
                " OR r.repo_id LIKE ? ESCAPE '\\')"
            )
            params += [query, like]
            if relevance:
                joins = (
                    " LEFT JOIN (SELECT rowid AS rid, -ts_rank(doc, to_tsquery('simple', ?)) AS rank"
                    " FROM repo_search WHERE doc @@ to_tsquery('simple', ?)) rel ON rel.rid = r.id"
                )
                order_params += [query, query]
        elif self.fts5 and words:
            match = " AND ".join(f'"{w}"*' for w in words)
            where.append(
                "(r.id IN (SELECT rowid FROM repo_search WHERE repo_search MATCH ?)"
                " OR r.repo_id LIKE ? ESCAPE '\\')"
            )
            params += [match, like]
            if relevance:
                joins = (
                    " LEFT JOIN (SELECT rowid AS rid, bm25(repo_search) AS rank FROM repo_search"
                    " WHERE repo_search MATCH ?) rel ON rel.rid = r.id"
                )
                order_params.append(match)
        elif words:
            clauses = []
            for w in words:
                wl = "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                clauses.append(
                    "(r.id IN (SELECT rowid FROM repo_search WHERE repo_words LIKE ? ESCAPE '\\'"
                    " OR body LIKE ? ESCAPE '\\'))"
                )
                params += [wl, wl]
            where.append("(" + " AND ".join(clauses) + " OR r.repo_id LIKE ? ESCAPE '\\')")
            params.append(like)
        else:
            where.append("r.repo_id LIKE ? ESCAPE '\\'")
            params.append(like)
        return where[0], params, joins, order_params

    def search(
        self,
        text: str | None = None,
        *,
        base_model: str | None = None,
        method: str | None = None,
        task: str | None = None,
        tags: Iterable[str] = (),
        author: str | None = None,
        library: str | None = None,
        sort: str = "downloads",
        limit: int = 20,
        offset: int = 0,
        visible_to: Collection[str] | None = None,
    ) -> list[RepoInfo]:
        """Find repos. All given filters must match.

        * ``text``: words matched (as prefixes) against the repo id, card body,
          tags, base model, method, task and datasets; or a substring of the id.
        * ``base_model``: the card's ``base_model`` or the adapter config's
          ``base_model_name_or_path``; ``method``: e.g. ``lora``; ``task``: a
          pipeline tag or PEFT task type (``CAUSAL_LM`` == ``text-generation``);
          ``tags``: every tag must be present (e.g. ``base_model:adapter:<id>``);
          ``author``: the namespace; ``library``: e.g. ``peft``.
        * ``sort``: ``downloads`` (default), ``recent`` (last modified),
          ``created``, ``relevance`` (text rank) or ``name``.
        * ``visible_to``: namespaces whose private repos may be returned;
          ``None`` returns every repo (trusted, in-process use).
        """
        sort_key = _SORT_ALIASES.get(sort)
        if sort_key is None:
            raise BadRequest(f"unknown sort {sort!r}; use one of: downloads, recent, created, relevance, name")
        if not isinstance(limit, int) or limit < 1:
            raise BadRequest(f"limit must be a positive integer, got {limit!r}")
        if not isinstance(offset, int) or offset < 0:
            raise BadRequest(f"offset must be a non-negative integer, got {offset!r}")
        limit = min(limit, MAX_SEARCH_LIMIT)
        where, params, joins, order_params = self._search_where(
            text, base_model=base_model, method=method, task=task, tags=tags, author=author, library=library,
            visible_to=visible_to, relevance=sort_key == "relevance",
        )

        order = {
            "downloads": "r.downloads DESC, r.last_modified DESC, r.id DESC",
            "recent": "r.last_modified DESC, r.id DESC",
            "created": "r.created_at DESC, r.id DESC",
            "name": "r.repo_id ASC",
            "relevance": "rel.rank IS NULL, rel.rank, r.downloads DESC, r.id DESC" if joins else
            "r.downloads DESC, r.last_modified DESC, r.id DESC",
        }[sort_key]
        # Two steps: the page's ids (a narrow sort the indexes serve), then their rows; sorting the wide
        # rows (cards) of every match costs ~50 ms at 10,000 repos.
        ids_sql = (
            "SELECT r.id FROM repos r" + joins
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY {order} LIMIT ? OFFSET ?"
        )
        with self.db.read() as conn:
            ids = [row[0] for row in conn.execute(ids_sql, order_params + params + [limit, offset])]
            found = {
                row["id"]: row
                for row in conn.execute(
                    "SELECT r.*, refs.commit_sha AS head, m.meta_json, m.card_json FROM repos r"
                    " JOIN refs ON refs.repo = r.id AND refs.name = 'main'"
                    f" LEFT JOIN repo_meta m ON m.repo = r.id WHERE r.id IN ({','.join('?' * len(ids))})",
                    ids,
                )
            } if ids else {}
        rows = [found[i] for i in ids if i in found]
        return [
            self._info_from_row(
                r, r["head"], json.loads(r["meta_json"]) if r["meta_json"] else {},
                json.loads(r["card_json"]) if r["card_json"] else {},
            )
            for r in rows
        ]

    def search_facets(
        self, text: str | None = None, *, per_kind: int = 10, sample: int = 1000, **filters: Any
    ) -> SearchFacets:
        """How many repos a :meth:`search` with these filters (its keyword arguments ``base_model``,
        ``method``, ``task``, ``tags``, ``author``, ``library``, ``visible_to``) finds, and the most
        frequent values of each facet (``base_model``, ``method``, ``task``, ``dataset``, ``license``,
        ``tag``, ``author``), at most ``per_kind`` of each, most frequent first.

        Values are counted in the ``sample`` most downloaded matches (all of them when there are no more),
        so the cost stays bounded whatever the registry's size; ``SearchFacets.counted`` says how many.
        Tags with a ``:`` (derived ones such as ``base_model:...``) are not counted as tags;
        ``license:<l>`` tags are counted as licenses."""
        unknown = set(filters) - {"base_model", "method", "task", "tags", "author", "library", "visible_to"}
        if unknown:
            raise TypeError(f"search_facets() got unexpected filters: {', '.join(sorted(unknown))}")
        where, params, _, _ = self._search_where(
            text, **{"base_model": None, "method": None, "task": None, "tags": (), "author": None, "library": None,
                     "visible_to": None, **filters},
        )
        condition = " WHERE " + " AND ".join(where) if where else ""
        # Counted in Python from the index's metadata of each hit: one narrow sorted scan and one row
        # each, cheaper than grouping the facets table (~15 index rows a repo) in SQL.
        sample_sql = (
            f"WITH hits AS MATERIALIZED (SELECT r.id, r.namespace FROM repos r{condition}"
            " ORDER BY r.downloads DESC, r.last_modified DESC, r.id DESC LIMIT ?)"
            " SELECT hits.namespace, m.meta_json FROM hits LEFT JOIN repo_meta m ON m.repo = hits.id"
        )
        tally: dict[str, dict[str, list[Any]]] = {k: {} for k in _FACET_KINDS}

        def add(kind: str, value: str) -> None:
            seen = tally[kind].setdefault(value.lower(), [value, 0])
            seen[1] += 1

        with self.db.read() as conn:
            (total,) = conn.execute(f"SELECT count(*) FROM repos r{condition}", params).fetchone()
            rows = conn.execute(sample_sql, [*params, sample]).fetchall()
        for namespace, meta_json in rows:
            meta = json.loads(meta_json) if meta_json else {}
            add("author", namespace)
            for kind, key in (("base_model", "base_models"), ("method", "methods"), ("task", "tasks"),
                              ("dataset", "datasets")):
                for value in meta.get(key) or ():
                    add(kind, value)
            for tag in meta.get("tags") or ():
                if tag.lower().startswith("license:"):
                    add("license", tag[len("license:") :])
                elif ":" not in tag:
                    add("tag", tag)
        counts = {
            kind: [(v, n) for v, n in sorted(values.values(), key=lambda vn: (-vn[1], vn[0]))[:per_kind]]
            for kind, values in tally.items()
        }
        return SearchFacets(total=total, counts=counts, counted=min(total, sample))

    def record_download(self, repo_id: str, count: int = 1, *, client: str | None = None) -> bool:
        """Count ``count`` downloads of the repo (sorting by downloads uses this); returns whether it counted.

        With ``client`` (the client's address) a client counts at most once
        per repo per UTC day, so nobody can inflate the count by repeating
        requests. Only a hash of the address is kept, and only for the day.
        """
        with self.db.write() as conn:
            if client is not None:
                day = int(time.time() // 86400)
                conn.execute("DELETE FROM download_clients WHERE day < ?", (day,))
                key = hashlib.sha256(_client_key(client).encode("utf-8", "replace")).hexdigest()[:32]
                cur = conn.execute(
                    "INSERT INTO download_clients(day, repo, client)"
                    " SELECT ?, id, ? FROM repos WHERE repo_id = ? ON CONFLICT DO NOTHING",
                    (day, key, repo_id),
                )
                if cur.rowcount == 0:
                    return False
            cur = conn.execute("UPDATE repos SET downloads = downloads + ? WHERE repo_id = ?", (count, repo_id))
            return cur.rowcount > 0

    # ----------------------------------------------------------- maintenance
    def gc(self, *, tmp_older_than_s: float = 3600.0, min_age_s: float = 0.0, allow_missing: bool = False) -> int:
        """Delete blobs no commit references (left by crashed commits) and stale staging files.

        Returns the number of blobs deleted (:meth:`gc_report` says which, their bytes, and the
        staging files). Safe while the server runs, and it holds the write lock every server shares
        only for the deletions, not for listing the blob store (minutes for a big bucket). Only blobs
        written ``min_age_s`` seconds before the listing started are candidates. Raises
        BlobStoreMismatch, deleting nothing, when the store's marker names another registry, or when
        the blob store lacks files the database refers to (another registry's store?), unless
        ``allow_missing`` (its own store, where fsck found files lost).
        """
        return len(self.gc_report(tmp_older_than_s=tmp_older_than_s, min_age_s=min_age_s,
                                  allow_missing=allow_missing).blobs)

    def gc_report(self, *, tmp_older_than_s: float = 3600.0, min_age_s: float = 0.0, allow_missing: bool = False,
                  dry_run: bool = False) -> GcReport:
        """:meth:`gc`, returning what it deleted: ``GcReport(blobs=[(sha256, bytes)], staging_files)``.
        ``dry_run=True`` deletes nothing and takes no write lock: the report lists what gc would delete."""
        return collect_garbage(self.db, self.blobs, tmp_older_than_s=tmp_older_than_s, min_age_s=min_age_s,
                               allow_missing=allow_missing, dry_run=dry_run)

    def orphan_blobs(self) -> list[str]:
        """Blobs on disk that no commit references (invisible to every read)."""
        with self.db.read() as conn:
            referenced = referenced_blobs(conn)
        return sorted(sha for sha in self.blobs.iter_all() if sha not in referenced)

    def fsck(self) -> list[str]:
        """Verify database, history and every blob (see :mod:`peftkit.registry.fsck`); returns the problems."""
        return fsck_database(self.db, self.blobs).problems
