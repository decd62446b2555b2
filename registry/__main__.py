"""``python -m peftkit.registry``: the registry CLI without the rest of peftkit."""

from .cli import registry_group

if __name__ == "__main__":
    registry_group(prog_name="peftkit registry")
