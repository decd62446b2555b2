"""Every option of every built-in method has help text, and docs/methods/ shows it (generated tables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from peftkit.api import describe_method, list_methods
from peftkit.method_docs import PAGES, render_page
from peftkit.plugin_api import AdapterConfig, option

METHODS_DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods"
BUILTIN = sorted(m["name"] for m in list_methods() if m["distribution"] in (None, "peftkit"))


@pytest.mark.parametrize("method", BUILTIN)
def test_every_option_has_one_line_help(method: str) -> None:
    options = describe_method(method)["options"]
    missing = [o["name"] for o in options if not o["help"].strip()]
    assert not missing, f"{method}: options without help: {missing}"
    assert all("\n" not in o["help"] for o in options)


def test_every_builtin_method_has_a_page() -> None:
    documented = {m for methods in PAGES.values() for m in methods}
    assert set(BUILTIN) <= documented, f"add the methods' pages to peftkit.method_docs.PAGES: " \
                                        f"{sorted(set(BUILTIN) - documented)}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_method_page_option_reference_is_current(page: str) -> None:
    text = (METHODS_DOCS / page).read_text(encoding="utf-8")
    assert text == render_page(text, PAGES[page]), (
        f"docs/methods/{page} has an outdated option reference: run `.venv/bin/python -m peftkit.method_docs`")
    for method in PAGES[page]:
        for o in describe_method(method)["options"]:
            assert o["help"] in text


def test_third_party_config_declares_help_with_option() -> None:
    @dataclasses.dataclass
    class ToyConfig(AdapterConfig):
        width: int = option(4, help="how wide")
        names: list[str] = option(default_factory=list, help="which names")

    @dataclasses.dataclass
    class WiderConfig(ToyConfig):
        width: int = 9  # a new default keeps the base's help

    details = {o["name"]: o for o in WiderConfig.option_details()}
    assert details["width"] == {"name": "width", "type": "int", "default": 9, "help": "how wide"}
    assert details["names"]["default"] == [] and details["names"]["help"] == "which names"
    assert ToyConfig().names is not ToyConfig().names
    with pytest.raises(ValueError, match="one non-empty line"):
        option(1, help="two\nlines")
