"""``PrefixStore``: a byte-budgeted store of quantized KV blocks for prompt prefixes.

A prompt is cut into chunks of ``chunk_size`` tokens; only full chunks are
stored. Each chunk's key is a BLAKE2b digest chained over the previous chunk's
key, and the first key starts from a *namespace* digest of the model's identity,
the quantization settings, the compute dtype and the chunk size:

    namespace = H(model fingerprint, cache settings, dtype, chunk size)
    key_0 = H(namespace || tokens[0:C])        key_k = H(key_{k-1} || tokens[kC:(k+1)C])

so a key names the whole prefix up to its chunk, is the same in every process
and after restarts (no Python ``hash()``), and two models or two settings never
share an entry. An entry holds the chunk's quantized K/V blocks for every layer,
in the cache's own format, so a hit is loaded without re-quantization.

The budget counts tensor bytes exactly (codes, scales, zeros). Eviction is LRU
(or LFU); a lookup refreshes a chain leaf-first so that parents outlive their
children, and evicting a chunk also evicts the chunks that extend it (nothing
could reach them any more). Pinned entries are never evicted; every eviction
and every refused insert is counted in ``stats()`` and reported to ``on_evict``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import CacheConfig, PluginConfig, PrefixStoreConfig
from ..config.validation import MAX_SIZE_MB
from ..quantization import QuantizedTensor
from .store_lock import StoreLock

__all__ = [
    "PrefixEntry",
    "PrefixEntryInfo",
    "PrefixMatch",
    "PrefixStore",
    "chunk_keys",
    "model_fingerprint",
    "prefix_namespace",
]

logger = logging.getLogger(__name__)

MIB = 2**20
_DIGEST_BYTES = 32
# config fields that name a checkout rather than what the weights compute
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype")
_SAMPLED_ELEMENTS = 256


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for part in parts:
        h.update(part)
    return h.digest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model: its config (minus paths and versions) and a fixed sample of every parameter.

    Two checkpoints of one architecture differ in their weights, so a sample of
    each tensor (name, shape, dtype and up to 256 evenly spaced elements) tells
    them apart without hashing gigabytes.
    """
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    config = getattr(model, "config", None)
    if config is not None:
        described = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLED_ELEMENTS)
        sample = flat[::step][:_SAMPLED_ELEMENTS].to("cpu").contiguous()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prefix_namespace(fingerprint: str, cache_config: CacheConfig, dtype: torch.dtype, chunk_size: int) -> bytes:
    """The digest every chunk chain of this model + settings starts from."""
    if cache_config.group_size is None:
        raise ValueError("`cache_config.group_size` is unresolved; pass `cache_config.for_model(...)`")
    described = {
        "model": fingerprint,
        # the budget bounds a live cache; chunks made under any budget are the same bytes
        "cache": {k: v for k, v in dataclasses.asdict(cache_config).items() if k != "max_size_mb"},
        "dtype": str(dtype),
        "chunk_size": chunk_size,
    }
    return _digest(b"hf_kvcache_plugin/prefix/v1", json.dumps(described, sort_keys=True, default=str).encode())


