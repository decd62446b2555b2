"""Storage quotas: how many bytes each namespace (a user or an organization) stores, and its limit.

What counts: a repo's size is the sum of the sizes of the distinct files its commits hold, every
commit the store keeps (all branches, tags and history; a file kept at several paths or revisions
counts once). A namespace's usage is the sum of its repos' sizes: the same file in two repos counts
in each, so deleting a repo frees exactly its size. Deleting a file in a new commit frees nothing
while older commits still hold it; squashing history (``super_squash``) drops those commits.

Cost: the counts are maintained, not scanned. ``repo_blobs`` lists each repo's distinct blobs and
``repo_storage`` holds each repo's bytes; a commit adds only the blobs it stages (index lookups, as
many as the files it carries), inside its own write transaction, and a namespace's usage is an
indexed sum over its repos' counters. Deleting a repo drops its rows (cascade); squashing recounts
that one repo. The check runs inside the write transaction that every writer takes (SQLite's write
lock, PostgreSQL's advisory lock shared by every server), so concurrent commits cannot overshoot.

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
    "free space by deleting repos (`peftkit hub delete REPO`, `HfApi.delete_repo`), or by deleting files and "
    "then squashing history "
    "(`HfApi.super_squash_history`: older commits keep their files), or ask an administrator to raise it: "
    "`peftkit registry quota set {namespace} SIZE`"
)


# ------------------------------------------------------------ the counters
def recount_repo(conn: Any, repo: int) -> None:
    """Count ``repo``'s distinct blobs and bytes again from its commits (after commits were deleted)."""
    conn.execute("DELETE FROM repo_blobs WHERE repo = ?", (repo,))
    conn.execute("INSERT INTO repo_blobs(repo, sha256, size) " + HELD_BLOBS_SQL.format(where=" WHERE c.repo = ?"),
                 (repo,))
    (total,) = conn.execute("SELECT COALESCE(SUM(size), 0) FROM repo_blobs WHERE repo = ?", (repo,)).fetchone()
    conn.execute(
        "INSERT INTO repo_storage(repo, bytes) VALUES (?, ?) ON CONFLICT(repo) DO UPDATE SET bytes = excluded.bytes",
        (repo, total),
    )


def recount_all(conn: Any) -> None:
    """Count every repo from its commits: once, when a registry made before quotas is first opened."""
    conn.execute("DELETE FROM repo_blobs")
    conn.execute("DELETE FROM repo_storage")
    conn.execute("INSERT INTO repo_blobs(repo, sha256, size) " + HELD_BLOBS_SQL.format(where=""))
    conn.execute(
        "INSERT INTO repo_storage(repo, bytes) SELECT r.id, COALESCE(SUM(b.size), 0) FROM repos r"
        " LEFT JOIN repo_blobs b ON b.repo = r.id GROUP BY r.id"
    )


def start_repo(conn: Any, repo: int) -> None:
    """A new repo stores nothing yet."""
    conn.execute("INSERT INTO repo_storage(repo, bytes) VALUES (?, 0) ON CONFLICT(repo) DO NOTHING", (repo,))


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


def repo_bytes(conn: Any, repo: int) -> int:
    row = conn.execute("SELECT bytes FROM repo_storage WHERE repo = ?", (repo,)).fetchone()
    return int(row[0]) if row else 0


def namespace_bytes(conn: Any, namespace: str) -> int:
    """The bytes ``namespace``'s repos store: an indexed sum over its repos' counters."""
    (used,) = conn.execute(
        "SELECT COALESCE(SUM(s.bytes), 0) FROM repos r JOIN repo_storage s ON s.repo = r.id WHERE r.namespace = ?",
        (namespace,),
    ).fetchone()
    return int(used)


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

    def check(self, conn: Any, namespace: str, added: int, action: str = "this commit adds") -> None:
        """Raise :class:`QuotaExceeded` when ``added`` more bytes would take ``namespace`` over its limit.

        Run it in the write transaction that then records them, so no other writer slips in between."""
        if added <= 0:
            return
        limit, source = self._limit(conn, namespace)
        if limit is None:
            return
        used = namespace_bytes(conn, namespace)
        if used + added > limit:
            whose = "" if source == "namespace" else " (the server's default)"
            raise QuotaExceeded(
                f"storage quota exceeded: namespace '{namespace}' stores {format_size(used)} of its "
                f"{format_size(limit)} quota{whose}, and {action} {format_size(added)}; "
                + QUOTA_FIX.format(namespace=namespace)
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
                out.append(NamespaceUsage(name, namespace_bytes(conn, name), limit, source))
        return sorted(out, key=lambda u: u.namespace.lower())
