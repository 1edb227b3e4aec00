"""``StreamedText``: new token ids in, text deltas out, cut at the first stop string.

Each step decodes the whole continuation (token pieces only make sense
together: a word split over tokens, a character split over byte tokens) and
hands out what is new. Text that might still turn into a stop string, or ends
in an unfinished character (``\\ufffd``), is held back until the next token
settles it, so a client never sees text that a stop string later removes.
The continuation is decoded behind the last few prompt tokens so that its
first word keeps its leading space (decoders drop it at the start of a text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["StreamedText"]

_UNFINISHED = "\ufffd"  # what decoding gives for a character whose bytes have not all arrived
_CONTEXT_TOKENS = 4  # prompt tokens decoded in front of the continuation


class StreamedText:
    """The text of one continuation, token by token; ``stopped`` once a stop string appeared."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._context = [int(t) for t in prompt_ids[-_CONTEXT_TOKENS:]]
        self._context_chars = 0
        self._context_chars = len(self._decode([]))
        self._stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # the settled text, cut at the stop string when one appeared
        self._sent = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one new token; returns the text that became final with it (possibly '')."""
        if self.stopped:
            return ""
        self.token_ids.append(int(token_id))
        full = self._decode(self.token_ids)
        cut = min((i for i in (full.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = full[:cut]
            return self._take(len(self.text))
        self.text = full
        return self._take(len(full) - self._held_back(full))

    def finish(self) -> str:
        """The rest of the text once no token follows (held-back text is final now)."""
        return self._take(len(self.text))

    def _decode(self, new_ids: list[int]) -> str:
        return self._tokenizer.decode(self._context + new_ids, skip_special_tokens=True)[self._context_chars :]

    def _take(self, upto: int) -> str:
        upto = max(upto, self._sent)
        delta, self._sent = self.text[self._sent : upto], upto
        return delta

    def _held_back(self, full: str) -> int:
        """Characters at the end of ``full`` that the next token may still change or cut."""
        if full.endswith(_UNFINISHED):
            return len(full) - len(full.rstrip(_UNFINISHED))
        # the longest tail of `full` that begins some stop string
        return max((n for s in self._stop for n in range(min(len(s) - 1, len(full)), 0, -1) if s.startswith(full[-n:])),
                   default=0)  # fmt: skip
