"""Serving the registry: uvicorn running :class:`~peftkit.registry.asgi_app.RegistryApp`.

* :func:`start_server` — a server in a background thread (tests, embedding);
* :func:`serve` — blocking, for ``peftkit registry serve``; with ``workers > 1``
  the parent binds the socket once and starts that many processes, each with
  its own store connection on the same data folder (SQLite WAL;
  ``BEGIN IMMEDIATE`` serialises writers across processes, and a commit checks
  its parent inside that transaction, so one of two racing commits wins and the
  other gets 412), restarting a worker that dies.

The limits a public listener needs are in :class:`ServerOptions`; the HTTP
protocol is uvicorn's httptools one with a header deadline and size cap
(:mod:`connection_guard`). uvicorn and httptools come with the ``registry``
extra (``pip install 'peftkit[registry]'``); importing this module does not
need them, starting a server does.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub_api import ApiConfig, HubApi
from .store import RegistryStore

if TYPE_CHECKING:  # pragma: no cover
    import uvicorn

    from .asgi_app import RegistryApp

LogFn = Callable[[str], None]

INSTALL_HINT = "pip install 'peftkit[registry]'"


class MissingServerDependencies(RuntimeError):
    """uvicorn/httptools are not installed."""


@dataclass(frozen=True)
class ServerOptions:
    """Connection limits and proxy trust; every timeout in seconds."""

    header_timeout_s: float = 20.0  # connection open / first byte of a request -> end of its headers
    max_header_bytes: int = 64 * 1024
    body_read_timeout_s: float = 30.0  # longest pause while a body arrives (or while a client reads a reply)
    request_timeout_s: float = 900.0  # a whole request body
    keep_alive_s: float = 60.0  # an idle keep-alive connection is closed after this
    threads: int = 40  # requests handled at once (each blocks a thread on SQLite or disk)
    trusted_proxies: tuple[str, ...] = field(default=())
    # Host names clients use besides --public-url's (see host_allowlist): ".example.com" for a domain, "*" for any.
    allowed_hosts: tuple[str, ...] = field(default=())


def _require_server_libraries() -> None:
    try:
        import httptools  # noqa: F401
        import jinja2  # noqa: F401  (the web pages)
        import markdown_it  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingServerDependencies(
            f"the registry server needs uvicorn, httptools, jinja2 and markdown-it-py ({exc.name or exc} is "
            f"missing): {INSTALL_HINT}"
        ) from None


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit (each connection is one); returns it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=False)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    if ":" in str(shown):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def _build(
    store: RegistryStore, config: ApiConfig | None, options: ServerOptions, log: LogFn | None
) -> tuple["uvicorn.Server", "RegistryApp"]:
    _require_server_libraries()
    import uvicorn

    from .asgi_app import BodyLimits, RegistryApp
    from .connection_guard import HeaderLimits, guarded_protocol
    from .host_allowlist import HostAllowlist
    from .origin import ProxyTrust
    from .web import WebSite

    api = HubApi(store, config)
    app = RegistryApp(
        WebSite(api),  # the web pages, in front of the Hub API
        body_limits=BodyLimits(read_timeout_s=options.body_read_timeout_s, request_timeout_s=options.request_timeout_s),
        proxies=ProxyTrust.parse(options.trusted_proxies),
        hosts=HostAllowlist.build(api.config.public_url, options.allowed_hosts),
        log=log,
        threads=options.threads,
    )
    uv_config = uvicorn.Config(
        app,
        http=guarded_protocol(HeaderLimits(options.header_timeout_s, options.max_header_bytes)),
        ws="none",
        lifespan="off",
        interface="asgi3",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-* are judged by the app against --trusted-proxy
        timeout_keep_alive=options.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=5,
        backlog=2048,
    )
    return uvicorn.Server(uv_config), app


@dataclass
class RunningServer:
    """A server running in a background thread (see :func:`start_server`)."""

    server: Any
    app: Any
    thread: threading.Thread
    url: str
    sock: socket.socket

    @property
    def stats(self) -> collections.Counter[str]:
        return self.app.stats

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        self.app.close()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(
    store: RegistryStore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: ApiConfig | None = None,
    log: LogFn | None = None,
    options: ServerOptions | None = None,
) -> RunningServer:
    """Serve ``store`` on ``host:port`` (0 = a free port) from a daemon thread; returns once it accepts."""
    raise_open_file_limit()
    server, app = _build(store, config, options or ServerOptions(), log)
    sock = bind_socket(host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="peftkit-registry", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the registry server thread did not start; see the log above")
        time.sleep(0.005)
    return RunningServer(server, app, thread, _url(sock), sock)


@dataclass(frozen=True)
class _WorkerSpec:
    """Everything a worker process needs to build its server (picklable)."""

    data_dir: str
    config: ApiConfig | None
    options: ServerOptions
    log: bool
    database: str | None = None
    blobs: str | None = None
    namespace_quota: int | None = None


def _stderr_log(line: str) -> None:
    sys.stderr.write(line + "\n")


def _run_worker(spec: _WorkerSpec, sock: socket.socket) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops workers with SIGTERM
    raise_open_file_limit()
    store = RegistryStore(Path(spec.data_dir), database=spec.database, blobs=spec.blobs,
                          namespace_quota=spec.namespace_quota)
    try:
        server, _ = _build(store, spec.config, spec.options, _stderr_log if spec.log else None)
        server.run(sockets=[sock])
    finally:
        store.close()


def serve(
    data_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    config: ApiConfig | None = None,
    log: LogFn | None = None,
    ready: Callable[[str], None] | None = None,
    options: ServerOptions | None = None,
    workers: int = 1,
    database: str | None = None,
    blobs: str | os.PathLike[str] | None = None,
    namespace_quota: int | None = None,
) -> None:
    """Serve the registry in ``data_dir`` until interrupted (Ctrl-C or SIGTERM).

    ``database`` (a ``postgresql://`` URL), ``blobs`` (a folder) and ``namespace_quota`` (bytes each
    namespace may store by default) are passed to :class:`RegistryStore`: several servers sharing
    both serve one registry."""
    _require_server_libraries()
    options = options or ServerOptions()
    raise_open_file_limit()
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    # Creates/upgrades the schema once, before any worker.
    store = RegistryStore(Path(data_dir), database=database, blobs=blobs, namespace_quota=namespace_quota)
    try:
        sock = bind_socket(host, port)
    except OSError:
        store.close()
        raise
    try:
        if workers <= 1:
            server, _ = _build(store, config, options, log)
            sock.listen(2048)
            if ready is not None:
                ready(_url(sock))
            _run_until_signal(server, sock)
            return
        store.close()
        spec = _WorkerSpec(str(data_dir), config, options, log is not None, database,
                           None if blobs is None else os.fspath(blobs), namespace_quota)
        _supervise(spec, sock, workers, ready)
    finally:
        sock.close()
        store.close()


class _Stopped(Exception):
    """SIGTERM arrived: leave quietly (exit status 0, as with Ctrl-C)."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped


def _run_until_signal(server: "uvicorn.Server", sock: socket.socket) -> None:
    """Serve until SIGINT/SIGTERM. uvicorn shuts down gracefully, then re-raises the signal
    to the handler that was there before it: ours, which ends the run without a traceback."""
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _supervise(spec: _WorkerSpec, sock: socket.socket, workers: int, ready: Callable[[str], None] | None) -> None:
    """Run ``workers`` processes on one listening socket until SIGINT/SIGTERM; replace any that dies."""
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def start_one() -> Any:
        proc = context.Process(target=_run_worker, args=(spec, sock), name="peftkit-registry-worker", daemon=False)
        proc.start()
        return proc

    procs = [start_one() for _ in range(workers)]
    sock.listen(2048)  # connections queue until a worker accepts them
    if ready is not None:
        ready(_url(sock))
    try:
        while not stop.wait(0.5):
            for i, proc in enumerate(procs):
                if not proc.is_alive():
                    _stderr_log(f"registry worker {proc.pid} exited with {proc.exitcode}; starting another")
                    procs[i] = start_one()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
