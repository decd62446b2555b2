"""``peftkit compose BASE --auto ...``: the options of automatic composition and what the command prints.

The options are added to ``peftkit compose`` (peftkit.cli_hub) by :func:`auto_options`; the work is
:func:`peftkit.learned_composition.auto_compose`. Imports no torch until the command runs.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from peftkit.cli_output import echo_json

#: The option names (as click passes them) that only mean something with --auto.
AUTO_ONLY = ("examples", "eval_file", "candidates", "search", "strategy", "head", "max_candidates", "budget", "l1",
             "steps", "lr", "fusion_lr", "seed", "push")
#: Their defaults (an option at its default was not given).
AUTO_DEFAULTS = {"strategy": "weights", "head": "auto", "max_candidates": 8, "budget": 40, "l1": 0.05, "steps": 100,
                 "lr": 0.01, "fusion_lr": 1e-3, "seed": 0}


def auto_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the ``--auto`` options to a click command (in the order ``--help`` lists them)."""
    options = [
        click.option("--auto", is_flag=True,
                     help="Learn how to combine candidate adapters from a few examples (see --strategy) instead "
                          "of composing SPEC."),
        click.option("--examples", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="With --auto: JSONL/CSV examples of the new task (text + label, or prompt + completion)."),
        click.option("--eval", "eval_file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="With --auto: held-out examples to report on (default: hold out 30% of --examples)."),
        click.option("--candidates", default=None, metavar="'A, B, ...'",
                     help="With --auto: the adapters to combine (hub ids or adapter folders, comma-separated)."),
        click.option("--search", default=None, metavar="'KEY=VALUE ...'",
                     help="With --auto: find candidates by a hub search for BASE (keys: text, base_model, method, "
                          "task, tag, author, dataset; bare words are free text)."),
        click.option("--strategy", default="weights", show_default=True, metavar="weights|mixture|fusion",
                     help="With --auto: how to combine: weights (gradient-free search over a linear merge of "
                          "LoRA weights), mixture (mixing weights over the members' outputs, trained), fusion "
                          "(AdapterFusion, trained); several comma-separated are all reported, the first is saved."),
        click.option("--head", type=click.Choice(["auto", "members", "fresh"]), default="auto", show_default=True,
                     help="With --auto, for classifiers: train a fresh head for the examples' labels (fresh), use "
                          "the members' heads (members), or fresh only when no member's head predicts them (auto)."),
        click.option("--max-candidates", type=click.IntRange(min=1), default=8, show_default=True,
                     help="With --auto: try at most this many candidates."),
        click.option("--budget", type=click.IntRange(min=1), default=40, show_default=True,
                     help="With --auto: how many weight vectors the search scores."),
        click.option("--l1", type=click.FloatRange(min=0), default=0.05, show_default=True,
                     help="With --auto: penalty on the mean absolute weight."),
        click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
                     help="With --auto: training steps of the mixture, the fusion and a fresh head."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
                     help="With --auto: learning rate (Adam) of the mixture and a fresh head."),
        click.option("--fusion-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
                     help="With --auto: learning rate (Adam) of a fusion and its fresh head (its d x d "
                     "projections diverge at a mixture's rate)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="With --auto: seed of the held-out split and the search."),
        click.option("--push", default=None, metavar="REPO_ID",
                     help="With --auto: push the learned adapter to the hub as REPO_ID."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the report as JSON: what was composed (members with the revisions asked for and "
                          "the commits pulled, adapters and methods, labels), or with --auto the whole result."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def check_auto_options(auto: bool, spec: str | None, given: dict[str, Any]) -> None:
    """A usage error for SPEC with --auto, no SPEC without it, or --auto options without --auto."""
    if auto:
        if spec is not None:
            raise click.UsageError("--auto learns the composition itself: give BASE and --candidates or --search, "
                                   "not SPEC")
        if not given.get("examples"):
            raise click.UsageError("--auto needs --examples FILE (a few examples of the new task)")
        if (given.get("candidates") is None) == (given.get("search") is None):
            raise click.UsageError("--auto needs exactly one of --candidates 'a, b' or --search 'KEY=VALUE ...'")
        return
    if spec is None:
        raise click.UsageError("missing argument 'SPEC' (or pass --auto to learn a combination)")
    extra = [k for k in AUTO_ONLY if given.get(k) not in (None, AUTO_DEFAULTS.get(k))]
    if extra:
        raise click.UsageError(f"--{extra[0].replace('_', '-').replace('eval-file', 'eval')}"
                               f" only works with --auto")


def run_auto(base: str, out: str, *, hub: str | None, merge: bool, token: str | None, quiet: bool,
             options: dict[str, Any]) -> None:
    """Run automatic composition and print its report (a table, or JSON with --json)."""
    from peftkit.learned_composition import auto_compose
    from peftkit.auto_compose_report import format_report

    candidates = None
    if options.get("candidates") is not None:
        candidates = [c.strip() for c in options["candidates"].split(",") if c.strip()]
        if not candidates:
            raise click.BadParameter("name at least one adapter", param_hint="--candidates")
    result = auto_compose(base, candidates, search=options.get("search"), examples=options["examples"],
                          eval_examples=options.get("eval_file"), hub=hub, token=token,
                          strategy=options["strategy"], head=options["head"], max_candidates=options["max_candidates"],
                          budget=options["budget"], l1=options["l1"], steps=options["steps"], lr=options["lr"],
                          fusion_lr=options["fusion_lr"],
                          seed=options["seed"], out=out, merge=merge, push=options.get("push"),
                          progress=not quiet and not options["as_json"])
    if options["as_json"]:
        for cand in result.left_out:
            click.echo(f"left out {cand.source}: {cand.left_out}", err=True)
        echo_json(result.to_json())
        return
    click.echo(format_report(result))
    what = "the base model with the learned combination merged in" if merge else \
        {"weights": "the learned adapter", "mixture": "the learned mixture (a composition folder)",
         "fusion": "the learned fusion (a composition folder)"}[result.strategy]
    click.echo(f"Wrote {what} to {out}" + (f"; pushed it as {options['push']}" if result.pushed else ""))
