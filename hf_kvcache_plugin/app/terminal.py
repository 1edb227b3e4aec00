"""What the commands show on stderr beside their results: progress bars (tqdm) and the package's log lines.

Bars are drawn only on a terminal (tqdm's ``disable=None``) and never with
``--no-progress``; transformers' own bars (loading weights) follow the same
rule. Log lines go through ``tqdm.write`` while a bar is shown, so neither
breaks the other.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

__all__ = ["LOG_LEVELS", "TokenProgress", "cli_output", "progress_disable"]

LOG_LEVELS = ("debug", "info", "warning", "error")
PACKAGE_LOGGER = "hf_kvcache_plugin"


def progress_disable(no_progress: bool) -> bool | None:
    """tqdm's ``disable``: True with ``--no-progress``, else None (shown on a terminal, hidden when piped)."""
    return True if no_progress else None


class TokenProgress(BaseStreamer):
    """A bar advanced by every token ``generate`` produces (``generate(streamer=TokenProgress(...))``).

    ``generate`` hands a streamer the prompt first, then each step's new
    tokens; the prompt is not counted.
    """

    def __init__(self, total: int, desc: str = "generate", disable: bool | None = None, leave: bool = True, **bar):
        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=disable, leave=leave, **bar)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        # greedy and sampling hand one token per row ([B]); assisted decoding several ([B, n])
        self.bar.update(value.shape[-1] if value.dim() > 1 else 1)

    def end(self) -> None:
        self.bar.close()


@contextmanager
def cli_output(level: str, no_progress: bool) -> Iterator[None]:
    """While the block runs: the package's log lines of ``level`` and above on stderr, and transformers' bars
    only where ours are drawn; restored afterwards."""
    library_bars = hf_logging.is_progress_bar_enabled()
    if no_progress or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
    saved_level = logger.level
    logger.setLevel(level.upper())
    logger.addHandler(handler)  # records still propagate: a caller's own handlers (pytest's caplog) see them too
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        if library_bars:
            hf_logging.enable_progress_bar()
