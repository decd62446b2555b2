"""The docs cannot drift: the CLI reference is generated, links resolve, the
public API is documented, and the README holds the two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

import peftkit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_cli_reference_matches_help():
    from peftkit.cli_docs import render

    assert (DOCS / "cli.md").read_text() == render(), \
        "docs/cli.md is stale: run `python -m peftkit.cli_docs > docs/cli.md`"


def test_relative_links_resolve():
    broken = []
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_public_name_is_documented():
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    missing = [name for name in peftkit.__all__ if not name.startswith("_") and name not in text]
    assert not missing, f"document these in docs/: {missing}"


def test_readme_has_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_link_anchors_name_real_headings():
    broken = []
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            linked = (page.parent / target) if target else page
            headings = re.findall(r"^#+\s+(.*)$", linked.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, broken


def test_python_examples_in_the_docs_are_valid_python():
    import ast

    bad = []
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for number, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            try:
                ast.parse(block)
            except SyntaxError as exc:
                bad.append(f"{page.relative_to(ROOT)} block {number + 1}: {exc}")
    assert not bad, bad
