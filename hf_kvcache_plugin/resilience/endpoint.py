"""``ServingEndpoint``: one entry point for generate requests that never fails because the cache did.

Per request: the client's rate limit, a check of the prompt, then the cached
path (``generate``: the prefix hook's generate, or ``model.generate`` with a
``QuantizedKVCache``). If that raises, the request is recomputed on
``fallback_generate`` (a plain ``model.generate``: no store, no quantized
cache) and counted as degraded; only if the fallback fails too does the
request fail, with the fallback's own error. Prefill (request start to first
token) and every gap between new tokens go into histograms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteriaList

from ..token_clock import TokenClock

from .liveness import ProgressWatch
from .metrics import ServingMetrics
from .rate_limit import RateLimiter, RateLimitExceeded

__all__ = ["ServingEndpoint", "check_prompt"]

logger = logging.getLogger(__name__)


def check_prompt(input_ids: Any, vocab_size: int | None = None) -> None:
    """A batch of non-empty integer prompts ``[batch, seq_len]`` with ids in ``[0, vocab_size)``, or a
    ``ValueError`` that says what is wrong (before any model runs: an id out of range is an IndexError deep
    inside the embedding otherwise)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"`input_ids` has to be a tensor [batch, seq_len] of token ids but got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` has to be 2-d [batch, seq_len] but got shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"`input_ids` has to hold integer token ids but got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"the prompt is empty (`input_ids` of shape {tuple(input_ids.shape)}): give at least one token"
        )
    if vocab_size is not None:
        bad = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"token ids have to be in [0, {vocab_size}) (the model's vocabulary) but `input_ids` holds "
                f"{int(input_ids[row, col])} at row {row}, position {col} ({int(bad.sum())} id(s) out of range)"
            )


class ServingEndpoint:
    """Rate-limited, measured ``generate`` with local recompute when the cached path fails.

    Args:
        generate: the cached path, called as ``generate(input_ids, **kwargs)``.
        fallback_generate: the plain path for recomputation; ``None`` lets failures through.
        name: the ``entry_point`` label in metrics.
        limiter: per-client rate limits; ``None`` for none.
        metrics: where requests and latencies are recorded.
        clock: seconds, for the latency histograms.
        vocab_size: token ids are checked against it before any model runs; ``None``: not checked.
        progress: marks each request in flight (liveness); ``None``: not watched.
    """

    def __init__(
        self,
        generate: Callable[..., Any],
        fallback_generate: Callable[..., Any] | None = None,
        *,
        name: str = "generate",
        limiter: RateLimiter | None = None,
        metrics: ServingMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        vocab_size: int | None = None,
        progress: ProgressWatch | None = None,
    ):
        self.generate = generate
        self.vocab_size = vocab_size
        self.progress = progress
        self.fallback_generate = fallback_generate
        self.name = name
        self.limiter = limiter
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self._clock = clock

    def __call__(self, input_ids: torch.Tensor, *, client: str = "default", **kwargs: Any) -> Any:
        if self.limiter is not None:
            try:
                self.limiter.acquire(client)
            except RateLimitExceeded:
                self._count("rate_limited")
                raise
        try:
            check_prompt(input_ids, self.vocab_size)
        except ValueError:
            self._count("invalid")
            raise
        if self.progress is None:
            return self._serve(input_ids, kwargs)
        with self.progress.request():
            return self._serve(input_ids, kwargs)

    def _serve(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        outcome = "served"
        start, tokens = self._clock(), TokenClock(self._clock)
        try:
            out = self.generate(input_ids, **self._with_clock(kwargs, tokens))
        except Exception as exc:  # noqa: BLE001 - whatever broke in the cached path, the request is recomputed
            self.metrics.record_error(self.name, exc)
            if self.fallback_generate is None:
                self._count("failed")
                raise
            logger.warning("%s: the cached path failed (%r); recomputing without the cache", self.name, exc)
            self.metrics.record_fallback(self.name, "generate", "recompute")
            start, tokens, outcome = self._clock(), TokenClock(self._clock), "degraded"
            try:
                out = self.fallback_generate(input_ids, **self._with_clock(kwargs, tokens))
            except ValueError:
                self._count("invalid")  # both paths refuse the input: it is the input
                raise
            except Exception:
                self._count("failed")
                raise
        self._observe(start, tokens.times)
        self._count(outcome)
        return out

    @staticmethod
    def _with_clock(kwargs: dict[str, Any], tokens: TokenClock) -> dict[str, Any]:
        return {**kwargs, "stopping_criteria": StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), tokens])}

    def _observe(self, start: float, times: list[float]) -> None:
        if not times:
            return
        self.metrics.prefill_seconds.labels(self.name).observe(times[0] - start)
        decode = self.metrics.decode_token_seconds.labels(self.name)
        for before, after in zip(times, times[1:]):
            decode.observe(after - before)

    def _count(self, outcome: str) -> None:
        self.metrics.requests.labels(self.name, outcome).inc()
