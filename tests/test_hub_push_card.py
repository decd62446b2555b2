"""The model card a push writes: a body peftkit wrote (``peftkit train``, ``save_adapter``) is written anew for the
repo, a body the user wrote or edited is kept exactly, and pushed metrics merge with the card's.

Real runs: ``peftkit train`` on the real MiniLM, ``peftkit hub push`` and ``hub pull`` on the command line
against the embedded hub and a registry served on 127.0.0.1 (``any_hub``), ``peftkit.hub.push`` in Python.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import transformers

import peftkit
from peftkit.cli import run
from peftkit.core.card import card_metadata, generated_body, read_card_metadata, render_card
from peftkit.hub_client import api as hub
from peftkit.hub_client.errors import HubError
from peftkit.hub_rules.cards import split_front_matter
from tests.hub_helpers import BASE_ID, HubUnderTest, any_hub, hub_env, tiny_base  # noqa: F401
from tests.tiny_models import build_tiny
from tests.train_helpers import torch_threads

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
NOTE = "[peftkit-card]: #"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, minilm_dir: str) -> Path:
    """A `peftkit train` output folder (its card holds loss, accuracy, f1_macro and train_loss)."""
    out = tmp_path_factory.mktemp("card-train") / "x"
    with torch_threads(1):
        code = run(["train", minilm_dir, "--base-model", MINILM_ID, "--task", "seq-cls", "--method", "lora[r=4]",
                    "--data", str(EXAMPLES / "sentiment_train.jsonl"), "--eval", str(EXAMPLES / "sentiment_eval.jsonl"),
                    "--max-steps", "2", "--batch-size", "8", "--save-steps", "0", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def _metrics(card: str) -> dict[str, float]:
    (entry,) = read_card_metadata(card)["model-index"]
    (result,) = entry["results"]
    return {m["type"]: m["value"] for m in result["metrics"]}


def _table(card: str) -> dict[str, str]:
    """The body's results table, metric -> shown value."""
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \|$", card.split("## Results", 1)[1], re.MULTILINE)
    return {name: value for name, value in rows if name != "metric"}


def _push_and_pull(address: str, folder: Path, repo: str, *options: str) -> str:
    assert run(["hub", "push", str(folder), repo, "--hub", address, "-q", *options]) == 0
    return (hub.pull(repo, hub=address, progress=False) / "README.md").read_text()


def test_a_trained_adapters_card_is_written_for_the_repo_and_metric_adds_to_its_metrics(
        trained: Path, any_hub: HubUnderTest) -> None:  # noqa: F811
    before = (trained / "README.md").read_text()
    recorded = _metrics(before)
    assert set(recorded) == {"loss", "accuracy", "f1_macro", "train_loss"} and "# default" in before

    card = _push_and_pull(any_hub.address, trained, "alice/x", "--metric", "accuracy=0.91", "--metric", "bleu=3")
    # the body is the repo's: its name, and a snippet that loads it from the hub on the base model's hub id
    assert "# alice/x\n" in card and "# default" not in card and "path/to/this/adapter" not in card
    assert f'model = peftkit.load("{MINILM_ID}", "alice/x")' in card
    assert 'PeftModel.from_pretrained(base_model, "alice/x")' in card
    assert "trained with `peftkit train` for text-classification" in card  # the run's description is kept
    # --metric replaces accuracy and adds bleu; what training recorded stays; the table says the same
    assert _metrics(card) == {**recorded, "accuracy": 0.91, "bleu": 3.0}
    assert _table(card) == {name: f"{value:.4g}" for name, value in _metrics(card).items()}
    assert read_card_metadata(card)["model-index"][0]["name"] == "alice/x"
    assert generated_body(split_front_matter(card)[1]) is not None  # pushed on again, it is still peftkit's


