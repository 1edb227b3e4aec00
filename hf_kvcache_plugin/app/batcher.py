"""``GenerationBatcher``: one worker thread that owns the model and decodes waiting requests together.

Requests (``GenerationJob``: one row per choice, prompt x ``n``) queue up; the
worker takes the oldest and, unless it has a ``seed``, every waiting job with
the same sampling settings (``batch_key``) up to ``max_batch_size`` rows,
left-pads them into one batch and runs one ``generate`` through a
``ServingEndpoint`` (so a failing cached path recomputes). Jobs with a
``seed`` run alone right after ``torch.manual_seed(seed)``: sampling draws
from the global generator, so only a job alone in its call gets the same
tokens as when served by itself. Rows share a batch only when their prompt
lengths are equal modulo ``align`` (the cache's ``group_size``): the left
padding then fills whole cache blocks, so every real token lands in the same
quantization block as when served alone and a row's tokens do not depend on
its companions (padding is masked; its blocks are quantized on their own).

A ``StoppingCriteria`` (``_BatchWatcher``) sees every new token: it streams
each row's text as it settles, and ends a row at EOS, a stop string, the row's
own ``max_tokens`` or when its job is cancelled (the client went away); the
call returns once every row has ended. If the cached path fails after some
tokens went out, the recompute continues from the token the stream stands at
(greedy rows get the same tokens; sampled ones the generator's next draws).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria

from ..resilience.endpoint import ServingEndpoint
from ..resilience.metrics import ServingMetrics
from .stream_text import StreamedText

__all__ = ["GenerationBatcher", "GenerationJob", "QueueFull", "RowEnd", "restarting"]

logger = logging.getLogger(__name__)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class QueueFull(RuntimeError):
    """More requests wait for the model than ``max_queue``."""


@dataclass(frozen=True)
class RowEnd:
    """How one row (one choice) ended: ``finish_reason`` is ``stop``, ``length`` or ``cancelled``."""

    finish_reason: str
    completion_tokens: int


@dataclass
class GenerationJob:
    """One request: ``rows`` of prompt token ids (a choice each), its sampling settings and where events go.

    ``on_text(row, delta)``, ``on_end(row, RowEnd)`` and ``on_error(exc)`` are
    called from the worker thread; ``on_error`` means the rows not ended yet
    never will.
    """

    request_id: str
    rows: list[list[int]]
    max_new_tokens: int
    on_text: Callable[[int, str], None]
    on_end: Callable[[int, RowEnd], None]
    on_error: Callable[[BaseException], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    client: str = "default"
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def batch_key(self) -> tuple[float, float] | None:
        """Jobs with equal keys may share a ``generate`` call; ``None``: this one runs alone."""
        if self.seed is not None and not self.greedy:
            return None
        return (0.0, 1.0) if self.greedy else (self.temperature, self.top_p)


class GenerationBatcher:
    """Serves ``GenerationJob``s on one thread; ``start()``, ``submit(job)``, ``stop()``.

    Args:
        endpoint: runs each batch (rate limits are the caller's: it is one call for many clients).
        tokenizer: decodes the streamed text.
        pad_token_id: fills the left padding and ended rows.
        eos_token_ids: tokens that end a row.
        max_batch_size: rows per ``generate`` call.
        batch_wait_s: how long an idle worker waits for company before starting a batch.
        max_queue: waiting jobs beyond which ``submit`` raises ``QueueFull``.
        metrics: batch sizes and queue depth go here.
        device: where the batch's tensors go.
        align: rows share a batch only with prompt lengths equal modulo this (the cache's ``group_size``).
    """

    def __init__(
        self,
        endpoint: ServingEndpoint,
        tokenizer: Any,
        *,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        max_batch_size: int = 8,
        batch_wait_s: float = 0.002,
        max_queue: int = 256,
        metrics: ServingMetrics | None = None,
        device: str | torch.device = "cpu",
        align: int = 1,
    ):
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` has to be >= 1 but got {max_batch_size}")
        if align < 1:
            raise ValueError(f"`align` has to be >= 1 but got {align}")
        self.align = align
        self.endpoint, self.tokenizer = endpoint, tokenizer
        self.pad_token_id, self.eos_token_ids = int(pad_token_id), frozenset(int(t) for t in eos_token_ids)
        self.max_batch_size, self.batch_wait_s, self.max_queue = max_batch_size, batch_wait_s, max_queue
        self.device = device
        metrics = metrics if metrics is not None else endpoint.metrics
        self._batch_rows = metrics.histogram(
            "hf_kvcache_http_batch_rows", "Rows (prompts x n) per generate call of the HTTP API", buckets=_BATCH_BUCKETS
        )
        self._queue_depth = metrics.gauge("hf_kvcache_http_queue_depth", "Requests waiting for the model")
        self._row_ends = metrics.counter(
            "hf_kvcache_http_rows", "Choices by how they ended (stop, length, cancelled)", ["finish_reason"]
        )
        self._new_tokens = metrics.counter("hf_kvcache_http_new_tokens", "Tokens generated for HTTP choices")
        self._waiting: collections.deque[GenerationJob] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running: list[GenerationJob] = []
        self._thread: threading.Thread | None = None

    def start(self) -> "GenerationBatcher":
        if self._thread is not None:
            raise ValueError("the batcher is already started")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hf-kvcache-generate", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel what waits, let the running batch end (its rows are cancelled too), join the worker."""
        with self._cond:
            self._closed = True
            for job in [*self._waiting, *self._running]:
                job.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: GenerationJob) -> None:
        if not job.rows or any(not row for row in job.rows):
            raise ValueError("a job needs at least one row and every row at least one prompt token")
        if len(job.rows) > self.max_batch_size:
            raise ValueError(f"a job of {len(job.rows)} rows does not fit `max_batch_size` {self.max_batch_size}")
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for the model (max_queue {self.max_queue})")
            self._waiting.append(job)
            self._queue_depth.set(len(self._waiting))
            self._cond.notify_all()

    def _ended(self, end: RowEnd) -> None:
        self._row_ends.labels(end.finish_reason).inc()
        self._new_tokens.inc(end.completion_tokens)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled.is_set()]
            if not batch:
                continue
            try:
                self._serve(batch)
            except Exception as exc:  # noqa: BLE001 - the jobs' clients get the error; the worker serves on
                logger.error("generate failed for requests %s: %r", ",".join(j.request_id for j in batch), exc)
                for job in batch:
                    job.on_error(exc)

    def _next_batch(self) -> list[GenerationJob] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._waiting.popleft()
            batch, rows, key = [first], len(first.rows), self._key(first)
            deadline = time.monotonic() + self.batch_wait_s
            while key is not None and rows < self.max_batch_size:
                for job in list(self._waiting):
                    if self._key(job) == key and rows + len(job.rows) <= self.max_batch_size:
                        self._waiting.remove(job)
                        batch.append(job)
                        rows += len(job.rows)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or rows >= self.max_batch_size or self._closed:
                    break
                self._cond.wait(remaining)
            self._queue_depth.set(len(self._waiting))
            self._running = batch
            return batch

    def _key(self, job: GenerationJob) -> tuple | None:
        """Jobs with equal keys may share a ``generate`` call; ``None``: the job runs alone."""
        residues = {len(row) % self.align for row in job.rows}
        if job.batch_key is None or len(residues) > 1:
            return None
        return (job.batch_key, residues.pop())

    def _serve(self, batch: list[GenerationJob]) -> None:
        rows = [_Row(job, i, ids, self.tokenizer, self._ended) for job in batch for i, ids in enumerate(job.rows)]
        width = max(len(row.prompt) for row in rows)
        # [batch, width], left-padded: every row's last prompt token sits in the last column
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        first = batch[0]
        watcher = _BatchWatcher(rows, self.eos_token_ids, first.seed)
        kwargs: dict[str, Any] = {
            "attention_mask": mask.to(self.device),
            "max_new_tokens": max(job.max_new_tokens for job in batch),
            "pad_token_id": self.pad_token_id,
            "stopping_criteria": [watcher],
        }
        if first.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=None)
        self._batch_rows.observe(len(rows))
        ids = ",".join(job.request_id for job in batch)
        logger.info("generate: %d rows of width %d for requests %s", len(rows), width, ids)
        with torch.inference_mode():
            self.endpoint(input_ids.to(self.device), client="http", **kwargs)
        for row in rows:
            if not row.ended:
                # generate stopped on a limit of its own (the model's length)
                row.end("length")


