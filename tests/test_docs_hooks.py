"""Docs and code stay together: every hook is documented (with its real
signature) in docs/plugins.md and has a test; links into the doc resolve."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from peftkit.core import hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugins.md"

HOOKS = sorted(name for name, value in vars(hookspecs).items()
               if callable(value) and hasattr(value, hookspecs.PROJECT_NAME + "_spec"))


def _documented() -> dict[str, str]:
    """Hook heading in docs/plugins.md -> the signature line under it."""
    text = DOC.read_text(encoding="utf-8")
    found = {}
    for match in re.finditer(r"^### (peftkit_\w+)\n\nSignature: `([^`]+)`", text, re.M):
        found[match.group(1)] = match.group(2)
    return found


def _slugs() -> set[str]:
    """GitHub's anchors for the doc's headings."""
    headings = re.findall(r"^#+ (.+)$", DOC.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_hookspecs_are_found():
    assert "peftkit_register_methods" in HOOKS and len(HOOKS) >= 5


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    documented = _documented()
    assert hook in documented, f"add a '### {hook}' section with a 'Signature:' line to docs/plugins.md"
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert documented[hook] == f"{hook}({params})"


def test_doc_documents_no_hook_that_does_not_exist():
    assert set(_documented()) <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    """Like datasette: each hook has a test named test_hook_<hook> in tests/test_plugins*.py."""
    tests = set()
    for path in (ROOT / "tests").glob("test_plugins*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        tests |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert f"test_hook_{hook}" in tests, f"write test_hook_{hook} in tests/test_plugins.py"


def test_links_into_the_doc_resolve():
    slugs = _slugs()
    sources = [*ROOT.glob("core/*.py"), *ROOT.glob("peftkit/*.py"), DOC]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for anchor in re.findall(r"(?:docs/plugins\.md|\]\()#([\w\-{}]+)", text):
            if anchor.startswith("{"):  # an f-string placeholder naming a hook
                continue
            assert anchor in slugs, f"{path.name} links to docs/plugins.md#{anchor}, which is no heading"
    assert set(HOOKS) <= slugs  # the error messages link to docs/plugins.md#<hook>


def test_python_examples_in_the_doc_compile():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 8
    for number, block in enumerate(blocks):
        compile(block, f"docs/plugins.md python block {number}", "exec")
