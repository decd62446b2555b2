"""The registry with its blobs in S3 (``--blobs s3://bucket/prefix``), against moto's real S3 server.

huggingface_hub drives a served registry (upload, download, HTTP ranges); fsck and gc check and
clean the bucket; a bad URL or an unusable bucket stops ``registry serve`` at startup with a clear
message; and two ``registry serve`` processes sharing one PostgreSQL database and one bucket (a
SQLite registry migrated there, its blobs copied by ``migrate --blobs``) serve one registry.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import (  # noqa: F401 - hf_online is a fixture
    hf_online,
    kill_one_mid_commit,
    race_on_parent,
    start_cli_server,
    stop_process,
    write_adapter_folder,
)
from tests.registry_pg_helpers import pg_server, pg_url  # noqa: F401 - fixtures
from tests.registry_s3_helpers import moto_endpoint, s3_blobs  # noqa: F401 - fixtures
from tests.registry_web_helpers import WebClient

from peftkit.registry import RegistryStore, start_server
from peftkit.registry.blob_location import parse_s3_url
from peftkit.registry.cli import registry_group

pytest.importorskip("huggingface_hub")
pytest.importorskip("uvicorn")
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402

WEIGHTS = bytes(range(256)) * 1200  # 300 KiB: streamed in several chunks


def _bucket_keys(url: str) -> list[str]:
    import boto3

    bucket, _ = parse_s3_url(url)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", ()))


def _get(url: str, token: str, headers: dict[str, str] | None = None, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - our loopback server
        return resp.status, resp.headers, resp.read()


def test_huggingface_hub_pushes_and_pulls_through_a_registry_on_s3(tmp_path: Path, s3_blobs: str, hf_online) -> None:  # noqa: F811
    store = RegistryStore(tmp_path / "data", fsync=False, blobs=s3_blobs)
    store.accounts.add_user("alice")
    token = store.accounts.create_token("alice", write=True)[1]
    server = start_server(store)
    try:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("alice/on-s3")
        folder = write_adapter_folder(tmp_path / "adapter", weights=WEIGHTS, body="Kept in a bucket.")
        sha = api.upload_folder(repo_id="alice/on-s3", folder_path=folder).oid

        got = hf_hub_download("alice/on-s3", "adapter_model.safetensors", endpoint=server.url, token=token,
                               cache_dir=tmp_path / "cache")
        assert Path(got).read_bytes() == WEIGHTS
        resolve = f"{server.url}/alice/on-s3/resolve/{sha}/adapter_model.safetensors"
        status, headers, body = _get(resolve, token, {"Range": "bytes=1000-70999"})
        assert status == 206 and body == WEIGHTS[1000:71000]
        assert headers["Content-Range"] == f"bytes 1000-70999/{len(WEIGHTS)}"
        status, _, body = _get(resolve, token, {"Range": "bytes=-10"})
        assert status == 206 and body == WEIGHTS[-10:]
        status, headers, body = _get(resolve, token, method="HEAD")
        assert status == 200 and body == b"" and headers["Content-Length"] == str(len(WEIGHTS))
        status, _, page = _get(f"{server.url}/alice/on-s3", token)  # the web page reads the card from S3
        assert status == 200 and b"Kept in a bucket." in page
        assert [m.id for m in api.list_models(search="bucket")] == ["alice/on-s3"]  # indexed from S3 too
    finally:
        server.close()
        store.close()
    keys = _bucket_keys(s3_blobs)
    _, prefix = parse_s3_url(s3_blobs)
    blob_keys = [k for k in keys if k.startswith(f"{prefix}/blobs/")]
    assert len(blob_keys) == 3 and all(k.rsplit("/", 1)[1].startswith(k.split("/")[-2]) for k in blob_keys)
    assert not (tmp_path / "data" / "blobs").exists() and not any((tmp_path / "data" / "tmp").iterdir())


def test_fsck_and_gc_check_and_clean_the_bucket(tmp_path: Path, s3_blobs: str) -> None:  # noqa: F811
    import boto3

    data = tmp_path / "data"
    with RegistryStore(data, fsync=False, blobs=s3_blobs) as store:
        store.create_repo("alice/checked")
        store.commit("alice/checked", {"a.bin": b"a" * 5000, "b.txt": b"bee", "c.txt": b"sea"})
        entries = {e.path: e.sha256 for e in store.list_files("alice/checked", "main")}
        key = store.blobs.key
    bucket, _ = parse_s3_url(s3_blobs)
    client = boto3.client("s3")
    runner = CliRunner()
    fsck = ["fsck", "--data", str(data), "--blobs", s3_blobs, "--json"]
    result = runner.invoke(registry_group, fsck)
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["ok"] and report["blobs"] == 3 and report["bytes_hashed"] == 5006

    stray = "f" * 64
    client.put_object(Bucket=bucket, Key=key(stray), Body=b"left by a failed commit")
    client.put_object(Bucket=bucket, Key=key(entries["a.bin"]), Body=b"a" * 4999 + b"b")  # same size, bit rot
    client.delete_object(Bucket=bucket, Key=key(entries["b.txt"]))
    result = runner.invoke(registry_group, fsck[:-1])
    assert result.exit_code == 1, result.output
    assert f"corrupt blob {entries['a.bin']}: its content hashes to" in result.output
    assert f"missing blob {entries['b.txt']} (3 bytes)" in result.output
    assert "1 unreferenced blob(s)" in result.output and "2 problem(s) found" in result.output

    result = runner.invoke(registry_group, ["gc", "--data", str(data), "--blobs", s3_blobs])
    assert result.exit_code == 1 and "gc deleted nothing" in result.output  # b.txt is missing
    assert key(stray) in _bucket_keys(s3_blobs)
    client.put_object(Bucket=bucket, Key=key(entries["b.txt"]), Body=b"bee")  # restored from a backup
    result = runner.invoke(registry_group, ["gc", "--data", str(data), "--blobs", s3_blobs])
    assert result.exit_code == 0 and "removed 1 unreferenced blob(s)" in result.output
    assert key(stray) not in _bucket_keys(s3_blobs) and key(entries["c.txt"]) in _bucket_keys(s3_blobs)


def test_a_bad_blob_store_stops_serve_at_startup_saying_what_is_wrong(
    tmp_path: Path, s3_blobs: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    runner = CliRunner()

    def serve(blobs: str) -> tuple[int, str]:
        result = runner.invoke(registry_group, ["serve", "--data", str(tmp_path / "d"), "--port", "0", "--blobs", blobs])
        assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, AttributeError))
        return result.exit_code, result.output

    code, out = serve("s3://Not_A_Bucket/x")
    assert code == 2 and "does not name an S3 bucket" in out
    code, out = serve("gs://bucket/x")
    assert code == 2 and "pass a folder or s3://BUCKET/PREFIX" in out
    code, out = serve("s3://no-such-bucket-here/x")
    assert code == 1 and "bucket 'no-such-bucket-here' does not exist at http://127.0.0.1:" in out

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, out = serve(s3_blobs)
    assert code == 1 and f"cannot use {s3_blobs} for blobs" in out and "AWS_ENDPOINT_URL_S3" in out

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, out = serve(s3_blobs)
    assert code == 1 and "no AWS credentials" in out and "AWS_ACCESS_KEY_ID" in out


def test_two_servers_share_one_database_and_one_bucket(tmp_path: Path, pg_url: str, s3_blobs: str, hf_online) -> None:  # noqa: F811
    # A SQLite registry moves to PostgreSQL and its blobs to the bucket.
    data = tmp_path / "old"
    with RegistryStore(data, fsync=False) as s:
        s.accounts.add_user("alice")
        token = s.accounts.create_token("alice", write=True)[1]
        s.create_repo("alice/moved")
        moved = s.commit("alice/moved", {"README.md": b"Moved to a bucket.\n", "w.bin": WEIGHTS})
    runner = CliRunner()
    result = runner.invoke(registry_group, ["migrate", "--data", str(data), "--to", pg_url, "--blobs", s3_blobs, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["blobs"]["copied"] == 2 and report["fsck"]["ok"] and report["fsck"]["blobs"] == 2

    common = ("--database", pg_url, "--blobs", s3_blobs)
    proc_a, url_a, _ = start_cli_server(tmp_path / "host-a", *common)
    try:
        proc_b, url_b, _ = start_cli_server(tmp_path / "host-b", *common)
        try:
            _push_through_one_pull_through_the_other(tmp_path, url_a, url_b, token, moved)
            kill_one_mid_commit(proc_a, url_a, url_b, token)
        finally:
            stop_process(proc_b)
    finally:
        stop_process(proc_a)
    assert proc_a.returncode == -signal.SIGKILL and proc_b.returncode == 0
    result = runner.invoke(registry_group, ["fsck", "--data", str(tmp_path / "admin"), *common])
    assert result.exit_code == 0 and "ok: the registry is intact" in result.output, result.output
    assert not (tmp_path / "host-a" / "blobs").exists() and not (tmp_path / "host-b" / "blobs").exists()


def _push_through_one_pull_through_the_other(tmp_path: Path, url_a: str, url_b: str, token: str, moved: str) -> None:
    api_a, api_b = HfApi(endpoint=url_a, token=token), HfApi(endpoint=url_b, token=token)
    assert api_b.model_info("alice/moved").sha == moved  # the migrated repo, its blobs in the bucket
    status, _, body = _get(f"{url_a}/alice/moved/resolve/main/w.bin", token, {"Range": "bytes=10-19"})
    assert status == 206 and body == WEIGHTS[10:20]

    folder = write_adapter_folder(tmp_path / "adapter", weights=WEIGHTS[::-1], body="Shared through a bucket.")
    api_a.create_repo("alice/shared")
    pushed = api_a.upload_folder(repo_id="alice/shared", folder_path=folder).oid
    pulled = Path(snapshot_download("alice/shared", endpoint=url_b, token=token, cache_dir=tmp_path / "cache"))
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        assert (pulled / name).read_bytes() == (folder / name).read_bytes()
    assert api_b.model_info("alice/shared").sha == pushed

    # One web secret in the bucket: a sign-in form served by one server is accepted by the other.
    browser = WebClient(url_a)
    csrf = browser.csrf()
    status, _, page = WebClient(url_b, cookies=dict(browser.cookies)).request(
        "POST", "/login", form={"csrf": csrf, "token": token, "next": "/"}, headers={"Origin": url_b})
    assert status == 303, page

    # Commits on one parent through both servers at once: exactly one wins.
    head = api_b.list_repo_commits("alice/shared")[0].commit_id
    outcomes = race_on_parent([url_a, url_b], token, "alice/shared", head, clients=4)
    assert sorted(outcomes, key=str) == sorted(["won"] + [412] * 3, key=str)
