"""The judging parts of bench/bench_registry_cluster.py: which errors count against the registry, and
the docs section it rewrites (the load run itself is the benchmark's; tests/test_registry_pg_cluster.py
runs a small one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_registry_cluster", ROOT / "bench" / "bench_registry_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_requests_to_the_killed_server_after_its_death_are_excused() -> None:
    bench = _bench()
    killed_at = 100.0
    errors = [  # (start, end, server, kind, message)
        (90.0, 95.0, 0, "model_info", "to A before the kill"),
        (99.0, 101.0, 0, "commit", "to A, in flight at the kill"),
        (102.0, 130.0, 0, "download", "to A after the kill"),
        (99.0, 101.0, 0, "search", "to A, a read in flight at the kill"),
        (101.0, 102.0, 1, "commit", "to B after the kill"),
    ]
    verdict = bench.classify_errors({"killed_at": killed_at, "errors": errors}, 0)
    assert [e[4] for e in verdict["counted"]] == ["to A before the kill", "to B after the kill"]
    assert len(verdict["after_death"]) == 3
    assert verdict["commits_in_flight"] == 1
    no_kill = bench.classify_errors({"killed_at": None, "errors": errors}, None)
    assert no_kill["counted"] == errors and no_kill["after_death"] == [] and no_kill["commits_in_flight"] == 0


def test_the_figures_replace_only_their_own_section(tmp_path: Path) -> None:
    bench = _bench()
    doc = tmp_path / "registry.md"
    doc.write_text("intro\n<!-- bench_registry_cluster:folder:start -->\nold folder\n"
                   "<!-- bench_registry_cluster:folder:end -->\nmiddle\n<!-- bench_registry_cluster:s3:start -->\n"
                   "old s3\n<!-- bench_registry_cluster:s3:end -->\nend\n")
    bench.write_docs("s3", "new s3\nfigures", doc)
    assert doc.read_text() == ("intro\n<!-- bench_registry_cluster:folder:start -->\nold folder\n"
                               "<!-- bench_registry_cluster:folder:end -->\nmiddle\n"
                               "<!-- bench_registry_cluster:s3:start -->\nnew s3\nfigures\n"
                               "<!-- bench_registry_cluster:s3:end -->\nend\n")
    doc.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="needs one pair of markers"):
        bench.write_docs("folder", "x", doc)
    assert doc.read_text() == "no markers here\n"


def test_docs_registry_md_has_a_section_for_each_blob_store() -> None:
    text = (ROOT / "docs" / "registry.md").read_text()
    for kind in ("folder", "s3"):
        assert text.count(f"<!-- bench_registry_cluster:{kind}:start -->") == 1
        assert text.count(f"<!-- bench_registry_cluster:{kind}:end -->") == 1
