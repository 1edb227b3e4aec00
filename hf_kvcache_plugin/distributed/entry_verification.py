"""``EntryVerifier``: a spot check that a peer's entries hold the K/V this process's own model computes.

A signed batch proves who sent it, not that its codes are right: a peer that
holds the launch secret could send well-formed entries with scrambled codes,
and every later hit on them would change outputs unnoticed. So some batches
are recomputed here before anything of them is stored: every batch from a
peer until one of its batches passed, then each batch with probability
``sample_rate`` (drawn from the OS's random source, so a peer cannot predict
which ones).

An entry names its tokens only by its key (a chained content hash), so the
tokens come from what this process saw: the verifier learns the chunks of
every prompt it hashes (``learn``; the coordinator hashes its own prompts and
every peer's prompts of every round). An entry whose tokens were never seen
here, or whose parent differs from the one those tokens give, cannot be
checked: a sampled batch holding one is not stored (``EntryUnverifiable``),
without blame on the peer.

The check (``check``), per chain of the batch: one forward over the chain's
tokens gives the exact K/V ``x`` of every chunk; one forward per chunk over
its tokens, attending to the batch's (or the store's) dequantized parents,
gives ``x_hit``. An honest chunk was computed either way or in between (a
chunk stored after a hit attended to the quantized chunks before it), so per
element, with the chunk quantized here by this layer's codec (step ``s``,
representable range ``[lo, hi]``), the received value ``d`` must satisfy

    |d - clamp(x, lo, hi)| <= s / 2 * (1 + 1%) + 2 * P + float slack

where ``P`` is the largest ``|x_hit - x|`` of that layer and head in the
chunk: how far quantized parents move this chunk. In the first layer ``P`` is
0 (its K/V depend on the tokens alone), so there the bound is the rounding
error itself. Scales come from this process's own encoding, never from the
peer's, so a peer cannot widen the bound by sending large scales, nor pass
zeroed ones. A value outside the bound raises ``EntryMismatch``: the
exchange refuses the whole batch, stores none of it, and counts it against
the peer's breaker.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from .._compat import GENERATE_CACHE_KWARG
from ..cache import QuantizedKVCache
from ..config import CacheConfig
from ..quantization import QuantizedTensor, dequantize
from ..reuse.prefix_store import PrefixEntry, chunk_keys
from .payloads import PayloadError

__all__ = ["EntryMismatch", "EntryUnverifiable", "EntryVerifier"]

_SCALE_SLACK = 0.01  # the sender's scales come from slightly different K/V than this process's
_PROPAGATION_FACTOR = 2.0  # an honest chunk lies between x and x_hit; twice the gap leaves room for mixed cases


class EntryMismatch(PayloadError):
    """A peer's entry whose values are not the K/V of its tokens (counted against the peer)."""


class EntryUnverifiable(PayloadError):
    """A peer's entry this process cannot recompute (tokens never seen here): not stored, nobody blamed."""


