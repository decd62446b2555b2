"""`make mutate`: mutation testing of the modules that carry correctness and security.

Reads bench/mutation_map.toml (module -> the fast test files that cover it), runs
mutmut on one module at a time and writes a report (score per module, surviving
mutants with file:line and the mutation) to docs/mutation.md.

Why mutmut (3.x): it never edits the checkout (it works on a copy under mutants/,
which matters in a checkout shared with other people), it runs for each mutant only
the tests that reached the mutated function, and it can mutate one file
(`only_mutate`) and chosen functions (mutant name patterns). cosmic-ray mutates the
files in place. mutmut derives module names from file paths, so this driver first
lays the package out as it is imported (peftkit/core/..., built from the package-dir
mapping in pyproject.toml) in a scratch folder, and runs mutmut there.

Equivalent mutants (no test can tell them apart from the original) are listed in
bench/mutation_equivalent.txt with a reason; see docs/testing.md.

Usage:
    python bench/mutate.py                       # every module in the map
    python bench/mutate.py plugins/lora/layer.py # some modules
    python bench/mutate.py --list                # the map
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAP_FILE = REPO / "bench" / "mutation_map.toml"
EQUIVALENT_FILE = REPO / "bench" / "mutation_equivalent.txt"
RESULTS_FILE = REPO / "bench" / "mutation_results.json"
DEFAULT_REPORT = REPO / "docs" / "mutation.md"
DEFAULT_WORK = REPO / "build" / "mutate"
SOURCE_NOTE = "source.txt"  # in the scratch folder: where the package copy came from
# Imported once by the scratch folder's root conftest.py, so mutmut's fork server holds them and
# no mutant's worker pays for them: the first tiny transformers model a test builds imports the
# modeling stack (torch._dynamo, scipy, ...), 5-15 s on a loaded 2-core machine, and peft is as
# slow. Imports only: the fork server must not run torch (not fork-safe after it has run).
PRELOAD = [
    "transformers.modeling_utils", "transformers.masking_utils",
    "transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.bert.modeling_bert", "transformers.models.roberta.modeling_roberta",
    "transformers.models.t5.modeling_t5", "peft", "safetensors.torch",
]
# mutmut stops a mutant after (estimated test time + 1 s) * multiplier CPU seconds, or half that
# in wall time; its default (15) turns a busy shared machine into false "timeout" kills.
TIMEOUT_MULTIPLIER = 60
# Statements not mutated (mutmut's do_not_mutate_patterns: a match excludes the whole statement).
# The wording of an error message or warning is not a value users' results depend on, and its
# mutants (a message turned into "XX..." or None) were a third of all mutants and most of the
# run time. The condition that decides whether the error is raised is still mutated.
NOT_MUTATED = [r"^\s*raise \w+\(",
               r"^\s*warnings\.warn\(", r"^\s*(logger|log|_log|LOG)\.(debug|info|warning|error)\("]
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


@dataclass
class Target:
    """One module of the map: its file in the repo, its tests, optional function globs."""

    path: str
    tests: list[str]
    functions: list[str] = field(default_factory=list)


@dataclass
class Mutant:
    name: str
    status: str
    line: int = 0
    before: str = ""
    after: str = ""

    @property
    def function(self) -> str:
        """The mutated function, as `Class.method` or `function`."""
        mangled = self.name.rsplit(".", 1)[-1].split("__mutmut_")[0]
        return mangled.removeprefix("x_").removeprefix("xǁ").replace("ǁ", ".")

    @property
    def key(self) -> str:
        """Names the mutation by function and changed text, not by mutmut's number,
        so a kept equivalence survives edits elsewhere in the module."""
        digest = hashlib.sha1(f"{self.before.strip()}\n{self.after.strip()}".encode()).hexdigest()[:10]
        return f"{self.function}:{digest}"


@dataclass
class ModuleResult:
    """One module's last run (kept in bench/mutation_results.json) and its equivalent mutants."""

    target: Target
    mutants: list[Mutant]
    seconds: float
    equivalent: dict[str, str]
    date: str
    source: str

    def count(self, statuses: set[str]) -> int:
        return sum(1 for m in self.live() if m.status in statuses)

    def live(self) -> list[Mutant]:
        """Mutants not marked equivalent."""
        return [m for m in self.mutants if m.key not in self.equivalent]

    @property
    def score(self) -> float:
        live = self.live()
        return 100.0 * self.count(KILLED) / len(live) if live else 100.0


