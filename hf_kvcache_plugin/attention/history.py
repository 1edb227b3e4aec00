"""What attention reads from a quantized layer, and how the cache hands a decode step over.

The model's attention function is called by transformers, not by the cache, so
the way from ``QuantizedKVCache.update`` to it is something the model passes to
both. Since transformers 5.24 that is the attention kwargs dict (``update(...,
kwargs=...)``): the cache puts one ``FusedStep`` there under ``FUSED_STEP_KEY``.
Older models call ``update(key, value, layer_idx)`` alone, and then the step
rides on the key tensor ``update`` returns, which is the very tensor the model
hands its attention function (attribute ``FUSED_STEP_KEY``). ``kvquant_sdpa``
takes the step (``take_over``), reads ``step.history`` (anything with the
``QuantizedHistory`` shape, in practice a ``QuantizedKVLayer``) and calls
``step.finish()`` once it has read it, so the layer quantizes its full blocks
only after this step's exact tokens were used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union

import torch

from ..quantization import QuantizedTensor

__all__ = ["FUSED_STEP_KEY", "FusedStep", "QuantizedHistory", "Segment", "hand_over", "take_over"]

# key of the attention kwargs under which the cache hands a FusedStep to kvquant_sdpa
FUSED_STEP_KEY = "quantized_kv_step"

# (keys, values, n_tokens): dense [B, H, T, D] tensors, or quantized blocks [B, H, n, G, D]
Segment = tuple[Union[torch.Tensor, QuantizedTensor], Union[torch.Tensor, QuantizedTensor], int]


class QuantizedHistory(Protocol):
    """One layer's cached tokens as fused attention reads them."""

    num_heads: int  # key/value heads
    value_head_dim: int

    def attention_segments(self) -> list[Segment]:
        """The history oldest first: sinks, quantized tiers (aligned), residual window."""
        ...

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole history as dense keys and values (for the cases fused attention does not serve)."""
        ...


@dataclass(frozen=True)
class FusedStep:
    """One decode step of one layer, handed from the cache to the attention function."""

    history: QuantizedHistory
    finish: Callable[[], None]  # call once the history was read: the layer then flushes its full blocks
    cpu_kernel: bool = True  # CPU tensors may go through the C++ kernel (the cache's `cpu_kernel: auto`)


def hand_over(step: FusedStep, attention_kwargs: dict | None, key_states: torch.Tensor) -> None:
    """Through the attention kwargs when the model passed them to ``update``, else on the returned keys."""
    if attention_kwargs is not None:
        attention_kwargs[FUSED_STEP_KEY] = step
    else:
        setattr(key_states, FUSED_STEP_KEY, step)


def take_over(attention_kwargs: dict, key: torch.Tensor | None) -> FusedStep | None:
    """Remove and return the step the cache handed over (None: the cache is not ours, or this is a prefill)."""
    step = attention_kwargs.pop(FUSED_STEP_KEY, None)
    if step is None and key is not None:
        step = getattr(key, FUSED_STEP_KEY, None)
        if step is not None:
            # taken once: cleared with setattr, which torch.compile traces on tensors (delattr it does not)
            setattr(key, FUSED_STEP_KEY, None)
    return step
