"""``TokenClock``: when each new token of a ``generate`` call existed (time to first token, gaps between tokens)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria

__all__ = ["TokenClock"]


class TokenClock(StoppingCriteria):
    """A stopping criterion that never stops: it notes ``clock()`` each time ``generate`` made a token.

    Pass it in ``stopping_criteria``; ``generate`` calls it once per step, after the step's token exists.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.times: list[float] = []

    @property
    def first(self) -> float | None:
        """When the first new token existed (None: no token yet)."""
        return self.times[0] if self.times else None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.times.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
