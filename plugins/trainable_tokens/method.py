"""The trainable-tokens method: which embeddings it adapts (and their tied output layer), the rows it
keeps per adapter, and PEFT's file format (``peft_type`` TRAINABLE_TOKENS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import ALL_BLOCKS, AdapterConfig, ConfigError, Method, read_peft_fields, Site

from .config import TrainableTokensConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's TrainableTokensConfig fields, all named as ours.
_PEFT_FIELDS = ("token_indices", "target_modules", "init_weights")
#: PEFT fields that carry nothing peftkit needs.
_PEFT_IGNORED = {"peft_type", "revision", "task_type", "inference_mode", "base_model_name_or_path",
                 "auto_mapping", "peft_version"}
#: The peft_type of a config PEFT's TrainableTokensConfig cannot express (a table of token ids per module,
#: modules_to_save, exclude_modules, layers_to_transform): PEFT refuses such a folder.
NOT_PEFT_TYPE = "PEFTKIT_TRAINABLE_TOKENS"
#: peftkit's fields that PEFT's TrainableTokensConfig lacks, written only when set.
_PEFTKIT_ONLY = ("exclude_modules", "layers_to_transform", "modules_to_save")


@dataclass(frozen=True)
class TokenSite(Site):
    """An embedding (or output layer) whose rows ``indices`` the adapter replaces. ``slot`` numbers the
    adapter's row tensors; a ``tied`` site reads those of the input embedding its weight is tied to."""

    slot: int = 0
    indices: tuple[int, ...] = ()
    tied: bool = False


class TrainableTokensMethod(Method):
    name = "trainable_tokens"
    config_class = TrainableTokensConfig
    description = "Trainable tokens: train chosen rows of an embedding (new tokens); mergeable; PEFT format"
    can_merge = True
    merge_dense = False  # a merge writes rows, it does not add a weight change
    peft_type = "TRAINABLE_TOKENS"
    extra_file_types = frozenset({NOT_PEFT_TYPE})
    supported_blocks = ALL_BLOCKS
    saves_base_embeddings = False  # the point is a few rows: PEFT's folders do not carry the embeddings

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        assert isinstance(config, TrainableTokensConfig)
        if config.target_modules is None:
            if isinstance(config.token_indices, dict):
                config.target_modules = list(config.token_indices)
            else:  # PEFT writes the input embedding's name into the config
                config.target_modules = _input_embedding_name(model)
        sites: list[TokenSite] = []
        for name in _target_names(model, config, arch):
            sites.append(TokenSite(name, slot=len(sites), indices=_indices_for(name, config, model)))
        return _with_tied_output(model, sites)

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        """Per adapted embedding: its new rows (a parameter) and a copy of the original ones."""
        import torch
        import torch.nn as nn

        from peftkit.plugin_api import adapter_dtype, base_of

        from .layer import original_name, rows_name

        assert isinstance(config, TrainableTokensConfig)
        tensors: dict[str, torch.Tensor] = {}
        for site in sites:
            assert isinstance(site, TokenSite)
            if site.tied:
                continue
            base = base_of(model.get_submodule(site.name))
            weight = base.weight
            index = torch.tensor(site.indices, dtype=torch.long, device=weight.device)
            original = weight.detach().index_select(0, index).clone()
            values = original if config.init_weights else torch.randn(original.shape, dtype=weight.dtype,
                                                                      device=weight.device)
            tensors[rows_name(site.slot)] = nn.Parameter(values.to(adapter_dtype(base)).clone())
            tensors[original_name(site.slot)] = original
        missing = [s.name for s in sites if isinstance(s, TokenSite) and s.tied and rows_name(s.slot) not in tensors]
        if missing:
            raise ConfigError(f"trainable_tokens: {missing[0]} is tied to an input embedding that this adapter does "
                              f"not adapt (it is inside modules_to_save?); take it out of modules_to_save")
        return tensors

    def shared_state_file_keys(self, config: AdapterConfig, names: list[str]) -> dict[str, str]:
        return {}  # saved by each site's layer adapter, under PEFT's keys

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import TokenRows

        assert isinstance(site, TokenSite)
        return TokenRows(base_layer, site.slot, site.indices, site.tied)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        return sum(len(s.indices) * base_of(model.get_submodule(s.name)).weight.shape[1]
                   for s in sites if isinstance(s, TokenSite) and not s.tied)

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def peft_type_of(self, config: AdapterConfig) -> str | None:
        """TRAINABLE_TOKENS unless the config uses what PEFT's TrainableTokensConfig has no field for."""
        assert isinstance(config, TrainableTokensConfig)
        if isinstance(config.token_indices, dict) or any(getattr(config, key) for key in _PEFTKIT_ONLY):
            return None
        return self.peft_type

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, TrainableTokensConfig)
        ours = config.to_dict()
        data: dict[str, Any] = {"peft_type": self.peft_type_of(config) or NOT_PEFT_TYPE}
        data.update({key: ours[key] for key in _PEFT_FIELDS})
        data.update({key: ours[key] for key in _PEFTKIT_ONLY if ours[key]})
        return data

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        fields = {key: key for key in (*_PEFT_FIELDS, *_PEFTKIT_ONLY)}
        return TrainableTokensConfig.from_dict(read_peft_fields(data, self.name, fields, ignored=_PEFT_IGNORED))


