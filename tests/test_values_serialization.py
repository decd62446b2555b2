"""Reading adapter folders (core/serialization.py), check by check with the exact outcome: the weights
file against the keys and shapes the model expects, pickles refused, damaged files, config files that
are no adapter config, the method a config names, another base model refused, and the core's own
fields kept out of the method's config. Written for `make mutate` (docs/mutation.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core import serialization as ser
from peftkit.core.errors import AdapterLoadError

from .tiny_models import build_tiny


def _keys(n: int, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{i}": torch.zeros(2, 3) for i in range(n)}


def test_site_key_prefixes_peft_model_path():
    assert ser.site_key("model.layers.0.q_proj", "lora_A.weight") == "base_model.model.model.layers.0.q_proj.lora_A.weight"


def test_check_weights_accepts_the_same_keys_and_shapes():
    ser.check_weights(_keys(3, "k"), _keys(3, "k"), "here")


def test_check_weights_names_missing_and_unexpected_keys_five_at_most():
    with pytest.raises(AdapterLoadError) as refused:
        ser.check_weights(_keys(7, "m"), {**_keys(1, "m"), **_keys(2, "x")}, "here")
    assert str(refused.value) == (
        "here: the weights do not fit this model and config: missing keys (6): m1, m2, m3, m4, m5 ...; "
        "unexpected keys (2): x0, x1. Was it saved for another base model or with other target modules?")
    with pytest.raises(AdapterLoadError) as refused:
        ser.check_weights(_keys(5, "m"), {}, "here")
    assert str(refused.value) == ("here: the weights do not fit this model and config: missing keys (5): "
                                  "m0, m1, m2, m3, m4. Was it saved for another base model or with other "
                                  "target modules?")
    with pytest.raises(AdapterLoadError, match=r"unexpected keys \(5\): u0, u1, u2, u3, u4\. Was"):
        ser.check_weights({}, _keys(5, "u"), "here")  # exactly five: no " ..."
    with pytest.raises(AdapterLoadError) as refused:
        ser.check_weights({}, _keys(6, "u"), "here")
    assert str(refused.value) == ("here: the weights do not fit this model and config: unexpected keys (6): "
                                  "u0, u1, u2, u3, u4 .... Was it saved for another base model or with other "
                                  "target modules?")


def test_check_weights_names_shape_mismatches_three_at_most():
    own = _keys(4, "k")
    file = {k: torch.zeros(3, 2) for k in own}
    with pytest.raises(AdapterLoadError) as refused:
        ser.check_weights(own, file, "here")
    assert str(refused.value) == (
        "here: shape mismatch in 4 tensors (k0: file (3, 2) vs model (2, 3); k1: file (3, 2) vs model (2, 3); "
        "k2: file (3, 2) vs model (2, 3)); the adapter was made for a model of another size or with another config")


@pytest.mark.parametrize("pickle_name", ser.PICKLE_NAMES)
def test_read_weights_refuses_pickles_by_name(tmp_path, pickle_name):
    (tmp_path / pickle_name).write_bytes(b"not read")
    with pytest.raises(AdapterLoadError) as refused:
        ser.read_weights(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path} holds weights only as {pickle_name}, a pickle file, which "
                                         f"peftkit never loads")
    assert "safetensors.torch.save_file(state_dict, 'adapter_model.safetensors')" in str(refused.value)


def test_read_weights_missing_truncated_and_good(tmp_path):
    with pytest.raises(AdapterLoadError) as refused:
        ser.read_weights(tmp_path)
    assert str(refused.value) == (f"{tmp_path} has no adapter_model.safetensors; the folder is incomplete — save "
                                  f"or download the adapter again")
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(1, dtype=torch.float64)}
    save_file(tensors, tmp_path / ser.WEIGHTS_NAME)
    read = ser.read_weights(tmp_path)
    assert set(read) == {"a", "b"} and torch.equal(read["a"], tensors["a"]) and read["b"].dtype == torch.float64
    data = (tmp_path / ser.WEIGHTS_NAME).read_bytes()
    (tmp_path / ser.WEIGHTS_NAME).write_bytes(data[: len(data) - 5])
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors is truncated or corrupted \("):
        ser.read_weights(tmp_path)


def test_read_config_refusals(tmp_path):
    with pytest.raises(AdapterLoadError) as refused:
        ser.read_config(tmp_path / "nowhere")
    assert str(refused.value) == (f"{str(tmp_path / 'nowhere')!r} is not an adapter folder (it does not exist or "
                                  f"is a file)")
    with pytest.raises(AdapterLoadError) as refused:
        ser.read_config(tmp_path)
    assert str(refused.value) == (f"{str(tmp_path)!r} has no adapter_config.json (it holds: nothing); save "
                                  f"adapters with save_adapter() or PEFT's save_pretrained()")
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(AdapterLoadError, match=r"\(it holds: a.txt, b.txt\)"):
        ser.read_config(tmp_path)
    for name in ("sentiment", "topic"):  # save_pretrained() of adapters none of which is named "default"
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterLoadError) as refused:
        ser.read_config(tmp_path)
    assert str(refused.value).endswith(
        f"it holds adapters in sentiment/, topic/ (a save_pretrained() of several adapters keeps all but 'default' "
        f"in subfolders): load one of them, e.g. {str(tmp_path / 'sentiment')!r}")
    config = tmp_path / ser.CONFIG_NAME
    config.write_text("{broken")
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json is not valid JSON \(.*\); the file is damaged"):
        ser.read_config(tmp_path)
    config.write_bytes(b"\xff\xfe{}")
    with pytest.raises(AdapterLoadError, match="is not valid JSON"):
        ser.read_config(tmp_path)
    config.write_text("[1, 2]")
    with pytest.raises(AdapterLoadError) as refused:
        ser.read_config(tmp_path)
    assert str(refused.value) == f"{config} must hold a JSON object, not list"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert ser.read_config(tmp_path)["r"] == 4


def test_method_for_reads_peftkit_method_then_peft_type():
    assert ser.method_for({"peftkit": {"method": "lora"}, "peft_type": "IA3"}, "w").name == "lora"
    assert ser.method_for({"peftkit": "not a dict", "peft_type": "IA3"}, "w").name == "ia3"
    assert ser.method_for({"peft_type": "LORA"}, "w").name == "lora"
    with pytest.raises(AdapterLoadError) as refused:
        ser.method_for({"r": 4}, "w")
    assert str(refused.value) == ("w: the config names no method (neither 'peftkit.method' nor 'peft_type'); is "
                                  "this an adapter folder?")
    with pytest.raises(AdapterLoadError, match="^w: PEFT method 'NOPE' is not supported by the installed peftkit "
                                               r"methods \(.*lora.*\); install a plugin that provides it$"):
        ser.method_for({"peft_type": "NOPE"}, "w")
    with pytest.raises(AdapterLoadError, match="^w: "):
        ser.method_for({"peftkit": {"method": "nope"}}, "w")


def test_check_base_model_refuses_another_size_and_names_it():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    info = ser.base_model_info(model)
    assert info["model_type"] == "llama" and info["hidden_size"] == 32
    ser.check_base_model(model, {"peftkit": {"base_model": dict(info)}}, "w")
    ser.check_base_model(model, {"peftkit": {"base_model": {"d_model": 7}}}, "w")  # a key this model lacks
    ser.check_base_model(model, {"peftkit": "odd", "r": 1}, "w")
    for key, value in (("hidden_size", 64), ("model_type", "gpt2"), ("num_hidden_layers", 9)):
        data = {"peftkit": {"base_model": {**info, key: value}}, "base_model_name_or_path": "org/base"}
        with pytest.raises(AdapterLoadError) as refused:
            ser.check_base_model(model, data, "w")
        assert str(refused.value) == (f"w: this adapter was made for a model with {key}={value!r} (org/base), but "
                                      f"this model has {key}={info[key]!r}; load it on the base model it was "
                                      f"trained for")
    with pytest.raises(AdapterLoadError, match=r"\(unknown base\)"):
        ser.check_base_model(model, {"peftkit": {"base_model": {"hidden_size": 1}}}, "w")


def test_config_from_data_leaves_the_core_fields_aside():
    method = peftkit.get_method("lora")
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peftkit": {"x": 1},
            "base_model_name_or_path": "b", "task_type": "CAUSAL_LM", "inference_mode": True, "peft_version": "1",
            "revision": None, "auto_mapping": None}
    config = ser.config_from_data(method, data, "w")
    assert (config.r, config.alpha) == (4, 8)
    with pytest.raises(AdapterLoadError, match="^w: adapter_config.json does not describe a valid lora adapter: "):
        ser.config_from_data(method, {"peft_type": "LORA", "r": "four"}, "w")


def test_a_peft_config_with_revision_and_auto_mapping_loads_as_saved(tmp_path):
    """PEFT writes ``revision`` and ``auto_mapping`` into adapter_config.json; they are not method options."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2,init_weights=false]")
    model.save_adapter(str(tmp_path / "a"))
    config_file = tmp_path / "a" / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data.update(revision="main", auto_mapping={"base_model_class": "LlamaForCausalLM",
                                               "parent_library": "transformers.models.llama.modeling_llama"})
    config_file.write_text(json.dumps(data))
    loaded = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"))
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_refused_weights_file_is_named_by_its_folder(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    folder = tmp_path / "a"
    model.save_adapter(str(folder))
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.extra.weight": torch.zeros(1)}, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError) as refused:
        peftkit.from_pretrained(build_tiny("llama"), str(folder))
    assert str(refused.value).startswith(f"{folder}: the weights do not fit this model and config: unexpected keys")


def test_an_adapters_format_folder_with_a_head_loads_back_with_the_same_logits(tmp_path):
    """AdapterHub's layout (adapter.safetensors + model_head.safetensors) read back by peftkit's loader."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("bert"), 'lora[r=2,init_weights=false,target_modules=["query","value"]]')
    with torch.no_grad():  # the head copy and the factors: values that only the files can bring back
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    model.save_adapter(str(tmp_path / "a"), format="adapters")
    loaded = peftkit.AdaptedModel(build_tiny("bert"))
    loaded.load_adapter(str(tmp_path / "a"), "default")
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert "classifier" in loaded.adapter_record("default").config.modules_to_save  # AdapterHub adds the pooler
    assert loaded.adapter_labels("default") == model.adapter_labels("default")


def test_the_model_card_carries_every_field_given_to_save_adapter(tmp_path):
    import yaml

    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    model.save_adapter(str(tmp_path / "a"), task="text-generation", dataset="imdb", metrics={"accuracy": 0.91},
                       tags=["demo-tag"], license="mit", language="fr", repo_id="org/thing",
                       description="A one-line description.")
    _, front, body = (tmp_path / "a" / "README.md").read_text().split("---\n", 2)
    assert yaml.safe_load(front) == {
        "library_name": "peft", "tags": ["lora", "peftkit", "task:text-generation", "demo-tag"],
        "pipeline_tag": "text-generation", "datasets": ["imdb"], "license": "mit", "language": "fr",
        "model-index": [{"name": "org/thing", "results": [{
            "task": {"type": "text-generation"}, "dataset": {"name": "imdb", "type": "imdb"},
            "metrics": [{"type": "accuracy", "name": "accuracy", "value": 0.91}]}]}]}
    lines = body.splitlines()
    for line in ("# org/thing", "A one-line description.", "- method: `lora`", "- dataset: imdb",
                 f"- trainable parameters: {model.trainable_parameters()[0]}", "| accuracy | 0.91 |",
                 'model = peftkit.load("<base model>", "org/thing")',
                 "- base model: not recorded (a model built from a config); a push names it with base_model=ORG/NAME "
                 "(`--base-model` on the command line)"):
        assert line in lines, line
    model.base_model.config._name_or_path = "org/base"  # no description: the default line names the base
    model.save_adapter(str(tmp_path / "b"))
    lines = (tmp_path / "b" / "README.md").read_text().split("---\n", 2)[2].splitlines()
    assert "A lora adapter for `org/base`, made with peftkit." in lines and "- base model: `org/base`" in lines


def test_an_adapters_labels_are_saved_and_loaded_back(tmp_path):
    base = build_tiny("bert")
    base.config.id2label, base.config.label2id = {0: "neg", 1: "neu", 2: "pos"}, {"neg": 0, "neu": 1, "pos": 2}
    model = peftkit.adapt(base, 'lora[r=2,target_modules=["query"]]')
    model.save_adapter(str(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "labels.json").read_text())["labels"] == ["neg", "neu", "pos"]
    loaded = peftkit.AdaptedModel(build_tiny("bert"))  # its own labels: LABEL_0..2
    loaded.load_adapter(str(tmp_path / "a"), "x")
    assert loaded.adapter_labels("x") == ["neg", "neu", "pos"]


# -- saving: what goes into the folder -------------------------------------------------------------------


def test_the_weights_file_is_marked_as_pytorch_tensors_and_the_card_names_the_adapter(tmp_path):
    """transformers and PEFT read safetensors metadata {"format": "pt"}; without a repo_id the card's title
    is the adapter's name."""
    from safetensors import safe_open

    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]", adapter_name="tuned")
    model.save_adapter(str(tmp_path / "a"), adapter_name="tuned")
    with safe_open(str(tmp_path / "a" / ser.WEIGHTS_NAME), framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    assert "# tuned" in (tmp_path / "a" / ser.CARD_NAME).read_text().splitlines()


def test_a_save_in_peftkits_own_format_drops_a_stale_peftkit_json(tmp_path):
    """A method PEFT lacks keeps its record in adapter_config.json: saving it where a PEFT-format adapter
    was saved removes that one's peftkit.json (which would otherwise be read with the new config)."""
    folder = tmp_path / "a"
    peftkit.adapt(build_tiny("bert"), 'lora[r=2,target_modules=["query"]]').save_adapter(str(folder))
    assert (folder / "peftkit.json").is_file()
    bottleneck = peftkit.adapt(build_tiny("bert"), "seq_bn[reduction_factor=4,init_weights=false]")
    bottleneck.save_adapter(str(folder))
    assert not (folder / "peftkit.json").exists()
    bottleneck.save_adapter(str(tmp_path / "fresh"))  # nothing to remove: no error
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [ser.CARD_NAME, ser.CONFIG_NAME,
                                                                      ser.WEIGHTS_NAME]
    loaded = peftkit.AdaptedModel(build_tiny("bert"))
    assert loaded.load_adapter(str(folder), "x").method.name == "seq_bn"


@pytest.mark.parametrize("fmt, file", [("peftkit", ser.WEIGHTS_NAME), ("adapters", "adapter.safetensors")])
def test_adapter_wide_tensors_are_saved_once_and_loaded_back(tmp_path, fmt, file):
    """Compacter's shared PHM rule (one parameter for every site), moved off its init, in both formats."""
    from .method_helpers import output_of, randomize

    model = peftkit.adapt(build_tiny("bert"), "compacter[reduction_factor=4,init_weights=false]").eval()
    shared = model.shared_state("default").tensors()["phm_rule"]
    before = shared.detach().clone()
    randomize(model, seed=3)
    assert not torch.equal(shared, before)  # the noise reached it
    model.save_adapter(str(tmp_path / "a"), format=fmt)
    saved = load_file(tmp_path / "a" / file)
    key = "peftkit_shared.phm_rule" if fmt == "peftkit" else "bert.shared_parameters.default.phm_rule"
    assert torch.equal(saved[key], shared)
    loaded = peftkit.AdaptedModel(build_tiny("bert"))
    loaded.load_adapter(str(tmp_path / "a"), "default")
    loaded.eval()
    assert torch.equal(loaded.shared_state("default").tensors()["phm_rule"], shared)
    assert torch.equal(output_of(loaded, "bert"), output_of(model, "bert"))


# -- loading: the base model's size --------------------------------------------------------------------


@pytest.mark.parametrize("arch, key", [("t5", "d_model"), ("gpt2", "n_embd")])
def test_check_base_model_compares_d_model_and_n_embd(arch, key):
    model = peftkit.adapt(build_tiny(arch), "lora[r=2]")
    info = ser.base_model_info(model)
    assert key in info
    data = {"peftkit": {"base_model": {key: info[key] + 1}}}
    with pytest.raises(AdapterLoadError) as refused:
        ser.check_base_model(model, data, "w")
    assert str(refused.value).startswith(f"w: this adapter was made for a model with {key}={info[key] + 1}")


# -- loading an AdapterHub folder -------------------------------------------------------------------------


def _labelled_bert():
    base = build_tiny("bert")
    base.config.id2label, base.config.label2id = {0: "neg", 1: "neu", 2: "pos"}, {"neg": 0, "neu": 1, "pos": 2}
    return base


def _adapterhub_folder(tmp_path):
    """A LoRA with its classification head (labels neg/neu/pos) saved in AdapterHub's format."""
    model = peftkit.adapt(_labelled_bert(), 'lora[r=2,init_weights=false,target_modules=["query","value"]]')
    folder = tmp_path / "hub"
    model.save_adapter(str(folder), format="adapters")
    return model, folder


def test_an_adapterhub_heads_labels_are_the_adapters_when_there_is_no_labels_file(tmp_path):
    _, folder = _adapterhub_folder(tmp_path)
    assert not (folder / "labels.json").exists()
    loaded = peftkit.AdaptedModel(build_tiny("bert"))  # its own labels: LABEL_0..2
    loaded.load_adapter(str(folder), "x")
    assert loaded.adapter_labels("x") == ["neg", "neu", "pos"]


def test_an_adapterhub_folder_without_a_head_loads_with_the_same_output(tmp_path):
    from .method_helpers import output_of, randomize

    model = peftkit.adapt(build_tiny("llama"), 'lora[r=2,target_modules=["q_proj","v_proj"]]').eval()
    randomize(model)
    model.save_adapter(str(tmp_path / "hub"), format="adapters")
    assert not (tmp_path / "hub" / "head_config.json").exists()
    loaded = peftkit.AdaptedModel(build_tiny("llama"))
    loaded.load_adapter(str(tmp_path / "hub"), "default")
    loaded.eval()
    assert torch.equal(output_of(loaded, "llama"), output_of(model, "llama"))


def _refusal(model, folder) -> str:
    names = list(model.adapters)
    with pytest.raises(AdapterLoadError) as refused:
        model.load_adapter(str(folder), "x")
    assert list(model.adapters) == names
    return str(refused.value)


def test_adapterhub_refusals_name_the_folder(tmp_path):
    _, folder = _adapterhub_folder(tmp_path)
    target = peftkit.AdaptedModel(build_tiny("bert"))
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(folder / "adapter.safetensors")
    head = load_file(folder / "model_head.safetensors")

    save_file({**weights, "bert.encoder.layer.0.attention.self.query.loras.other.lora_A": torch.zeros(2, 32)},
              folder / "adapter.safetensors")
    assert _refusal(target, folder).startswith(f"{folder}: weight 'bert.encoder.layer.0.attention.self.query."
                                               f"loras.other.lora_A' is not one of adapter 'default' named in")
    save_file(weights, folder / "adapter.safetensors")

    save_file({**head, "heads.default.9.weight": torch.zeros(3, 32)}, folder / "model_head.safetensors")
    assert _refusal(target, folder).startswith(f"{folder}: head weight 'heads.default.9.weight' is not one of")
    save_file(head, folder / "model_head.safetensors")

    (folder / "labels.json").write_text(json.dumps({"labels": ["a", "b"]}))
    assert _refusal(target, folder).startswith(f"{folder}: labels.json names 2 labels (a, b) but the adapter's "
                                               f"classification head predicts 3")
    (folder / "labels.json").unlink()

    (folder / "adapter_config.json").write_text(json.dumps({**config, "config": {**config["config"],
                                                                                 "architecture": "nope"}}))
    assert _refusal(target, folder).startswith(f"{folder}: no installed peftkit method reads this AdapterHub "
                                               f"adapter (architecture='nope'; ")


def test_a_peft_file_with_base_embeddings_of_another_vocabulary_is_refused_naming_the_folder(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), 'lora[r=2,target_modules=["embed_tokens","q_proj"]]')
    model.save_adapter(str(tmp_path / "a"))
    tensors = load_file(tmp_path / "a" / ser.WEIGHTS_NAME)
    (key,) = [k for k in tensors if "base_layer" in k]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, tmp_path / "a" / ser.WEIGHTS_NAME)
    message = _refusal(peftkit.AdaptedModel(build_tiny("llama")), tmp_path / "a")
    assert message.startswith(f"{tmp_path / 'a'}: the file carries the base weights of model.embed_tokens")