def load_map(path: Path = MAP_FILE) -> list[Target]:
    data = tomllib.loads(path.read_text())
    targets = []
    for entry in data.get("module", []):
        for test in entry["tests"]:
            if not (REPO / test.split("::")[0]).is_file():
                raise SystemExit(f"{path.name}: test file {test} of {entry['path']} does not exist; fix the map")
        if not (REPO / entry["path"]).is_file():
            raise SystemExit(f"{path.name}: module {entry['path']} does not exist (moved?); fix the map")
        targets.append(Target(entry["path"], list(entry["tests"]), list(entry.get("functions", []))))
    return targets


def load_equivalent(path: Path = EQUIVALENT_FILE) -> dict[tuple[str, str], str]:
    """(module path, mutant key) -> reason. Lines: `PATH KEY REASON...`; `#` starts a comment."""
    kept: dict[tuple[str, str], str] = {}
    if not path.exists():
        return kept
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            raise SystemExit(f"{path.name}:{number}: expected `PATH FUNCTION:HASH REASON`, got {raw!r}")
        kept[(parts[0], parts[1])] = parts[2]
    return kept


def pyproject(rev: str | None) -> dict:
    """pyproject.toml of the working tree, or of commit `rev`."""
    if rev is None:
        return tomllib.loads((REPO / "pyproject.toml").read_text())
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:pyproject.toml"],
                           capture_output=True, text=True, check=True)
    return tomllib.loads(shown.stdout)


def package_dirs(rev: str | None) -> dict[str, str]:
    """Import path -> folder in the repo, from pyproject.toml's package-dir mapping."""
    return dict(pyproject(rev)["tool"]["setuptools"]["package-dir"])


def import_path_of(repo_path: str, dirs: dict[str, str]) -> str:
    """`core/merging.py` -> `peftkit/core/merging.py` (the file as the package is imported)."""
    best = max((folder for folder in dirs.values() if repo_path.startswith(folder + "/")), key=len, default=None)
    if best is None:
        raise SystemExit(f"{repo_path} is in no package folder of pyproject.toml's package-dir")
    package = next(name for name, folder in dirs.items() if folder == best)
    return package.replace(".", "/") + repo_path[len(best):]


