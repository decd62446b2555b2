"""Bounds on the free text a client writes into history: commit summaries and descriptions, tag and
squash messages.

Without them one commit could carry a message as large as the upload limit, which every history listing
(``/api/models/{repo}/commits``, the web pages) then reads, stores and sends again. The bounds are far
above what people and tools write: the summary is a title line (huggingface_hub's default is
``"Upload folder using huggingface_hub"``, git's convention under 72 characters), and a description or
a tag message is a few paragraphs of release notes. A longer one is refused with a 400 naming the bound,
before anything is written.
"""

from __future__ import annotations

from .errors import BadRequest

#: A commit's summary (its first line) and a super-squash message, which becomes one.
MAX_SUMMARY_CHARS = 1_000
#: A commit's description and a tag's message.
MAX_DESCRIPTION_CHARS = 65_536


def check_summary(text: str, what: str = "commit summary") -> str:
    """``text`` when it is at most :data:`MAX_SUMMARY_CHARS` long, else a 400 naming the bound."""
    if len(text) > MAX_SUMMARY_CHARS:
        raise BadRequest(
            f"the {what} is {len(text):,} characters long; this registry takes at most {MAX_SUMMARY_CHARS:,}: "
            "shorten it to a title line" + (f" and put the details in the commit description (at most "
                                            f"{MAX_DESCRIPTION_CHARS:,} characters)" if what == "commit summary"
                                            else "")
        )
    return text


def check_description(text: str, what: str = "commit description") -> str:
    """``text`` when it is at most :data:`MAX_DESCRIPTION_CHARS` long, else a 400 naming the bound."""
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise BadRequest(
            f"the {what} is {len(text):,} characters long; this registry takes at most "
            f"{MAX_DESCRIPTION_CHARS:,}: shorten it (keep long notes in a file of the repo, such as README.md)"
        )
    return text
