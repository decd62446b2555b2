"""Fixture: a plugin that registers a method name peftkit already has ("lora")."""

from dataclasses import dataclass
from typing import ClassVar

import peftkit

PEFTKIT_PLUGIN_API = 1


@dataclass
class OtherLoraConfig(peftkit.AdapterConfig):
    method: ClassVar[str] = "lora"


class OtherLora(peftkit.Method):
    name = "lora"
    config_class = OtherLoraConfig
    description = "fixture: a second 'lora'"


@peftkit.hookimpl
def peftkit_register_methods(register):
    register(OtherLora())