def lay_out(work: Path, dirs: dict[str, str], rev: str | None) -> None:
    """A fresh copy of the package in its import layout, plus tests/, in `work`. With `rev`, the
    package comes from that commit (the working tree of a shared checkout may be mid-edit); the
    tests always come from the working tree, so new tests can be tried before they are committed."""
    if work.exists():
        shutil.rmtree(work)
    source = REPO
    if rev:
        source = work / "_rev"
        source.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, *sorted(set(dirs.values()))],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(dirs.items(), key=lambda item: item[0].count(".")):
        destination = work / package.replace(".", "/")
        shutil.copytree(source / folder, destination, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(REPO / "tests", work / "tests", ignore=ignore)
    if rev:
        shutil.rmtree(source)
    write_preload(work)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev or "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    (work / SOURCE_NOTE).write_text(f"commit {head}" if rev else f"working tree at {head}")


def write_preload(work: Path) -> None:
    """The scratch folder's root conftest.py. mutmut's fork server runs it once (while collecting);
    every mutant's worker is forked from there, so what it imports is paid once, not per mutant:
    PRELOAD and every module of the (mutated) package, which a test otherwise imports lazily (the
    mutated module alone is thousands of lines to compile). gc.freeze() then keeps that heap out
    of the workers' garbage collections (pytest's own collect calls took seconds per mutant)."""
    lines = [
        '"""Written by bench/mutate.py (write_preload): imports for mutmut\'s fork server."""',
        "",
        "import gc",
        "import importlib",
        "import pkgutil",
        "",
        "",
        "def _load(name):",
        "    try:",
        "        return importlib.import_module(name)",
        "    except Exception:  # an optional dependency missing: the tests that need it say so",
        "        return None",
        "",
        "",
        "import tests.conftest  # noqa: E402,F401  (first: it sets HF_HOME etc. before anything imports the hub)",
        "",
        f"for _name in {PRELOAD!r}:",
        "    _load(_name)",
        "_package = _load('peftkit')",
        "if _package is not None:",
        "    for _info in pkgutil.walk_packages(_package.__path__, 'peftkit.'):",
        "        if not _info.name.endswith('__main__'):",
        "            _load(_info.name)",
        "gc.freeze()",
        "",
    ]
    (work / "conftest.py").write_text("\n".join(lines))


def mutmut_config(target: Target, mutated: str, project: dict) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(item) for item in items) + "]"  # a JSON string is a TOML string

    pytest_options = project["tool"]["pytest"]["ini_options"]
    return "\n".join([
        "[tool.mutmut]",
        'source_paths = ["peftkit"]',
        f'only_mutate = ["{mutated}"]',
        f"pytest_add_cli_args_test_selection = {toml_list(target.tests)}",
        'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider"]',
        # torch is not fork-safe after it has run: fork workers from a clean server.
        'process_isolation = "forkserver"',
        "use_git_change_detection = false",
        f"timeout_multiplier = {TIMEOUT_MULTIPLIER}",
        'also_copy = ["conftest.py"]',  # write_preload's
        f"do_not_mutate_patterns = {toml_list(NOT_MUTATED)}",
        "",
        "[tool.pytest.ini_options]",
        f"filterwarnings = {toml_list(pytest_options.get('filterwarnings', []))}",
        f"markers = {toml_list(pytest_options.get('markers', []))}",
        "",
    ])


def parse_results(text: str) -> dict[str, str]:
    results = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            results[name] = status
    return results


def describe(mutants: list[Mutant], work: Path, mutated: str, source_lines: list[str]) -> None:
    """Fill in each mutant's changed text (the lines `mutmut show` prints) and its line in the original
    file. In this process, from one parse of the mutated module: `mutmut show` parses it again for
    every mutant, minutes for a module with a hundred survivors."""
    import difflib

    import libcst as cst
    from mutmut.mutation import diff_apply

    if not mutants:
        return
    module = cst.parse_module((work / "mutants" / mutated).read_text())
    for mutant in mutants:
        pair = (diff_apply.read_original_function(module, mutant.name),
                diff_apply.read_mutant_function(module, mutant.name))
        original, changed = (cst.Module([function]).code.strip().split("\n") for function in pair)
        diff = list(difflib.unified_diff(original, changed, lineterm=""))
        removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
        added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
        mutant.before, mutant.after = "\n".join(removed), "\n".join(added)
        mutant.line = line_in_function(source_lines, mutant.function, removed[0] if removed else "")


