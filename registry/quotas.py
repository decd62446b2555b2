"""Storage quotas: how many bytes each namespace (a user or an organization) makes the registry hold, and its limit.

What counts: a repo's size is its files plus its metadata.

* Files: the sum of the sizes of the distinct files its commits hold, every commit the store keeps (all
  branches, tags and history; a file kept at several paths or revisions counts once).
* Metadata: what the database keeps for it, by a fixed cost model (:data:`REPO_COST` and the other
  costs below, measured on SQLite and PostgreSQL): the repo itself; each commit it keeps, with its
  message, description and author; each distinct tree its commits hold (one row per file path, so a
  tree of 20,000 empty files costs about 6.5 MB however small its files are); each branch and tag.
  Without it a client under its quota could grow the database without limit (empty files at new paths,
  long commit messages, empty repos, thousands of tags).

A namespace's usage is the sum of its repos' sizes: the same file (or tree) in two repos counts in each,
so deleting a repo frees exactly its size. Deleting a file in a new commit frees nothing while older
commits still hold it; squashing history (``super_squash``) drops those commits.

Cost: the counts are maintained, not scanned. ``repo_blobs`` lists each repo's distinct blobs,
``repo_trees`` its distinct trees, and ``repo_storage`` holds each repo's file bytes and metadata
bytes; a commit adds only the blobs it stages (index lookups, as many as the files it carries) and,
when its tree is new to the repo, that tree's cost (computed from the entries the commit already holds
in memory), inside its own write transaction; a namespace's usage is an indexed sum over its repos'
counters. Deleting a repo drops its rows (cascade); squashing recounts that one repo. The check runs
inside the write transaction that every writer takes (SQLite's write lock, PostgreSQL's advisory lock
shared by every server), so concurrent commits cannot overshoot.

The limit is a per-namespace override kept in the database (``peftkit registry quota set``), else
the server's default (``serve --namespace-quota-gb``), else none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from peftkit.hub_rules.storage import NamespaceUsage, format_size

from .errors import QuotaExceeded

_LOOKUP_CHUNK = 500

#: ``(repo, sha256, size)`` of each distinct blob the commits of a repo hold, for the repos ``{where}`` keeps
#: (``""``: every repo): what the counters hold, recounted from the commits (also fsck's comparison).
HELD_BLOBS_SQL = ("SELECT c.repo AS repo, te.sha256 AS sha256, MAX(te.size) AS size FROM commits c"
                  " JOIN tree_entries te ON te.tree = c.tree{where} GROUP BY c.repo, te.sha256")

#: How to get below a quota, in every refusal.
QUOTA_FIX = (
    "free space by deleting repos (`peftkit hub delete REPO`; on a registry also `HfApi.delete_repo`), branches "
    "or tags, or by squashing history (on a registry, `HfApi.super_squash_history`: older commits keep their files "
    "and count as metadata), or ask an administrator to raise it: `peftkit registry quota set {namespace} SIZE "
    "--data FOLDER` (the registry's data folder; the embedded hub's is $PEFTKIT_HOME/hub, else "
    "~/.cache/peftkit/hub)"
)

# ------------------------------------------------------------ the cost model
# What a row takes, roughly, with its indexes (measured with 1,000 repos, commits and tags and 20,000-entry
# trees; SQLite / PostgreSQL): an empty repo 760 / 1,500 bytes with its first commit and branch, a commit
# 280 / 550, a tree entry 300 + 2.4 / 255 + 2.3 bytes per byte of its path, a tag 90 / 170.

#: A repo's own rows (the repo, its search entry and card, its counters), besides its commits and branches.
REPO_COST = 500
#: A commit, besides the bytes of its message, description and author.
COMMIT_COST = 300
#: A file path in a tree, besides twice the bytes of the path (the row and an index hold it).
TREE_ENTRY_COST = 300
#: A branch or tag, besides the bytes of its name (and a tag's message).
REF_COST = 100


def text_bytes(*texts: str) -> int:
    """The bytes ``texts`` take in UTF-8, as the database stores them."""
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


def commit_cost(message: str, description: str = "", author: str = "") -> int:
    return COMMIT_COST + text_bytes(message, description, author)


def tree_cost(paths: Iterable[str]) -> int:
    """What a tree of files at ``paths`` costs a repo that does not hold it yet."""
    return sum(TREE_ENTRY_COST + 2 * text_bytes(path) for path in paths)


def ref_cost(name: str, message: str = "") -> int:
    """What a branch (or a tag with its ``message``) costs."""
    return REF_COST + text_bytes(name, message)


def empty_repo_cost(first_commit: int, branch: str) -> int:
    """What a new repo costs with its first commit (of cost ``first_commit``, on an empty tree) and ``branch``."""
    return REPO_COST + first_commit + ref_cost(branch)


def _octets(column: str) -> str:
    """SQL for the UTF-8 bytes of a text ``column`` (PostgreSQL's ``octet_length``, see pg_schema.translate)."""
    return f"length(CAST({column} AS BLOB))"


#: ``(repo, metadata bytes)`` of each part of the cost model, for the repos ``{where}`` keeps (a condition on
#: ``repo``; ``""``: every repo): what the counters hold, recounted (also fsck's comparison).
_HELD_METADATA_SQL = (
    f"SELECT id AS repo, {REPO_COST} AS cost FROM repos{{where_id}}",
    f"SELECT repo, SUM({COMMIT_COST} + {_octets('message')} + {_octets('description')} + {_octets('author')})"
    " FROM commits{where} GROUP BY repo",
    f"SELECT d.repo, SUM({TREE_ENTRY_COST} + 2 * {_octets('te.path')}) FROM (SELECT DISTINCT repo, tree FROM commits"
    "{where}) d JOIN tree_entries te ON te.tree = d.tree GROUP BY d.repo",
    f"SELECT repo, SUM({REF_COST} + {_octets('name')}) FROM refs{{where}} GROUP BY repo",
    f"SELECT repo, SUM({REF_COST} + {_octets('name')} + {_octets('message')}) FROM tags{{where}} GROUP BY repo",
)


def held_metadata(conn: Any, repo: int | None = None) -> dict[int, int]:
    """Each repo's metadata bytes (only ``repo``'s when given), counted from its rows: time linear in
    what it holds. A repo with nothing but its own row costs :data:`REPO_COST`."""
    where, where_id, params = ("", "", ()) if repo is None else (" WHERE repo = ?", " WHERE id = ?", (repo,))
    held: dict[int, int] = {}
    for sql in _HELD_METADATA_SQL:
        for row in conn.execute(sql.format(where=where, where_id=where_id), params):
            held[int(row[0])] = held.get(int(row[0]), 0) + int(row[1] or 0)
    return held


# ------------------------------------------------------------ the counters
def recount_repo(conn: Any, repo: int) -> None:
    """Count ``repo``'s distinct blobs, trees and bytes again from its rows (after commits were deleted)."""
    conn.execute("DELETE FROM repo_blobs WHERE repo = ?", (repo,))
    conn.execute("INSERT INTO repo_blobs(repo, sha256, size) " + HELD_BLOBS_SQL.format(where=" WHERE c.repo = ?"),
                 (repo,))
    conn.execute("DELETE FROM repo_trees WHERE repo = ?", (repo,))
    conn.execute("INSERT INTO repo_trees(repo, tree) SELECT DISTINCT repo, tree FROM commits WHERE repo = ?", (repo,))
    (total,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM repo_blobs WHERE repo = ?", (repo,)).fetchone()
    conn.execute(
        "INSERT INTO repo_storage(repo, bytes, metadata_bytes) VALUES (?, ?, ?) ON CONFLICT(repo) DO UPDATE"
        " SET bytes = excluded.bytes, metadata_bytes = excluded.metadata_bytes",
        (repo, total, held_metadata(conn, repo).get(repo, 0)),
    )


def recount_all(conn: Any) -> None:
    """Count every repo from its rows: once, when a registry of an older schema is first opened."""
    conn.execute("DELETE FROM repo_blobs")
    conn.execute("DELETE FROM repo_trees")
    conn.execute("DELETE FROM repo_storage")
    conn.execute("INSERT INTO repo_blobs(repo, sha256, size) " + HELD_BLOBS_SQL.format(where=""))
    conn.execute("INSERT INTO repo_trees(repo, tree) SELECT DISTINCT repo, tree FROM commits")
    conn.execute(
        "INSERT INTO repo_storage(repo, bytes) SELECT r.id, COALESCE(SUM(b.size), 0) FROM repos r"
        " LEFT JOIN repo_blobs b ON b.repo = r.id GROUP BY r.id"
    )
    conn.executemany("UPDATE repo_storage SET metadata_bytes = ? WHERE repo = ?",
                     [(cost, repo) for repo, cost in held_metadata(conn).items()])


def start_repo(conn: Any, repo: int, metadata: int, tree: str) -> None:
    """A new repo stores no file yet, and ``metadata`` bytes (see :func:`empty_repo_cost`) with ``tree``."""
    conn.execute("INSERT INTO repo_storage(repo, bytes, metadata_bytes) VALUES (?, 0, ?)"
                 " ON CONFLICT(repo) DO NOTHING", (repo, metadata))
    hold_tree(conn, repo, tree)


def holds_tree(conn: Any, repo: int, tree: str) -> bool:
    """Whether a commit of ``repo`` holds ``tree`` already (then a new commit of it costs no tree)."""
    return conn.execute("SELECT 1 FROM repo_trees WHERE repo = ? AND tree = ?", (repo, tree)).fetchone() is not None


def hold_tree(conn: Any, repo: int, tree: str) -> None:
    """Record that a commit of ``repo`` holds ``tree`` (its cost is added with :func:`add_metadata`)."""
    conn.execute("INSERT INTO repo_trees(repo, tree) VALUES (?, ?) ON CONFLICT DO NOTHING", (repo, tree))


def add_metadata(conn: Any, repo: int, added: int) -> None:
    """Record that ``repo`` holds ``added`` more metadata bytes (less, when negative: a deleted branch or tag)."""
    if added:
        conn.execute("UPDATE repo_storage SET metadata_bytes = metadata_bytes + ? WHERE repo = ?", (added, repo))


def _held(conn: Any, repo: int, column: str, values: list[Any]) -> set[Any]:
    """Those of ``values`` that ``column`` (sha256 or size) of ``repo``'s counted blobs holds, looked up
    in chunks of bounded size."""
    held: set[Any] = set()
    for i in range(0, len(values), _LOOKUP_CHUNK):
        chunk = values[i : i + _LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT DISTINCT {column} FROM repo_blobs WHERE repo = ? AND {column} IN ({marks})"  # noqa: S608
        rows = conn.execute(sql, (repo, *chunk))
        held.update(r[0] for r in rows)
    return held


def new_blobs(conn: Any, repo: int, blobs: Mapping[str, int]) -> dict[str, int]:
    """Those of ``blobs`` (sha256 -> size) that ``repo`` does not hold yet: what a commit of them adds."""
    held = _held(conn, repo, "sha256", list(blobs))
    return {sha: size for sha, size in blobs.items() if sha not in held}


def add_blobs(conn: Any, repo: int, added: Mapping[str, int]) -> None:
    """Record that ``repo`` now holds ``added`` (sha256 -> size, none of them held before)."""
    if not added:
        return
    conn.executemany("INSERT INTO repo_blobs(repo, sha256, size) VALUES (?, ?, ?)",
                     [(repo, sha, size) for sha, size in added.items()])
    conn.execute("UPDATE repo_storage SET bytes = bytes + ? WHERE repo = ?", (sum(added.values()), repo))


def repo_split(conn: Any, repo: int) -> tuple[int, int]:
    """The bytes of files and of metadata ``repo`` counts against its namespace's quota."""
    row = conn.execute("SELECT bytes, metadata_bytes FROM repo_storage WHERE repo = ?", (repo,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def namespace_split(conn: Any, namespace: str) -> tuple[int, int]:
    """The bytes of files and of metadata ``namespace``'s repos hold: an indexed sum over their counters."""
    files, metadata = conn.execute(
        "SELECT COALESCE(SUM(s.bytes), 0), COALESCE(SUM(s.metadata_bytes), 0) FROM repos r"
        " JOIN repo_storage s ON s.repo = r.id WHERE r.namespace = ?",
        (namespace,),
    ).fetchone()
    return int(files), int(metadata)


# ------------------------------------------------------------ the limits
class Quotas:
    """The namespaces' limits: overrides in the database over ``default_bytes`` (None: no limit)."""

    def __init__(self, db: Any, default_bytes: int | None = None) -> None:
        self.db = db
        self.default_bytes = default_bytes

    def _limit(self, conn: Any, namespace: str) -> tuple[int | None, str]:
        row = conn.execute("SELECT quota_bytes FROM namespace_quotas WHERE namespace = ?", (namespace,)).fetchone()
        if row is not None:
            return int(row[0]), "namespace"
        if self.default_bytes is not None:
            return self.default_bytes, "default"
        return None, "none"

    def check(self, conn: Any, namespace: str, added: int, action: str = "this commit adds", *,
              metadata: int = 0) -> None:
        """Raise :class:`QuotaExceeded` when ``added`` more bytes of files and ``metadata`` more bytes of
        metadata would take ``namespace`` over its limit.

        Run it in the write transaction that then records them, so no other writer slips in between."""
        if added + metadata <= 0:
            return
        limit, source = self._limit(conn, namespace)
        if limit is None:
            return
        files, held_metadata = namespace_split(conn, namespace)
        used = files + held_metadata
        if used + added + metadata > limit:
            whose = "" if source == "namespace" else " (the server's default)"
            split = f" ({format_size(added)} of files, {format_size(metadata)} of metadata)" if metadata else ""
            raise QuotaExceeded(
                f"storage quota exceeded: namespace '{namespace}' stores {format_size(used)} "
                f"({format_size(files)} of files, {format_size(held_metadata)} of metadata: history, file paths, "
                f"branches and tags) of its {format_size(limit)} quota{whose}, and {action} "
                f"{format_size(added + metadata)}{split}; " + QUOTA_FIX.format(namespace=namespace)
            )

    def check_announced(self, repo_id: str, sizes: Iterable[int]) -> None:
        """Refuse an upload from the sizes of its files alone (a preupload), before any byte is sent.

        It counts only what must be new: a file whose size no file of the repo has cannot be one it
        stores, and files of one size are counted once (they may be copies). A file of a size the repo
        has may be stored already, so it passes here; the commit then counts it exactly, by content."""
        wanted = sorted({int(size) for size in sizes if size})
        if not wanted:
            return
        with self.db.read() as conn:
            repo = conn.execute("SELECT id, namespace FROM repos WHERE repo_id = ?", (repo_id,)).fetchone()
            if repo is None:
                return  # the commit says so
            held = {int(size) for size in _held(conn, repo[0], "size", wanted)}
            self.check(conn, repo[1], sum(size for size in wanted if size not in held), "this upload adds")

    def set(self, namespace: str, quota_bytes: int) -> None:
        """Give ``namespace`` its own limit (over the server's default)."""
        if quota_bytes < 0:
            raise ValueError(f"a quota is a size of at least 0 bytes, not {quota_bytes}")
        with self.db.write() as conn:
            conn.execute("DELETE FROM namespace_quotas WHERE namespace = ?", (namespace,))
            conn.execute("INSERT INTO namespace_quotas(namespace, quota_bytes, set_at) VALUES (?, ?, ?)",
                         (namespace, quota_bytes, time.time()))

    def clear(self, namespace: str) -> bool:
        """Drop ``namespace``'s own limit (the server's default applies again); False when it had none."""
        with self.db.write() as conn:
            return conn.execute("DELETE FROM namespace_quotas WHERE namespace = ?", (namespace,)).rowcount > 0

    def known(self, namespace: str) -> str | None:
        """``namespace`` as the registry spells it (an account, a repo's namespace, an override), or None."""
        with self.db.read() as conn:
            for sql in ("SELECT name FROM accounts WHERE name = ?",
                        "SELECT namespace FROM repos WHERE namespace = ? LIMIT 1",
                        "SELECT namespace FROM namespace_quotas WHERE namespace = ?"):
                row = conn.execute(sql, (namespace,)).fetchone()
                if row is not None:
                    return row[0]
        return None

    def usage(self, namespaces: Iterable[str] | None = None) -> list[NamespaceUsage]:
        """Usage and limit of ``namespaces`` (default: every account, namespace with repos, or override),
        sorted by name."""
        with self.db.read() as conn:
            if namespaces is None:
                names: dict[str, str] = {}
                for sql in ("SELECT name FROM accounts", "SELECT DISTINCT namespace FROM repos",
                            "SELECT namespace FROM namespace_quotas"):
                    for (name,) in conn.execute(sql):
                        names.setdefault(name.lower(), name)
                namespaces = names.values()
            out = []
            for name in namespaces:
                limit, source = self._limit(conn, name)
                files, metadata = namespace_split(conn, name)
                out.append(NamespaceUsage(name, files + metadata, limit, source, file_bytes=files,
                                          metadata_bytes=metadata))
        return sorted(out, key=lambda u: u.namespace.lower())
