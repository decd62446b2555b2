"""The huggingface_hub clients of bench/bench_registry_cluster.py, run in child processes.

Each child process runs a few client roles, one thread each, against the registry servers
(``urls``), and sends back one :class:`Tally` (counts, a bounded sample of latencies, every
error with its start and end time and the server it went to, and the commits the servers
acknowledged). The parent decides which errors count: a request to a server that the parent
killed, ending after the kill, is expected; any other is a failure.

Roles:

- ``reader``: in turn ``model_info``, ``list`` (the bench user's repos), ``download`` (a 256 KiB
  weights file, forced, checked against the SHA-256 of the bytes pushed through the other
  server) and ``search`` (a word only one fixture repo's card has; that repo must be found);
- ``writer``: commits a small file to one shared repo, then reads it back at that commit
  through the other server (``cross_read``: pushed through one server, pulled through the other);
- ``racer``: commits on one ``parent_commit`` from 4 clients at once, spread over the servers
  (tests/registry_conftest_helpers.race_on_parent); every race must have exactly one winner.

A client whose server stops answering ``/api/health`` marks it dead and moves to the other one.

By default every client has a process of its own: huggingface_hub shares one HTTP client per
process and closes it when a connection is refused (``http_backoff``), which breaks the requests
other threads of that process have in flight to the live server ("Bad file descriptor"): an
artefact of the client library, not of the registry.
"""

from __future__ import annotations

import functools
import hashlib
import random
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

#: Latencies kept per request kind and process (a uniform sample: memory stays bounded).
LATENCY_SAMPLE = 20_000
READ_KINDS = ("model_info", "list", "download", "search")
COMMITS_REPO = "bench/commits"
RACE_REPO = "bench/race"
RACE_CLIENTS = 4


@dataclass(frozen=True)
class Role:
    kind: str  # "reader", "writer" or "racer"
    index: int
    home: int  # index into the server URLs of the server it starts on


