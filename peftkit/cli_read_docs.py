"""``peftkit docs``: read the user documentation that ships with peftkit, in the terminal.

Error messages point to pages and sections as ``peftkit docs PAGE#SECTION``; this prints them from the
installed package (:mod:`peftkit.docs_topics`), so a pip install needs no checkout and no network.
"""

from __future__ import annotations

import click

from peftkit.cli_output import echo_json, format_table
from peftkit.docs_topics import UnknownTopicError, find_topic, headings, section, section_headings, topics


@click.command("docs")
@click.argument("page", required=False)
@click.option("--sections", "list_sections", is_flag=True, help="List PAGE's sections (with the names PAGE#SECTION "
                                                                  "takes) instead of printing it.")
@click.option("--path", "show_path", is_flag=True, help="Print where the page's file is (to open it in an editor or "
                                                        "a Markdown viewer).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the pages, or PAGE's sections.")
def docs_command(page: str | None, list_sections: bool, show_path: bool, as_json: bool) -> None:
    """Read peftkit's documentation: without PAGE, list the pages; with PAGE, print it (Markdown, through a
    pager on a terminal).

    PAGE is a page name (`plugins`, `methods/lora`, or just `lora`); PAGE#SECTION prints one section, e.g.
    `peftkit docs plugins#peftkit_register_methods` (error messages name sections this way).
    """
    try:
        if page is None:
            if list_sections or show_path:
                raise click.UsageError(f"{'--sections' if list_sections else '--path'} is about one page: give "
                                       f"PAGE, e.g. peftkit docs lora {'--sections' if list_sections else '--path'}")
            _list_pages(as_json)
            return
        name, _, anchor = page.partition("#")
        topic = find_topic(name)
        if show_path:
            click.echo(str(topic.path))
        elif list_sections or as_json:
            found = [{"section": f"{topic.name}#{h.anchor}", "level": h.level, "title": h.title}
                     for h in (section_headings(topic, anchor) if anchor else headings(topic.text()))]
            if as_json:
                echo_json(found)
            else:
                click.echo("\n".join(f"{'  ' * (h['level'] - 1)}{h['section']}  {h['title']}" for h in found))
        else:
            click.echo_via_pager(section(topic, anchor) if anchor else topic.text())
    except UnknownTopicError as exc:
        raise click.ClickException(str(exc)) from None


def _list_pages(as_json: bool) -> None:
    pages = topics()
    if as_json:
        echo_json([{"page": t.name, "title": t.title, "path": str(t.path)} for t in pages])
        return
    click.echo(format_table([[t.name, t.title] for t in pages], ["PAGE", "TITLE"]))
    click.echo("\n`peftkit docs PAGE` prints one, `peftkit docs PAGE --sections` lists its sections.", err=True)


commands = [docs_command]