def line_in_function(lines: list[str], function: str, text: str) -> int:
    """The line number of `text` inside `function` (`Class.method` or `name`) of the source lines
    (mutmut's diff numbers lines within the function). 0 when not found."""
    owner, _, name = function.rpartition(".")
    after = 0
    if owner:
        owner_header = re.compile(rf"^\s*class\s+{re.escape(owner)}\b")
        after = next((i for i, line in enumerate(lines) if owner_header.match(line)), 0)
    header = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(")
    starts = [i for i, line in enumerate(lines) if i >= after and header.match(line)] or [after]
    for start in starts:
        for number in range(start, len(lines)):
            if lines[number].strip() == text.strip():
                return number + 1
    return 0


def run_module(target: Target, args: argparse.Namespace) -> dict:
    """Runs mutmut on one module; returns its record for bench/mutation_results.json."""
    if args.tests:  # --again --tests: the survivors meet only the tests added for them
        target = Target(target.path, list(args.tests), target.functions)
    dirs = package_dirs(args.rev)
    mutated = import_path_of(target.path, dirs)
    work = Path(args.work) / re.sub(r"[^A-Za-z0-9]+", "_", target.path)
    # Bytecode is cached (in the scratch folder): a worker then loads, not compiles, what it imports.
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "MUTANT_UNDER_TEST", "PYTHONDONTWRITEBYTECODE"}}
    env.setdefault("OMP_NUM_THREADS", "1")
    module = mutated[:-3].replace("/", ".")
    patterns = [f"{module}.*{glob}__mutmut_*" for glob in target.functions]
    before: dict[str, str] = {}
    if args.again and (work / "mutants").is_dir():
        before = selected(mutmut_statuses(work, env), patterns)
        # mutmut forgets the verdicts of the mutants an --again run did not retest: the kills kept in
        # bench/mutation_results.json (from the runs on this same package copy) stand.
        records = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
        kept = {m["name"]: m["status"] for m in records.get(target.path, {}).get("mutants", [])}
        before = {name: (kept[name] if kept.get(name) in KILLED else status) for name, status in before.items()}
        shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
        write_preload(work)
    else:
        lay_out(work, dirs, args.rev)
    (work / "pyproject.toml").write_text(mutmut_config(target, mutated, pyproject(args.rev)))
    retest = [name for name, status in before.items() if status not in KILLED] if before else patterns
    seconds = 0.0
    if retest or not before:
        command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *retest]
        print(f"== {target.path}: mutmut run, {len(retest) if before else 'all'} mutants "
              f"({', '.join(target.functions) or 'every function'}) in {work}", flush=True)
        seconds = run_mutmut(command, work, env, args.verbose)
    statuses = selected(mutmut_statuses(work, env), patterns)
    if before:  # a kill stands: tests were only added since (mutmut forgets verdicts when the tests change)
        statuses = {name: (statuses[name] if name in retest else status) for name, status in before.items()}
    source_lines = module_source(work, mutated)
    mutants = [Mutant(name, status) for name, status in sorted(statuses.items())]
    describe([m for m in mutants if m.status not in KILLED], work, mutated, source_lines)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": (work / SOURCE_NOTE).read_text().strip(),
        "seconds": round(seconds),
        "mutants": [{"name": m.name, "status": m.status, "line": m.line, "before": m.before, "after": m.after}
                    for m in mutants],
    }


