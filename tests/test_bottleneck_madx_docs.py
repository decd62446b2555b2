"""docs/methods/bottleneck.md's MAD-X recipe runs as written, on the real MiniLM (a BERT) for the
multilingual BERT it names, and does what the page says: two language adapters trained with the
masked-LM objective, a task adapter trained above the frozen English one, then swapped onto German."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_docs_examples import DOCS, code_block
from tests.tiny_models import minilm_path


@pytest.mark.slow
def test_madx_recipe_trains_language_and_task_adapters_and_swaps_the_language(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    script = code_block(DOCS / "methods" / "bottleneck.md", "python", "### The MAD-X recipe")
    assert 'name = "bert-base-multilingual-cased"' in script
    script = script.replace('name = "bert-base-multilingual-cased"', f"name = {minilm_path()!r}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(script, "bottleneck.md (MAD-X recipe)", "exec"), namespace)  # noqa: S102 - the docs' own code

    mlm, tagger = namespace["mlm"], namespace["tagger"]
    assert mlm.adapter_record("lang_en").method.name == "seq_bn_inv"
    # the inverse sits before the masked-LM head's output layer, the forward block on the embeddings
    assert set(mlm.base_model.cls.predictions.decoder.adapters) == {"lang_en", "lang_de"}
    for lang in ("lang_en", "lang_de"):
        assert (tmp_path / "out" / lang / "adapter_model.safetensors").is_file()
        block = mlm.shared_state(lang).inv_F_2_weight
        assert block.abs().sum() > 0  # trained away from its identity init
    # only the task adapter and its head trained; the language adapters stayed as saved
    trained = {n for n in tagger.adapter_records if any(p.requires_grad for p in tagger.adapter_parameters(n))}
    assert trained == {"task"}
    torch.testing.assert_close(tagger.shared_state("lang_en").inv_F_2_weight, mlm.shared_state("lang_en").inv_F_2_weight)
    assert namespace["predictions"].shape == namespace["german"]["input_ids"].shape
    # swapping the language adapter changes what the task adapter sees
    german = namespace["german"]
    with torch.no_grad():
        tagger.set_active("stack(lang_de, task)")
        de = tagger(**german).logits
        tagger.set_active("stack(lang_en, task)")
        en = tagger(**german).logits
    assert not torch.allclose(de, en, atol=1e-4)
