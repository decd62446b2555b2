"""The moto S3 server of tests/registry_s3_helpers.py keeps serving however much it logs.

Found by bench/bench_registry_cluster.py --blobs-kind s3: the server's child process wrote its
request log to a pipe nobody read; after about 64 KiB of log (a few hundred requests, which a
two-server load run makes in seconds) its write blocked and every S3 request hung.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.registry_s3_helpers import start_moto_server

pytest.importorskip("moto")


def test_moto_server_answers_after_more_log_than_a_pipe_holds() -> None:
    endpoint, stop = start_moto_server()
    try:
        long_key = "k" * 8000  # each request's log line carries its path: 24 of them pass 64 KiB
        for _ in range(24):
            try:
                urllib.request.urlopen(f"{endpoint}/no-such-bucket/{long_key}", timeout=20).close()
            except urllib.error.HTTPError as exc:  # 404: the server answered
                assert exc.code == 404
    finally:
        stop()