def chunk_keys(namespace: bytes, token_ids: Sequence[int] | torch.Tensor, chunk_size: int) -> list[bytes]:
    """Chained keys of every full chunk of ``token_ids``: key k names tokens [0, (k+1) * chunk_size)."""
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` has to be a positive integer but got {chunk_size}")
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"`token_ids` has to be 1-d (one prompt) but got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    # little-endian int64: the same bytes on every platform
    ids = np.asarray(token_ids, dtype="<i8")
    keys, parent = [], namespace
    for start in range(0, len(ids) - chunk_size + 1, chunk_size):
        parent = _digest(parent, ids[start : start + chunk_size].tobytes())
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class PrefixEntry:
    """One chunk's quantized K/V for every layer, each of logical shape [1, H, chunk/G, G, D]."""

    key: bytes
    parent: bytes | None  # the previous chunk's key; None for the first chunk of a prompt
    num_tokens: int
    keys: tuple[QuantizedTensor, ...]
    values: tuple[QuantizedTensor, ...]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError(
                f"a PrefixEntry needs key and value blocks for the same layers but got {len(self.keys)} and "
                f"{len(self.values)}"
            )
        for q in self.keys + self.values:
            tokens = q.shape[2] * q.shape[3] if len(q.shape) == 5 else -1
            if q.shape[0] != 1 or tokens != self.num_tokens:
                raise ValueError(
                    f"a PrefixEntry holds one prompt's chunk of {self.num_tokens} tokens as blocks "
                    f"[1, H, n, G, D] but got blocks of shape {q.shape}"
                )

    @property
    def nbytes(self) -> int:
        """Every tensor byte the entry holds: packed codes, scales and zeros of all layers."""
        return sum(q.nbytes for q in self.keys + self.values)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def to(self, device: torch.device | str) -> "PrefixEntry":
        device = torch.device(device)
        if self.device == device:
            return self
        move = lambda t: t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            keys=tuple(q.map_tensors(move) for q in self.keys),
            values=tuple(q.map_tensors(move) for q in self.values),
        )


@dataclass
class PrefixMatch:
    """Result of a longest-prefix lookup."""

    chunk_keys: list[bytes]  # keys of every full chunk of the prompt, hit or not
    entries: list[PrefixEntry]  # the hit chain, first chunk first
    chunk_size: int
    pinned: bool = False

    @property
    def num_tokens(self) -> int:
        """Prompt tokens covered by the hit chain."""
        return len(self.entries) * self.chunk_size

    @property
    def hit_keys(self) -> list[bytes]:
        return [e.key for e in self.entries]


@dataclass(frozen=True)
class PrefixEntryInfo:
    """One stored entry as ``PrefixStore.entry_infos`` lists it (a snapshot, no tensors)."""

    key: bytes
    parent: bytes | None  # the previous chunk's key; None for a prompt's first chunk
    nbytes: int
    last_used: int  # a store tick: larger is more recent
    hits: int
    pins: int


@dataclass
class _Slot:
    entry: PrefixEntry
    nbytes: int
    last_used: int
    hits: int = 0
    pins: int = 0
    children: set[bytes] = field(default_factory=set)


class PrefixStore:
    """Byte-budgeted, thread-safe map from chained chunk keys to quantized KV of that chunk.

    Args:
        max_size_mb: budget in MiB of tensor bytes.
        chunk_size: tokens per chunk (a multiple of the cache's group size; checked by the hook).
        eviction: ``lru`` or ``lfu`` (least hits first, least recently used among equals).
        device: where entries live (``cpu`` by default); hits are copied to the cache's device.
        on_evict: called with ``(entry, reason)`` for every entry that leaves the store
            (``"budget"``, ``"orphan"``: its parent left, ``"clear"``).
    """

    def __init__(
        self,
        max_size_mb: float = PrefixStoreConfig.max_size_mb,
        chunk_size: int = PrefixStoreConfig.chunk_size,
        eviction: str = PrefixStoreConfig.eviction,
        device: str | torch.device = PrefixStoreConfig.device,
        on_evict: Callable[[PrefixEntry, str], None] | None = None,
    ):
        # the dataclass is the one place defaults and checks live
        PrefixStoreConfig(chunk_size=chunk_size, max_size_mb=max_size_mb, eviction=eviction, device=str(device))
        self.chunk_size = chunk_size
        self.eviction = eviction
        self.device = torch.device(device)
        self.on_evict = on_evict
        self._max_bytes = int(max_size_mb * MIB)
        self._slots: dict[bytes, _Slot] = {}
        self._used_bytes = 0
        self._tick = 0
        self._lock = StoreLock()
        self._counters = dict.fromkeys(
            ("lookups", "hit_chunks", "missed_chunks", "puts", "duplicate_puts", "rejected_puts", "evictions"), 0
        )
        self._evicted_bytes = 0

    @classmethod
    def from_config(cls, config: PrefixStoreConfig | PluginConfig, **kwargs: Any) -> "PrefixStore":
        """Build from ``load_config(path)`` (its ``prefix_store:`` section) or a ``PrefixStoreConfig``."""
        if isinstance(config, PluginConfig):
            if config.prefix_store is None:
                raise ValueError("the config has no `prefix_store:` section")
            config = config.prefix_store
        if not isinstance(config, PrefixStoreConfig):
            raise ValueError(f"`config` has to be a PluginConfig or PrefixStoreConfig but got {type(config).__name__}")
        return cls(config.max_size_mb, config.chunk_size, config.eviction, config.device, **kwargs)

    # ------------------------------------------------------------------ sizes
    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def max_size_mb(self) -> float:
        return self._max_bytes / MIB

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._slots.values() if s.pins)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    # ------------------------------------------------------------------ lookup
    def lookup(
        self,
        namespace: bytes,
        token_ids: Sequence[int] | torch.Tensor,
        *,
        max_tokens: int | None = None,
        pin: bool = False,
    ) -> PrefixMatch:
        """Longest stored chain of full chunks that prefixes ``token_ids`` (at most ``max_tokens`` tokens).

        With ``pin=True`` the hit entries stay in the store until ``release(match)``.
        """
        keys = chunk_keys(namespace, token_ids, self.chunk_size)
        limit = len(keys) if max_tokens is None else min(len(keys), max(0, max_tokens) // self.chunk_size)
        with self._lock:
            entries = []
            for key in keys[:limit]:
                slot = self._slots.get(key)
                if slot is None:
                    break
                entries.append(slot.entry)
            self._counters["lookups"] += 1
            self._counters["hit_chunks"] += len(entries)
            self._counters["missed_chunks"] += limit - len(entries)
            # leaf first: the chain's first chunk ends up the most recently used
            for entry in reversed(entries):
                slot = self._slots[entry.key]
                slot.hits += 1
                slot.last_used = self._next_tick()
                if pin:
                    slot.pins += 1
        return PrefixMatch(chunk_keys=keys, entries=entries, chunk_size=self.chunk_size, pinned=pin)

    def get(self, key: bytes) -> PrefixEntry | None:
        """The entry under ``key`` (no recency update), or None."""
        slot = self._slots.get(key)
        return None if slot is None else slot.entry

    def entry_infos(self) -> list[PrefixEntryInfo]:
        """Every stored entry's key, parent, size, recency, hits and pins (no recency update)."""
        with self._lock:
            return [
                PrefixEntryInfo(key, slot.entry.parent, slot.nbytes, slot.last_used, slot.hits, slot.pins)
                for key, slot in self._slots.items()
            ]

    def accounting_problems(self) -> list[str]:
        """What is inconsistent in one snapshot: the byte total against the recorded and the measured
        entry bytes, and entries whose parent chunk is gone. Empty when all is well."""
        with self._lock:
            used = self._used_bytes
            held = sum(slot.nbytes for slot in self._slots.values())
            measured = sum(slot.entry.nbytes for slot in self._slots.values())
            orphans = [
                key.hex()[:12]
                for key, slot in self._slots.items()
                if slot.entry.parent is not None and slot.entry.parent not in self._slots
            ]
        problems = []
        if used != held or held != measured:
            problems.append(f"used_bytes {used} != recorded entry bytes {held} != measured entry bytes {measured}")
        if orphans:
            problems.append(f"{len(orphans)} entries whose parent chunk is gone: {orphans[:5]}")
        return problems

    # ------------------------------------------------------------------ pinning
    def pin(self, keys: Iterable[bytes]) -> None:
        """Keep these entries from eviction until ``unpin``; each pin needs its own unpin."""
        with self._lock:
            keys = list(keys)
            missing = [k.hex()[:16] for k in keys if k not in self._slots]
            if missing:
                raise ValueError(f"cannot pin keys that are not stored: {missing}")
            for key in keys:
                self._slots[key].pins += 1

    def unpin(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                slot = self._slots.get(key)
                if slot is None or slot.pins == 0:
                    raise ValueError(f"key {key.hex()[:16]} is not pinned")
                slot.pins -= 1
            # what pins held above the budget (or cut off from its parent) can go now
            self._evict_orphans()
            self._evict_to(self._max_bytes)

    def release(self, match: PrefixMatch) -> None:
        """Unpin the entries a ``lookup(..., pin=True)`` pinned."""
        if match.pinned:
            match.pinned = False
            self.unpin(match.hit_keys)

    @contextmanager
    def pinned(self, keys: Iterable[bytes]) -> Iterator[None]:
        keys = list(keys)
        self.pin(keys)
        try:
            yield
        finally:
            self.unpin(keys)

    # ------------------------------------------------------------------ insert
    def put(self, entry: PrefixEntry) -> bool:
        """Store one chunk; see ``put_chain``."""
        return self.put_chain([entry]) == 1

    def put_chain(self, entries: Sequence[PrefixEntry]) -> int:
        """Store chunks of one prompt, first chunk first; returns how many are now stored.

        An entry is refused (and counted in ``rejected_puts``, with a warning)
        when its parent is not stored, when it alone exceeds the budget, or when
        pinned entries leave no room; the chunks after it are refused too, since
        nothing could reach them.
        """
        stored = 0
        with self._lock:
            held: list[bytes] = []  # chunks of this chain stay pinned until the chain is in
            try:
                for i, entry in enumerate(entries):
                    reason = self._insert(entry)
                    if reason is not None:
                        self._reject(entries[i:], reason)
                        break
                    self._slots[entry.key].pins += 1
                    held.append(entry.key)
                    stored += 1
            finally:
                for key in held:
                    self._slots[key].pins -= 1
                # leaf first, as in `lookup`
                for key in reversed(held):
                    self._slots[key].last_used = self._next_tick()
        return stored

    def _insert(self, entry: PrefixEntry) -> str | None:
        """Add one entry; returns why it was refused, or None."""
        if entry.num_tokens != self.chunk_size:
            raise ValueError(f"this store holds chunks of {self.chunk_size} tokens but the entry has {entry.num_tokens}")
        self._counters["puts"] += 1
        if entry.key in self._slots:
            self._counters["duplicate_puts"] += 1
            return None
        if entry.parent is not None and entry.parent not in self._slots:
            return "its parent chunk is not stored"
        nbytes = entry.nbytes
        if nbytes > self._max_bytes:
            return f"it needs {nbytes} bytes and the budget is {self._max_bytes}"
        parent = self._slots.get(entry.parent) if entry.parent is not None else None
        if parent is not None:
            # the chain the entry extends must survive the room-making
            parent.pins += 1
        try:
            self._evict_to(self._max_bytes - nbytes)
        finally:
            if parent is not None:
                parent.pins -= 1
        if self._used_bytes + nbytes > self._max_bytes:
            return f"pinned entries hold {self.pinned_bytes} of the {self._max_bytes} budget bytes"
        self._slots[entry.key] = _Slot(entry.to(self.device), nbytes, self._next_tick())
        if entry.parent is not None:
            self._slots[entry.parent].children.add(entry.key)
        self._used_bytes += nbytes
        return None

    def _reject(self, entries: Sequence[PrefixEntry], reason: str) -> None:
        self._counters["rejected_puts"] += len(entries)
        logger.warning("prefix store refused %d chunk(s): %s", len(entries), reason)

    # ------------------------------------------------------------------ budget
    def resize(self, new_size_mb: float) -> int:
        """Set the budget; evicts unpinned entries until under it. Returns how many entries left.

        If pinned entries alone exceed the new budget the store stays above it
        until they are unpinned, and then trims itself.
        """
        if (
            not isinstance(new_size_mb, (int, float)) or isinstance(new_size_mb, bool)
            or not 0 <= new_size_mb <= MAX_SIZE_MB  # NaN too
        ):  # fmt: skip
            raise ValueError(f"`new_size_mb` has to be a number in [0, {MAX_SIZE_MB:g}] but got {new_size_mb!r}")
        with self._lock:
            before = self._counters["evictions"]
            self._max_bytes = int(new_size_mb * MIB)
            self._evict_to(self._max_bytes)
            return self._counters["evictions"] - before

    def clear(self) -> int:
        """Drop every unpinned entry; returns how many left."""
        with self._lock:
            in_use = set()  # pinned chunks and every chunk they extend, walked up once per pin
            for key in [k for k, s in self._slots.items() if s.pins]:
                while key is not None and key in self._slots and key not in in_use:
                    in_use.add(key)
                    key = self._slots[key].entry.parent
            victims = [k for k in self._slots if k not in in_use]
            for key in victims:
                if key in self._slots:
                    self._remove(key, "clear")
            return len(victims)

    def remove(self, keys: Iterable[bytes], reason: str = "removed") -> int:
        """Remove ``keys`` and the chunks extending them; returns the bytes freed.

        Keys not stored are skipped, and so are pinned ones and those a pinned
        chunk extends (in use). ``on_evict`` hears ``reason`` for each removed
        key and ``"orphan"`` for what extended it.
        """
        with self._lock:
            before = self._used_bytes
            for key in keys:
                slot = self._slots.get(key)
                if slot is None or slot.pins or self._pinned_below(key):
                    continue
                self._remove(key, reason)
            return before - self._used_bytes

    def _evict_to(self, target_bytes: int) -> None:
        if self._used_bytes <= target_bytes:
            return
        # LRU: oldest first; LFU: fewest hits first, then oldest
        if self.eviction == "lru":
            order = lambda item: item[1].last_used  # noqa: E731
        else:
            order = lambda item: (item[1].hits, item[1].last_used)  # noqa: E731
        for key, slot in sorted(self._slots.items(), key=order):
            if self._used_bytes <= target_bytes:
                break
            if key in self._slots and not slot.pins and not self._pinned_below(key):
                self._remove(key, "budget")

    def _pinned_below(self, key: bytes) -> bool:
        """Whether a chunk extending this one is pinned (then this one is in use too)."""
        stack = list(self._slots[key].children)
        while stack:
            slot = self._slots.get(stack.pop())
            if slot is not None:
                if slot.pins:
                    return True
                stack.extend(slot.children)
        return False

    def _remove(self, key: bytes, reason: str) -> None:
        """Remove ``key`` and every chunk extending it: without it they are unreachable.

        Iterative (a chain of thousands of chunks is one long path), and leaf first, so every entry leaves
        after the chunks extending it. ``on_evict`` runs once the store's lock is released (``StoreLock``)."""
        subtree, stack = [], [key]
        while stack:  # pre-order: each key before the chunks extending it
            current = stack.pop()
            subtree.append(current)
            stack.extend(child for child in self._slots[current].children if child in self._slots)
        parent = self._slots[key].entry.parent
        if parent is not None and parent in self._slots:
            self._slots[parent].children.discard(key)
        for current in reversed(subtree):
            slot = self._slots.pop(current)
            self._used_bytes -= slot.nbytes
            self._evicted_bytes += slot.nbytes
            self._counters["evictions"] += 1
            if self.on_evict is not None:
                self._lock.after_release(self.on_evict, slot.entry, reason if current == key else "orphan")

    def _evict_orphans(self) -> None:
        orphans = [
            k for k, s in self._slots.items() if s.entry.parent is not None and s.entry.parent not in self._slots
        ]
        for key in orphans:
            if key in self._slots and not self._slots[key].pins and not self._pinned_below(key):
                self._remove(key, "orphan")

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Counters and exact byte figures."""
        with self._lock:
            looked_up = self._counters["hit_chunks"] + self._counters["missed_chunks"]
            return {
                "entries": len(self._slots),
                "used_bytes": self._used_bytes,
                "max_bytes": self._max_bytes,
                "pinned_bytes": self.pinned_bytes,
                "evicted_bytes": self._evicted_bytes,
                "chunk_hit_rate": self._counters["hit_chunks"] / looked_up if looked_up else 0.0,
                "chunk_size": self.chunk_size,
                "eviction": self.eviction,
                "device": str(self.device),
                **self._counters,
            }

