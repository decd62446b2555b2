"""The built-in hub backends, registered through the same hook a plugin uses.

* ``file``: the embedded local store (:class:`~peftkit.hub_client.local.LocalBackend`);
* ``http``/``https``: a peftkit registry server (:class:`~peftkit.hub_client.http.HttpBackend`);
* ``hf``: the Hugging Face Hub (the same backend, pointed at huggingface.co).

A plugin adds a storage backend the same way::

    @peftkit.hookimpl
    def peftkit_register_hub_backends(register):
        register("s3", lambda url, token=None, **options: MyS3Backend(url, token=token))

Torch-free: this module is imported when plugins load.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.core.hookspecs import hookimpl

PEFTKIT_PLUGIN_API = 1


def local_backend(url: str, token: str | None = None, **options: Any) -> Any:
    from .local import LocalBackend

    return LocalBackend(url or None)


def registry_backend(url: str, token: str | None = None, **options: Any) -> Any:
    from .http import HttpBackend

    return HttpBackend(url, token=token)


def huggingface_backend(url: str, token: str | None = None, **options: Any) -> Any:
    from .http import HttpBackend, hf_endpoint

    return HttpBackend(url or hf_endpoint(), token=token, huggingface=True, address="hf")


@hookimpl
def peftkit_register_hub_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("file", local_backend)
    register("http", registry_backend)
    register("https", registry_backend)
    register("hf", huggingface_backend)
