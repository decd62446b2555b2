"""Trainable tokens' config (torch-free), with PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class TrainableTokensConfig(AdapterConfig):
    """Trainable tokens (PEFT's ``TrainableTokensConfig``): train only some rows of an embedding matrix.

    The adapter holds the new values of the chosen rows (``trainable_tokens_delta``) and a copy of
    the original ones; the embedding's output takes the new rows for those tokens, every other row
    stays the base's. Useful for new special tokens (a chat template's) without training the whole
    embedding.

    token_indices: the rows (token ids) to train: a list for every adapted embedding, or a table
      module name -> list for several embeddings with their own rows (peftkit's; not PEFT's format).
    target_modules: None adapts the model's input embedding (``get_input_embeddings()``), as PEFT.
      When the model ties its output layer to it (``tie_word_embeddings``), the output layer uses
      the same new rows.
    init_weights: True starts from the current rows (the model is unchanged); False draws them
      from a standard normal (PEFT's; for tests).
    """

    method: ClassVar[str] = "trainable_tokens"

    target_modules: Union[list[str], str, None] = option(
        None, help="embeddings to adapt: names or dotted suffixes (list) or a regex; null takes the model's input "
                   "embedding (get_input_embeddings())")
    token_indices: Union[list[int], dict[str, list[int]]] = option(
        default_factory=list,
        help="the token ids (embedding rows) to train; a table module name -> ids gives each embedding its own")
    init_weights: bool = option(
        True, help="true starts from the current rows (the model is unchanged); false draws them from a standard "
                   "normal (for tests)")

    def check(self) -> None:
        tables = self.token_indices.values() if isinstance(self.token_indices, dict) else [self.token_indices]
        if not any(tables):
            raise ConfigError("trainable_tokens: token_indices is empty; name the token ids to train, e.g. "
                              "trainable_tokens[token_indices=[32000,32001]] (tokenizer.convert_tokens_to_ids "
                              "gives them)")
        for indices in tables:
            if any(i < 0 for i in indices):
                raise ConfigError(f"trainable_tokens: token_indices {indices} holds a negative id; token ids start "
                                  f"at 0")
            repeated = sorted({i for i in indices if indices.count(i) > 1})
            if repeated:
                raise ConfigError(f"trainable_tokens: token_indices names {repeated} more than once; give each "
                                  f"token id once")
