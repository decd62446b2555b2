"""Two registry servers on one PostgreSQL and one blob store, under load, and kill -9 of one.

Run by hand (never from the test suite)::

    nice -n 5 .venv/bin/python bench/bench_registry_cluster.py                  # 16 readers + 4 writers, 30 s
    .venv/bin/python bench/bench_registry_cluster.py --seconds 5 --no-docs       # a quick look
    .venv/bin/python bench/bench_registry_cluster.py --blobs-kind s3             # blobs in S3 (moto)

What it does:

1. Starts PostgreSQL (the ``pgserver`` package, as the tests do) and two ``peftkit registry
   serve`` processes on two 127.0.0.1 ports sharing ``--database postgresql://...`` and
   ``--blobs`` (a shared folder, or ``s3://...`` on a moto S3 server with ``--blobs-kind s3``).
   Accounts are real: a read token for the readers, a write token for the writers.
2. Pushes 8 fixture adapter repos through server A.
3. Load: ``--readers`` readers and ``--writers`` writers (one of them racing commits on one
   ``parent_commit``), huggingface_hub clients in ``--client-processes`` processes, spread over
   both servers for ``--seconds`` (bench/cluster_clients.py describes each role).
4. Kill: the same clients for ``--burst-seconds``, the writers committing ``--burst-kb`` files
   without pause; ``--kill-after`` seconds in, server A gets SIGKILL and its clients move to B.
5. Checks: every acknowledged commit is in the history seen through B and through a restarted
   A (0 lost), their files are in the tree, each race had one winner and the race repo holds
   exactly the winners, 0 errors (requests to A that ended after its death are counted apart),
   the kill landed while a commit was in flight, and ``peftkit registry fsck`` passes.

Prints the figures (requests/s by kind, p50/p95/p99 latency, race outcomes, machine and
versions) and, unless ``--no-docs`` or a check failed, writes them into docs/registry.md
between the markers ``<!-- bench_registry_cluster:<blobs kind>:start/end -->``.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.* helpers (PostgreSQL, registry servers, races)
sys.path.insert(0, str(ROOT / "bench"))

from cluster_clients import (  # noqa: E402
    COMMITS_REPO,
    RACE_CLIENTS,
    RACE_REPO,
    READ_KINDS,
    Role,
    Workload,
    client_process,
)

DOC = ROOT / "docs" / "registry.md"
FIXTURE_WORDS = ("amberwing", "birchfold", "cedarloom", "duneshard", "emberquay", "fjordlight", "grovemint",
                 "heathspire")
WEIGHTS_BYTES = 256 * 1024
KINDS = (*READ_KINDS, "commit", "cross_read", "race")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


# ------------------------------------------------------------------ setup
def blob_store(kind: str, tmp: Path, cleanup: list) -> str:
    """The ``--blobs`` value every server gets. For S3: moto's S3 server started (its stop appended
    to ``cleanup``), a bucket made, and the AWS settings pointing at it put in this process's
    environment, which the registry servers and fsck inherit."""
    if kind == "folder":
        return str(tmp / "shared-blobs")
    from tests.registry_s3_helpers import create_bucket, s3_env, start_moto_server

    endpoint, stop = start_moto_server()
    cleanup.append(stop)
    create_bucket(endpoint, "bench")
    os.environ.update(s3_env(endpoint))
    return "s3://bench/registry"


def start_registry_server(name: str, tmp: Path, database: str, blobs: str):
    from tests.registry_conftest_helpers import start_cli_server

    proc, url, _ = start_cli_server(tmp / name, "--database", database, "--blobs", blobs)
    return proc, url


def push_fixtures(url: str, token: str, tmp: Path) -> dict[str, tuple[str, str]]:
    """8 adapter repos pushed through ``url``, a commits repo and a race repo; returns
    {repo: (its card's own word, SHA-256 of its weights)}."""
    from huggingface_hub import HfApi

    from tests.registry_conftest_helpers import write_adapter_folder

    api = HfApi(endpoint=url, token=token)
    fixtures = {}
    for k, word in enumerate(FIXTURE_WORDS):
        repo = f"bench/adapter-{k}"
        weights = os.urandom(WEIGHTS_BYTES)
        folder = write_adapter_folder(tmp / "fixtures" / str(k), weights=weights, tags=("cluster",),
                                      body=f"Cluster bench adapter {word}.")
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
        fixtures[repo] = (word, hashlib.sha256(weights).hexdigest())
    for repo in (COMMITS_REPO, RACE_REPO):
        api.create_repo(repo)
        api.upload_file(path_or_fileobj=b"start\n", path_in_repo="start.txt", repo_id=repo)
    return fixtures


# ------------------------------------------------------------------ running the clients
def roles(readers: int, writers: int, *, race: bool) -> list[Role]:
    """Readers and writers alternating between server 0 and 1; with ``race`` the last writer races."""
    out = [Role("reader", i, i % 2) for i in range(readers)]
    out += [Role("racer" if race and i == writers - 1 else "writer", i, i % 2) for i in range(writers)]
    return out


def run_phase(work: Workload, all_roles: list[Role], processes: int, *, kill=None) -> dict:
    """Run the roles in ``processes`` child processes (0: one each). With ``kill=(process, n)``,
    SIGKILL that server process (server 0) once it has acknowledged ``n`` commits in this phase, at
    a moment when a commit through it is in flight. Returns the merged tallies."""
    ctx = multiprocessing.get_context("spawn")
    processes = len(all_roles) if processes <= 0 else min(processes, len(all_roles))
    start = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    progress = ctx.Array("i", 2 * len(work.urls))  # acknowledged commits per server, then in flight
    killed = ctx.Value("d", 0.0)
    children = [ctx.Process(target=client_process,
                            args=(all_roles[p::processes], work, start, results, progress, killed))
                for p in range(processes)]
    for c in children:
        c.start()
    start.wait(timeout=300)
    began = time.time()
    killed_at = None
    if kill is not None:
        proc, after_commits = kill
        in_flight = len(work.urls)
        while time.time() < began + work.seconds:
            if progress[0] >= after_commits and progress[in_flight] > 0:
                break
            time.sleep(0.002)
        killed_at = killed.value = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    tallies = [results.get(timeout=work.seconds + 600) for _ in children]
    for c in children:
        c.join(timeout=60)
        if c.exitcode != 0:
            raise SystemExit(f"a client process failed (exit status {c.exitcode})")
    merged = merge(tallies)
    merged["began"], merged["killed_at"] = began, killed_at
    merged["seconds"] = max(t["ended"] for t in tallies) - began
    merged["processes"] = processes
    return merged


def merge(tallies: list[dict]) -> dict:
    out: dict = {"counts": {}, "after_kill": {}, "seen": {}, "latencies": {}, "errors": [], "acknowledged": [],
                 "races": [], "moved": sum(t["moved"] for t in tallies)}
    for t in tallies:
        for name in ("counts", "after_kill", "seen"):
            for key, n in t[name].items():
                out[name][key] = out[name].get(key, 0) + n
        for kind, sample in t["latencies"].items():
            out["latencies"].setdefault(kind, []).extend(sample)
        for name in ("errors", "acknowledged", "races"):
            out[name].extend(t[name])
    return out


# ------------------------------------------------------------------ checks
def classify_errors(phase: dict, killed: int | None) -> dict:
    """Errors split into those that count and requests to the killed server ending after its death;
    commits in flight at the kill are the commit requests to it that started before and ended after."""
    at = phase["killed_at"]
    expected = [e for e in phase["errors"] if killed is not None and e[2] == killed and e[1] >= at]
    counted = [e for e in phase["errors"] if e not in expected]
    in_flight = [e for e in expected if e[3] == "commit" and e[0] < at]
    return {"counted": counted, "after_death": expected, "commits_in_flight": len(in_flight)}


def history(url: str, token: str, repo: str) -> tuple[list[str], set[str]]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=token)
    return [c.commit_id for c in api.list_repo_commits(repo)], set(api.list_repo_files(repo))


def check_commits(urls: dict[str, str], token: str, acknowledged: list[tuple[str, str, int, float]]) -> dict:
    """Every acknowledged commit in the history, and its file in the tree, as each server sees it."""
    out = {}
    for name, url in urls.items():
        commits, files = history(url, token, COMMITS_REPO)
        known = set(commits)
        out[name] = {"commits": len(commits), "lost": sum(c[0] not in known for c in acknowledged),
                     "missing_files": sum(c[1] not in files for c in acknowledged), "history": commits}
    return out


def check_races(urls: dict[str, str], token: str, races: list[list[object]], before: int) -> dict:
    """Each race: one winner, the others 412; the race repo: ``before`` commits plus the winners."""
    want = sorted(["won"] + [412] * (RACE_CLIENTS - 1), key=str)
    bad = [r for r in races if sorted(r, key=str) != want]
    lengths = {name: len(history(url, token, RACE_REPO)[0]) for name, url in urls.items()}
    return {"races": len(races), "one_winner": len(races) - len(bad), "bad": bad[:5],
            "history_lengths": lengths, "expected_length": before + len(races) - len(bad)}


def run_fsck(data: Path, database: str, blobs: str) -> dict:
    from tests.registry_conftest_helpers import subprocess_env

    done = subprocess.run([sys.executable, "-m", "peftkit.registry", "fsck", "--data", str(data), "--database",
                           database, "--blobs", blobs, "--json"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=1800)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {"output": (done.stdout + done.stderr)[-2000:]}
    return {"exit_status": done.returncode, "report": report}


# ------------------------------------------------------------------ report
def kind_rows(phase: dict) -> list[dict]:
    rows = []
    for kind in KINDS:
        by_server = [phase["counts"].get(f"{kind}@{s}", 0) for s in (0, 1)]
        sample = phase["latencies"].get(kind, [])
        if not sample:
            continue
        rows.append({"kind": kind, "a": by_server[0], "b": by_server[1],
                     "per_s": sum(by_server) / phase["seconds"],
                     **{f"p{q}_ms": percentile(sample, q) * 1e3 for q in (50, 95, 99)}})
    return rows


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    versions = {}
    for dist in ("peftkit", "huggingface_hub", "uvicorn", "psycopg", "pgserver", "moto", "boto3"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "os": platform.platform(),
            "python": platform.python_version(), "versions": versions, "git": commit.stdout.strip()}


def postgres_version(server) -> str:
    import psycopg

    with psycopg.connect(server.get_uri()) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


def markdown(report: dict) -> str:
    m, load, kill = report["machine"], report["load"], report["kill"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"Measured {report['date']} with `{report['command']}` (git {m['git']}): "
        f"{report['readers']} readers + {report['writers']} writers (one racing on a `parent_commit`), "
        f"huggingface_hub clients in {report['load']['processes']} processes, blobs in "
        f"{report['blobs_label']}. Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; "
        f"Python {m['python']}, PostgreSQL {report['postgres']}, {versions}. Clients, both servers and "
        f"PostgreSQL shared the machine with other jobs (load average {report['load_before']:.1f} before, "
        f"{report['load_after']:.1f} after): the figures are a lower bound.",
        "",
        f"Load, {load['seconds']:.1f} s, both servers up:",
        "",
        "| request | through A | through B | requests/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| `{r['kind']}` | {r['a']:,} | {r['b']:,} | {r['per_s']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} |" for r in load["rows"]]
    races = load["races"]
    lines += [
        "",
        f"Errors: {load['errors']}. Acknowledged commits: {load['acknowledged']}, lost through A: "
        f"{load['commits']['A']['lost']}, through B: {load['commits']['B']['lost']} (and each was read back "
        f"at its commit through the other server right after). Races ({RACE_CLIENTS} clients committing on "
        f"one `parent_commit`, 2 through each server): {races['one_winner']} of {races['races']} with exactly "
        f"one winner and {RACE_CLIENTS - 1} refusals (412); the race repo holds its first "
        f"{races['expected_length'] - races['one_winner']} commits plus the winners "
        f"({'as it should' if set(races['history_lengths'].values()) == {races['expected_length']} else 'NOT'}).",
        "",
        f"Kill: the same clients for {kill['seconds']:.1f} s, the writers committing {report['burst_kb']} KiB "
        f"files without pause; `kill -9` of A {kill['killed_after_s']:.1f} s in, once it had acknowledged "
        f"{kill['acknowledged_by_killed']} commits in this phase and while {kill['commits_in_flight']} "
        f"commit(s) were in flight through it ({kill['landed_unacknowledged']} of them landed without an "
        f"acknowledgement). After the kill B answered {kill['requests_after_kill']} requests (no errors) and "
        f"acknowledged {kill['acknowledged_after_kill']} commits; {kill['moved']} clients moved from A to B. Requests to A that failed after its death: {kill['after_death']} (counted apart; the last "
        f"{kill['last_failure_at_a_s']:.0f} s after the kill, as huggingface_hub retries a refused connection "
        f"with backoff before it gives up and the client moves to B); errors otherwise: {kill['errors']}. "
        f"Every acknowledged commit of both phases "
        f"({report['acknowledged_total']}) is in the history through B and through A restarted, and "
        f"`peftkit registry fsck` passes ({report['fsck_summary']}).",
    ]
    return "\n".join(lines)


def write_docs(kind: str, block: str, doc: Path = DOC) -> None:
    """Replace the text between this blob kind's markers in ``doc`` (the rest is left as it is)."""
    start, end = f"<!-- bench_registry_cluster:{kind}:start -->", f"<!-- bench_registry_cluster:{kind}:end -->"
    text = doc.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{doc} needs one pair of markers {start} ... {end} where the figures go")
    head, rest = text.split(start)
    doc.write_text(f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}")


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs-kind", choices=("folder", "s3"), default="folder")
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--writers", type=int, default=4, help="writers; the last one races (at least 2)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load with both servers up")
    parser.add_argument("--burst-seconds", type=float, default=45.0,
                        help="seconds of the phase with the kill (huggingface_hub retries a dead server for about "
                             "25 s before its clients move on)")
    parser.add_argument("--kill-after", type=int, default=5,
                        help="kill server A once it has acknowledged this many commits in that phase (and while a "
                             "commit through it is in flight)")
    parser.add_argument("--burst-kb", type=int, default=256, help="KiB per commit in the kill phase")
    parser.add_argument("--commit-bytes", type=int, default=1024, help="bytes per commit in the load phase")
    parser.add_argument("--client-processes", type=int, default=0,
                        help="processes the clients run in (default 0: one per client; see bench/cluster_clients.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/registry.md")
    args = parser.parse_args(argv)
    if args.writers < 2 or args.readers < 1:
        parser.error("--writers needs at least 2 (one racer, one committer) and --readers at least 1")
    if args.kill_after < 1:
        parser.error("--kill-after needs at least 1 commit")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "nice -n 5 .venv/bin/python bench/bench_registry_cluster.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    tmp = Path(tempfile.mkdtemp(prefix="peftkit-bench-cluster-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the servers and PostgreSQL are stopped
    os.environ.update({"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(tmp / "hf")})
    from peftkit.registry import RegistryStore

    from tests.registry_conftest_helpers import stop_process
    from tests.registry_pg_helpers import create_database, start_postgres

    load_before = os.getloadavg()[0]
    pg = start_postgres(tmp / "pg")
    servers: list = []
    cleanup = [pg.cleanup]
    try:
        database = create_database(pg, "registry_cluster")
        blobs = blob_store(args.blobs_kind, tmp, cleanup)
        with RegistryStore(tmp / "admin", database=database, blobs=blobs) as store:
            for user in ("bench", "reader"):
                store.accounts.add_user(user)
            write_token = store.accounts.create_token("bench", write=True, name="bench-writer")[1]
            read_token = store.accounts.create_token("reader", write=False, name="bench-reader")[1]
        proc_a, url_a = start_registry_server("host-a", tmp, database, blobs)
        servers.append(proc_a)
        proc_b, url_b = start_registry_server("host-b", tmp, database, blobs)
        servers.append(proc_b)
        pg_version = postgres_version(pg)
        print(f"PostgreSQL {pg_version}; servers A {url_a} and B {url_b}; blobs {blobs}", flush=True)
        fixtures = push_fixtures(url_a, write_token, tmp)
        start_commits = set(history(url_a, read_token, COMMITS_REPO)[0])
        race_start = len(history(url_a, read_token, RACE_REPO)[0])

        def workload(phase: str, seconds: float, commit_bytes: int) -> Workload:
            return Workload(phase, (url_a, url_b), read_token, write_token, fixtures, seconds, commit_bytes,
                            str(tmp / "cache"))

        load = run_phase(workload("load", args.seconds, args.commit_bytes),
                         roles(args.readers, args.writers, race=True), args.client_processes)
        print(f"load phase done ({load['seconds']:.1f} s); checking", flush=True)
        load_errors = classify_errors(load, None)
        load_commits = check_commits({"A": url_a, "B": url_b}, read_token, load["acknowledged"])
        races = check_races({"A": url_a, "B": url_b}, read_token, load["races"], race_start)

        kill_roles = roles(args.readers, args.writers, race=False)
        kill = run_phase(workload("kill", args.burst_seconds, args.burst_kb * 1024), kill_roles, args.client_processes,
                         kill=(proc_a, args.kill_after))
        print(f"kill phase done ({kill['seconds']:.1f} s); checking", flush=True)
        kill_errors = classify_errors(kill, 0)
        proc_a2, url_a2 = start_registry_server("host-a-restarted", tmp, database, blobs)
        servers.append(proc_a2)
        acknowledged = load["acknowledged"] + kill["acknowledged"]
        final = check_commits({"B": url_b, "A restarted": url_a2}, read_token, acknowledged)
        final_races = check_races({"B": url_b, "A restarted": url_a2}, read_token, load["races"], race_start)
        for proc in servers[1:]:
            stop_process(proc)
        fsck = run_fsck(tmp / "admin", database, blobs)
    finally:
        for proc in servers:
            if proc.poll() is None:
                stop_process(proc)
        for stop in reversed(cleanup):
            stop()
        shutil.rmtree(tmp, ignore_errors=True)

    at = kill["killed_at"]
    acked_by_killed = [c for c in kill["acknowledged"] if c[2] == 0]
    landed_unacknowledged = len(set(final["B"]["history"]) - {c[0] for c in acknowledged} - start_commits)
    failover = max((e[1] - at for e in kill_errors["after_death"]), default=0.0)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "machine": machine(), "postgres": pg_version, "blobs_kind": args.blobs_kind,
        "blobs_label": "a shared folder" if args.blobs_kind == "folder" else "S3 (a moto server)",
        "readers": args.readers, "writers": args.writers, "client_processes": args.client_processes,
        "burst_kb": args.burst_kb, "kill_after": args.kill_after,
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "acknowledged_total": len(acknowledged),
        "load": {"seconds": load["seconds"], "processes": load["processes"], "rows": kind_rows(load), "errors": len(load_errors["counted"]),
                 "acknowledged": len(load["acknowledged"]), "races": races,
                 "commits": {k: {x: v[x] for x in ("commits", "lost", "missing_files")}
                             for k, v in load_commits.items()}},
        "kill": {"seconds": kill["seconds"], "rows": kind_rows(kill), "errors": len(kill_errors["counted"]),
                 "after_death": len(kill_errors["after_death"]),
                 "killed_after_s": at - kill["began"], "commits_in_flight": kill_errors["commits_in_flight"],
                 "acknowledged_by_killed": len(acked_by_killed), "moved": kill["moved"],
                 "requests_after_kill": sum(n for k, n in kill["after_kill"].items() if k.endswith("@1")),
                 "acknowledged_after_kill": sum(1 for c in kill["acknowledged"] if c[2] == 1 and c[3] > at),
                 "landed_unacknowledged": landed_unacknowledged, "last_failure_at_a_s": failover},
        "final": {k: {x: v[x] for x in ("commits", "lost", "missing_files")} for k, v in final.items()},
        "final_races": final_races, "fsck": fsck,
        "error_samples": [e[3:] for e in (load_errors["counted"] + kill_errors["counted"])[:10]],
    }
    fsck_report = fsck["report"]
    report["fsck_summary"] = ", ".join(f"{k} {v}" for k, v in fsck_report.items() if isinstance(v, (int, bool)))
    checks = {
        "no errors with both servers up": report["load"]["errors"] == 0,
        "no errors at the surviving server": report["kill"]["errors"] == 0,
        "no acknowledged commit lost (A and B, load phase)": all(
            v["lost"] == 0 and v["missing_files"] == 0 for v in load_commits.values()),
        "no acknowledged commit lost (B and A restarted, both phases)": all(
            v["lost"] == 0 and v["missing_files"] == 0 for v in final.values()),
        "both servers show the same history": final["B"]["history"] == final["A restarted"]["history"],
        "one winner per race": races["races"] > 0 and races["one_winner"] == races["races"]
        and all(n == races["expected_length"] for n in final_races["history_lengths"].values()),
        "the kill landed during a commit through A": report["kill"]["commits_in_flight"] > 0,
        "A acknowledged commits in the kill phase before dying": len(acked_by_killed) > 0,
        "every client of A moved to B": kill["moved"] == sum(r.home == 0 for r in kill_roles),
        "fsck passes": fsck["exit_status"] == 0 and fsck_report.get("ok") is True,
    }
    report["checks"] = checks
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        if report["error_samples"]:
            print("errors: " + json.dumps(report["error_samples"], indent=1), file=sys.stderr)
        return 1
    if not args.no_docs:
        write_docs(args.blobs_kind, markdown(report))
        print(f"wrote the figures into {DOC.relative_to(ROOT)}")
    return 0


def print_report(report: dict) -> None:
    print(markdown(report))
    print("\nkill phase (A killed):")
    for r in report["kill"]["rows"]:
        print(f"  {r['kind']:<10} A {r['a']:>6} B {r['b']:>6} {r['per_s']:7.1f}/s p50 {r['p50_ms']:.0f} "
              f"p95 {r['p95_ms']:.0f} p99 {r['p99_ms']:.0f} ms")
    print(f"  commits that landed without an acknowledgement (in flight at the kill): "
          f"{report['kill']['landed_unacknowledged']}")
    for name, ok in report["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")


if __name__ == "__main__":
    raise SystemExit(main())
