"""`peftkit docs`: the user docs ship with peftkit, and every page or section an error message names exists.

Error messages point users to `peftkit docs PAGE#SECTION` (a pip install has no docs/ folder to open); a
renamed heading must not leave a message pointing nowhere, so the references in the source are checked here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftkit.cli import main, run
from peftkit.core import hookspecs
from peftkit.docs_topics import UnknownTopicError, anchor_of, find_topic, headings, section, topics

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("core", "peftkit", "plugins", "hub_client", "hub_rules", "registry")
           for p in (ROOT / folder).rglob("*.py")]
REFERENCE = re.compile(r"`peftkit docs ([a-z][\w/.-]*)(?:#([\w{}-]+))?`")  # as messages write them


def cli(*args: str):
    run([])  # the commands are attached by run()
    return CliRunner().invoke(main, list(args))


def test_every_page_of_docs_is_listed_with_its_title():
    pages = {t.name: t for t in topics()}
    on_disk = {p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert set(pages) == on_disk
    assert pages["plugins"].title == "Writing and managing plugins"
    listing = cli("docs", "--json")
    assert listing.exit_code == 0, listing.output
    rows = {r["page"]: r for r in json.loads(listing.stdout)}
    assert rows["methods/lora"]["title"] == pages["methods/lora"].title and set(rows) == on_disk


def test_a_page_a_section_and_a_method_name():
    whole = cli("docs", "docs/registry.md")
    assert whole.exit_code == 0 and whole.stdout == (ROOT / "docs" / "registry.md").read_text() + "\n"
    hook = cli("docs", "plugins#peftkit_register_methods")
    assert hook.exit_code == 0
    assert hook.stdout.startswith("### peftkit_register_methods\n")
    assert "### peftkit_register_merge_strategies" not in hook.stdout  # stops at the next heading of its level
    assert "register(" in hook.stdout
    assert find_topic("lora").name == "methods/lora"
    assert find_topic("seq_bn").name == "methods/bottleneck"  # a family's page, by any of its methods
    assert cli("docs", "seq_bn", "--path").stdout.strip() == str(ROOT / "docs" / "methods" / "bottleneck.md")


def test_sections_are_named_as_a_markdown_renderer_anchors_them():
    assert anchor_of("4. The entry-point module") == "4-the-entry-point-module"
    assert anchor_of("PEFT's file format (`peft_type`)") == "pefts-file-format-peft_type"
    assert anchor_of("See [the hub](hub.md) now") == "see-the-hub-now"
    text = "# Title\n```python\n# not a heading\n```\n## Same\n## Same\n"
    assert [h.anchor for h in headings(text)] == ["title", "same", "same-1"]
    listed = cli("docs", "plugins", "--sections", "--json")
    assert {"section": "plugins#hook-reference", "level": 2, "title": "Hook reference"} in json.loads(listed.stdout)
    inside = json.loads(cli("docs", "plugins#hook-reference", "--sections", "--json").stdout)  # one section's
    assert inside[0]["section"] == "plugins#hook-reference" and len(inside) > 1
    assert all(s["level"] > 2 for s in inside[1:]) and len(inside) < len(json.loads(listed.stdout))
    assert {"section": "plugins#peftkit_register_methods", "level": 3, "title": "peftkit_register_methods"} in inside
    bare = cli("docs", "--sections")  # a flag about one page, with none given
    assert bare.exit_code == 2 and "give PAGE" in bare.output


def test_unknown_pages_and_sections_say_what_there_is():
    page = cli("docs", "plugin")
    assert page.exit_code == 1
    assert "the docs have no page 'plugin'; did you mean 'plugins'?" in page.output
    gone = cli("docs", "plugins#hooks")
    assert gone.exit_code == 1
    assert "plugins has no section 'hooks'; did you mean" in gone.output and "--sections" in gone.output
    with pytest.raises(UnknownTopicError, match="no section"):
        section(find_topic("plugins"), "nothing-like-this")


def test_every_reference_in_the_source_names_a_page_and_section_that_exist():
    found = []
    for path in SOURCES:
        for page, anchor in REFERENCE.findall(path.read_text()):
            found.append((path.name, page, anchor))
            topic = find_topic(page)
            if anchor and "{" not in anchor:
                section(topic, anchor)
    assert len(found) >= 10 and any(page == "plugins" for _, page, _ in found)
    # plugins#{hook_name} / plugins#{attr}: every hook has its section
    for hook in (name for name in dir(hookspecs) if name.startswith("peftkit_register_")):
        assert section(find_topic("plugins"), hook).startswith(f"### {hook}\n")


def test_every_builtin_method_has_a_page():
    from peftkit.api import list_methods

    for method in list_methods():
        if method["distribution"] == "peftkit":
            find_topic(method["name"])


def test_a_builtin_methods_description_names_its_page():
    shown = cli("methods", "seq_bn")
    assert shown.exit_code == 0 and "docs: `peftkit docs seq_bn`" in shown.stdout
    assert cli("docs", "seq_bn", "--path").stdout.strip().endswith("methods/bottleneck.md")


def test_a_method_with_a_section_of_its_family_page_names_that_section():
    """`peftkit methods p_tuning` named the prompt-tuning page, which printed from its top."""
    shown = cli("methods", "p_tuning")
    assert shown.exit_code == 0 and "docs: `peftkit docs p_tuning#p-tuning-p_tuning-pefts-p_tuning`" in shown.stdout
    section = cli("docs", "p_tuning#p-tuning-p_tuning-pefts-p_tuning")
    assert section.exit_code == 0 and section.stdout.startswith("## P-tuning (`p_tuning`, PEFT's `P_TUNING`)")
    assert "## Option reference" not in section.stdout
