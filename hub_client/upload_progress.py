"""A byte progress bar for a push, which huggingface_hub sends as one request.

A peftkit registry takes every file inside the commit request (NDJSON with
base64 contents, see docs/architecture.md), and huggingface_hub shows no progress
for that request. To show the bytes as they leave, a request hook on
huggingface_hub's shared HTTP client swaps the body of the commit request for
a stream that hands it to the socket in chunks and advances a bar. The hook
acts only inside :func:`upload_bar` (a context variable says which bar, so
other threads and other requests are untouched). The bar appears when the
commit request is sent, with the body's size as its total from the start
(the body, base64 and JSON, is about a third larger than the files).

Files huggingface_hub uploads itself (LFS/Xet on huggingface.co) keep its own
bars; ``progress=False`` silences those too, for the push's duration.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from typing import Any, Iterator

_CHUNK = 256 * 1024
_ACTIVE: ContextVar[Any] = ContextVar("peftkit_upload_bar", default=None)


def _is_commit(request: Any) -> bool:
    return request.method == "POST" and "/commit/" in request.url.path


def _count_commit_bytes(request: Any) -> None:
    """huggingface_hub request hook: stream the commit body through the active bar."""
    pending = _ACTIVE.get()
    if pending is None or not _is_commit(request):
        return
    body = request.content  # bytes: huggingface_hub builds the whole commit before sending it
    stream_base = next((cls for cls in type(request.stream).__mro__ if cls.__name__ == "SyncByteStream"), None)
    if stream_base is None:  # an HTTP stack we do not know: send the body as it is
        return
    bar = pending.start(len(body))

    class CountingStream(stream_base):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Iterator[bytes]:
            view = memoryview(body)
            for start in range(0, len(body), _CHUNK):
                chunk = bytes(view[start:start + _CHUNK])
                yield chunk
                bar.update(len(chunk))

    request.stream = CountingStream()


def _install_hook() -> None:
    from huggingface_hub.utils import get_session

    client = get_session()  # shared, and made anew if a user calls set_client_factory(): check each time
    hooks = client.event_hooks
    if _count_commit_bytes not in hooks.get("request", []):
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _count_commit_bytes]}


class _PendingBar:
    """A bar made only once the commit body's size is known, so its total never changes while shown."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None

    def start(self, total: int) -> Any:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.description,
                            file=sys.stderr, dynamic_ncols=True)
        else:  # huggingface_hub retried the request: count the same body again from zero
            self.bar.reset(total=total)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def upload_bar(description: str, *, progress: bool) -> Iterator[None]:
    """Show a byte bar for the commit request sent inside this block (nothing with ``progress=False``)."""
    if not progress:
        with _hub_bars_silenced():
            yield
        return
    _install_hook()
    pending = _PendingBar(description)
    token = _ACTIVE.set(pending)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        pending.close()


@contextlib.contextmanager
def _hub_bars_silenced() -> Iterator[None]:
    """Turn huggingface_hub's own bars off for a quiet push, and back on after if they were on."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
