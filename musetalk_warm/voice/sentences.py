"""Split text, whole or streamed in pieces, into sentences to speak one at a time.

A sentence ends at ``.``, ``!``, ``?`` or ``…`` (with closing quotes or brackets)
followed by white space, or at a line break. Common abbreviations, initials and
decimal numbers do not end one. Very long sentences are cut at a comma or a
space so the first one reaches the speech engine early.
"""

from __future__ import annotations

import re

_END = re.compile(r"""([.!?…]+["'”’)\]]*)(\s+)|(\n+)""")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e approx dept fig no vol inc ltd co".split()
)


class SentenceSplitter:
    """Incremental splitter: :meth:`feed` text as it arrives, :meth:`flush` at the end."""

    def __init__(self, max_chars: int = 300) -> None:
        self.max_chars = max_chars
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        """Add ``text``; return the sentences it completed."""
        self._buffer += text
        out: list[str] = []
        start = 0
        for match in _END.finditer(self._buffer):
            if match.group(1) and _not_an_end(self._buffer, match.start(1)):
                continue
            out += self._clean(self._buffer[start : match.start(2) if match.group(1) else match.start(3)])
            start = match.end()
        self._buffer = self._buffer[start:]
        while len(self._buffer) > self.max_chars:
            cut = _cut_point(self._buffer, self.max_chars)
            out += self._clean(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
        return out

    def flush(self) -> list[str]:
        """The rest of the text as a last sentence (if any)."""
        rest, self._buffer = self._buffer, ""
        return self._clean(rest)

    @staticmethod
    def _clean(sentence: str) -> list[str]:
        sentence = " ".join(sentence.split())
        return [sentence] if any(c.isalnum() for c in sentence) else []


def _not_an_end(text: str, dot: int) -> bool:
    """A '.' after an abbreviation, an initial or inside a number."""
    if text[dot] != ".":
        return False
    word = re.search(r"([\w.]+)$", text[:dot])
    if word is None:
        return False
    token = word.group(1).lower()
    return token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha())


def _cut_point(text: str, limit: int) -> int:
    for mark in (", ", "; ", " "):
        at = text.rfind(mark, 0, limit)
        if at > 0:
            return at + len(mark)
    return limit


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """All sentences of ``text``."""
    splitter = SentenceSplitter(max_chars)
    return splitter.feed(text) + splitter.flush()
