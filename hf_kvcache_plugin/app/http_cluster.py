"""``hf-kvcache serve --http`` under ``torchrun`` with a ``distributed:`` section: rank 0 answers HTTP, every
rank serves the prompts whose prefix it holds.

The processes already form one prefix cache through the ``CacheCoordinator``'s
rounds (``distributed.round_runner``): in a round every process posts its
prompts, all compute the same routing plan (``distributed.routing``: the
holder of the longest stored prefix, else the ring owner of the first chunk),
each serves what is routed to it and posts the results back over the signed
transport. The HTTP front door reuses that as it is:

- rank 0's batcher runs each greedy batch as one round with the batch's
  prompts (``RoutedGeneration``); the new tokens that come back are replayed
  through the batcher's stopping criteria, so stop strings, EOS, ``max_tokens``
  and streaming work as for a local ``generate``. A prompt whose server did
  not answer (dead or stalled rank, open breaker) is recomputed on rank 0 by
  the coordinator: no request is lost. Sampled requests are generated on
  rank 0 (the round carries prompts and lengths, not sampling settings or a
  generator's state, so only a local call keeps ``seed`` reproducible);
- while no request comes, rank 0 runs an empty round every
  ``heartbeat_interval_s``, so the other ranks, waiting in their round, never
  count rank 0 as missing;
- every other rank runs rounds without prompts of its own (``serve_worker``)
  until rank 0 leaves (its ``close`` says so in the store).

A remote answer comes back whole: its text streams out of rank 0 only once
the round ends (time to first token = that rank's whole generate).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..distributed.nodes import NodeState

if TYPE_CHECKING:
    from ..distributed.coordinator import CacheCoordinator

__all__ = ["FRONT_RANK", "RoutedGeneration", "serve_worker"]

logger = logging.getLogger(__name__)

FRONT_RANK = 0  # the rank that serves HTTP
_ROUTE_LOG = 1024  # routes kept for ``routes`` (stats and tests)


class RoutedGeneration:
    """The cached ``generate`` of rank 0's HTTP batcher, served across the launch by ``coordinator`` rounds.

    ``local`` serves what is not routed (sampled batches). ``start()`` runs the idle rounds on a thread of
    its own, ``stop()`` ends them; rounds never overlap (one lock). ``routes`` lists ``(server, reason,
    hit_chunks)`` for the latest prompts, oldest first.
    """

    def __init__(self, coordinator: "CacheCoordinator", local: Callable[..., Any], *, idle_round_s: float | None = None):
        if coordinator.transport is None:
            raise ValueError("routing needs a coordinator with a transport (a distributed launch of 2+ ranks)")
        self.coordinator, self.local = coordinator, local
        self.idle_round_s = idle_round_s if idle_round_s is not None else coordinator.config.heartbeat_interval_s
        self.routes: collections.deque[tuple[int, str, int]] = collections.deque(maxlen=_ROUTE_LOG)
        self._lock = threading.Lock()
        self._last_round = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if kwargs.get("do_sample"):
            with self._lock:
                return self.local(input_ids, **kwargs)
        rows = input_ids.cpu()
        mask = kwargs.get("attention_mask")
        keep = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.cpu().bool()
        prompts = [row[k].tolist() for row, k in zip(rows, keep)]  # [batch, width] left-padded -> each row's tokens
        with self._lock:
            outputs = self.coordinator.generate(prompts, client="http", max_new_tokens=kwargs["max_new_tokens"])
            self._last_round = time.monotonic()
            plan = self.coordinator.last_routes
            for i in range(len(prompts)):
                route = plan.get((FRONT_RANK, i))
                if route is not None:
                    self.routes.append((route.server, route.reason, route.hit_chunks))
        self._replay(outputs, kwargs.get("stopping_criteria") or [], int(kwargs.get("pad_token_id") or 0))
        return outputs

    @staticmethod
    def _replay(outputs: list[list[int]], criteria: Any, pad: int) -> None:
        """Feed the new tokens to ``criteria`` one step at a time, as ``generate`` would have."""
        for step in range(max((len(out) for out in outputs), default=0)):
            last = torch.tensor([[out[step] if step < len(out) else pad] for out in outputs])  # [batch, 1]
            done = torch.zeros(len(outputs), dtype=torch.bool)
            for criterion in criteria:
                done |= torch.as_tensor(criterion(last, None), dtype=torch.bool)
            if bool(done.all()):
                return

    # ------------------------------------------------------------------ idle rounds
    def start(self) -> "RoutedGeneration":
        if self._thread is not None:
            raise ValueError("the idle rounds already run")
        self._stopped.clear()
        self._thread = threading.Thread(target=self._idle_rounds, name="hf-kvcache-rounds", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _idle_rounds(self) -> None:
        while not self._stopped.wait(self.idle_round_s / 2):
            if time.monotonic() - self._last_round < self.idle_round_s or not self._lock.acquire(blocking=False):
                continue  # a request's round is recent, or one runs now
            try:
                self.coordinator.step()
                self._last_round = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - an idle round that failed is retried at the next tick
                logger.warning("rank %d: an idle round failed: %r", FRONT_RANK, exc)
            finally:
                self._lock.release()


def serve_worker(coordinator: "CacheCoordinator", stop: threading.Event | None = None) -> int:
    """Serve rounds on a rank other than ``FRONT_RANK`` until that rank leaves or ``stop`` is set; returns the
    number of rounds served.

    While the front rank is unreachable (its breaker is open) rounds pause ``heartbeat_interval_s`` between
    them instead of spinning."""
    if coordinator.transport is None or coordinator.node_id == FRONT_RANK:
        raise ValueError(f"`serve_worker` runs on ranks other than {FRONT_RANK} of a distributed launch")
    stop = stop if stop is not None else threading.Event()
    rounds = 0
    while not stop.is_set():
        front = coordinator.nodes.get(FRONT_RANK)
        if front is not None and front.state == NodeState.OFFLINE:
            logger.info("rank %d: rank %d left; %d rounds served", coordinator.node_id, FRONT_RANK, rounds)
            break
        coordinator.step()
        rounds += 1
        if not coordinator.peers_alive().get(f"rank{FRONT_RANK}", True):
            stop.wait(coordinator.config.heartbeat_interval_s)
    return rounds