def test_a_loaded_adapter_gets_no_default_head_its_config_does_not_name(tmp_path):
    """Loading never adds a task model's head: an adapter saved without one loads without one."""
    from .method_helpers import output_of, randomize

    model = peftkit.AdaptedModel(build_tiny("bert"))
    model.add_adapter("default", 'lora[r=2,target_modules=["query"]]', default_head=False)
    model.set_active("default")
    randomize(model)
    model.eval()
    model.save_adapter(str(tmp_path / "a"))
    loaded = peftkit.AdaptedModel(build_tiny("bert"))
    record = loaded.load_adapter(str(tmp_path / "a"), "default")
    assert record.modules_to_save == [] and not record.config.modules_to_save
    loaded.eval()
    assert torch.equal(output_of(loaded, "bert"), output_of(model, "bert"))


def test_only_peft_format_files_carry_the_base_embeddings(tmp_path):
    """PEFT saves a targeted embedding's base weight beside the adapter (save_embedding_layers="auto");
    peftkit's own format (a method PEFT lacks, here a LoRA registered without a peft_type) has no reader
    that needs it, so it stays out."""
    import dataclasses

    from peftkit.plugins.lora.config import LoraConfig
    from peftkit.plugins.lora.method import LoraMethod

    from .method_helpers import method_plugin

    @dataclasses.dataclass
    class OwnLoraConfig(LoraConfig):
        method = "own_lora"

    class OwnLora(LoraMethod):
        name = "own_lora"
        config_class = OwnLoraConfig
        peft_type = None

    targets = '[r=2,target_modules=["embed_tokens","q_proj"]]'
    base_key = "base_model.model.model.embed_tokens.base_layer.weight"
    peftkit.adapt(build_tiny("llama"), "lora" + targets).save_adapter(str(tmp_path / "peft"))
    assert base_key in load_file(tmp_path / "peft" / ser.WEIGHTS_NAME)
    with peftkit.use_plugin(method_plugin(OwnLora()), "own_lora_plugin") as loaded:
        assert not loaded.errors
        peftkit.adapt(build_tiny("llama"), "own_lora" + targets).save_adapter(str(tmp_path / "own"))
        keys = set(load_file(tmp_path / "own" / ser.WEIGHTS_NAME))
    assert keys == set(load_file(tmp_path / "peft" / ser.WEIGHTS_NAME)) - {base_key}


