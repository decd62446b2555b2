"""What a push sends and shows: a byte progress bar over HTTP, silence with progress=False, and a training
output folder pushed as it is (its checkpoints and run records stay local)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftkit.hub_client import api as hub
from peftkit.hub_client.errors import HubError
from tests.hub_helpers import HubUnderTest, any_hub, hub_env, save_task_adapters  # noqa: F401
from tests.registry_conftest_helpers import running_registry


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_task_adapters(tmp_path_factory.mktemp("adapters"))


def _with_large_file(folder: Path, dest: Path) -> Path:
    """The adapter folder plus a ~1.5 MB safetensors file, so the commit body spans several chunks."""
    shutil.copytree(folder, dest)
    gen = torch.Generator().manual_seed(0)
    save_file({"noise": torch.randn(400_000, generator=gen)}, str(dest / "extra.safetensors"))
    return dest


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_to_a_registry_shows_bytes_sent(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = _with_large_file(folders["lang"], hub_env / "big")
    with running_registry(hub_env / "registry", users={"alice": True}) as (_, server, tokens):
        hub.push(folder, "alice/big", hub=server.url, token=tokens["alice"], progress=True)
        err = capsys.readouterr().err
        shown = [line for line in re.split(r"[\r\n]", err) if "Uploading" in line]
        final = shown[-1]
        assert "Uploading 5 files to alice/big" in final and "100%" in final, err  # with peftkit.json
        sent, total = re.search(r"([\d.]+)M/([\d.]+)M", final).groups()  # the commit body: base64 + JSON
        assert sent == total and float(total) >= 1.9, final  # 1.5 MiB of file data is ~2 MiB as base64
        # The bar shows that total from its first line on (it never starts at the files' 1.5 MiB).
        totals = {re.search(r"/([\d.]+[kMG]?)(?:B)? ", line).group(1) for line in shown}
        assert totals == {f"{total}M"}, shown
        # The counted stream sent the body intact: what comes back is what went up.
        pulled = hub.pull("alice/big", hub=server.url, token=tokens["alice"], progress=False)
        assert _digest(pulled / "extra.safetensors") == _digest(folder / "extra.safetensors")
        assert _digest(pulled / "adapter_model.safetensors") == _digest(folder / "adapter_model.safetensors")

        hub.push(folders["ner"], "alice/quiet", hub=server.url, token=tokens["alice"], progress=False)
        assert "Uploading" not in capsys.readouterr().err


def test_a_training_output_folder_is_pushed_without_its_run_state(any_hub: HubUnderTest,  # noqa: F811
                                                                  folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(folders["lang"], out)
    (out / "labels.json").write_text('["neg", "pos"]')
    (out / "train_results.json").write_text('{"out": "/home/me/run"}')
    for checkpoint in (out / "checkpoints" / "checkpoint-2", out / "checkpoint-4"):
        checkpoint.mkdir(parents=True)
        (checkpoint / "optimizer.pt").write_bytes(b"pickle, never published")
        (checkpoint / "trainer_state.json").write_text("{}")
    (out / "trainer_state.json").write_text('{"best_model_checkpoint": "/home/me/run/checkpoint-4"}')
    (out / "training_args.bin").write_bytes(b"pickle, never published")
    (out / "trainable_state.safetensors").write_bytes(b"AdapterTrainer's resume state, never published")

    hub.push(out, "alice/run", hub=any_hub.address, progress=False)
    pulled = hub.pull("alice/run", hub=any_hub.address, progress=False)
    assert sorted(p.name for p in pulled.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", "labels.json", "peftkit.json"]

    (out / "optimizer.pt").write_bytes(b"a pickle outside the run's folders is still refused")
    with pytest.raises(HubError, match=r"pickle files \(optimizer.pt\)"):
        hub.push(out, "alice/run", hub=any_hub.address, progress=False)
