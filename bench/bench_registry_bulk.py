"""What one large commit costs the registry: a commit of N small files over HTTP, then its tree and paths-info.

Run by hand (never from the test suite)::

    python bench/bench_registry_bulk.py              # 10,000 files
    python bench/bench_registry_bulk.py --files 20000 --json out.json

The server runs in this process (``start_server`` on 127.0.0.1) and the client
is a raw keep-alive HTTP connection, so this process's CPU time during a
request is, to a good approximation, the server's. Figures:

* ``commit_cpu_s``: CPU for the whole commit request (parsing, hashing,
  staging every file, then the transaction);
* ``commit_locked_cpu_s`` / ``commit_locked_wall_s``: ``RegistryStore.commit``
  with the files already staged, i.e. the write transaction (publishing blobs,
  writing the tree, moving the branch): the only part that holds other writers;
* ``tree_cpu_s``: listing the whole tree recursively, every page;
* ``paths_info_cpu_s``: ``paths-info`` for every file and for every folder.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import tempfile
import time
from urllib.parse import urlsplit

from peftkit.registry import RegistryStore, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--json", dest="json_out", default=None, help="Also write the figures to this file.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        store = RegistryStore(root)
        store.accounts.add_user("bench")
        token = store.accounts.create_token("bench", write=True)[1]
        store.create_repo("bench/bulk")
        locked = {"cpu": 0.0, "wall": 0.0}
        commit = store.commit

        def timed_commit(*a, **kw):
            # The HTTP layer hands commit() files already staged, so its time is the
            # write transaction: what holds other writers.
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return commit(*a, **kw)
            finally:
                locked["cpu"], locked["wall"] = time.thread_time() - cpu, time.perf_counter() - wall

        server = start_server(store)
        parts = urlsplit(server.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)

        def request(method: str, path: str, body: bytes | None = None, headers: dict | None = None):
            cpu, wall = time.process_time(), time.perf_counter()
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, (resp.status, data[:300])
            return data, time.process_time() - cpu, time.perf_counter() - wall

        files = {f"d{i % 40}/sub{i % 7}/f{i}.txt": f"file {i}\n".encode() for i in range(args.files)}
        lines = [json.dumps({"key": "header", "value": {"summary": "bulk"}})]
        lines += [json.dumps({"key": "file", "value": {"path": p, "content": base64.b64encode(c).decode()}})
                  for p, c in files.items()]
        body = ("\n".join(lines) + "\n").encode()
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
        store.commit = timed_commit  # type: ignore[method-assign]
        _, commit_cpu, commit_wall = request("POST", "/api/models/bench/bulk/commit/main", body, auth)
        store.commit = commit  # type: ignore[method-assign]

        tree_cpu, listed, path = 0.0, 0, "/api/models/bench/bulk/tree/main?recursive=1"
        while path:
            cpu = time.process_time()
            conn.request("GET", path)
            resp = conn.getresponse()
            listed += len(json.loads(resp.read()))
            tree_cpu += time.process_time() - cpu
            link = resp.headers.get("Link")
            path = urlsplit(link.split(">")[0].lstrip("<"))._replace(scheme="", netloc="").geturl() if link else ""
        wanted = list(files) + sorted({p.rsplit("/", 1)[0] for p in files} | {p.split("/")[0] for p in files})
        _, info_cpu, _ = request("POST", "/api/models/bench/bulk/paths-info/main",
                                 json.dumps({"paths": wanted}).encode(), {"Content-Type": "application/json"})
        conn.close()
        server.close()
        store.close()

    figures = {
        "files": args.files,
        "commit_cpu_s": round(commit_cpu, 3),
        "commit_wall_s": round(commit_wall, 3),
        "commit_locked_cpu_s": round(locked["cpu"], 3),
        "commit_locked_wall_s": round(locked["wall"], 3),
        "tree_entries_listed": listed,
        "tree_cpu_s": round(tree_cpu, 3),
        "paths_info_paths": len(wanted),
        "paths_info_cpu_s": round(info_cpu, 3),
    }
    print(json.dumps(figures, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
