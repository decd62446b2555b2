"""``peftkit registry gc``'s options: --dry-run, --min-age DURATION, --json, and its summary line.

Before, gc took no option (``RegistryStore.gc(min_age_s=...)`` only in Python), printed only how many blobs
it removed, and never said what it removed, how big, or which staging files went. Real stores: a folder
and a bucket on moto's S3 server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.registry_s3_helpers import moto_endpoint, s3_blobs  # noqa: F401 - fixtures

from peftkit.registry import RegistryStore
from peftkit.registry.cli import registry_group

_HOUR = 3600


def _gc(data: Path, blobs: str | None, *options: str) -> tuple[int, str]:
    args = ["gc", "--data", str(data), *(("--blobs", blobs) if blobs else ()), *options]
    result = CliRunner().invoke(registry_group, args)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def _registry_with_strays(data: Path, blobs: str | None) -> tuple[dict[str, int], Path]:
    """A registry with a commit, two unreferenced blobs (failed commits') and a crashed writer's staging file
    two hours old; returns ``{sha256: bytes}`` of the unreferenced blobs and the staging file."""
    with RegistryStore(data, fsync=False, blobs=blobs, clean_staging=False) as store:
        store.create_repo("alice/kept")
        store.commit("alice/kept", {"kept.bin": b"referenced" * 10})
        strays = {}
        for content in (b"failed commit one", b"failed commit two" * 1000):
            staged = store.blobs.stage_bytes(content)
            store.blobs.publish(staged)
            strays[staged.sha256] = len(content)
        stale = store.blobs.tmp_dir / "stage-crashed"
        stale.write_bytes(b"a crashed writer's")
        os.utime(stale, (time.time() - 2 * _HOUR,) * 2)
    time.sleep(1.05)  # S3 keeps whole seconds: the strays are then dated before gc starts
    return strays, stale


def _present(data: Path, blobs: str | None) -> set[str]:
    with RegistryStore(data, fsync=False, blobs=blobs, clean_staging=False) as store:
        assert store.read_file("alice/kept", "kept.bin") == b"referenced" * 10
        return set(store.blobs.iter_all())


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_dry_run_lists_what_gc_then_deletes_and_deletes_nothing(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    blobs = request.getfixturevalue("s3_blobs") if kind == "s3" else None
    data = tmp_path / "data"
    strays, stale = _registry_with_strays(data, blobs)
    before = _present(data, blobs)
    mb = sum(strays.values()) / 1e6

    code, out = _gc(data, blobs, "--dry-run")
    assert code == 0, out
    listed = dict(line.split("  ") for line in out.splitlines()[:-1])
    assert {sha: int(size) for sha, size in listed.items()} == strays
    assert out.splitlines()[-1] == (f"would remove 2 unreferenced blob(s) ({mb:.1f} MB) and 1 stale staging "
                                    "file(s) (dry run: nothing was deleted)")
    assert _present(data, blobs) == before and stale.exists()

    code, out = _gc(data, blobs, "--dry-run", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report == {"dry_run": True, "blobs": 2, "bytes": sum(strays.values()), "staging_files": 1,
                      "to_delete": [{"sha256": sha, "bytes": strays[sha]} for sha in sorted(strays)]}
    assert _present(data, blobs) == before and stale.exists()

    code, out = _gc(data, blobs, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["dry_run"] is False and report["staging_files"] == 1
    assert report["deleted"] == [{"sha256": sha, "bytes": strays[sha]} for sha in sorted(strays)]
    assert _present(data, blobs) == before - set(strays) and not stale.exists()

    code, out = _gc(data, blobs)
    assert code == 0 and out == "removed 0 unreferenced blob(s) (0.0 MB) and 0 stale staging file(s)\n", out


def test_min_age_spares_recent_blobs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    strays, _ = _registry_with_strays(data, None)
    old, recent = sorted(strays)
    with RegistryStore(data, fsync=False) as store:
        os.utime(store.blobs.path(old), (time.time() - 3 * _HOUR,) * 2)  # failed three hours ago
        os.utime(store.blobs.path(recent), (time.time() - 20 * 60,) * 2)  # twenty minutes ago
    for spares_both in ("1d", "4h", "10800.5"):
        code, out = _gc(data, None, "--dry-run", "--min-age", spares_both)
        assert code == 0 and "would remove 0 unreferenced blob(s)" in out, (spares_both, out)
    code, out = _gc(data, None, "--min-age", "30m", "--json")
    assert code == 0 and [b["sha256"] for b in json.loads(out)["deleted"]] == [old], out
    assert recent in _present(data, None) and old not in _present(data, None)
    code, out = _gc(data, None, "--min-age", "600")  # plain seconds
    assert code == 0 and "removed 1 unreferenced blob(s)" in out, out


@pytest.mark.parametrize("bad", ["soon", "-5", "1y", "", "2 hours", "1e3"])
def test_a_bad_min_age_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    data = tmp_path / "data"
    strays, _ = _registry_with_strays(data, None)
    code, out = _gc(data, None, "--min-age", bad)
    assert code == 2 and "--min-age" in out and "as a duration" in out and "30m, 2h, 1d" in out, out
    assert set(strays) <= _present(data, None)
