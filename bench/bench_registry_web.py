"""Server time of the registry's web pages on a registry holding 10,000 adapters.

Run by hand (never from the test suite)::

    python bench/bench_registry_web.py                          # 10,000 adapters in a temporary folder
    python bench/bench_registry_web.py --data /tmp/web-bench    # keep (or reuse) the filled registry
    python bench/bench_registry_web.py --repos 2000 --requests 200 --json out.json

The registry is filled directly through the store API (a card, an
``adapter_config.json`` and a small weights file per repo; 50 base models,
8 methods, 6 tasks, 40 tags, 20 datasets, 5 licenses, 300 authors, 5% private).
Then each page is answered ``--requests`` times by the same object the server
serves (:class:`peftkit.registry.web.WebSite` in front of the Hub API), in this
process, and the wall time of each answer is measured: the server's time for
the page, without the network. Pages: the home page (everything, facet counts
over all 10,000), a text search, a filtered search, a deep results page, a
signed-out user page, and adapter pages (a different repo each time, so no
card cache helps). Prints p50/p99/max in milliseconds per page.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from email.message import Message
from pathlib import Path
from urllib.parse import parse_qs

from peftkit.registry import RegistryStore
from peftkit.registry.hub_api import HubApi, Request
from peftkit.registry.web import WebSite

METHODS = ["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LOKR", "LOHA", "ADALORA", "BOTTLENECK"]
TASKS = ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION"]
WORDS = ["sentiment", "news", "legal", "medical", "chat", "code", "math", "german", "french", "summaries",
         "reviews", "tweets", "finance", "support", "translation", "poetry", "qa", "ner", "intent", "toxicity"]


def fill(store: RegistryStore, repos: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    bases = [f"org{i % 7}/base-model-{i}" for i in range(50)]
    tags = [f"tag{i}" for i in range(40)]
    datasets = [f"data/set-{i}" for i in range(20)]
    licenses = ["mit", "apache-2.0", "cc-by-4.0", "openrail", "other"]
    weights = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(256)
    start = time.perf_counter()
    for i in range(repos):
        author = f"user{i % 300}"
        repo_id = f"{author}/adapter-{i}-{rng.choice(WORDS)}"
        base = rng.choice(bases)
        method = rng.choice(METHODS)
        words = " ".join(rng.sample(WORDS, 5))
        card = (
            "---\nlibrary_name: peft\n"
            f"base_model: {base}\nlicense: {rng.choice(licenses)}\n"
            f"tags:\n- {rng.choice(tags)}\n- {rng.choice(tags)}\n"
            f"datasets:\n- {rng.choice(datasets)}\n"
            "model-index:\n- name: m\n  results:\n  - dataset: {name: d, type: d}\n    metrics:\n"
            f"    - {{type: accuracy, value: {rng.random():.3f}}}\n"
            f"---\n\n# Adapter {i}\n\nAn adapter for {words}.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
            + "Some more text about training. " * 20 + "\n"
        )
        config = {"peft_type": method, "task_type": rng.choice(TASKS), "base_model_name_or_path": base,
                  "r": rng.choice([4, 8, 16]), "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
        store.create_repo(repo_id, private=rng.random() < 0.05, owner=author)
        store.commit(repo_id, {"README.md": card, "adapter_config.json": json.dumps(config),
                               "adapter_model.safetensors": weights}, message=f"Add adapter {i}", author=author)
        if i % 1000 == 999:
            print(f"  filled {i + 1} repos ({time.perf_counter() - start:.0f} s)", flush=True)


def request(path: str, query: str = "") -> Request:
    headers = Message()
    headers["Accept"] = "text/html,application/xhtml+xml"
    headers["Host"] = "127.0.0.1:8080"
    return Request("GET", path, parse_qs(query, keep_blank_values=True), headers, "http://127.0.0.1:8080")


def measure(site: WebSite, make, n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        req = make(i)
        t = time.perf_counter()
        resp = site.dispatch(req)
        times.append((time.perf_counter() - t) * 1000)
        assert resp.status == 200, (req.path, resp.status, resp.body[:300])
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(times[int(0.99 * (len(times) - 1))], 2),
            "max_ms": round(times[-1], 2), "requests": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repos", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300, help="answers measured per page")
    parser.add_argument("--data", default=None, help="registry folder to fill (or reuse when already filled)")
    parser.add_argument("--json", dest="json_out", default=None, help="Also write the figures to this file.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        store = RegistryStore(root, fsync=False)
        have = len(store.search(limit=1, offset=args.repos - 1)) if args.repos else 0
        if not have:
            print(f"filling {args.repos} adapters into {root} ...", flush=True)
            fill(store, args.repos)
        site = WebSite(HubApi(store))
        ids = [r.repo_id for r in store.search(visible_to=(), limit=1000, sort="name")]
        rng = random.Random(1)
        pages = {
            "home (all adapters, facet counts over all)": lambda i: request("/"),
            "text search (?q=sentiment)": lambda i: request("/", f"q={rng.choice(WORDS)}"),
            "filtered search (method + base model + sort)": lambda i: request(
                "/", f"method=lora&base_model=org{i % 50 % 7}/base-model-{i % 50}&sort=recent"),
            "deep page (?page=400)": lambda i: request("/", "page=400"),
            "user page": lambda i: request(f"/user{i % 300}"),
            "adapter page (a different repo each time)": lambda i: request("/" + ids[i % len(ids)]),
        }
        for make in pages.values():  # warm up: templates compiled, SQLite pages cached
            for i in range(5):
                site.dispatch(make(i))
        results = {}
        for name, make in pages.items():
            results[name] = measure(site, make, args.requests)
            print(f"{name:48s} p50 {results[name]['p50_ms']:6.2f} ms  p99 {results[name]['p99_ms']:6.2f} ms  "
                  f"max {results[name]['max_ms']:6.2f} ms", flush=True)
        store.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"repos": args.repos, "pages": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
