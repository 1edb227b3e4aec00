"""The live cache's byte budget: what each layer holds, what an update would make it hold, the refusal.

``QuantizedKVCache(max_size_mb=...)`` / ``resize(new_size_mb)`` set a budget
in MiB (2**20 bytes) for every byte the cache holds: packed codes, scales,
zeros, sinks, the residual window, blocks kept exact and full-precision
layers (``get_stats()["total_bytes"]``). Before an update appends anything,
the bytes the cache will hold once the update and its flush are done are
predicted exactly (``QuantizedKVLayer.nbytes_after_append``: the same path
through sinks, window, blocks and mixed-precision aging; a block that cannot
be quantized and is kept exact is the one thing not foreseen). If that is
over the budget the update is refused with ``CacheBudgetExceeded`` and
nothing is appended.

A model's forward step updates every layer in turn, so the whole step is
admitted at its first layer: a refusal then never leaves layers of different
lengths behind, and the step's other layers are not checked again (about
0.5 ms a step for 32 layers on a CPU, and nothing without a budget). The
incoming K/V of a step pass through in full precision before their blocks
are quantized; the budget bounds what stays.

Getting smaller to fit first (re-packing old blocks to fewer bits, dropping
middle blocks) is ``shrink``'s, by ``cache.budget_policy``; this module's
refusal is what is left when that is not allowed or not enough.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from .config.validation import MAX_SIZE_MB
from .errors import KVCacheError
from .layer import EMPTY_LAYER_STATS, QuantizedKVLayer, tensor_nbytes

__all__ = [
    "MIB", "CacheBudgetExceeded", "budget_problem", "check_budget", "layer_nbytes", "layer_nbytes_after", "layer_stats",
]

MIB = 2**20


class CacheBudgetExceeded(KVCacheError, RuntimeError):
    """An update would make the cache hold more than its byte budget; nothing was appended.

    ``budget_bytes``, ``needed_bytes`` (held after the update) and
    ``held_bytes`` (now) say by how much.
    """

    code = "cache_budget_exceeded"
    detail_fields = ("budget_bytes", "needed_bytes", "held_bytes")

    def __init__(self, message: str, *, budget_bytes: int, needed_bytes: int, held_bytes: int):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.needed_bytes = needed_bytes
        self.held_bytes = held_bytes


def budget_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is no budget in MiB (a positive finite number up to ``MAX_SIZE_MB``), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"`{name}` has to be a positive finite number of MiB (2**20 bytes) but got {value!r}"
    if value > MAX_SIZE_MB:
        return f"`{name}` has to be at most {MAX_SIZE_MB:g} MiB (1 PiB) but got {value!r}"
    return None


def layer_stats(layer: Any) -> dict[str, int]:
    """Byte accounting for our layers and for the full-precision layers we delegate to."""
    if isinstance(layer, QuantizedKVLayer):
        return layer.stats()
    held = layer_nbytes(layer)
    seq = layer.get_seq_length() if isinstance(layer, CacheLayerMixin) else 0
    return {**dict.fromkeys(EMPTY_LAYER_STATS, 0), "seq_length": seq, "residual_bytes": held, "fp_bytes": held}


def layer_nbytes(layer: Any) -> int:
    """Every byte a layer holds (a ``DummyLayer`` holds none)."""
    if isinstance(layer, QuantizedKVLayer):
        return layer.nbytes
    if not getattr(layer, "is_initialized", False):
        return 0
    return tensor_nbytes(getattr(layer, "keys", None)) + tensor_nbytes(getattr(layer, "values", None))


def layer_nbytes_after(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
    """What ``layer`` will hold once it has taken ``key_states`` / ``value_states`` ``[B, H, n, D]``."""
    if isinstance(layer, QuantizedKVLayer):
        return layer.nbytes_after_append(key_states, value_states)
    if not isinstance(layer, CacheLayerMixin):
        return 0  # a DummyLayer stores nothing
    incoming = tensor_nbytes(key_states) + tensor_nbytes(value_states)
    held = layer_nbytes(layer)
    if isinstance(layer, DynamicSlidingWindowLayer) and not layer.record_past:
        n = key_states.shape[-2]
        held_tokens = layer.keys.shape[-2] if layer.is_initialized else 0
        # it keeps the last `sliding_window - 1` tokens
        kept = min(held_tokens + n, layer.sliding_window - 1)
        return incoming // n * kept if n else held
    return held + incoming


def check_budget(
    layers: Sequence[Any], after: dict[int, int], budget_bytes: int | None, what: str, detail: str = ""
) -> None:
    """Refuse (``CacheBudgetExceeded``) when the layers, ``after[i]`` bytes for each layer ``i`` named there and
    what they hold now for the others, would exceed ``budget_bytes``; ``detail`` says what was tried first."""
    if budget_bytes is None:
        return
    held = [layer_nbytes(layer) for layer in layers]
    needed = sum(held) + sum(after[i] - held[i] for i in after)
    if needed > budget_bytes:
        raise CacheBudgetExceeded(
            f"{what} is refused: the cache would hold {needed} bytes ({needed / MIB:.3f} MiB) but its budget "
            f"`max_size_mb` is {budget_bytes} bytes ({budget_bytes / MIB:.3f} MiB); it holds {sum(held)} bytes now"
            f"{' ' + detail if detail else ''}. "
            "Raise the budget (`resize`), or free the cache (`reset`, `crop`)",
            budget_bytes=budget_bytes,
            needed_bytes=needed,
            held_bytes=sum(held),
        )
