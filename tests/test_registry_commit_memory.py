"""What reading a commit holds in memory: a file travels inline as one base64 line, held whole while it is
parsed and decoded. Measured with tracemalloc (deterministic: allocations, not time); docs/registry.md gives
the figure to size --max-upload-mb by."""

from __future__ import annotations

import base64
import io
import json
import os
import tracemalloc

from peftkit.registry.payloads import parse_commit

SIZE = 8 * 2**20


class _Staged:
    def __init__(self, size: int) -> None:
        self.size = size


def test_a_commit_of_one_large_file_peaks_at_four_times_the_file():
    """Parsing holds the line, json's decoded text and the base64 string (4x the file); the line is dropped
    before the base64 is decoded, and the base64 before the next line is read. It was 5x (a decoded copy of
    each line beside the bytes, and the parsed line kept while decoding)."""
    lines = [{"key": "header", "value": {"summary": "big"}},
             {"key": "file", "value": {"path": "a.bin", "content": base64.b64encode(os.urandom(SIZE)).decode()}},
             {"key": "file", "value": {"path": "b.bin", "content": base64.b64encode(os.urandom(SIZE)).decode()}}]
    body = io.BytesIO(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    del lines
    sizes = []
    tracemalloc.start()
    try:
        payload = parse_commit(body, lambda data: (sizes.append(len(data)), _Staged(len(data)))[1], lambda _: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sizes == [SIZE, SIZE] and set(payload.files) == {"a.bin", "b.bin"}
    assert peak < 4.3 * SIZE, f"{peak / SIZE:.2f} x the file"
