"""The CLI: torch-free start, listings with --json, info, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import peftkit
from peftkit.cli import run
from tests.tiny_models import build_tiny

_NO_HEAVY_IMPORTS = (
    "import sys; from peftkit.cli import run; code = run({argv!r}); "
    "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
    "assert not heavy, f'imported {{heavy}}'; sys.exit(code)"
)


@pytest.mark.parametrize("argv", [["--help"], ["methods", "--json"], ["methods", "lora"], ["plugins", "--json"]])
def test_help_and_listings_import_no_torch(argv):
    result = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORTS.format(argv=argv)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_import_peftkit_imports_no_torch():
    code = "import sys, peftkit; peftkit.hookimpl; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_import_peftkit_hub_is_the_hub_client_either_way():
    """``peftkit.hub`` as an attribute and ``import peftkit.hub`` name one module, without torch."""
    code = ("import sys, peftkit.hub, peftkit; from peftkit.hub import push; "
            "assert peftkit.hub is peftkit.hub_client and push is peftkit.hub_client.api.push; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_methods_json(capsys):
    assert run(["methods", "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert methods["lora"]["can_merge"] and methods["lora"]["peft_format"]
    assert "r" in methods["lora"]["options"]


def test_methods_name_shows_one_methods_options(capsys):
    assert run(["methods", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lora: ") and "lora_alpha = alpha" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("r ", "use_dora "))}
    assert rows["r"][1:4] == ["int", "8", "rank"] and rows["use_dora"][1:4] == ["bool", "false", "weight-decomposed"]
    assert "HELP" in out.split("\n\n")[-1].splitlines()[0]
    assert run(["methods", "seq_bn", "--json"]) == 0
    options = {o["name"]: o for o in json.loads(capsys.readouterr().out)["options"]}
    assert options["reduction_factor"]["default"] == 16 and options["non_linearity"]["default"] == "relu"
    assert options["non_linearity"]["help"] == "activation between the down and up projections"
    assert run(["methods", "lroa"]) == 1
    assert "Did you mean 'lora'?" in capsys.readouterr().err
    assert run(["methods", "union", "--json"]) == 0  # a union's parts choose their modules: not its options
    assert {o["name"] for o in json.loads(capsys.readouterr().out)["options"]} == {"parts", "modules_to_save"}


def test_plugins_json_lists_builtins(capsys):
    assert run(["plugins", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["lora"]["status"] == "ok" and records["lora"]["builtin"]
    assert "peftkit_register_methods" in records["lora"]["hooks"]


def test_info_describes_a_folder(tmp_path, capsys):
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    model.save_adapter(tmp_path / "a")
    assert run(["info", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["base_model_type"] == "llama"
    assert info["parameters"] == model.trainable_parameters()[0]
    assert info["target_modules"] == ["q_proj", "v_proj"]
    assert info["size_bytes"] > 0
    assert info["format"] == "peft" and info["parts"] is None  # PEFT loads a peftkit LoRA folder
    assert run(["info", str(tmp_path / "a")]) == 0
    assert "parameters" in capsys.readouterr().out
    union = peftkit.adapt(build_tiny("llama"), 'lora[r=2,target_modules=["q_proj"]]|par_bn')
    union.save_adapter(tmp_path / "u")
    assert run(["info", str(tmp_path / "u"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["format"]) == ("union", "peftkit")
    assert info["parts"] == [{"method": "lora", "target_modules": ["q_proj"]},
                             {"method": "par_bn", "target_modules": None}]
    assert run(["info", str(tmp_path / "u")]) == 0
    assert "parts: lora (q_proj) | par_bn" in capsys.readouterr().out



def test_info_counts_a_saved_tokenizer_apart_from_the_adapter(tmp_path, capsys):
    """`peftkit train` saves the run's tokenizer beside the adapter: info shows it on its own line."""
    from tests.train_helpers import word_tokenizer

    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    model.save_adapter(tmp_path / "run")
    own = sum(p.stat().st_size for p in (tmp_path / "run").iterdir())
    word_tokenizer("bert").save_pretrained(tmp_path / "run")
    files = [p for p in (tmp_path / "run").iterdir() if p.name not in ("adapter_config.json", "adapter_model.safetensors",
                                                                       "README.md", "peftkit.json")]
    assert run(["info", str(tmp_path / "run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size_bytes"] == own and info["tokenizer_files"] == len(files) > 0
    assert info["tokenizer_size_bytes"] == sum(p.stat().st_size for p in files)
    assert run(["info", str(tmp_path / "run")]) == 0
    assert f"tokenizer: {len(files)} files (" in capsys.readouterr().out


def test_info_counts_what_training_changes_as_parameters_for_every_builtin_method(tmp_path):
    """`peftkit info`'s parameters are the adapter's trained numbers (PEFT's print_trainable_parameters for the
    PEFT methods): tensors a folder saves that training does not change (VeRA's and PVeRA's projections,
    RandLoRA's bases, DeLoRA's norms, GLoRA's zeros: Method.frozen_tensors; SHiRA's integer positions) are
    counted apart. P-tuning trains an encoder
    whose output is what its folder saves (as PEFT's), so its count is the output's."""
    from peftkit.core.inspect_folder import describe_folder
    from tests.test_conformance import BUILTIN_SPECS

    fixed = {}
    for key, spec in BUILTIN_SPECS.items():
        if key in ("bitfit", "p_tuning", "p_tuning_lstm"):  # bitfit: the tiny Llama has no biases (bitfit_add_missing)
            continue
        model = peftkit.adapt(build_tiny("llama"), spec)
        model.save_adapter(tmp_path / key)
        info = describe_folder(tmp_path / key)
        assert info["parameters"] == model.trainable_parameters()[0], key
        fixed[key] = info["fixed_numbers"]
    assert {key for key, count in fixed.items() if count} == {"vera", "pvera", "randlora", "delora", "shira",
                                                               "glora"}  # GLoRA: PEFT's zeros (llama: no bias)


def test_info_counts_training_checkpoints_apart_from_the_adapter(tmp_path, capsys):
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    model.save_adapter(tmp_path / "run")
    own = sum(p.stat().st_size for p in (tmp_path / "run").iterdir())
    for step in (1, 2):  # what `peftkit train` leaves beside the adapter
        model.save_adapter(tmp_path / "run" / "checkpoints" / f"checkpoint-{step}")
    assert run(["info", str(tmp_path / "run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size_bytes"] == own
    assert info["checkpoints"] == 2 and info["checkpoints_size_bytes"] == 2 * own
    assert run(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "checkpoints: 2 (" in out and "not part of the adapter" in out


def test_errors_exit_nonzero_with_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(["info", str(tmp_path / "empty")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err
    build_tiny("llama").save_pretrained(tmp_path / "model")  # a model, not an adapter
    assert run(["info", str(tmp_path / "model")]) == 1
    assert "it holds a model (config.json); give a folder written by save_adapter()" in capsys.readouterr().err
    assert run(["no-such-command"]) == 2


def test_info_describes_a_composition_folder(tmp_path, capsys):
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]", "a")
    model.add_adapter("b", "seq_bn")
    model.add_fusion("fuse(a, b)")
    model.save_composition(tmp_path / "setup", "stack(a, fuse(a, b))")
    assert run(["info", str(tmp_path / "setup"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["composition"], info["base_model_type"]) == ("composition", "stack(a, fuse(a, b))",
                                                                            "llama")
    assert {n: a["method"] for n, a in info["adapters"].items()} == {"a": "lora", "b": "seq_bn"}
    assert info["fusions"] == ["a_b"]
    fusion_params = sum(p.numel() for p in model.fusion_parameters("a_b"))
    assert info["parameters"] == sum(
        a["parameters"] for a in info["adapters"].values()) + fusion_params
    assert run(["info", str(tmp_path / "setup")]) == 0
    out = capsys.readouterr().out
    assert "composition: stack(a, fuse(a, b))" in out and "adapters: a (lora, " in out and "fusions: a_b" in out
    assert run(["info", str(tmp_path / "setup" / "adapters" / "a")]) == 0
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "composition.json").write_text("[1, 2]")
    assert run(["info", str(tmp_path / "broken")]) == 1
    assert "must hold a JSON object" in capsys.readouterr().err


def test_a_command_ending_with_ctx_exit_gives_that_exit_status() -> None:
    """click without standalone mode returns ctx.exit(n)'s n rather than raising: run() used to drop it, so
    `peftkit registry fsck` exited 0 on problems, and so would any plugin command ending with ctx.exit(1)."""
    import click

    from peftkit.cli import main

    @main.command("exit-with")
    @click.argument("code", type=int)
    @click.pass_context
    def exit_with(ctx: click.Context, code: int) -> None:
        ctx.exit(code)

    try:
        assert run(["exit-with", "3"]) == 3
        assert run(["exit-with", "0"]) == 0
    finally:
        main.commands.pop("exit-with")
