"""Caption text rules: one clean line, BLIP's inventions stripped, the trigger-token prefix exactly once.

kohya reads only a caption file's first line, and only as UTF-8; these rules
make every caption file what kohya will read, whoever wrote it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["clean_caption", "read_caption", "strip_phrases", "with_prefix"]


def read_caption(path: Path) -> tuple[str, bool]:
    """A caption file's text on one line, and whether it was UTF-8 (kohya reads only UTF-8).

    A file saved in a Windows code page (an editor's "ANSI") is read as cp1252
    rather than stopping the run; the caller rewrites it as UTF-8.
    """
    raw = path.read_bytes()
    try:
        return clean_caption(raw.decode("utf-8-sig")), not raw.startswith(b"\xef\xbb\xbf")
    except UnicodeDecodeError:
        return clean_caption(raw.decode("cp1252", errors="replace")), False


def clean_caption(text: str) -> str:
    """One line, single spaces: kohya reads only a caption file's first line."""
    return " ".join(text.split())


_CONNECTORS = r"(?:and|with|while|who is|that is|is)"


def strip_phrases(text: str, phrases: Sequence[str]) -> tuple[str, list[str]]:
    """Remove each phrase (whole words, any case); return the text and what was removed.

    Longer phrases go first, so "holding a remote control" wins over "holding a
    remote". A connector left dangling at an end ("a man smiling and") goes too,
    and "an" before what is now a consonant becomes "a".
    """
    removed: list[str] = []
    patterns = [
        re.compile(r"(?<![\w-])" + r"\s+".join(map(re.escape, phrase.split())) + r"(?![\w-])", re.I)
        for phrase in sorted({p.strip() for p in phrases if p.strip()}, key=len, reverse=True)
    ]
    changed = True
    while changed:  # a removal can join the halves of another phrase
        changed = False
        for pattern in patterns:
            found = pattern.findall(text)
            if found:
                removed.extend(found)
                text = clean_caption(pattern.sub(" ", text))
                changed = True
    if not removed:
        return text, removed
    text = clean_caption(text)
    text = re.sub(r"\s+([,.])", r"\1", text)
    text = re.sub(r"(,\s*)+,", ",", text)
    text = re.sub(rf"^(?:[,\s]|{_CONNECTORS}\b)+", "", text, flags=re.I)
    text = re.sub(rf"(?:[,\s]|\b{_CONNECTORS})+$", "", text, flags=re.I)
    text = re.sub(r"\b([Aa])n (?=[b-df-gj-np-tv-z])", r"\1 ", text)
    return clean_caption(text), removed


def with_prefix(text: str, token: str, prefix: str = "{token}, ", postfix: str = "") -> str:
    """`prefix` + `text` + `postfix`, with the prefix exactly once at the start.

    A caption that already starts with the prefix or the token (a user wrote
    "t0k3n, a man" or "t0k3n a man") does not get it twice; "t0k3n's dog" is
    not taken for the token. The token inside the text is left alone.
    """
    head, tail = prefix.format(token=token), postfix.format(token=token)
    body = clean_caption(text)
    if head.strip():
        # The prefix, or the bare token when the prefix carries it, followed by a separator or the end.
        starts = [re.escape(head.strip())] + ([re.escape(token)] if "{token}" in prefix else [])
        lead = rf"^(?:(?:{'|'.join(starts)})(?=[\s,:;]|$)[\s,:;]*)+"
        body = re.sub(lead, "", body, flags=re.I).lstrip(" ,:;")
    if tail and body.endswith(tail.strip()):
        tail = ""
    return clean_caption(head + body + tail).rstrip(" ,;:") if body or tail else clean_caption(head).rstrip(" ,;:")
