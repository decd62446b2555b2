"""The Trainer callback that runs AdaLoRA's rank allocation (torch and transformers).

``peftkit train`` and ``AdapterTrainer`` add it by themselves (the method's
``training_callbacks`` hook); with a plain ``transformers.Trainer`` pass
``callbacks=peftkit.training_callbacks(model)``. In a training loop of your own, call
``callback.allocate(step)`` after each ``optimizer.step()`` and before ``zero_grad()``, and
``callback.finish()`` at the end.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from peftkit.plugin_api import ConfigError, layer_adapters_of

from .allocator import RankAllocator
from .config import AdaloraConfig, check_schedule
from .layer import AdaloraLayer


class AdaloraCallback(TrainerCallback):
    """Allocates adapter ``adapter_name``'s rank budget after every optimizer step, and at the end of
    training shrinks its layers to the triplets kept, recording them in the config's ``rank_pattern``
    (so that a save writes PEFT's folder with the resized tensors)."""

    def __init__(self, model: Any, adapter_name: str = "default") -> None:
        self.model, self.adapter_name = model, adapter_name
        self.allocator: RankAllocator | None = None

    @property
    def config(self) -> AdaloraConfig:
        config = self.model.adapter_record(self.adapter_name).config
        if not isinstance(config, AdaloraConfig):
            raise ConfigError(f"adapter {self.adapter_name!r} is a {config.method} adapter, not adalora")
        return config

    def start(self, max_steps: int | None = None) -> RankAllocator:
        """Begin allocating; ``total_step`` comes from the config, else from ``max_steps``."""
        config = self.config
        total_step = config.total_step if config.total_step is not None else max_steps
        if total_step is None or total_step <= 0:
            raise ConfigError("adalora: set total_step (the number of optimizer steps of the run) in the config; "
                              "the training run does not say how many steps it makes")
        check_schedule(config, total_step)
        config.total_step = total_step
        layers = {site: layer for site, layer in layer_adapters_of(self.model, self.adapter_name).items()
                  if isinstance(layer, AdaloraLayer)}
        self.allocator = RankAllocator(layers, config, total_step)
        return self.allocator

    def allocate(self, global_step: int) -> None:
        """After the optimizer step that ends step ``global_step`` (0-based), before zero_grad()."""
        (self.allocator or self.start()).step(global_step)

    def finish(self) -> dict[str, list[bool]] | None:
        """Shrink the layers to the triplets the latest allocation kept and record them in the config's
        ``rank_pattern`` (module -> one flag per initial triplet); None when no allocation ran."""
        allocator = self.allocator
        self.allocator = None
        if allocator is None or allocator.kept is None:
            return None
        pattern = dict(self.config.rank_pattern or {})
        for site, flags in allocator.kept.items():
            layer = allocator.layers[site]
            layer.keep(flags)
            pattern[f"{site}.lora_E"] = list(layer.kept)
        self.config.rank_pattern = pattern
        return pattern

    # -- transformers.TrainerCallback -------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start(state.max_steps if state.max_steps and state.max_steps > 0 else None)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.allocate(state.global_step)  # not yet counting this step: PEFT's 0-based step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.finish()
