"""A repo that is not on the hub: the error suggests the near names the hub does hold (embedded hub and
a real registry server through huggingface_hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

import peftkit
from peftkit.hub_client import RepoNotFound
from tests.hub_helpers import HubUnderTest, any_hub, hub_env, save_task_adapters  # noqa: F401


def test_an_unknown_repo_suggests_near_names(any_hub: HubUnderTest, tmp_path: Path) -> None:  # noqa: F811
    folders = save_task_adapters(tmp_path / "adapters")
    for repo, folder in (("alice/sentiment", "lang"), ("alice/topic", "ner"), ("alice/summaries", "summ")):
        peftkit.hub.push(folders[folder], repo, hub=any_hub.address, progress=False)

    def error_of(call, *args, **kwargs) -> str:
        with pytest.raises(RepoNotFound) as info:
            call(*args, hub=any_hub.address, **kwargs)
        return str(info.value)

    pulled = error_of(peftkit.hub.pull, "alice/sentimnt", cache_dir=tmp_path / "cache", progress=False)
    assert "alice/sentimnt" in pulled and pulled.endswith("; did you mean alice/sentiment?")
    assert error_of(peftkit.hub.info, "alcie/topic").endswith("; did you mean alice/topic?")  # misspelt namespace
    assert "did you mean" not in error_of(peftkit.hub.info, "alice/unrelated-xyz")
