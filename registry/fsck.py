"""``peftkit registry fsck``: verify a registry data folder end to end.

Checks, in order:

* the database: SQLite's ``PRAGMA integrity_check`` and ``foreign_key_check``
  (PostgreSQL enforces both itself: :func:`fsck_database` reads it in one snapshot);
* history: every branch and tag points to a commit of its own repo, every
  commit's parent and tree exist, and every tree's id matches its entries;
* content: every blob a tree references exists, has the recorded size, and
  re-hashes to its sha256 address and its git oid;
* storage accounting: each repo's counted bytes and files, trees and metadata bytes (what quotas use,
  see :mod:`peftkit.registry.quotas`) equal a recount from its commits, branches and tags;
* identity: the blob store's marker names this registry (see :mod:`peftkit.registry.identity`; an
  unmarked store, or a database made before ids, has nothing to compare).

Blobs on disk that nothing references are counted, not reported as problems
(an interrupted upload leaves them; ``registry gc`` removes them). Nothing is
changed: fsck only reads, and is safe while the server runs.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .blob_storage import BlobStorage
from .blobs import BlobStore, sha256_and_oid_of_stream
from .hashing import tree_oid
from .identity import ForeignBlobStore, read_marker
from .quotas import HELD_BLOBS_SQL, held_metadata

_MAX_LISTED = 1000  # problems listed in full; the count is always exact


@dataclass
class FsckReport:
    """What fsck checked and found; ``ok`` when no problem was found."""

    repos: int = 0
    commits: int = 0
    trees: int = 0
    blobs: int = 0
    bytes_hashed: int = 0
    orphan_blobs: int = 0
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: str) -> None:
        self.problem_count += 1
        if len(self.problems) < _MAX_LISTED:
            self.problems.append(problem)

    def to_json(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def check_database(conn: sqlite3.Connection, report: FsckReport) -> None:
    for (message,) in conn.execute("PRAGMA integrity_check").fetchall():
        if message != "ok":
            report.add(f"database integrity: {message}")
    for row in conn.execute("PRAGMA foreign_key_check").fetchall():
        report.add(f"database: row {row[1]} of table {row[0]} refers to a missing row of {row[2]}")


def check_history(conn: sqlite3.Connection, report: FsckReport) -> None:
    repos = {r["id"]: r["repo_id"] for r in conn.execute("SELECT id, repo_id FROM repos")}
    report.repos = len(repos)
    commits = {r["sha"]: (r["repo"], r["parent"], r["tree"]) for r in conn.execute("SELECT sha, repo, parent, tree FROM commits")}
    report.commits = len(commits)
    for kind, table in (("branch", "refs"), ("tag", "tags")):
        for r in conn.execute(f"SELECT repo, name, commit_sha FROM {table}"):  # noqa: S608 - fixed names
            repo_id = repos.get(r["repo"], f"#{r['repo']}")
            target = commits.get(r["commit_sha"])
            if target is None:
                report.add(f"{kind} '{r['name']}' of {repo_id} points to missing commit {r['commit_sha']}")
            elif target[0] != r["repo"]:
                report.add(f"{kind} '{r['name']}' of {repo_id} points to commit {r['commit_sha']} of another repo")
    for r in conn.execute("SELECT r.repo_id FROM repos r LEFT JOIN refs ON refs.repo = r.id AND refs.name = 'main'"
                          " WHERE refs.repo IS NULL"):
        report.add(f"{r['repo_id']} has no 'main' branch")
    trees_with_entries = {r[0] for r in conn.execute("SELECT DISTINCT tree FROM tree_entries")}
    empty_tree = tree_oid(())
    for sha, (repo, parent, tree) in commits.items():
        repo_id = repos.get(repo, f"#{repo}")
        if parent is not None and parent not in commits:
            report.add(f"commit {sha} of {repo_id} has a missing parent {parent}")
        if tree != empty_tree and tree not in trees_with_entries:
            report.add(f"commit {sha} of {repo_id} has a missing tree {tree}")

    # One ordered pass over every entry: recompute each tree's id from its entries.
    current: str | None = None
    pairs: list[tuple[str, str]] = []

    def finish() -> None:
        if current is not None:
            report.trees += 1
            if tree_oid(pairs) != current:
                report.add(f"tree {current} does not match its entries (a file's path or oid was altered)")

    for r in conn.execute("SELECT tree, path, oid FROM tree_entries ORDER BY tree, path"):
        if r["tree"] != current:
            finish()
            current, pairs = r["tree"], []
        pairs.append((r["path"], r["oid"]))
    finish()


def check_blobs(conn: sqlite3.Connection, blobs: BlobStorage, report: FsckReport) -> None:
    referenced: dict[str, tuple[int, str]] = {}
    for r in conn.execute("SELECT sha256, size, oid FROM tree_entries"):
        seen = referenced.setdefault(r["sha256"], (r["size"], r["oid"]))
        if seen != (r["size"], r["oid"]):
            report.add(f"blob {r['sha256']} is recorded with two sizes or oids")
    for sha, (size, oid) in sorted(referenced.items()):
        report.blobs += 1
        try:
            actual_size = blobs.size(sha)
            if actual_size is None:
                report.add(f"missing blob {sha} ({size} bytes)")
                continue
            if actual_size != size:
                report.add(f"corrupt blob {sha}: {actual_size} bytes stored, {size} recorded")
                continue
            with blobs.open(sha) as f:
                got_sha, got_oid, read = sha256_and_oid_of_stream(f, size, f"blob {sha}")
        except Exception as exc:  # noqa: BLE001 - unreadable (a disk or S3 error), or changed size while read
            report.add(f"blob {sha} cannot be read: {exc}")
            continue
        report.bytes_hashed += read
        if got_sha != sha:
            report.add(f"corrupt blob {sha}: its content hashes to {got_sha}")
        elif got_oid != oid:
            report.add(f"blob {sha} is recorded with git oid {oid}, its content has {got_oid}")
    report.orphan_blobs += sum(1 for sha in blobs.iter_all() if sha not in referenced)


def check_storage(conn: sqlite3.Connection, report: FsckReport, *, metadata: bool = True) -> None:
    """Each repo's maintained counters (repo_storage, repo_blobs; with ``metadata``, repo_trees and the
    metadata bytes, which a SQLite file of a schema before 4 lacks) against a recount from its rows."""
    actual: dict[int, tuple[int, int]] = {
        r[0]: (int(r[1]), int(r[2])) for r in conn.execute(
            f"SELECT repo, COALESCE(SUM(size), 0), COUNT(*) FROM ({HELD_BLOBS_SQL.format(where='')}) held"
            " GROUP BY repo"
        )
    }
    counted_files = {r[0]: int(r[1]) for r in conn.execute("SELECT repo, COUNT(*) FROM repo_blobs GROUP BY repo")}
    counted_bytes = {r[0]: int(r[1]) for r in conn.execute("SELECT repo, bytes FROM repo_storage")}
    for r in conn.execute("SELECT id, repo_id FROM repos"):
        size, files = actual.get(r[0], (0, 0))
        if r[0] not in counted_bytes:
            report.add(f"{r[1]} has no storage count (quotas would not count it)")
        elif (counted_bytes[r[0]], counted_files.get(r[0], 0)) != (size, files):
            report.add(f"{r[1]} is counted as storing {counted_bytes[r[0]]} bytes in {counted_files.get(r[0], 0)} "
                       f"file(s); its commits hold {size} bytes in {files}")
    if metadata:
        check_metadata(conn, report)


def check_metadata(conn: sqlite3.Connection, report: FsckReport) -> None:
    """Each repo's counted metadata bytes and trees against a recount from its commits, trees, branches and tags."""
    actual = held_metadata(conn)
    counted = {r[0]: int(r[1]) for r in conn.execute("SELECT repo, metadata_bytes FROM repo_storage")}
    trees = {r[0]: int(r[1]) for r in conn.execute(
        "SELECT repo, COUNT(*) FROM (SELECT DISTINCT repo, tree FROM commits) held GROUP BY repo")}
    counted_trees = {r[0]: int(r[1]) for r in conn.execute("SELECT repo, COUNT(*) FROM repo_trees GROUP BY repo")}
    for r in conn.execute("SELECT id, repo_id FROM repos"):
        if r[0] in counted and counted[r[0]] != actual.get(r[0], 0):
            report.add(f"{r[1]} is counted as holding {counted[r[0]]} bytes of metadata; its commits, trees, "
                       f"branches and tags take {actual.get(r[0], 0)}")
        if counted_trees.get(r[0], 0) != trees.get(r[0], 0):
            report.add(f"{r[1]} is counted as holding {counted_trees.get(r[0], 0)} distinct tree(s); its commits "
                       f"hold {trees.get(r[0], 0)}")


