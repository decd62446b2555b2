"""AdapterHub spellings docs/migrating.md says peftkit writes otherwise: the error names peftkit's."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.core.errors import CompositionError
from peftkit.testing import build_tiny, tiny_model


@pytest.mark.parametrize("text", ["a,b", "a, b", "ner,pos,lang"])
def test_adapterhubs_comma_joined_names_are_refused_naming_fuse_and_stack(text: str) -> None:
    names = [n.strip() for n in text.split(",")]
    with pytest.raises(CompositionError, match=rf"AdapterHub's spelling.*fuse\({', '.join(names)}\).*named "
                                               rf"{'_'.join(names)}.*stack\({', '.join(names)}\)"):
        peftkit.parse_composition(text)


def test_add_fusion_with_adapterhubs_fusion_name_says_how_to_write_it() -> None:
    model = peftkit.AdaptedModel(build_tiny(tiny_model("bert"), seed=0))
    for name in ("a", "b"):
        model.add_adapter(name, "seq_bn[reduction_factor=4]")
    with pytest.raises(CompositionError, match=r"fuse\(a, b\) for a fusion"):
        model.add_fusion("a,b")
    assert model.add_fusion("fuse(a, b)").name == "a_b"