class EntryVerifier:
    """Recomputes sampled peer entries with the local model; see the module docstring.

    Args:
        model: this process's model (its forward is used; ``generate`` is not called).
        cache_config: the hook's resolved cache settings (the codecs entries were made with).
        namespace: the hook's key namespace; ``chunk_size``: the store's.
        stored_entry: this process's entry under a key, or None (parents a batch does not carry).
        sample_rate: probability of checking a batch once a peer had one batch pass.
        max_chunks: how many learned chunks (token lists) are remembered, least recently learned dropped first.
        draw: a source of floats in [0, 1) for sampling; default the OS's random source.
    """

    def __init__(
        self,
        model: Any,
        cache_config: CacheConfig,
        namespace: bytes,
        chunk_size: int,
        stored_entry: Callable[[bytes], PrefixEntry | None],
        sample_rate: float,
        *,
        max_chunks: int = 16384,
        draw: Callable[[], float] | None = None,
    ):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"`sample_rate` has to be in [0, 1] but got {sample_rate!r}")
        self.model = model
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.stored_entry = stored_entry
        self.sample_rate = sample_rate
        self.max_chunks = max_chunks
        self._draw = draw or random.SystemRandom().random
        # key -> (parent key, the chunk's token ids as int64 bytes): compact, a long run keeps many
        self._chunks: OrderedDict[bytes, tuple[bytes | None, bytes]] = OrderedDict()
        self._lock = threading.Lock()  # `learn` may run in a serving thread while a round checks a batch
        self._passed_peers: set[int] = set()
        self._layers = QuantizedKVCache(model.config, cache_config=cache_config).layers
        for layer in self._layers:  # their codecs quantize the recomputed K/V here, as the hook quantizes chunks
            s = layer.settings
            zeros = torch.zeros(1, s.expected_num_heads, chunk_size, s.expected_head_dim, dtype=model.dtype)
            layer.lazy_initialization(zeros, zeros)
        self.stats = {"batches_checked": 0, "entries_checked": 0, "seconds": 0.0, "mismatches": 0,
                      "unverifiable": 0, "worst_ratio": 0.0}

    # ------------------------------------------------------------------ what was seen
    def learn(self, prompt: Sequence[int]) -> list[bytes]:
        """Remember the tokens of every full chunk of ``prompt``; returns their chained keys."""
        tokens = np.asarray([int(t) for t in prompt], dtype="<i8")
        keys = chunk_keys(self.namespace, tokens.tolist(), self.chunk_size)
        size = self.chunk_size
        with self._lock:
            for i, key in enumerate(keys):
                self._chunks[key] = (keys[i - 1] if i else None, tokens[i * size : (i + 1) * size].tobytes())
                self._chunks.move_to_end(key)
            while len(self._chunks) > self.max_chunks:
                self._chunks.popitem(last=False)
        return keys

    def _prefix_tokens(self, key: bytes) -> tuple[list[bytes], list[int]] | None:
        """The chain of keys (first chunk first) ending at ``key`` and their tokens, or None if not all known."""
        chain, parts = [], []
        with self._lock:
            while key is not None:
                known = self._chunks.get(key)
                if known is None or len(chain) > len(self._chunks):
                    return None
                chain.append(key)
                parts.append(known[1])
                key = known[0]
        return chain[::-1], np.frombuffer(b"".join(reversed(parts)), dtype="<i8").tolist()

    # ------------------------------------------------------------------ sampling
    def wants(self, peer: int) -> bool:
        """Whether to check ``peer``'s next batch: always until one passed, then at ``sample_rate``."""
        return peer not in self._passed_peers or self._draw() < self.sample_rate

    def passed(self, peer: int) -> None:
        self._passed_peers.add(peer)

    # ------------------------------------------------------------------ the check
    @torch.inference_mode()
    def check(self, entries: Sequence[PrefixEntry]) -> None:
        """Raise ``EntryMismatch`` if an entry's values are not its tokens' K/V, ``EntryUnverifiable`` if an
        entry cannot be recomputed here; entries whose parents are neither in ``entries`` nor stored are
        skipped (the store refuses them anyway)."""
        started = time.perf_counter()
        batch = {e.key: e for e in entries}
        self.stats["batches_checked"] += 1
        try:
            todo = []
            for entry in entries:
                known = self._prefix_tokens(entry.key)
                if known is None:
                    self.stats["unverifiable"] += 1
                    raise EntryUnverifiable(f"entry {entry.key.hex()[:12]}: its tokens were never seen here")
                chain, tokens = known
                if entry.parent != (chain[-2] if len(chain) > 1 else None):
                    self._mismatch(f"entry {entry.key.hex()[:12]}: its parent is not the chunk before it")
                parents = [batch.get(k) or self.stored_entry(k) for k in chain[:-1]]
                if all(p is not None for p in parents):
                    todo.append((entry, tokens, parents))
            exact: list[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = []
            # longest first: the forward over a chain's last chunk serves every chunk before it
            for entry, tokens, parents in sorted(todo, key=lambda item: -len(item[1])):
                self.stats["entries_checked"] += 1
                self._check_entry(entry, tokens, parents, self._exact_kv(tokens, exact))
        finally:
            self.stats["seconds"] += time.perf_counter() - started

    def _mismatch(self, problem: str) -> None:
        self.stats["mismatches"] += 1
        raise EntryMismatch(problem)

    def _exact_kv(self, tokens: list[int], done: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) [1, H, T, D] of a plain forward over a prompt that starts with ``tokens`` (one
        forward per chain: a chunk's K/V are the same in any longer prompt)."""
        for prompt, kv in done:
            if prompt[: len(tokens)] == tokens:
                return kv
        kv = self._forward(tokens, [])
        done.append((tokens, kv))
        return kv

    def _forward(self, tokens: list[int], parents: list[PrefixEntry]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) of ``tokens`` placed after ``parents``' dequantized K/V (none: from position 0)."""
        device = self.model.device
        cache = DynamicCache(config=self.model.config)
        start = 0
        for layer_idx in range(len(self._layers)):
            if parents:
                k = torch.cat([_dense(p.keys[layer_idx]) for p in parents], dim=2).to(device, self.model.dtype)
                v = torch.cat([_dense(p.values[layer_idx]) for p in parents], dim=2).to(device, self.model.dtype)
                cache.update(k, v, layer_idx)
                start = k.shape[2]
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device).unsqueeze(0)
        self.model(input_ids=ids, position_ids=positions, use_cache=True, **{GENERATE_CACHE_KWARG: cache})
        return [(layer.keys[:, :, start:], layer.values[:, :, start:]) for layer in cache.layers]

    def _check_entry(self, entry: PrefixEntry, tokens: list[int], parents: list[PrefixEntry], exact) -> None:
        size, begin = self.chunk_size, len(tokens) - self.chunk_size
        hit = self._forward(tokens[begin:], parents) if parents else None
        name = entry.key.hex()[:12]
        for layer_idx, layer in enumerate(self._layers):
            for stream, blocks in (("keys", entry.keys), ("values", entry.values)):
                s = 0 if stream == "keys" else 1
                x = exact[layer_idx][s][:, :, begin : begin + size].float()  # [1, H, C, D]
                moved = torch.zeros(x.shape[1], device=x.device)
                if hit is not None:
                    moved = (hit[layer_idx][s].float() - x).abs().amax(dim=(0, 2, 3))  # per head
                codec = layer.quantized_keys.codec if s == 0 else layer.quantized_values.codec
                ratio = _worst_ratio(blocks[layer_idx], codec.encode(x.to(self.model.dtype)), x, moved)
                self.stats["worst_ratio"] = max(self.stats["worst_ratio"], ratio)
                if ratio > 1.0:
                    self._mismatch(f"entry {name}: layer {layer_idx} {stream} differ from this model's K/V of "
                                   f"its tokens by {ratio:.1f} times the quantization bound")


def _dense(q: QuantizedTensor) -> torch.Tensor:
    """Blocks [1, H, n, G, D] as K/V [1, H, n * G, D]."""
    d = dequantize(q)
    return d.reshape(d.shape[0], d.shape[1], -1, d.shape[-1])


def _filled(q: QuantizedTensor, code: int) -> torch.Tensor:
    """``q``'s values if every code were ``code`` (same scales and zeros), as blocks [1, H, n, G, D]."""
    per_byte = 8 // q.bits
    byte = sum(code << (q.bits * i) for i in range(per_byte))
    return dequantize(dataclasses.replace(q, data=torch.full_like(q.data, byte))).float()


def _worst_ratio(received: QuantizedTensor, local: QuantizedTensor, x: torch.Tensor, moved: torch.Tensor) -> float:
    """max |received - clamp(x)| / bound over the chunk (see the module docstring); above 1 is a mismatch."""
    shape = tuple(local.shape)  # [1, H, n, G, D]
    if tuple(received.shape) != shape:
        return float("inf")
    x = x.reshape(shape)
    levels = (1 << local.bits) - 1
    low, high = _filled(local, 0), _filled(local, levels)
    step = (_filled(local, 1) - low).abs()
    lo, hi = torch.minimum(low, high), torch.maximum(low, high)
    reference = torch.maximum(torch.minimum(x, hi), lo)  # clipping codecs clamp outliers to the range
    slack = 8 * torch.finfo(local.dtype).eps * (x.abs() + step)  # forwards of other shapes round differently
    bound = step / 2 * (1 + _SCALE_SLACK) + _PROPAGATION_FACTOR * moved.view(1, -1, 1, 1, 1) + slack
    error = (dequantize(received).float() - reference).abs()
    return float((error / bound).max())
