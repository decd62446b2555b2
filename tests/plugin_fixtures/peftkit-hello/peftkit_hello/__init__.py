"""A working fixture plugin that implements every peftkit hook (torch-free at import)."""

from dataclasses import dataclass
from typing import ClassVar

import peftkit

PEFTKIT_PLUGIN_API = 1


@dataclass
class HelloConfig(peftkit.AdapterConfig):
    method: ClassVar[str] = "hello"


class HelloMethod(peftkit.Method):
    """Adds a trained bias to each targeted layer's output."""

    name = "hello"
    config_class = HelloConfig
    description = "fixture: a trained output bias"

    def create_layer_adapter(self, site, base_layer, config, model):
        from .layer import HelloBias

        return HelloBias(base_layer)


class HelloBackend:
    def __init__(self, url):
        self.url = url


@peftkit.hookimpl
def peftkit_register_methods(register):
    register(HelloMethod())


@peftkit.hookimpl
def peftkit_register_merge_strategies(register):
    register("hello_mean", lambda deltas, weights, **options: sum(deltas) / len(deltas))


@peftkit.hookimpl
def peftkit_register_architectures(register):
    register(peftkit.ArchitectureSpec("hello_net", defaults={"hello": ("proj",)},
                                      points={"ffn_output": r".*\.blocks\.\d+\.proj"}))


@peftkit.hookimpl
def peftkit_register_hub_backends(register):
    register("hello", lambda url, **options: HelloBackend(url))


@peftkit.hookimpl
def peftkit_register_commands(cli):
    import click

    @cli.command("hello")
    @click.argument("who", default="world")
    def hello(who):
        """Say hello (fixture command)."""
        click.echo(f"hello, {who}, from peftkit-hello")
