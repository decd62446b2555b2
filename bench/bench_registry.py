"""Benchmark of the peftkit registry: search latency over many adapters, pulls/s and pushes/s.

Run by hand (never from the test suite)::

    python bench/bench_registry.py                      # 10,000 adapters, 10 s of pulls/pushes
    python bench/bench_registry.py --adapters 2000 --duration 5 --json out.json

What it does:

1. Indexes ``--adapters`` synthetic adapter repos (card + adapter_config.json +
   a small weights file) through the in-process store API.
2. Search latency, in process (``RegistryStore.search``) and over HTTP
   (``GET /api/models``, one keep-alive client): a mix of free text, base
   model, method, task, tags, author and sort queries; p50 and p99.
3. Throughput against ``peftkit registry serve`` running as its own process:
   16 clients pulling (huggingface_hub ``hf_hub_download`` of a 1 MiB weights
   file, forced, so every pull transfers it, each checked against the bytes
   pushed) while 4 clients push (``upload_file`` of 16 KiB, one commit each) to
   the same repo; then raw keep-alive GETs to show what the server does without
   the client library's overhead.
4. The HTTP stack (``--stack``): requests/s and p50/p99 latency of 16
   keep-alive raw clients on a small ``resolve`` and on ``model_info``; the
   same with 1,000 idle connections held open; then 16 huggingface_hub readers
   and 4 writers for ``--mixed-seconds`` (30 s) counting errors, lost commits
   (a commit the server acknowledged that is not in the history afterwards)
   and corrupt downloads (bytes that differ from what was pushed). ``--workers
   N`` starts the server with N processes. ``--stack-only`` skips 1-3.

To measure another checkout's server (e.g. before a change), point
``--server-pythonpath`` at a folder holding its ``peftkit/registry``.

Client and server share the machine, so on a small box the figures are bounded
by the client process too; the report prints the CPU count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode, urlsplit

BASES = [f"org{i}/base-model-{i}" for i in range(25)] + ["meta-llama/Llama-3.2-1B", "google/flan-t5-small"]
METHODS = ["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LOHA"]
PEFTKIT_METHODS = ["seq_bn", "bitfit"]
TASKS = ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "qui", "ber", "don", "fal", "gri"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


def index_adapters(store, n: int, rng: random.Random) -> tuple[list[str], float]:
    vocab = [_word(rng) for _ in range(2000)]
    tags_vocab = [_word(rng) for _ in range(300)]
    authors = [f"user{i}" for i in range(200)]
    t0 = time.perf_counter()
    for i in range(n):
        author = rng.choice(authors)
        repo_id = f"{author}/{rng.choice(vocab)}-{rng.choice(vocab)}-{i}"
        base = rng.choice(BASES)
        tags = rng.sample(tags_vocab, 3)
        body = " ".join(rng.choice(vocab) for _ in range(40))
        config: dict = {"peft_type": rng.choice(METHODS), "task_type": rng.choice(TASKS),
                        "base_model_name_or_path": base, "r": 8}
        if rng.random() < 0.2:
            config["peftkit"] = {"method": rng.choice(PEFTKIT_METHODS)}
        card = (
            "---\nlibrary_name: peft\n"
            f"base_model: {base}\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n\n" + body + "\n"
        )
        store.create_repo(repo_id)
        store.commit(repo_id, {
            "README.md": card.encode(),
            "adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": rng.randbytes(1024),
        }, message="add adapter")
        downloads = int(rng.paretovariate(1.2)) - 1
        if downloads:
            store.record_download(repo_id, downloads)
    return vocab, time.perf_counter() - t0


def query_mix(rng: random.Random, vocab: list[str], n: int) -> list[tuple[str, dict]]:
    """(kind, kwargs for RegistryStore.search) pairs; the HTTP variant maps them to list_models params."""
    kinds = ["text", "text2", "base_model", "method+task", "tag", "author", "text+base+recent", "top"]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "text":
            kw = {"text": rng.choice(vocab)}
        elif kind == "text2":
            kw = {"text": f"{rng.choice(vocab)} {rng.choice(vocab)}"}
        elif kind == "base_model":
            kw = {"base_model": rng.choice(BASES)}
        elif kind == "method+task":
            kw = {"method": rng.choice(METHODS).lower(), "task": rng.choice(TASKS)}
        elif kind == "tag":
            kw = {"tags": ["peft", f"base_model:adapter:{rng.choice(BASES)}"]}
        elif kind == "author":
            kw = {"author": f"user{rng.randrange(200)}"}
        elif kind == "text+base+recent":
            kw = {"text": rng.choice(vocab)[:4], "base_model": rng.choice(BASES), "sort": "recent"}
        else:
            kw = {"sort": "downloads"}
        out.append((kind, kw))
    return out


def http_params(kw: dict) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = [("limit", "20")]
    if "text" in kw:
        params.append(("search", kw["text"]))
    if "base_model" in kw:
        params.append(("filter", f"base_model:{kw['base_model']}"))
    if "method" in kw:
        params.append(("filter", f"method:{kw['method']}"))
    if "task" in kw:
        params.append(("filter", f"task:{kw['task']}"))
    for t in kw.get("tags", ()):
        params.append(("filter", t))
    if "author" in kw:
        params.append(("author", kw["author"]))
    params.append(("sort", {"recent": "lastModified"}.get(kw.get("sort", "downloads"), "downloads")))
    return params


def bench_search(store, queries) -> dict:
    times: dict[str, list[float]] = {}
    hits = 0
    for kind, kw in queries:
        t0 = time.perf_counter()
        res = store.search(limit=20, visible_to=(), **kw)
        times.setdefault(kind, []).append(time.perf_counter() - t0)
        hits += len(res)
    return _summarize(times) | {"mean_hits": hits / len(queries)}


def bench_http_search(url: str, queries) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    times: dict[str, list[float]] = {}
    for kind, kw in queries:
        path = "/api/models?" + urlencode(http_params(kw))
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        times.setdefault(kind, []).append(time.perf_counter() - t0)
        assert resp.status == 200, body[:200]
    conn.close()
    return _summarize(times)


def _summarize(times: dict[str, list[float]]) -> dict:
    every = [t for ts in times.values() for t in ts]
    return {
        "n": len(every),
        "p50_ms": percentile(every, 50) * 1e3,
        "p99_ms": percentile(every, 99) * 1e3,
        "by_kind_p50_ms": {k: percentile(v, 50) * 1e3 for k, v in times.items()},
        "by_kind_p99_ms": {k: percentile(v, 99) * 1e3 for k, v in times.items()},
    }


def run_threads(workers: list[tuple[Callable[[int], None], int]]) -> float:
    """Run ``count`` threads of each ``(target, count)`` (target(i) for i in range(count)), all at
    once, until every one returns; the seconds that took."""
    threads = [threading.Thread(target=target, args=(i,)) for target, count in workers for i in range(count)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def start_server(data: Path, workers: int = 1, pythonpath: str | None = None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [pythonpath, *sys.path] if p)
    extra = ["--workers", str(workers)] if workers > 1 else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftkit.registry", "serve", "--port", "0", "--quiet", "--data", str(data), *extra],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if " at http" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split(" at ", 1)[1].split()[0]


def bench_raw_pulls(url: str, duration: float, clients: int) -> dict:
    parts = urlsplit(url)
    deadline = time.monotonic() + duration
    counts = [0] * clients

    def run(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while time.monotonic() < deadline:
            conn.request("GET", "/bench/busy/resolve/main/adapter_model.safetensors")
            resp = conn.getresponse()
            resp.read()
            counts[i] += 1
        conn.close()

    elapsed = run_threads([(run, clients)])
    return {"seconds": elapsed, "pulls_per_s": sum(counts) / elapsed, "mib_per_s": sum(counts) / elapsed}


def server_cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of process ``pid`` and its children so far (Linux /proc), or None."""
    if pid is None or not os.path.isdir("/proc"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def keepalive_load(url: str, path: str, clients: int, seconds: float, server_pid: int | None = None) -> dict:
    """``clients`` raw keep-alive connections GETting ``path`` for ``seconds``: requests/s, p50/p99, errors,
    and the server's CPU milliseconds per request (when its pid is given)."""
    parts = urlsplit(url)
    cpu0 = server_cpu_seconds(server_pid)
    deadline = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def run(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[i] += 1
            except OSError:
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                continue
            latencies[i].append(time.perf_counter() - t0)
        conn.close()

    elapsed = run_threads([(run, clients)])
    every = [t for ts in latencies for t in ts]
    cpu1 = server_cpu_seconds(server_pid)
    cpu_ms = (cpu1 - cpu0) * 1e3 / len(every) if cpu0 is not None and cpu1 is not None and every else None
    return {"requests_per_s": len(every) / elapsed, "p50_ms": percentile(every, 50) * 1e3,
            "p99_ms": percentile(every, 99) * 1e3, "errors": sum(errors), "requests": len(every),
            "server_cpu_ms_per_request": cpu_ms}


def open_idle_connections(url: str, count: int) -> list:
    """``count`` connected sockets that never send a byte (each one a file descriptor on both sides)."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parts = urlsplit(url)
    socks = []
    for _ in range(count):
        s = socket.create_connection((parts.hostname, parts.port), timeout=10)
        socks.append(s)
    return socks


def still_open(socks: list) -> int:
    """How many of ``socks`` the server has not closed."""
    import select

    readable, _, _ = select.select(socks, [], [], 0) if len(socks) < 1000 else (_poll_readable(socks), None, None)
    closed = 0
    for s in readable:
        try:
            if s.recv(1, 0x40) == b"":  # MSG_DONTWAIT: b'' means the peer closed it
                closed += 1
        except OSError:
            closed += 1
    return len(socks) - closed


def _poll_readable(socks: list) -> list:
    import select

    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(0)]


def bench_mixed(url: str, token: str, tmp: Path, seconds: float, readers: int, writers: int) -> dict:
    """huggingface_hub readers (checked against the bytes pushed) and writers; lost commits and corrupt reads."""
    import hashlib

    from huggingface_hub import HfApi, hf_hub_download

    repo = "bench/mixed"
    api = HfApi(endpoint=url, token=token)
    api.create_repo(repo, exist_ok=True)
    weights = os.urandom(1024 * 1024)
    api.upload_file(path_or_fileobj=weights, path_in_repo="adapter_model.safetensors", repo_id=repo)
    want = hashlib.sha256(weights).hexdigest()
    deadline = time.monotonic() + seconds
    counts = {"reads": 0, "writes": 0, "errors": 0, "corrupt": 0}
    acknowledged: list[str] = []
    lock = threading.Lock()

    def read(i: int) -> None:
        cache = tmp / f"mixed-cache-{i}"
        while time.monotonic() < deadline:
            try:
                path = hf_hub_download(repo, "adapter_model.safetensors", endpoint=url, cache_dir=cache,
                                       token=False, force_download=True)
                ok = hashlib.sha256(Path(path).read_bytes()).hexdigest() == want
                with lock:
                    counts["reads"] += 1
                    counts["corrupt"] += not ok
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    counts["errors"] += 1

    def write(i: int) -> None:
        writer = HfApi(endpoint=url, token=token)
        step = 0
        while time.monotonic() < deadline:
            try:
                info = writer.upload_file(path_or_fileobj=os.urandom(16 * 1024), path_in_repo=f"w/{i}/{step}.bin",
                                          repo_id=repo, commit_message=f"write {i}.{step}")
                with lock:
                    counts["writes"] += 1
                    acknowledged.append(info.oid)
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    counts["errors"] += 1
            step += 1

    elapsed = run_threads([(read, readers), (write, writers)])
    history = {c.commit_id for c in api.list_repo_commits(repo)}
    files = set(api.list_repo_files(repo))
    lost = sum(1 for oid in acknowledged if oid not in history)
    missing_files = counts["writes"] - sum(1 for f in files if f.startswith("w/"))
    return {"seconds": elapsed, "reads_per_s": counts["reads"] / elapsed, "writes_per_s": counts["writes"] / elapsed,
            "errors": counts["errors"], "lost_commits": lost + max(0, missing_files), "corrupt_downloads": counts["corrupt"]}


def _load_line(result: dict) -> str:
    cpu = result["server_cpu_ms_per_request"]
    return (f"{result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
            f"errors {result['errors']}" + (f", server CPU {cpu:.2f} ms/request" if cpu is not None else ""))


def bench_stack(url: str, token: str, tmp: Path, *, clients: int, seconds: float, idle: int, mixed_seconds: float,
                readers: int, writers: int, server_pid: int | None = None) -> dict:
    paths = {"resolve": "/bench/busy/resolve/main/adapter_config.json", "model_info": "/api/models/bench/busy"}
    out: dict = {}
    for name, path in paths.items():
        keepalive_load(url, path, clients, 1.0)  # warm up
        out[name] = keepalive_load(url, path, clients, seconds, server_pid)
        print(f"  {clients} keep-alive clients, {name}: {_load_line(out[name])}", flush=True)
    socks = open_idle_connections(url, idle)
    try:
        for name, path in paths.items():
            key = f"{name}_with_{idle}_idle"
            out[key] = keepalive_load(url, path, clients, seconds, server_pid)
            print(f"  ... with {idle} idle connections open, {name}: {_load_line(out[key])}", flush=True)
        out["idle_still_open"] = still_open(socks)
    finally:
        for s in socks:
            s.close()
    out["mixed"] = bench_mixed(url, token, tmp, mixed_seconds, readers, writers)
    m = out["mixed"]
    print(f"  {readers} huggingface_hub readers + {writers} writers, {m['seconds']:.0f}s: {m['reads_per_s']:.1f} "
          f"reads/s (1 MiB), {m['writes_per_s']:.1f} commits/s; errors {m['errors']}, lost commits "
          f"{m['lost_commits']}, corrupt downloads {m['corrupt_downloads']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=800, help="search queries per measurement")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of pulls/pushes")
    parser.add_argument("--pullers", type=int, default=16)
    parser.add_argument("--pushers", type=int, default=4)
    parser.add_argument("--data", type=Path, default=None, help="data folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--stack", action="store_true", help="also measure the HTTP stack (section 4)")
    parser.add_argument("--stack-only", action="store_true", help="only section 4 (implies --adapters 0)")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--clients", type=int, default=16, help="keep-alive clients in section 4")
    parser.add_argument("--stack-seconds", type=float, default=5.0, help="seconds per keep-alive measurement")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections held open in section 4")
    parser.add_argument("--mixed-seconds", type=float, default=30.0)
    parser.add_argument("--server-pythonpath", default=None, help="serve from this peftkit checkout instead")
    args = parser.parse_args(argv)
    if args.stack_only:
        args.stack, args.adapters = True, 0

    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ["HF_HUB_OFFLINE"] = "0"
    tmp = Path(tempfile.mkdtemp(prefix="peftkit-bench-registry-"))
    os.environ.setdefault("HF_HOME", str(tmp / "hf"))

    from peftkit.registry import RegistryStore

    data = args.data or tmp / "registry"
    rng = random.Random(args.seed)
    report: dict = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "adapters": args.adapters}

    # Bulk import without fsync: this measures indexing, not the disk's flush latency.
    with RegistryStore(data, fsync=False) as store:
        if not args.stack_only:
            vocab, secs = index_adapters(store, args.adapters, rng)
            report["index"] = {"seconds": secs, "adapters_per_s": args.adapters / secs}
            print(f"indexed {args.adapters} adapters in {secs:.1f}s ({args.adapters / secs:.0f}/s)", flush=True)
            queries = query_mix(rng, vocab, args.queries)
            store.search("warmup", visible_to=())
            report["search_store"] = bench_search(store, queries)
        store.accounts.add_user("bench")  # the throughput repo lives in this user's namespace
        token = store.accounts.create_token("bench", write=True)[1]
        store.create_repo("bench/busy")
        store.commit("bench/busy", {
            "README.md": b"---\nlibrary_name: peft\nbase_model: org0/base-model-0\n---\nbench\n",
            "adapter_config.json": b'{"peft_type": "LORA", "task_type": "CAUSAL_LM"}',
            "adapter_model.safetensors": os.urandom(1024 * 1024),
        })

    proc, url = start_server(data, args.workers, args.server_pythonpath)
    try:
        if args.stack:
            print(f"HTTP stack, server with {args.workers} worker(s), {report['cpus']} CPUs:", flush=True)
            report["stack"] = bench_stack(url, token, tmp, clients=args.clients, seconds=args.stack_seconds,
                                          idle=args.idle, mixed_seconds=args.mixed_seconds,
                                          readers=args.pullers, writers=args.pushers, server_pid=proc.pid)
        if args.stack_only:
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
            return 0
        report["search_http"] = bench_http_search(url, queries)
        report["throughput"] = bench_mixed(url, token, tmp, args.duration, args.pullers, args.pushers)
        report["raw_pulls"] = bench_raw_pulls(url, min(args.duration, 5.0), args.pullers)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    s, h, t, r = report["search_store"], report["search_http"], report["throughput"], report["raw_pulls"]
    print(f"\nmachine: {report['cpus']} CPUs, Python {report['python']}; client and server on the same machine")
    print(f"search over {args.adapters} adapters, in process : p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms"
          f"  ({s['n']} queries, {s['mean_hits']:.1f} hits each on average, limit 20)")
    print(f"search over {args.adapters} adapters, over HTTP   : p50 {h['p50_ms']:.2f} ms  p99 {h['p99_ms']:.2f} ms")
    for kind in s["by_kind_p50_ms"]:
        print(f"    {kind:<18} store p50 {s['by_kind_p50_ms'][kind]:6.2f} p99 {s['by_kind_p99_ms'][kind]:6.2f} ms"
              f" | http p50 {h['by_kind_p50_ms'][kind]:6.2f} p99 {h['by_kind_p99_ms'][kind]:6.2f} ms")
    print(f"{args.pullers} pullers + {args.pushers} pushers via huggingface_hub, {t['seconds']:.1f}s: "
          f"{t['reads_per_s']:.1f} pulls/s (1 MiB each), {t['writes_per_s']:.1f} pushes/s, errors {t['errors']}, "
          f"lost commits {t['lost_commits']}, corrupt downloads {t['corrupt_downloads']}")
    print(f"{args.pullers} raw keep-alive HTTP clients, {r['seconds']:.1f}s: {r['pulls_per_s']:.1f} pulls/s "
          f"({r['mib_per_s']:.0f} MiB/s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