# -- sites ----------------------------------------------------------------------------


def _input_embedding_name(model: "nn.Module") -> str:
    """The name of ``model.get_input_embeddings()`` (PEFT's default target), or ConfigError."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
    if name is None:
        raise ConfigError("trainable_tokens: this model has no get_input_embeddings(); name the embedding in "
                          "target_modules, e.g. trainable_tokens[token_indices=[...],target_modules=[embed]]")
    return name


def _target_names(model: "nn.Module", config: TrainableTokensConfig, arch: Any) -> list[str]:
    """The targeted modules, each an ``nn.Embedding`` or ``nn.Linear`` (refused otherwise)."""
    import torch.nn as nn

    from peftkit.plugin_api import base_of, find_targets

    names = find_targets(model, config, arch, method="trainable_tokens")
    for name in names:
        base = base_of(model.get_submodule(name))
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ConfigError(f"trainable_tokens: target {name!r} is a {type(base).__name__}; trainable tokens "
                              f"replace rows of an nn.Embedding (or an nn.Linear output layer): target the "
                              f"embedding, e.g. target_modules=[embed_tokens]")
    return names


def _indices_for(name: str, config: TrainableTokensConfig, model: "nn.Module") -> tuple[int, ...]:
    """The token ids adapted at module ``name``, checked against its number of rows."""
    from peftkit.plugin_api import base_of, name_matches

    table = config.token_indices
    if isinstance(table, dict):
        key = next((k for k in table if name_matches(name, [k])), None)
        if key is None:
            raise ConfigError(f"trainable_tokens: token_indices names no ids for module {name!r} (its keys: "
                              f"{', '.join(table)}); add an entry for it or take it out of target_modules")
        indices = table[key]
    else:
        indices = table
    rows = base_of(model.get_submodule(name)).weight.shape[0]
    outside = sorted(i for i in indices if i >= rows)
    if outside:
        raise ConfigError(f"trainable_tokens: token ids {outside} are outside {name}'s {rows} rows; resize the "
                          f"embeddings for the new tokens first (model.resize_token_embeddings(len(tokenizer)))")
    return tuple(indices)


def _with_tied_output(model: "nn.Module", sites: list[TokenSite]) -> list[TokenSite]:
    """``sites`` plus, when the model ties its output layer to an adapted input embedding
    (``tie_word_embeddings``), that output layer reading the embedding's rows (PEFT's tied adapter; it
    replaces a site of its own there)."""
    from peftkit.plugin_api import base_of

    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", False)
    if not (tied and callable(get_in) and callable(get_out)):
        return sites
    embedding, output = get_in(), get_out()
    if embedding is None or output is None:
        return sites
    names = {id(m): n for n, m in model.named_modules()}
    source = next((s for s in sites if s.name == names.get(id(embedding))), None)
    out_name = names.get(id(output))
    if source is None or out_name is None or base_of(output).weight.shape != base_of(embedding).weight.shape:
        return sites
    kept = [s for s in sites if s.name != out_name]
    return [*kept, TokenSite(out_name, slot=source.slot, indices=source.indices, tied=True)]
