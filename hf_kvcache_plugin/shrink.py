"""Getting a cache under its byte budget: re-pack the oldest blocks to fewer bits, then drop middle blocks.

When an update (or ``resize``) would leave the cache holding more than its
budget, ``fit_to_budget`` takes these steps in order, each only as far as it
has to, and measures each (blocks touched, bytes freed, seconds):

1. ``repack_8_to_4``: the oldest blocks held at 8 bits are re-packed to 4;
2. ``repack_4_to_2``: then the oldest blocks held at 4 bits to 2;
3. ``drop``: then the oldest blocks are dropped: what lies between the sinks
   (``sink_tokens``, kept exact) and the newest tokens (the residual window,
   kept exact) goes, oldest first, as StreamingLLM evicts;
4. otherwise the update is refused with ``CacheBudgetExceeded`` naming the
   budget, and nothing is appended.

``cache.budget_policy`` says which steps are allowed:

- ``refuse``: none (every block keeps its bits and tokens; over the budget is refused);
- ``repack`` (the default): 1 and 2;
- ``repack_then_drop``: 1, 2 and 3;
- ``repack_to_4_then_drop``: 1 and 3 (never below 4 bits: on stories260K
  dropping old tokens costs less perplexity than INT2, benchmarks/budget_quality.py);
- ``drop``: 3 only (the bits are fixed: an INT4 cache stays INT4).

A block is re-packed the way mixed-precision aging does it: dequantized from
its codes and encoded once at fewer bits. Each step runs at most once per
block (8 -> 4 once, 4 -> 2 once), so an INT8 block that ends at 2 bits was
re-quantized twice from codes, once more than mixed aging. With asymmetric
ranges that loses nothing measurable: each block keeps its min and max, and
the 2-bit levels are 4- and 8-bit levels, so 2 bits from INT4 codes have the
SQNR of 2 bits from the values to 0.01 dB (tests/test_cache_shrink.py). Keys and values of a layer are re-packed at the
same blocks when they have the same bits; when their bits differ their tiers
are cut at different blocks and fused attention reads that layer dequantized.

An update larger than the budget on its own (a long prompt) cannot make
room by shrinking what is held before it: its own new blocks have to shrink.
It is admitted when what the cache would hold with those blocks shrunk as
far as the policy goes (re-packed to 2 bits, or dropped) fits; it is
appended at its bits, its forward step reads it so, and the cache shrinks
to the budget, by the same steps, as soon as the step's last layer is in
(``QuantizedKVCache``). Only if even that smallest form is over the budget
is it refused, naming the budget and those bytes. Meanwhile, for the one
step, the cache holds more than its budget, as the step's incoming K/V
always do.

Dropped tokens leave a gap in the positions (``QuantizedKVLayer``): the held
keys keep the rotary rotation of their true positions and new tokens go on
from the number of tokens seen, as StreamingLLM without re-rotation does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .budget import check_budget, layer_nbytes, layer_nbytes_after
from .config import BUDGET_POLICIES
from .layer import QuantizedKVLayer
from .padding import move_sinks_past_padding

__all__ = ["BUDGET_POLICIES", "ShrinkLog", "budget_stats", "fit_to_budget", "smallest_nbytes_after"]

REPACK_STEPS = ((8, 4), (4, 2))
_STEPS_OF_POLICY = {
    "refuse": (),
    "repack": ("repack_8_to_4", "repack_4_to_2"),
    "repack_then_drop": ("repack_8_to_4", "repack_4_to_2", "drop"),
    "repack_to_4_then_drop": ("repack_8_to_4", "drop"),
    "drop": ("drop",),
}


@dataclass
class StepTotals:
    """What one kind of shrink step has done since the cache was made."""

    events: int = 0  # times the step ran
    blocks: int = 0  # blocks re-packed or dropped, keys and values counted apart, all layers
    bytes_freed: int = 0  # measured: bytes held before minus after
    seconds: float = 0.0


class ShrinkLog:
    """Per-step totals (``repack_8_to_4``, ``repack_4_to_2``, ``drop``) for ``get_stats()``."""

    def __init__(self) -> None:
        self.steps = {name: StepTotals() for name in _STEPS_OF_POLICY["repack_then_drop"]}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(totals) for name, totals in self.steps.items()}


def _quantized(layers: Sequence[Any]) -> list[QuantizedKVLayer]:
    return [layer for layer in layers if isinstance(layer, QuantizedKVLayer) and layer.is_initialized]


def _block_saving(layer: QuantizedKVLayer, stream: str, from_bits: int, to_bits: int | None) -> int:
    """Bytes one block of ``stream`` frees going from ``from_bits`` to ``to_bits`` (None: dropped)."""
    blocks = getattr(layer, f"quantized_{stream}")
    dim = layer.head_dim if stream == "keys" else layer.value_head_dim
    size = lambda bits: blocks.codec.block_nbytes(layer.batch_size, layer.num_heads, dim, layer.dtype, bits=bits)
    return size(from_bits) - (size(to_bits) if to_bits else 0)


def _repack(layers: list[QuantizedKVLayer], from_bits: int, to_bits: int) -> tuple[Callable[[int], int], int]:
    """(apply(k): re-pack the oldest k blocks at ``from_bits`` of every stream, blocks done; bytes per k)."""
    streams = [(layer, name) for layer in layers for name in ("keys", "values")
               if getattr(layer, f"quantized_{name}").blocks_at_bits(from_bits)]  # fmt: skip
    saving = sum(_block_saving(layer, name, from_bits, to_bits) for layer, name in streams)

    def apply(k: int) -> int:
        return sum(getattr(layer, f"quantized_{name}").repack_oldest(from_bits, to_bits, k) for layer, name in streams)

    return apply, saving


def _drop(layers: list[QuantizedKVLayer], left_padding: torch.Tensor | None) -> tuple[Callable[[int], int], int]:
    """(apply(k): drop the oldest k blocks of every layer, blocks done; bytes per k, at the oldest blocks' bits).
    ``left_padding``: padding tokens per row of a left-padded batch, whose rows keep their own sinks (``padding``)."""
    holding = [layer for layer in layers if layer.quantized_keys.num_blocks]
    saving = sum(
        _block_saving(layer, name, getattr(layer, f"quantized_{name}").tiers[0].bits, None)
        for layer in holding
        for name in ("keys", "values")
    )

    def apply(k: int) -> int:
        done = 0
        for layer in holding:
            n = min(k, layer.quantized_keys.num_blocks)
            if left_padding is not None:
                move_sinks_past_padding(layer, n, left_padding)
            layer.quantized_keys.drop_oldest(n)
            layer.quantized_values.drop_oldest(n)
            layer.dropped_tokens += n * layer.group_size
            done += 2 * n
        return done

    return apply, saving


def smallest_nbytes_after(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, policy: str) -> int:
    """What ``layer`` would hold once it has taken ``key_states`` / ``value_states`` and then shrunk as far as
    ``policy`` goes: every block dropped (a policy that drops), or every block at 2 bits (``repack``: 8 -> 4 -> 2
    reaches 2 from either). Layers the shrink steps do not touch keep what ``layer_nbytes_after`` says."""
    steps = _STEPS_OF_POLICY[policy]
    if not steps or not isinstance(layer, QuantizedKVLayer) or layer.is_sliding:
        return layer_nbytes_after(layer, key_states, value_states)
    dense, _, num_blocks = layer.append_footprint(key_states, value_states)
    if "drop" in steps:
        return dense
    b, h, _, d = key_states.shape
    floor = 0
    for name, dim in (("keys", d), ("values", value_states.shape[-1])):
        codec = (getattr(layer, f"quantized_{name}") if layer.is_initialized else layer.settings.blocks(name)).codec
        floor += num_blocks * codec.block_nbytes(b, h, dim, key_states.dtype, bits=REPACK_STEPS[-1][1])
    return dense + floor


def fit_to_budget(
    layers: Sequence[Any],
    after: Callable[[], dict[int, int]],
    budget_bytes: int | None,
    policy: str,
    log: ShrinkLog,
    what: str,
    smallest: Callable[[], dict[int, int]] | None = None,
    left_padding: torch.Tensor | None = None,
) -> bool:
    """Shrink ``layers`` until what they will hold (``after()``: bytes per layer about to change, as
    ``check_budget`` takes it) fits ``budget_bytes``, by the steps ``policy`` allows; else refuse.

    ``smallest()``: what the layers about to change would hold once the update is in and they have shrunk as far
    as the policy goes (``smallest_nbytes_after``). An update whose own new blocks have to shrink to fit (a
    prompt larger than the budget) is then admitted when that fits: True is returned, and the caller shrinks
    the cache (``fit_to_budget`` with nothing about to change) once the update is in. ``left_padding``: see
    ``padding``."""
    if budget_bytes is None:
        return False

    def needed() -> int:
        planned = after()
        return sum(planned[i] if i in planned else layer_nbytes(layer) for i, layer in enumerate(layers))

    need = needed()
    for name in _STEPS_OF_POLICY[policy]:
        while need > budget_bytes:
            quantized = _quantized(layers)
            if name == "drop":
                apply, saving = _drop(quantized, left_padding)
            else:
                from_bits, to_bits = (8, 4) if name == "repack_8_to_4" else (4, 2)
                apply, saving = _repack(quantized, from_bits, to_bits)
            if saving <= 0:
                break  # nothing left at these bits
            held = sum(layer_nbytes(layer) for layer in layers)
            started = time.perf_counter()
            # the least blocks per stream that would cover the excess; aging or a block kept exact can make it
            # fall short, so the loop measures again
            done = apply(math.ceil((need - budget_bytes) / saving))
            totals = log.steps[name]
            totals.seconds += time.perf_counter() - started
            totals.events += 1
            totals.blocks += done
            totals.bytes_freed += held - sum(layer_nbytes(layer) for layer in layers)
            need = needed()
    allowed = _STEPS_OF_POLICY[policy]
    shrunk = f"after the shrink steps {list(allowed)} of `budget_policy` {policy!r} ran out" if allowed else (
        f"`budget_policy` is {policy!r} (nothing is re-packed or dropped)")
    if need > budget_bytes and smallest is not None and allowed:
        own = "dropped" if "drop" in allowed else "re-packed to 2 bits"
        check_budget(layers, smallest(), budget_bytes, what, detail=f"{shrunk}, even with its own new blocks {own}")
        return True
    check_budget(layers, after(), budget_bytes, what, detail=shrunk)
    return False


def budget_stats(layers: Sequence[Any], policy: str, log: ShrinkLog) -> dict[str, Any]:
    """``get_stats()["budget"]``: the policy, tokens held at each bit width (summed over layers, keys and values
    apart), what was dropped, and each shrink step's totals."""
    quantized = _quantized(layers)
    at_bits: dict[str, dict[int, int]] = {}
    for name in ("keys", "values"):
        counts: dict[int, int] = {}
        for layer in quantized:
            for tier in getattr(layer, f"quantized_{name}").tiers:
                counts[tier.bits] = counts.get(tier.bits, 0) + tier.shape[2] * layer.group_size
        at_bits[name] = dict(sorted(counts.items(), reverse=True))
    return {
        "policy": policy,
        "tokens_at_bits": at_bits,
        "dropped_tokens": max((layer.dropped_tokens for layer in quantized), default=0),
        "dropped_blocks": sum(layer.dropped_tokens // layer.group_size for layer in quantized),
        "steps": log.as_dict(),
    }
