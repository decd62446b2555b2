"""The settings of one AdapterFusion (``FuseConfig``, saved in a fusion folder's fusion_config.json).

Plain data with its checks, apart from the fusion's modules (``core/fusion.py``): the model's fusion
records (``core/state.py``) hold one without importing what runs it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

#: What a fusion's query reads (FuseConfig.query_from).
QUERY_SOURCES = ("output", "adapter_input")


@dataclasses.dataclass
class FuseConfig:
    """Settings of one fusion (saved in fusion_config.json).

    temperature: softmax temperature T (> 0), constant, saved with the fusion.
    query_key_dim: width of the query/key projections; None = the site's width (the paper).
    value: learn the value projection W_v (initialized to the identity); False = W_v fixed to I.
    residual: True: out = h + sum p_n W_v z_n; False: out = sum p_n W_v (h + z_n).
    regularization: factor of ||W_v - I||^2 in fusion_regularization_loss() (the paper uses 0.01).
    init_std: standard deviation of W_q's initial values.
    query_from: "output": the query reads h (the paper); "adapter_input": it reads what the last
      member's branch reads (``LayerAdapter.fusion_query``: LN(h + r) for AdapterHub's default sequential
      adapter, which reads through the model's LayerNorm; h for other adapters), as AdapterHub's fusion
      over such adapters does (its ``query_before_ln=false``).
    """

    temperature: float = 1.0
    query_key_dim: int | None = None
    value: bool = True
    residual: bool = True
    regularization: float = 0.01
    init_std: float = 0.02
    query_from: str = "output"

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
             and math.isfinite(self.temperature) and self.temperature > 0, "temperature must be a number > 0"),
            (self.query_key_dim is None or (isinstance(self.query_key_dim, int) and self.query_key_dim > 0),
             "query_key_dim must be a positive integer or null"),
            (isinstance(self.value, bool), "value must be true or false"),
            (isinstance(self.residual, bool), "residual must be true or false"),
            (isinstance(self.regularization, (int, float)) and not isinstance(self.regularization, bool)
             and self.regularization >= 0, "regularization must be a number >= 0"),
            (isinstance(self.init_std, (int, float)) and not isinstance(self.init_std, bool)
             and self.init_std >= 0, "init_std must be a number >= 0"),
            (self.query_from in QUERY_SOURCES, f"query_from must be one of {', '.join(QUERY_SOURCES)}, "
                                               f"not {self.query_from!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"fusion config: {message}")
        self.temperature = float(self.temperature)
        self.regularization = float(self.regularization)
        self.init_std = float(self.init_std)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FuseConfig":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown fusion setting {', '.join(map(repr, unknown))}; "
                              f"allowed: {', '.join(allowed)}")
        return cls(**data)

    @classmethod
    def build(cls, config: "FuseConfig | dict[str, Any] | None", options: dict[str, Any]) -> "FuseConfig":
        if isinstance(config, FuseConfig):
            return dataclasses.replace(config, **options) if options else dataclasses.replace(config)
        if config is not None and not isinstance(config, dict):
            raise ConfigError(f"a fusion config is a FuseConfig or a dict, not {type(config).__name__}")
        return cls.from_dict({**(config or {}), **options})
