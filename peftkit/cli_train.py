"""``peftkit train``: the command line of :func:`peftkit.training.train`.

Torch-free at import, like every CLI module: torch and transformers load when
the command runs. Under ``torchrun`` / ``accelerate launch`` every process runs
this same command (``python -m peftkit train ...``); only the main one writes.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

import click

from peftkit.training_data import TASKS

_RESULT_KEYS = ("loss", "accuracy", "f1_macro", "perplexity", "train_loss")


def _labels(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if len(names) < 2:
        raise click.BadParameter("list at least two labels, separated by commas: --labels neg,pos")
    return names


@click.command("train", context_settings={"show_default": True})
@click.argument("model")
@click.option("--method", "-m", default="lora", metavar="SPEC",
              help="Tuning method as a shorthand: lora, 'lora[r=8,alpha=16]', 'seq_bn[reduction_factor=16]'.")
@click.option("--data", "-d", required=True, type=click.Path(dir_okay=False),
              help="Training data: .jsonl/.json (one object per line) or .csv/.tsv with a header row.")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False), default=None,
              help="Evaluation data, same format; gives eval loss (and accuracy for classification).")
@click.option("--task", "-t", required=True, type=click.Choice(TASKS),
              help="causal-lm: prompt -> completion (or plain text); seq-cls: text -> label; "
                   "token-cls: tokens -> one tag each; seq2seq: encoder-decoder prompt -> completion.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder: the adapter, labels.json, train_results.json, checkpoints/.")
@click.option("--text-field", default=None, help="Field with the text (seq-cls: default 'text'; causal-lm: "
                                                    "train on plain text instead of prompt/completion).")
@click.option("--text-pair-field", default=None, help="seq-cls: field with a second text (pairs, e.g. NLI).")
@click.option("--label-field", default="label", help="seq-cls: field with the label (string or integer).")
@click.option("--prompt-field", default="prompt", help="causal-lm/seq2seq: field with the prompt.")
@click.option("--completion-field", default="completion", help="causal-lm/seq2seq: field with the completion.")
@click.option("--tokens-field", default="tokens", help="token-cls: field with the list of words.")
@click.option("--tags-field", default="tags", help="token-cls: field with one tag per word.")
@click.option("--labels", callback=_labels, default=None, metavar="A,B,...",
              help="Label names in id order (default: those in the training data, sorted).")
@click.option("--max-length", type=click.IntRange(min=1), default=512,
              help="Longest tokenized example; longer ones are cut (at most the model's limit).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=3.0, help="Passes over the data.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, help="Peak learning rate.")
@click.option("--lora-plus-ratio", type=click.FloatRange(min=0, min_open=True), default=None, metavar="R",
              help="LoRA+: LoRA's B factors learn at lr * R (the paper uses 2 to 16).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Examples per device per step.")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=None,
              help="Evaluation batch size [default: --batch-size].")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1,
              help="Accumulate gradients over this many batches per optimizer step.")
@click.option("--warmup-steps", type=click.FloatRange(min=0), default=0.0,
              help="Linear warm-up: a step count, or a fraction of all steps if below 1.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, help="AdamW weight decay.")
@click.option("--lr-scheduler", default="linear", help="linear, cosine, constant, constant_with_warmup, ...")
@click.option("--seed", type=int, default=42, help="Seed for adapter init, data order and dropout.")
@click.option("--bf16", is_flag=True, help="bfloat16 mixed precision (autocast).")
@click.option("--cpu", is_flag=True, help="Train on the CPU even when a GPU is present.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory.")
@click.option("--fsdp", is_flag=True,
              help="Shard the base model over the processes (FSDP2, one unit per transformer block; the adapter "
                   "stays whole). Launch with torchrun or accelerate launch.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]), default="float32",
              help="dtype the base model is loaded in (auto: as saved).")
@click.option("--quantize", type=click.Choice(["4bit", "8bit"]), default=None,
              help="Load the base model quantized with bitsandbytes (4bit: NF4, QLoRA); the adapter trains in "
                   "float32 on top (and a classifier's task head, which stays in float).")
@click.option("--eval-steps", type=click.IntRange(min=1), default=None,
              help="Evaluate every N steps [default: at the end of every epoch].")
@click.option("--metric-for-best-model", default=None, metavar="NAME",
              help="Evaluation metric that ranks checkpoints: loss, accuracy, f1_macro (seq-cls) "
                   "[default: loss with --load-best-model-at-end]; lower is better for a name ending in loss, "
                   "else higher.")
@click.option("--load-best-model-at-end", is_flag=True,
              help="Save the best evaluation's adapter, not the last step's (writes a checkpoint at every "
                   "evaluation; needs --eval).")
@click.option("--logging-steps", type=click.IntRange(min=1), default=10, help="Log the loss every N steps.")
@click.option("--save-steps", type=click.IntRange(min=0), default=500,
              help="Write a resumable checkpoint every N steps (0: none).")
@click.option("--save-total-limit", type=click.IntRange(min=1), default=2, help="Keep the newest N checkpoints.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoints go [default: OUT/checkpoints].")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[DIR]",
              help="Continue from a checkpoint: the newest in the checkpoint folder, or the checkpoint-N folder DIR.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run's files in OUT (its checkpoints too).")
@click.option("--adapter-name", default="default", help="Name of the adapter inside the model.")
@click.option("--dataset-name", default=None, help="The dataset on a hub the data comes from (e.g. imdb), recorded in the model card's `datasets` [default: none; the card names the local file in its text].")
@click.option("--push", default=None, metavar="REPO_ID",
              help="After training, publish the adapter (with labels.json) as namespace/name on the hub.")
@click.option("--hub", default=None, metavar="HUB",
              help="Hub to push to: local, local:/folder, http://registry:8080 or hf "
                   "[default: $PEFTKIT_HUB, else the embedded local hub].")
@click.option("--private/--public", default=None, help="Visibility of a new repo [default: public].")
@click.option("--base-model", default=None, metavar="ID",
              help="Hub id of the base model, recorded in the adapter (and on push) when MODEL is a local folder.")
@click.option("--report-to", default="none", help="Experiment trackers for the Trainer (tensorboard, wandb, ...).")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bar, notes or library warnings: errors, peftkit's warnings, and one line "
                   "saying where the adapter went.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (train_results.json) as JSON.")
def train_command(model: str, method: str, data: str, eval_data: str | None, task: str, out: str, as_json: bool,
                  **options: Any) -> None:
    """Train an adapter on MODEL (a model folder or hub id) with a local dataset.

    \b
    Examples:
      peftkit train ./bert --task seq-cls --data train.jsonl --eval dev.jsonl --out out/sentiment
      peftkit train ./llama --method 'lora[r=16]' --task causal-lm --data sft.jsonl --out out/sft
      torchrun --nproc_per_node 4 -m peftkit train ./llama --task causal-lm --data sft.jsonl --out out/sft
      torchrun --nproc_per_node 8 -m peftkit train ./llama --fsdp --bf16 --task causal-lm --data sft.jsonl --out out/sft
    """
    from peftkit.cli_options import plain_warnings
    from peftkit.training import is_main_process, train

    # With --json, stdout carries the JSON alone: the Trainer's log lines go to stderr with the progress bar.
    to_stderr = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with to_stderr, plain_warnings(show_all=False), _terminate_as_interrupt():
            result = train(model, method, data, task=task, out=out, eval_data=eval_data, **options)
    except (KeyboardInterrupt, _Terminated) as exc:
        if is_main_process():
            click.echo(f"\nError: {_interrupted_message(out, options['checkpoint_dir'])}", err=True)
        raise click.exceptions.Exit(143 if isinstance(exc, _Terminated) else 130) from None
    main_process = is_main_process()
    _end_distributed_run()
    if not main_process:
        return  # one report per run, from the main process
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    where = [f"adapter: {result.output_dir}"]
    if result.pushed:
        pushed = result.pushed
        where.append(f"pushed: {pushed['repo_id']} ({pushed.get('url') or pushed['hub']}, commit {pushed['commit']})")
    if options["quiet"]:  # no notes and no progress, but still where the result went
        click.echo("; ".join(where))
        return
    shown = {k: v for k, v in result.metrics.items() if k in _RESULT_KEYS}
    steps = f"{result.global_step} step" + ("" if result.global_step == 1 else "s")
    summary = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    click.echo(f"trained {steps}" + (f"; {summary}" if summary else ""))
    for line in where:
        click.echo(line)


class _Terminated(BaseException):
    """SIGTERM (a job scheduler's stop, ``kill``) while training: reported like Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` while the run lasts, so it ends with the same report as Ctrl-C
    instead of silently."""
    import signal

    def terminated(_signum: int, _frame: Any) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
        installed = True
    except ValueError:  # not the main thread (click called from a thread): leave SIGTERM alone
        previous, installed = None, False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _interrupted_message(out: str, checkpoint_dir: str | None) -> str:
    """What an interrupted run left and how to go on: the newest complete checkpoint and --resume."""
    from peftkit.training_plan import checkpoint_folder, latest_checkpoint

    folder = checkpoint_folder(out, checkpoint_dir)
    newest = latest_checkpoint(folder)
    if newest is None:
        again = "again with --overwrite" if folder.is_dir() and any(folder.iterdir()) else "again"
        return (f"interrupted before a checkpoint was complete in {folder} (one is written every --save-steps "
                f"steps); nothing to resume: run the command {again} to start over")
    return (f"interrupted; the newest complete checkpoint is {newest}: run the same command with --resume "
            f"to continue from it")


def _end_distributed_run() -> None:
    """Under torchrun, tear the process group down on every rank together once the run is done: left to
    interpreter exit, a rank's gloo threads can be destroyed while still joinable ('terminate called
    without an active exception', SIGABRT), failing a run whose work was all done and saved. The command
    owns the process; ``peftkit.train()`` in a user's script leaves the group alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


commands = [train_command]