def run_mutmut(command: list[str], work: Path, env: dict[str, str], verbose: bool) -> float:
    """Runs mutmut in its own process group, so an interrupted driver stops its workers too."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=work, env=env, start_new_session=True,
                               stdout=None if verbose else subprocess.DEVNULL)
    try:
        returncode = process.wait()
    except BaseException:
        os.killpg(process.pid, signal.SIGTERM)
        raise
    if returncode != 0:
        raise SystemExit(f"mutmut failed in {work} (exit {returncode}); rerun with --verbose")
    return time.monotonic() - start


def mutmut_statuses(work: Path, env: dict[str, str]) -> dict[str, str]:
    listed = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                            capture_output=True, text=True, check=True).stdout
    return parse_results(listed)


def selected(statuses: dict[str, str], patterns: list[str]) -> dict[str, str]:
    """The mutants of the mapped functions (all when the map names none)."""
    if not patterns:
        return statuses
    return {n: s for n, s in statuses.items() if any(fnmatch.fnmatch(n, p) for p in patterns)}


def module_source(work: Path, mutated: str) -> list[str]:
    """The unmutated module as laid out for this run (mutmut keeps the original beside its mutants)."""
    return (work / mutated).read_text().splitlines()


def load_results(targets: list[Target], equivalent: dict[tuple[str, str], str]) -> list[ModuleResult]:
    records = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
    results = []
    for target in targets:
        record = records.get(target.path)
        if record is None:
            continue
        mutants = [Mutant(**m) for m in record["mutants"]]
        kept = {key: reason for (path, key), reason in equivalent.items() if path == target.path}
        results.append(ModuleResult(target, mutants, record["seconds"], kept, record["date"], record["source"].strip()))
    return results


def markdown(results: list[ModuleResult], not_run: list[Target]) -> str:
    out = [
        "# Mutation testing report",
        "",
        "Written by `make mutate` (`python bench/mutate.py`, mutmut), one module at a time; each row says",
        "when it ran and on what. How to run and read it: [testing.md](testing.md#mutation-testing-make-mutate).",
        "",
        "Score: killed / (mutants - equivalent); *killed* includes timeouts. *No tests*: no mapped test",
        "reached the function (counted as not killed). Equivalent mutants: `bench/mutation_equivalent.txt`.",
        "",
        "| module | functions | mutants | killed | survived | no tests | equivalent | score | minutes (last run) | run |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --: | --- |",
    ]
    for r in results:
        equivalent = len(r.mutants) - len(r.live())
        functions = ", ".join(r.target.functions) or "all"
        out.append(f"| {r.target.path} | {functions} | {len(r.mutants)} | {r.count(KILLED)} | {r.count({'survived'})} "
                   f"| {r.count({'no tests'})} | {equivalent} | {r.score:.1f}% | {r.seconds / 60:.1f} "
                   f"| {r.date}, {r.source} |")
    if not_run:
        out += ["", "Not run yet: " + ", ".join(f"`{t.path}`" for t in not_run) + "."]
    for r in results:
        alive = [m for m in r.live() if m.status not in KILLED]
        if not alive:
            continue
        out += ["", f"## {r.target.path}: not killed", "",
                "Tests: " + ", ".join(f"`{t}`" for t in r.target.tests), "",
                "| line | key (for mutation_equivalent.txt) | status | original | mutant |",
                "| --: | --- | --- | --- | --- |"]
        for m in sorted(alive, key=lambda m: m.line):
            out.append(f"| {r.target.path}:{m.line} | `{m.key}` | {m.status} | {code(m.before)} | {code(m.after)} |")
    out.append("")
    return "\n".join(out)


def code(text: str) -> str:
    flat = " / ".join(line.strip() for line in text.splitlines() if line.strip()) or "(removed)"
    return "`" + flat.replace("|", "\\|").replace("`", "'") + "`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module files from the map (default: all)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--report", default=str(DEFAULT_REPORT), help="report file (default docs/mutation.md)")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="scratch folder (default build/mutate)")
    parser.add_argument("--rev", help="take the package from this git commit (tests from the working tree)")
    parser.add_argument("--again", action="store_true",
                        help="keep the package copy of the last run and test only the mutants it did not kill, "
                             "with the current tests (after adding tests, or to finish an interrupted run)")
    parser.add_argument("--tests", nargs="+", metavar="TEST",
                        help="with --again: retest the survivors with these test files only (the ones added for "
                             "them; a kill stands, so the mapped tests need not run again)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the kept results (after marking equivalent mutants)")
    parser.add_argument("--list", action="store_true", help="print the map and exit")
    parser.add_argument("--verbose", action="store_true", help="show mutmut's output")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `kill` stops mutmut's workers too
    targets = load_map()
    if args.tests and not args.again:
        parser.error("--tests only goes with --again (a first run takes the mapped tests)")
    if args.list:
        for t in targets:
            print(f"{t.path}: {' '.join(t.tests)}" + (f"  [functions: {', '.join(t.functions)}]" if t.functions else ""))
        return 0
    unknown = set(args.modules) - {t.path for t in targets}
    if unknown:
        raise SystemExit(f"not in {MAP_FILE.name}: {', '.join(sorted(unknown))} (see --list)")
    equivalent = load_equivalent()
    if not args.report_only:
        for target in [t for t in targets if not args.modules or t.path in args.modules]:
            record = run_module(target, args)
            records = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
            records[target.path] = record
            RESULTS_FILE.write_text(json.dumps(records, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
            (r,) = load_results([target], equivalent)
            print(f"   {len(r.mutants)} mutants, {r.count(KILLED)} killed, score {r.score:.1f}%", flush=True)
    results = load_results(targets, equivalent)
    done = {r.target.path for r in results}
    Path(args.report).write_text(markdown(results, [t for t in targets if t.path not in done]))
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
