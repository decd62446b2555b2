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
   file, forced, so every pull transfers it) while 4 clients push (``upload_file``
   of 64 KiB, one commit each) to the same repo; then raw keep-alive GETs to
   show what the server does without the client library's overhead.

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


def start_server(data: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftkit.registry", "serve", "--port", "0", "--quiet", "--data", str(data)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if " at http" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split(" at ", 1)[1].split()[0]


def bench_throughput(url: str, token: str, tmp: Path, duration: float, pullers: int, pushers: int) -> dict:
    from huggingface_hub import HfApi, hf_hub_download

    repo = "bench/busy"
    deadline = time.monotonic() + duration
    counts = {"pulls": 0, "pushes": 0, "errors": 0}
    lock = threading.Lock()
    push_latency: list[float] = []

    def pull(i: int) -> None:
        cache = tmp / f"pull-cache-{i}"
        while time.monotonic() < deadline:
            try:
                hf_hub_download(repo, "adapter_model.safetensors", endpoint=url, cache_dir=cache,
                                token=False, force_download=True)
                with lock:
                    counts["pulls"] += 1
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    counts["errors"] += 1

    def push(i: int) -> None:
        api = HfApi(endpoint=url, token=token)
        step = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                api.upload_file(path_or_fileobj=os.urandom(64 * 1024), path_in_repo=f"pushes/{i}.bin",
                                repo_id=repo, commit_message=f"push {i}.{step}")
                with lock:
                    counts["pushes"] += 1
                    push_latency.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    counts["errors"] += 1
            step += 1

    elapsed = run_threads([(pull, pullers), (push, pushers)])
    return {
        "seconds": elapsed,
        "pulls_per_s": counts["pulls"] / elapsed,
        "pushes_per_s": counts["pushes"] / elapsed,
        "pulled_mib_per_s": counts["pulls"] / elapsed,  # 1 MiB per pull
        "push_p50_ms": percentile(push_latency, 50) * 1e3 if push_latency else None,
        "errors": counts["errors"],
    }


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
    args = parser.parse_args(argv)

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

    proc, url = start_server(data)
    try:
        report["search_http"] = bench_http_search(url, queries)
        report["throughput"] = bench_throughput(url, token, tmp, args.duration, args.pullers, args.pushers)
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
          f"{t['pulls_per_s']:.1f} pulls/s (1 MiB each), {t['pushes_per_s']:.1f} pushes/s "
          f"(push p50 {t['push_p50_ms'] or 0:.1f} ms), errors {t['errors']}")
    print(f"{args.pullers} raw keep-alive HTTP clients, {r['seconds']:.1f}s: {r['pulls_per_s']:.1f} pulls/s "
          f"({r['mib_per_s']:.0f} MiB/s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