@dataclass(frozen=True)
class Workload:
    """What every client of one phase needs (sent to the child processes, so plain data only)."""

    phase: str
    urls: tuple[str, ...]
    read_token: str
    write_token: str
    #: fixture repo id -> (the one word only its card has, SHA-256 of its weights file)
    fixtures: dict[str, tuple[str, str]]
    seconds: float
    commit_bytes: int
    cache: str


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=dict)  # "kind@server" -> completed requests
    after_kill: dict[str, int] = field(default_factory=dict)  # the same, of those started after a kill
    moved: int = 0  # clients that left a dead server for another
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> sample of seconds
    seen: dict[str, int] = field(default_factory=dict)  # kind -> requests (for the sample)
    #: (start, end, server index, kind, message), wall-clock times
    errors: list[tuple[float, float, int, str, str]] = field(default_factory=list)
    #: (commit id, path in the repo, server index that acknowledged it, wall-clock time)
    acknowledged: list[tuple[str, str, int, float]] = field(default_factory=list)
    races: list[list[object]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._progress = self._killed_at = None  # see watch()

    def watch(self, progress, killed_at) -> None:
        """Publish commits to ``progress`` (a shared int array: acknowledged commits per server, then
        commits in flight per server), which the parent watches to time its kill; ``killed_at`` (a
        shared double) is when the parent killed a server, 0 before."""
        self._progress, self._killed_at = progress, killed_at

    def commit_started(self, server: int, servers: int) -> None:
        if self._progress is not None:
            with self._progress.get_lock():
                self._progress[servers + server] += 1

    def commit_ended(self, server: int, servers: int, acknowledged: bool) -> None:
        if self._progress is not None:
            with self._progress.get_lock():
                self._progress[servers + server] -= 1
                self._progress[server] += acknowledged

    def ok(self, kind: str, server: int, seconds: float, start: float) -> None:
        with self._lock:
            key = f"{kind}@{server}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if self._killed_at is not None and 0 < self._killed_at.value < start:
                self.after_kill[key] = self.after_kill.get(key, 0) + 1
            n = self.seen[kind] = self.seen.get(kind, 0) + 1
            sample = self.latencies.setdefault(kind, [])
            if len(sample) < LATENCY_SAMPLE:
                sample.append(seconds)
            else:  # reservoir sampling: every request equally likely to be kept
                slot = self._rng.randrange(n)
                if slot < LATENCY_SAMPLE:
                    sample[slot] = seconds

    def client_moved(self) -> None:
        with self._lock:
            self.moved += 1

    def error(self, start: float, server: int, kind: str, exc: BaseException) -> None:
        with self._lock:
            self.errors.append((start, time.time(), server, kind, f"{type(exc).__name__}: {exc}"[:300]))

    def commit(self, oid: str, path: str, server: int) -> None:
        with self._lock:
            self.acknowledged.append((oid, path, server, time.time()))

    def race(self, outcomes: list[object]) -> None:
        with self._lock:
            self.races.append(outcomes)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def commit_payload(phase: str, writer: int, step: int, size: int) -> bytes:
    """The bytes writer ``writer`` commits at ``step``: derived from those three, so any copy can be
    checked without keeping it."""
    seed = hashlib.sha256(f"{phase}/{writer}/{step}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class Servers:
    """The servers one client uses: its current one, and those it found dead."""

    def __init__(self, urls: tuple[str, ...], home: int) -> None:
        self.urls = urls
        self.current = home
        self.dead: set[int] = set()

    def other(self) -> int:
        """Another live server than the current one (the current one when none is left)."""
        for step in range(1, len(self.urls)):
            candidate = (self.current + step) % len(self.urls)
            if candidate not in self.dead:
                return candidate
        return self.current

    def after_error(self, server: int) -> bool:
        """Move on when ``server`` no longer answers its health check (a refused or dropped
        connection); an error from a live server leaves everything as it was. Whether this client
        moved to another server."""
        try:
            with urllib.request.urlopen(self.urls[server] + "/api/health", timeout=5) as resp:
                if resp.status == 200:
                    return False
        except OSError:
            pass
        self.dead.add(server)
        if server != self.current:
            return False
        self.current = self.other()
        return self.current != server


def _timed(tally: Tally, servers: Servers, kind: str, server: int, call) -> object:
    start, t0 = time.time(), time.perf_counter()
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - every failure is counted; the parent judges them
        tally.error(start, server, kind, exc)
        if servers.after_error(server):
            tally.client_moved()
        return None
    tally.ok(kind, server, time.perf_counter() - t0, start)
    return result


def read_model_info(api, repo: str) -> None:
    if api.model_info(repo).id != repo:
        raise AssertionError(f"model_info({repo}) named another repo")


def read_list(api, at_least: int) -> None:
    if len(list(api.list_models(author="bench", limit=50))) < at_least:
        raise AssertionError("list_models(author='bench') missed fixture repos")


def read_download(url: str, token: str, cache: Path, repo: str, weights_sha: str) -> None:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo, "adapter_model.safetensors", endpoint=url, cache_dir=cache, token=token,
                           force_download=True)
    if hashlib.sha256(Path(path).read_bytes()).hexdigest() != weights_sha:
        raise AssertionError(f"{repo}: downloaded weights differ from those pushed")


def read_search(api, word: str, repo: str) -> None:
    found = [m.id for m in api.list_models(search=word, limit=20)]
    if repo not in found:
        raise AssertionError(f"search {word!r} did not find {repo}: {found}")


def read_back(url: str, token: str, cache: Path, path: str, oid: str, data: bytes) -> None:
    """Read ``path`` at commit ``oid`` through ``url``; it must hold ``data``."""
    from huggingface_hub import hf_hub_download

    got = Path(hf_hub_download(COMMITS_REPO, path, revision=oid, endpoint=url, cache_dir=cache, token=token))
    if got.read_bytes() != data:
        raise AssertionError(f"{path} at {oid}, read through another server, differs from what was pushed")
    got.unlink()  # keeps the cache small


def run_reader(role: Role, work: Workload, tally: Tally, deadline: float) -> None:
    from huggingface_hub import HfApi

    servers = Servers(work.urls, role.home)
    apis = [HfApi(endpoint=url, token=work.read_token) for url in work.urls]
    repos = sorted(work.fixtures)
    cache = Path(work.cache) / f"{work.phase}-reader-{role.index}"
    step = role.index
    while time.time() < deadline:
        kind = READ_KINDS[step % len(READ_KINDS)]
        repo = repos[step % len(repos)]
        word, weights_sha = work.fixtures[repo]
        s = servers.current
        step += 1
        call = {
            "model_info": functools.partial(read_model_info, apis[s], repo),
            "list": functools.partial(read_list, apis[s], len(repos)),
            "download": functools.partial(read_download, work.urls[s], work.read_token, cache, repo, weights_sha),
            "search": functools.partial(read_search, apis[s], word, repo),
        }[kind]
        _timed(tally, servers, kind, s, call)


def run_writer(role: Role, work: Workload, tally: Tally, deadline: float) -> None:
    from huggingface_hub import HfApi

    servers = Servers(work.urls, role.home)
    apis = [HfApi(endpoint=url, token=work.write_token) for url in work.urls]
    cache = Path(work.cache) / f"{work.phase}-writer-{role.index}"
    step = 0
    while time.time() < deadline:
        path = f"{work.phase}/w{role.index}/{step}.bin"
        data = commit_payload(work.phase, role.index, step, work.commit_bytes)
        s = servers.current
        tally.commit_started(s, len(work.urls))
        info = _timed(tally, servers, "commit", s, functools.partial(
            apis[s].upload_file, path_or_fileobj=data, path_in_repo=path, repo_id=COMMITS_REPO,
            commit_message=f"{work.phase} writer {role.index} step {step}"))
        tally.commit_ended(s, len(work.urls), info is not None)
        step += 1
        if info is None:
            continue
        tally.commit(info.oid, path, s)
        other = servers.other()
        _timed(tally, servers, "cross_read", other,
               functools.partial(read_back, work.urls[other], work.read_token, cache, path, info.oid, data))


def run_racer(role: Role, work: Workload, tally: Tally, deadline: float) -> None:
    from huggingface_hub import HfApi

    from tests.registry_conftest_helpers import race_on_parent

    servers = Servers(work.urls, role.home)
    apis = [HfApi(endpoint=url, token=work.read_token) for url in work.urls]
    race = 0
    while time.time() < deadline:
        s = servers.current
        info = _timed(tally, servers, "model_info", s, functools.partial(apis[s].model_info, RACE_REPO))
        if info is None:
            continue
        outcomes = _timed(tally, servers, "race", s, functools.partial(
            race_on_parent, list(work.urls), work.write_token, RACE_REPO, info.sha, clients=RACE_CLIENTS,
            folder=f"{work.phase}/race-{race}"))
        race += 1
        if outcomes is not None:
            tally.race(outcomes)


RUNNERS = {"reader": run_reader, "writer": run_writer, "racer": run_racer}


def client_process(roles: list[Role], work: Workload, start, results, progress, killed_at) -> None:
    """Child process entry: wait for every process at ``start`` (a Barrier), run the roles for
    ``work.seconds``, put the tally's dict on ``results`` (a Queue); commits are counted in
    ``progress`` as they happen (:meth:`Tally.watch`)."""
    # Everything the roles import, imported before the start line rather than inside the timed phase.
    import huggingface_hub.file_download  # noqa: F401
    import huggingface_hub.hf_api  # noqa: F401

    import tests.registry_conftest_helpers  # noqa: F401

    tally = Tally()
    tally.watch(progress, killed_at)
    start.wait()
    tally.started = time.time()
    deadline = tally.started + work.seconds
    threads = [threading.Thread(target=RUNNERS[r.kind], args=(r, work, tally, deadline)) for r in roles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.ended = time.time()
    results.put(tally.as_dict())