def test_an_adapterhub_load_asks_the_method_for_its_shared_keys_with_the_adapters_config(tmp_path, monkeypatch):
    """Method.shared_state_file_keys(config, names) gets the loaded adapter's own config and shared names."""
    model = peftkit.adapt(build_tiny("bert"), "compacter[reduction_factor=4,init_weights=false]")
    model.save_adapter(str(tmp_path / "hub"), format="adapters")
    loaded = peftkit.AdaptedModel(build_tiny("bert"))
    method = peftkit.get_method("compacter")
    calls = []
    real = method.shared_state_file_keys

    def spy(config, names):
        calls.append((config, list(names)))
        return real(config, names)

    monkeypatch.setattr(method, "shared_state_file_keys", spy)
    record = loaded.load_adapter(str(tmp_path / "hub"), "x")
    assert calls and all(config is record.config and names == ["phm_rule"] for config, names in calls)


# -- layouts that differ between the file and the model ---------------------------------------------------


def test_a_reft_rotation_is_saved_as_its_rows_and_loads_back_to_the_same_outputs(tmp_path):
    """ReFT's file_tensors() (R's rows, r x hidden) are what is saved; the load rebuilds the live frame
    (tensors_from_file) before comparing with the model's own tensors. A bad R is refused naming folder and site."""
    from .method_helpers import output_of, randomize

    model = peftkit.adapt(build_tiny("bert"), "loreft[r=2]").eval()
    randomize(model, seed=5)
    model.save_adapter(str(tmp_path / "a"))
    saved = load_file(tmp_path / "a" / ser.WEIGHTS_NAME)
    site = "base_model.model.bert.encoder.layer.1.units.0."
    assert {k[len(site):]: tuple(v.shape) for k, v in saved.items() if k.startswith(site)} == {
        "learned_source.weight": (2, 32), "learned_source.bias": (2,), "projection.weight": (2, 32)}
    live = ser.adapter_tensors(model, "default", live=True)
    assert tuple(live[site + "projection.parametrizations.weight.0.base"].shape) == (32, 32)
    loaded = peftkit.AdaptedModel(build_tiny("bert"))
    loaded.load_adapter(str(tmp_path / "a"), "default")
    loaded.eval()
    assert torch.equal(output_of(loaded, "bert"), output_of(model, "bert"))
    save_file({**saved, site + "projection.weight": saved[site + "projection.weight"][:1].contiguous()},
              tmp_path / "a" / ser.WEIGHTS_NAME)
    assert _refusal(peftkit.AdaptedModel(build_tiny("bert")), tmp_path / "a") == (
        f"{tmp_path / 'a'}: the tensors at bert.encoder.layer.1: units.0.projection.weight is (1, 32) in the file "
        f"and (2, 32) (r x hidden) in this adapter; the file was saved for another r or model")


def test_an_adapterhub_prefix_loads_back_and_a_missing_one_is_refused_naming_the_folder(tmp_path):
    """Prefix tuning's model-level prefix in AdapterHub's folder (adapters' flat layout)."""
    from .method_helpers import output_of, randomize

    spec = "prefix_tuning[num_virtual_tokens=3,token_positions=from_zero]"
    model = peftkit.adapt(build_tiny("bert"), spec).eval()
    randomize(model, seed=6)
    folder = tmp_path / "hub"
    model.save_adapter(str(folder), format="adapters")
    loaded = peftkit.AdaptedModel(build_tiny("bert"))
    loaded.load_adapter(str(folder), "default")
    loaded.eval()
    assert torch.equal(output_of(loaded, "bert"), output_of(model, "bert"))
    weights = load_file(folder / "adapter.safetensors")
    save_file({k: v for k, v in weights.items() if "prefix" not in k}, folder / "adapter.safetensors")
    assert _refusal(peftkit.AdaptedModel(build_tiny("bert")), folder).startswith(
        f"{folder}: the folder has no prefix of adapter 'default'")
