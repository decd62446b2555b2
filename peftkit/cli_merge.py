"""``peftkit merge BASE A B ... -o OUT``: merge adapters in weight space into one new adapter folder.

The work is :func:`peftkit.weight_merge.merge_to_folder`; this module parses the options and prints
the summary (or ``--json``). Torch-free at import.
"""

from __future__ import annotations

from pathlib import Path

import click

from peftkit.cli_options import hub_option, plain_warnings, quiet_option, read_token, token_option
from peftkit.cli_output import echo_json, echo_safe


def _weights(text: str | None) -> list[float] | None:
    """``--weights '0.7,0.3'`` as numbers (negative subtracts)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: write one number per adapter, comma-separated, e.g. 0.7,0.3",
                                 param_hint="--weights") from None


@click.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder to write the merged adapter to (with its card and merge.json).")
@click.option("--weights", default=None, metavar="'W1,W2,...'",
              help="One weight per adapter, in order, comma-separated; negative subtracts.  [default: 1 each]")
@click.option("--strategy", default="svd", show_default=True, metavar="NAME",
              help="How to merge: linear (the exact weighted sum), cat, svd (that sum cut to --rank), ties, "
                   "dare_linear, dare_ties, magnitude_prune, their _svd forms, or one a plugin adds (docs: "
                   "`peftkit docs composition`).")
@click.option("--density", type=float, default=None,
              help="ties, dare_* and magnitude_prune: the fraction of each change's entries to keep, in (0, 1].")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Rank of the merged LoRA (default: the sum of ranks for linear and cat, else the largest; a "
                   "dense merge of other methods: full rank).")
@click.option("--majority-sign", "majority_sign_method", type=click.Choice(["total", "frequency"]),
              default=None, help="ties and dare_ties: how each entry's sign is elected [default: total]; refused "
                                 "with the other strategies.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="dare_*: seed of the random drops (the same merge every run).")
@click.option("--head", default=None, metavar="ADAPTER|average",
              help="When several adapters keep a task head: the adapter whose head the merged one keeps, or "
                   "'average' for their weighted average.")
@click.option("--name", default="merged", show_default=True, help="The merged adapter's name.")
@hub_option
@token_option
@click.option("--overwrite", is_flag=True, help="Replace OUT when it exists.")
@quiet_option
@click.option("--json", "as_json", is_flag=True,
              help="Print what was merged as JSON (members with the commits pulled, weights, options, the "
                   "merged adapter's method and rank).")
def merge_command(base: str, adapters: tuple[str, ...], out: str, weights: str | None, strategy: str,
                  density: float | None, rank: int | None, majority_sign_method: str | None, seed: int,
                  head: str | None,
                  name: str, hub: str | None, token_file: str | None, overwrite: bool, quiet: bool,
                  as_json: bool) -> None:
    """Merge ADAPTERS in weight space into one new adapter and save it to OUT.

    BASE is the model folder or hub id the adapters were trained on. Each of
    ADAPTERS is an adapter folder or a hub id (namespace/name[@revision]).
    The result is an ordinary adapter folder, ready to load or to publish
    with `peftkit hub push OUT REPO`: a LoRA (other methods are merged
    through their dense weight changes), or IA3 / BitFit for members of
    those methods.

    \b
    Example:
      peftkit merge BASE alice/sst2 ./imdb -o merged --head sst2 \\
        --strategy ties --density 0.5 --weights 0.6,0.4
    """
    from peftkit.weight_merge import merge_to_folder

    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())) and not overwrite:
        raise click.ClickException(f"{out} exists and is not empty; pass --overwrite to replace it")
    with plain_warnings():
        report = merge_to_folder(base, list(adapters), out, weights=_weights(weights), strategy=strategy,
                                 density=density, rank=rank, majority_sign_method=majority_sign_method, seed=seed,
                                 head=head, name=name, hub=hub, token=read_token(token_file),
                                 progress=not quiet and not as_json)
    if as_json:
        echo_json(report.to_json())
    else:
        echo_safe(report.summary(), multiline=True)


commands = [merge_command]