class _Row:
    """One choice of one job: its prompt, its streamed text and how many tokens it got."""

    def __init__(
        self, job: GenerationJob, index: int, prompt: list[int], tokenizer: Any, ended: Callable[[RowEnd], None]
    ):
        self.job, self.index, self.prompt, self._ended = job, index, prompt, ended
        self.text = StreamedText(tokenizer, prompt, job.stop)
        self.tokens = 0
        self.ended = False

    def accept(self, token: int, eos: frozenset[int]) -> None:
        self.tokens += 1
        if token in eos:
            self.end("stop")
            return
        delta = self.text.add(token)
        if delta:
            self.job.on_text(self.index, delta)
        if self.text.stopped:
            self.end("stop")
        elif self.tokens >= self.job.max_new_tokens:
            self.end("length")

    def end(self, reason: str) -> None:
        self.ended = True
        if reason != "cancelled":
            delta = self.text.finish()
            if delta:
                self.job.on_text(self.index, delta)
        end = RowEnd(reason, self.tokens)
        self._ended(end)
        self.job.on_end(self.index, end)


class _BatchWatcher(StoppingCriteria):
    """Called by ``generate`` after each new token: streams it per row, says which rows are done."""

    def __init__(self, rows: list[_Row], eos: frozenset[int], seed: int | None):
        self.rows, self.eos, self.seed = rows, eos, seed
        self._steps = 0
        self.restart()

    def restart(self) -> None:
        """A (re)started ``generate`` call: count its tokens from 0, draw from the seed again."""
        self._steps = 0
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self._steps += 1
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if row.ended:
                continue
            if row.job.cancelled.is_set():
                row.end("cancelled")
            elif self._steps > row.tokens:  # a recompute replays tokens the stream already has
                row.accept(token, self.eos)
        return torch.tensor([row.ended for row in self.rows], dtype=torch.bool, device=input_ids.device)


def restarting(generate: Callable[..., Any]) -> Callable[..., Any]:
    """``generate`` that first restarts the ``_BatchWatcher`` among its stopping criteria (one per attempt)."""

    def run(input_ids: torch.Tensor, **kwargs: Any) -> Any:
        for criterion in kwargs.get("stopping_criteria") or ():
            if isinstance(criterion, _BatchWatcher):
                criterion.restart()
        return generate(input_ids, **kwargs)

    return run
