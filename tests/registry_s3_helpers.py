"""A real S3-compatible server for the registry's S3 tests and benchmarks (moto's server, from PyPI).

:func:`start_moto_server` runs moto's S3 server in a child Python process on 127.0.0.1 and a
free port the OS picks (no port race), and returns ``(endpoint_url, stop)``. Clients reach it
through the standard AWS settings: :func:`s3_env` gives them (fixed test credentials, a region,
``AWS_ENDPOINT_URL_S3``), for a child's environment or ``monkeypatch``. Buckets live in the
server's memory and vanish with it.

Fixtures: ``moto_endpoint`` (one server per test session) and ``s3_blobs`` (a new, empty
bucket per test, the AWS settings pointed at it; yields the ``s3://bucket/prefix`` URL).
Plain functions too, so a benchmark script can use them without pytest::

    endpoint, stop = start_moto_server()
    try:
        create_bucket(endpoint, "bench")
        env = {**os.environ, **s3_env(endpoint)}   # then: peftkit registry serve --blobs s3://bench/blobs
    finally:
        stop()
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

# The child: start moto's threaded server on port 0, print the port it got, serve until stdin closes.
# After the port line its output goes to /dev/null: nobody reads the pipes then, and a full pipe
# would block the server's request log, and with it every request.
_SERVER = """
import os, sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stderr.flush()
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
sys.stdin.read()
server.stop()
"""

_bucket_counter = itertools.count()


def s3_env(endpoint_url: str) -> dict[str, str]:
    """The AWS settings that point boto3 (and so ``--blobs s3://...``) at ``endpoint_url`` with test credentials."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint_url,
    }


def start_moto_server(timeout_s: float = 60.0) -> tuple[str, Callable[[], None]]:
    """Start moto's S3 server in a child process; returns ``(endpoint_url, stop)``.

    RuntimeError when moto (``moto[server]``, in the test extra) is missing or the server does not start.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port_line = _read_line(proc, timeout_s)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if not port_line.strip().isdigit():
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"moto's S3 server did not start (is moto[server] installed?): {err.strip()[-2000:]}")

    def stop() -> None:
        if proc.poll() is None:
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    return f"http://127.0.0.1:{int(port_line)}", stop


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The child's first line of output, or '' if it exits or stays silent for ``timeout_s``."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return proc.stdout.readline()


def create_bucket(endpoint_url: str, name: str) -> None:
    """Create bucket ``name`` on the server at ``endpoint_url``."""
    import boto3

    env = s3_env(endpoint_url)
    client = boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=name)


@functools.cache
def _session_server() -> str:
    """The test session's one moto server (any module asking first starts it; it ends with the session)."""
    import atexit

    endpoint, stop = start_moto_server()
    atexit.register(stop)
    return endpoint


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    try:
        import boto3  # noqa: F401 - the client the registry uses (the s3 extra)
        import moto  # noqa: F401 - the S3 server (the test extra)
    except ImportError as exc:  # pragma: no cover - the test extra installs both
        pytest.skip(f"S3 tests need boto3 and moto[server] (the test extra): {exc}")
    return _session_server()


@pytest.fixture
def s3_blobs(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<new bucket>/blobs``, with the AWS settings of this process pointed at the server."""
    for name, value in s3_env(moto_endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"peftkit-test-{os.getpid()}-{next(_bucket_counter)}"
    create_bucket(moto_endpoint, bucket)
    yield f"s3://{bucket}/blobs"
