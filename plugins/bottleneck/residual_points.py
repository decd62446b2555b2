"""Where a block's residual input can be read, for the original_ln_before placement (torch-free).

With ``original_ln_before`` a sequential adapter reads ``h + r``: the projection's output plus the
residual input of its sub-block (attention or feed-forward), then the model's LayerNorm of that on a
post-LayerNorm model. ``r`` is the input of a module these insertion points name: BERT's attention
block and intermediate layer, a pre-LayerNorm decoder's norm in front of each sub-block (whose
input is the residual stream). Registered as architecture points by this plugin.
"""

from __future__ import annotations

from peftkit.plugin_api import ArchitectureSpec

#: Insertion point of the adapter -> the point whose module's input is that sub-block's residual input.
RESIDUAL_POINTS = {"attention_output": "attention_residual", "ffn_output": "ffn_residual"}

_BERT_LIKE = {"attention_residual": r".*\.layer\.\d+\.attention\.self", "ffn_residual": r".*\.layer\.\d+\.intermediate"}
_POINTS = {
    **{t: _BERT_LIKE for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "llama": {"attention_residual": r".*\.layers\.\d+\.input_layernorm",
              "ffn_residual": r".*\.layers\.\d+\.post_attention_layernorm"},
    "gpt2": {"attention_residual": r".*\.h\.\d+\.ln_1", "ffn_residual": r".*\.h\.\d+\.ln_2"},
}


def residual_point_specs() -> list[ArchitectureSpec]:
    """The families whose residual inputs peftkit knows, as architecture specs adding those points."""
    return [ArchitectureSpec(model_type, points=dict(points)) for model_type, points in _POINTS.items()]
