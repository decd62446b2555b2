"""P-tuning: a soft prompt made by a small encoder from learned virtual-token embeddings, PEFT's P_TUNING.

The prompt joins the input as prompt tuning's does (:class:`~.layer.PromptTuning`, whose forward hook this
reuses); only where it comes from differs. While the adapter is new, ``prompt_embeddings`` holds the
encoder's input E (PEFT's ``embedding.weight``) and the prompt is ``encoder(E)``, recomputed every forward
so that the encoder trains. PEFT saves the encoder's output as ``prompt_embeddings`` and drops the encoder
(its folder is an inference prompt); peftkit saves the same, so a folder loads in either library as that
prompt, and a loaded adapter (here: ``load_tensors``) has no encoder: its prompt is the file's vectors,
trained directly if training goes on (PEFT refuses to load a prompt-learning adapter trainable).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from peftkit.plugin_api import AdapterLoadError

from .layer import TENSOR_KEY, PromptTuning
from .p_tuning_config import PTuningConfig


class PromptEncoder(nn.Module):
    """PEFT's prompt encoder without its embedding: ``mlp_head`` (and ``lstm_head``) as PEFT builds them, so
    the same weights give the same prompt."""

    def __init__(self, kind: str, token_dim: int, hidden: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head: nn.LSTM | None = None
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden, num_layers=num_layers,
                                     dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, token_dim))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The prompt (rows, token_dim) for the virtual-token embeddings (rows, token_dim): the LSTM reads
        all rows as one sequence."""
        if self.lstm_head is None:
            return self.mlp_head(embeddings)
        return self.mlp_head(self.lstm_head(embeddings.unsqueeze(0))[0])[0]


class PTuning(PromptTuning):
    """Prompt tuning whose prompt is ``encoder(prompt_embeddings)`` until weights are loaded into it."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, make_encoder: Callable[[], PromptEncoder], *,
                 num_transformer_submodules: int = 1, is_encoder_decoder: bool = False) -> None:
        """The embeddings are drawn before the encoder, as PEFT draws them: one seed gives both the same start."""
        super().__init__(num_virtual_tokens, token_dim, num_transformer_submodules=num_transformer_submodules,
                         is_encoder_decoder=is_encoder_decoder)
        self.encoder: PromptEncoder | None = make_encoder()

    def prompt_rows(self) -> torch.Tensor:
        """The encoder's output while there is an encoder, else the loaded prompt itself."""
        if self.encoder is None:
            return self.prompt_embeddings
        embeddings = self.prompt_embeddings
        if not torch.is_grad_enabled():
            # a parameter handed to a module without gradients breaks torch's module tracker (FlopCounterMode:
            # "'NoneType' object has no attribute 'next_functions'"); detached, the values are the same
            embeddings = embeddings.detach()
        return self.encoder(embeddings)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensor: the prompt (all rows), computed by the encoder while there is one."""
        if self.encoder is None:
            return {TENSOR_KEY: self.prompt_embeddings}
        with torch.no_grad():
            return {TENSOR_KEY: self.prompt_rows()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The loaded prompt becomes the prompt itself: the encoder, which only trains the prompt, is dropped."""
        with torch.no_grad():
            self.prompt_embeddings.copy_(tensors[TENSOR_KEY])
        self.encoder = None

    def hotswap_plan(self, new: Any) -> Callable[[], None]:
        """Another prompt copied into this loaded one's in place; refused while this adapter still makes its
        prompt with its encoder (dropping the encoder would change the model's parameters)."""
        if self.encoder is not None:
            raise AdapterLoadError("this p_tuning adapter is new: its prompt is computed from other parameters (its "
                                   "encoder's), so a loaded prompt cannot be copied into it; hot-swap into a p_tuning "
                                   "adapter loaded from a folder (peftkit.from_pretrained / load_adapter), whose "
                                   "prompt is held")
        return super().hotswap_plan(new)

    def extra_repr(self) -> str:
        source = "from its encoder" if self.encoder is not None else "loaded"
        return f"{super().extra_repr()}, prompt {source}"


def make_encoder(config: PTuningConfig, token_dim: int) -> PromptEncoder:
    """The encoder ``config`` asks for, on a model of width ``token_dim``."""
    return PromptEncoder(config.encoder_reparameterization_type, token_dim, config.encoder_hidden_size or token_dim,
                         config.encoder_num_layers, float(config.encoder_dropout))
