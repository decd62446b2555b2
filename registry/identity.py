"""Which registry a blob store belongs to: a random id kept in the database, and a marker beside the blobs.

Two registries (each its own database) pointed at one blob store by mistake never lack their own
files, so nothing else notices; but ``gc`` of one then deletes every file of the other (unreferenced
by its database). So every registry gets a random id when its database is made (``registry_identity``,
schema 3; copied by ``registry migrate`` and by any backup of the database), and its blob store gets
the marker ``registry_id`` (a file in the folder, the object ``PREFIX/registry_id`` in a bucket)
naming it. Opening a store whose marker names another registry is refused before any work
(:class:`ForeignBlobStore`); several servers of one registry share its database, so its id, and
open its store alike.

An unmarked store (made by an older peftkit, or new and empty) is marked when it is first opened,
but only when that is safe: it holds no blobs yet, or it holds files this registry's database refers
to. An unmarked store holding blobs but none of this registry's files is most likely another
registry's (made before markers): it is refused, and a deliberate move is
``peftkit registry adopt-blobs`` (:func:`adopt_blob_store`).
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Any

from .errors import BlobStoreMismatch, ForeignBlobStore  # noqa: F401 - BlobStoreMismatch re-exported

if TYPE_CHECKING:  # pragma: no cover
    from .blob_storage import BlobStorage

#: The marker's name beside the blobs (a file in the folder; an object under the S3 prefix).
MARKER_NAME = "registry_id"
#: What ``--replacing`` takes to adopt a store that has no marker.
UNMARKED = "unmarked"
_ID = re.compile(r"[0-9a-f]{32}")
_SAMPLED_FILES = 16  # referenced files looked up in an unmarked store before marking it
_DOCS = "`peftkit docs registry#which-registry-a-blob-store-belongs-to`"


def is_registry_id(text: str) -> bool:
    """Whether ``text`` is written as a registry id is (32 lowercase hex digits)."""
    return _ID.fullmatch(text) is not None


def new_registry_id() -> str:
    """A new registry's id: 16 random bytes as hex."""
    return secrets.token_hex(16)


def ensure_registry_id(conn: Any) -> str:
    """The id in ``registry_identity``, created when the table is empty (inside the caller's write
    transaction: a new registry, or one made before ids, schema < 3)."""
    row = conn.execute("SELECT registry_id FROM registry_identity").fetchone()
    if row is not None:
        return str(row[0])
    registry_id = new_registry_id()
    conn.execute("INSERT INTO registry_identity(registry_id) VALUES (?)", (registry_id,))
    return registry_id


def read_marker(blobs: BlobStorage) -> str | None:
    """The registry id the store's marker names, None when it has none; ForeignBlobStore for a marker
    that is not an id (written by hand, or damaged)."""
    text = blobs.read_marker(MARKER_NAME)
    if text is None:
        return None
    marker = text.strip()
    if not is_registry_id(marker):
        raise ForeignBlobStore(
            f"the marker {_marker_where(blobs)} does not hold a registry id ({marker[:80]!r}): restore it, or "
            f"adopt the store with `peftkit registry adopt-blobs --replacing {UNMARKED}` after deleting it "
            f"(see {_DOCS})"
        )
    return marker


def _marker_where(blobs: BlobStorage) -> str:
    return f"{blobs.describe().rstrip('/')}/{MARKER_NAME}"


def _refusal(blobs: BlobStorage, marker: str, own: str, database: str) -> ForeignBlobStore:
    return ForeignBlobStore(
        f"the blob store {blobs.describe()} belongs to another registry: its marker ({_marker_where(blobs)}) "
        f"names registry {marker}, and this registry's database ({database}) is registry {own}. Two registries "
        "sharing one blob store delete each other's files (gc), so nothing was done. Point --blobs at this "
        "registry's own store (pass the --blobs and --database pair its servers use). To move this registry "
        "onto that store on purpose (registry "
        f"{marker} no longer uses it; gc will then delete its files this registry does not refer to), run "
        f"`peftkit registry adopt-blobs --replacing {marker}` with this registry's --data, --database and "
        f"--blobs (see {_DOCS})"
    )


def _unsafe_to_mark(blobs: BlobStorage, db: Any) -> str | None:
    """Why an unmarked store must not be marked as this registry's, or None: it holds no blobs, or it
    holds some of the files this registry's database refers to (sampled: a handful of look-ups)."""
    if next(iter(blobs.iter_all()), None) is None:
        return None
    with db.read() as conn:
        sample = [r[0] for r in conn.execute(
            f"SELECT DISTINCT sha256 FROM tree_entries LIMIT {_SAMPLED_FILES}")]  # noqa: S608 - a constant
    if not sample:
        return "it holds blobs but this registry refers to no files yet"
    if not any(blobs.exists(sha) for sha in sample):
        return "it holds blobs but none of the files this registry refers to"
    return None


def check_blob_store(blobs: BlobStorage, db: Any, *, beside_database: bool = False) -> str:
    """Refuse (ForeignBlobStore) a blob store that is not this registry's; mark an unmarked one where
    safe. Returns this registry's id. ``db`` is the registry's open database; ``beside_database``: the
    store is the data folder that holds the SQLite file too (no --blobs, no --database), so an unmarked
    one is this registry's whatever it holds (a crash's leftovers in a registry whose repos were all deleted)."""
    own: str = db.registry_id
    marker = read_marker(blobs)
    if marker is None:
        why = None if beside_database else _unsafe_to_mark(blobs, db)
        if why is not None:
            raise ForeignBlobStore(
                f"the blob store {blobs.describe()} has no registry marker and {why}: it is most likely another "
                f"registry's (made by an older peftkit), whose files gc would delete. Point --blobs at this "
                f"registry's own store (pass the --blobs and --database pair its servers use); to use this store "
                f"on purpose, run `peftkit registry adopt-blobs --replacing {UNMARKED}` with this registry's "
                f"--data, --database and --blobs (see {_DOCS})"
            )
        # Never overwrites: of several servers (one registry) racing here, all read the one stored first.
        blobs.create_marker(MARKER_NAME, own + "\n")
        marker = read_marker(blobs)
    if marker != own:
        raise _refusal(blobs, marker or UNMARKED, own, db.describe())
    return own


def confirm_own_store(blobs: BlobStorage, db: Any) -> None:
    """ForeignBlobStore unless the store's marker names this registry (what ``gc`` checks before deleting)."""
    marker = read_marker(blobs)
    if marker != db.registry_id:
        raise _refusal(blobs, marker or UNMARKED, db.registry_id, db.describe())


def adopt_blob_store(blobs: BlobStorage, db: Any, replacing: str) -> str | None:
    """Mark ``blobs`` as the store of the registry in ``db``, deliberately: ``replacing`` must name the
    registry its marker names now (or be ``"unmarked"`` for a store without one), so a store is never
    adopted by accident. Returns what the marker named before (an id, or ``"unmarked"``), None when it
    already named this registry (nothing is changed then)."""
    own: str = db.registry_id
    marker = read_marker(blobs)
    if marker == own:
        return None
    if (marker or UNMARKED) != replacing:
        actual = f"names registry {marker}" if marker else "has no marker"
        raise ForeignBlobStore(
            f"nothing was changed: the blob store {blobs.describe()} {actual}, not {replacing!r}; pass "
            f"--replacing {marker or UNMARKED} if that is the registry to take it from"
        )
    blobs.replace_marker(MARKER_NAME, own + "\n")
    return marker or UNMARKED
