"""The hub client's download check (hub_client/cache.py verify_files, hash_file) against known hashes:
git's blob id and sha256 of real content (as `git hash-object` and `sha256sum` give them), files over
one read chunk, which hash is checked when, upper-case hashes, extra and missing files, and the
exact messages. Written for `make mutate` (docs/mutation.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from peftkit.hub_client import cache
from peftkit.hub_client.backend import RemoteFile
from peftkit.hub_client.errors import IntegrityError

HELLO_GIT = "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0"  # printf hello | git hash-object --stdin
HELLO_SHA256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"  # printf hello | sha256sum


def _write(folder: Path, path: str, content: bytes) -> Path:
    target = folder / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    return target


def test_hash_file_gives_sha256_and_git_blob_id(tmp_path):
    assert cache.hash_file(_write(tmp_path, "a", b"hello"), 5) == (HELLO_SHA256, HELLO_GIT)
    big = bytes(range(256)) * 5000  # 1.28 MB: more than one read
    expected_git = hashlib.sha1(b"blob %d\0" % len(big) + big).hexdigest()  # git's definition of a blob id
    assert cache.hash_file(_write(tmp_path, "big", big), len(big)) == (hashlib.sha256(big).hexdigest(), expected_git)


def test_verify_accepts_matching_files_with_either_hash_in_any_case(tmp_path):
    _write(tmp_path, "a.json", b"hello")
    _write(tmp_path, "sub/b.bin", b"hello")
    cache.verify_files(tmp_path, [RemoteFile("a.json", 5, HELLO_GIT.upper(), None),
                                  RemoteFile("sub/b.bin", 5, None, HELLO_SHA256.upper())], "repo")
    # sha256 decides when given: a wrong oid beside it is not read
    cache.verify_files(tmp_path, [RemoteFile("a.json", 5, "0" * 40, HELLO_SHA256)], "repo", remove_extra=False)
    # an oid that is not a git sha1 (e.g. none, or a 64-hex LFS id) checks the size only
    cache.verify_files(tmp_path, [RemoteFile("a.json", 5, "f" * 64, None), RemoteFile("sub/b.bin", 5)], "repo")


def test_verify_refuses_each_mismatch_with_its_message(tmp_path):
    _write(tmp_path, "a.json", b"hello")
    cases = [
        (RemoteFile("a.json", 5, HELLO_GIT, "0" * 64),
         f"repo: a.json does not match its sha256 ({HELLO_SHA256} instead of {'0' * 64}); the file was corrupted: "
         f"pull again"),
        (RemoteFile("a.json", 5, "A" * 40, None),
         f"repo: a.json does not match its git hash ({HELLO_GIT} instead of {'A' * 40}); the file was corrupted: "
         f"pull again"),
        (RemoteFile("a.json", 4, HELLO_GIT, HELLO_SHA256),
         "repo: a.json has 5 bytes, the hub announced 4; the download was cut short or changed in transit: pull again"),
    ]
    for remote, message in cases:
        with pytest.raises(IntegrityError) as refused:
            cache.verify_files(tmp_path, [remote], "repo")
        assert str(refused.value) == message


def test_missing_files_are_named_sorted_five_at_most(tmp_path):
    _write(tmp_path, "present", b"x")
    wanted = [RemoteFile(name, 1) for name in ("g", "b", "f", "present", "a", "e", "d", "c")]
    with pytest.raises(IntegrityError) as refused:
        cache.verify_files(tmp_path, wanted, "repo")
    assert str(refused.value) == "repo: the download lacks a, b, c, d, e; pull again"
    assert (tmp_path / "present").exists()  # nothing removed before the check passed


def test_extra_files_are_removed_only_when_asked(tmp_path):
    _write(tmp_path, "a.json", b"hello")
    _write(tmp_path, "extra.txt", b"x")
    _write(tmp_path, "deep/er.txt", b"y")
    files = [RemoteFile("a.json", 5, HELLO_GIT)]
    cache.verify_files(tmp_path, files, "repo", remove_extra=False)
    assert (tmp_path / "extra.txt").exists() and (tmp_path / "deep/er.txt").exists()
    cache.verify_files(tmp_path, files, "repo")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == ["a.json"]