def check_identity(registry_id: str | None, blobs: BlobStorage, report: FsckReport) -> None:
    """A problem when the blob store's marker names another registry than the database's id."""
    try:
        marker = read_marker(blobs)
    except ForeignBlobStore as exc:
        report.add(str(exc))
        return
    if registry_id is not None and marker is not None and marker != registry_id:
        report.add(f"the blob store {blobs.describe()} belongs to registry {marker}, this database is registry "
                   f"{registry_id}: gc would delete that registry's files (see `peftkit registry adopt-blobs`)")


def _stored_registry_id(conn: sqlite3.Connection) -> str | None:
    """The id in a SQLite file fsck opened read-only (None in a registry of before ids, until opened)."""
    if not _has_table(conn, "registry_identity"):
        return None
    row = conn.execute("SELECT registry_id FROM registry_identity").fetchone()
    return None if row is None else str(row[0])


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    """Whether a SQLite file fsck opened read-only has ``table`` (a registry of an older schema gets the
    storage counters and the id once any other command opened it)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() is not None


def fsck_database(db: Any, blobs: BlobStorage) -> FsckReport:
    """Check the registry whose metadata is in the open database ``db`` (SQLite or PostgreSQL) and
    whose blobs are in ``blobs`` (a folder or S3), in one read-only snapshot. PostgreSQL enforces its own
    integrity and foreign keys, so only SQLite's are checked explicitly."""
    report = FsckReport()
    try:
        with db.read() as conn:
            if db.kind == "sqlite":
                check_database(conn, report)
            check_history(conn, report)
            check_blobs(conn, blobs, report)
            check_storage(conn, report)
        check_identity(db.registry_id, blobs, report)
    except Exception as exc:  # noqa: BLE001 - any driver's error is a finding, not a crash
        report.add(f"database cannot be read: {exc}")
    return report


def fsck(root: Path) -> FsckReport:
    """Check the registry in ``root`` (read-only). A database SQLite cannot read is reported, not raised."""
    report = FsckReport()
    uri = f"file:{Path(root, 'registry.db').as_posix()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        report.add(f"database cannot be opened: {exc}")
        return report
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("BEGIN")  # one consistent snapshot for every check
        check_database(conn, report)
        check_history(conn, report)
        blobs = BlobStore(Path(root), create=False)
        check_blobs(conn, blobs, report)
        if _has_table(conn, "repo_storage"):
            check_storage(conn, report, metadata=_has_table(conn, "repo_trees"))
        check_identity(_stored_registry_id(conn), blobs, report)
    except sqlite3.DatabaseError as exc:
        report.add(f"database cannot be read: {exc}")
    finally:
        conn.close()
    return report