def test_a_body_the_user_wrote_or_edited_is_kept_exactly(trained: Path, hub_env: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    h = f"local:{hub_env / 'hub'}"
    text = (trained / "README.md").read_text()
    front, body = text.split("\n---\n", 1)
    cases = {"edited": body.replace("(160 examples)", "(160 hand-picked examples)"),
             "edited-heading": body.replace("## Usage", "## How to use it"),
             "written": "\n# My sentiment adapter\n\nTrained on reviews; see the results table.\n"}
    for name, new_body in cases.items():
        folder = tmp_path / name
        shutil.copytree(trained, folder)
        (folder / "README.md").write_text(front + "\n---\n" + new_body)
        card = _push_and_pull(h, folder, f"alice/{name}", "--metric", "accuracy=0.91", "--license", "mit")
        assert split_front_matter(card)[1] == new_body.lstrip("\n"), name
        meta = read_card_metadata(card)
        assert meta["license"] == "mit" and _metrics(card)["accuracy"] == 0.91 and "loss" in _metrics(card)


def test_cards_written_before_the_note_are_recognized_by_their_exact_layout(trained: Path, hub_env: Path,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    h = f"local:{hub_env / 'hub'}"
    text = (trained / "README.md").read_text()
    legacy = text[:text.index(NOTE)].rstrip("\n") + "\n"  # what peftkit wrote before it added the note
    assert NOTE in text and NOTE not in legacy
    for name, card_text, kept in (("legacy", legacy, False),
                                  ("legacy-edited", legacy.replace("```\n", "```\n\nAsk me anything.\n", 1), True)):
        folder = tmp_path / name
        shutil.copytree(trained, folder)
        (folder / "README.md").write_text(card_text)
        card = _push_and_pull(h, folder, f"alice/{name}")
        assert (split_front_matter(card)[1] == split_front_matter(card_text)[1]) is kept, name
        assert (f'peftkit.load("{MINILM_ID}", "alice/{name}")' in card) is not kept, name


def test_a_base_model_saved_as_a_local_folder_is_not_shown_as_loadable(hub_env: Path,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    h = f"local:{hub_env / 'hub'}"
    build_tiny("llama").save_pretrained(tmp_path / "base")
    model = peftkit.adapt(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "lora[r=2]")
    model.save_adapter(str(tmp_path / "a"))
    local = str(tmp_path / "base")
    assert read_card_metadata((tmp_path / "a" / "README.md").read_text())["base_model"] == local
    with pytest.warns(UserWarning, match="local folder"):
        card = (hub.pull(hub.push(tmp_path / "a", "alice/local", hub=h).repo_id, hub=h) / "README.md").read_text()
    assert 'model = peftkit.load(base_model, "alice/local")' in card and f"local folder (`{local}`)" in card
    assert f'peftkit.load("{local}"' not in card
    # given the hub id at push, the card names it: the folder's body is peftkit's, written anew
    card = _push_and_pull(h, tmp_path / "a", "alice/hub-base", "--base-model", BASE_ID)
    assert f'model = peftkit.load("{BASE_ID}", "alice/hub-base")' in card and local not in card


def test_the_python_api_merges_metrics_and_refuses_a_model_index_it_cannot_merge(hub_env: Path,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    h = f"local:{hub_env / 'hub'}"
    model = peftkit.adapt(tiny_base(), "lora[r=2]")
    model.save_adapter(str(tmp_path / "a"), metrics={"loss": 0.5, "accuracy": 0.7}, dataset="imdb")
    hub.push(tmp_path / "a", "alice/a", hub=h, metrics={"accuracy": 0.9, "f1": 0.8})
    card = (hub.pull("alice/a", hub=h) / "README.md").read_text()
    assert _metrics(card) == {"loss": 0.5, "accuracy": 0.9, "f1": 0.8}
    assert _table(card) == {"loss": "0.5", "accuracy": "0.9", "f1": "0.8"}
    assert read_card_metadata(card)["model-index"][0]["results"][0]["dataset"]["name"] == "imdb"

    fuller = tmp_path / "fuller"
    shutil.copytree(tmp_path / "a", fuller)
    text = (fuller / "README.md").read_text()
    (fuller / "README.md").write_text(text.replace("    - type: loss\n", "    - type: loss\n      verified: true\n"))
    with pytest.raises(HubError, match=r"model-index .*cannot be merged.*push without metrics"):
        hub.push(fuller, "alice/fuller", hub=h, metrics={"accuracy": 0.9})
    hub.push(fuller, "alice/fuller", hub=h)  # without metrics its model-index goes up as it is
    meta = read_card_metadata((hub.pull("alice/fuller", hub=h) / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["metrics"][0]["verified"] is True


def test_generated_body_tolerates_line_endings_but_no_edit() -> None:
    meta = card_metadata(method="lora", base_model=BASE_ID, peft_format=True)
    body = split_front_matter(render_card(meta, method="lora", adapter_name="a", description="Mine."))[1]
    assert generated_body(body).description == "Mine."
    assert generated_body(body.replace("\n", "\r\n") + "\n\n").description == "Mine."
    assert generated_body(body.replace("Mine.", "Mine!")) is None
    default = split_front_matter(render_card(meta, method="lora", adapter_name="a"))[1]
    assert generated_body(default).description is None  # a default text is written anew for the repo


def test_a_locally_saved_cards_snippet_loads_the_folder(tmp_path: Path) -> None:
    """The card of a folder saved outside a hub said peftkit.load(base, "path/to/this/adapter"), and peftkit.load
    reads hub repos only: the snippet failed as written (found in the merging walkthrough)."""
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    model.save_adapter(str(tmp_path / "a"))
    card = (tmp_path / "a" / "README.md").read_text()
    (line,) = [line for line in card.splitlines() if line.startswith("model = peftkit.")]
    assert line.startswith("model = peftkit.from_pretrained(") and line.endswith(', "path/to/this/adapter")')
    snippet = line.replace('"path/to/this/adapter"', repr(str(tmp_path / "a"))).split(" = ", 1)[1]
    loaded = eval(snippet.replace(snippet[snippet.index("(") + 1:snippet.index(",")], "base"),  # the card's call
                  {"peftkit": peftkit, "base": build_tiny("llama")})
    assert isinstance(loaded, peftkit.AdaptedModel) and loaded.adapters
