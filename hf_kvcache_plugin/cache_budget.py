"""``QuantizedKVCache``'s byte budget: ``resize``, admitting each step (module ``budget``), shrinking to fit
(module ``shrink``), and the left padding that drops need (module ``padding``).

A mixin of ``QuantizedKVCache``: it reads the cache's ``layers``,
``cache_config``, ``_first_layer`` and the step bookkeeping the cache's
constructor sets (``_admitted_step``, ``_shrink_log``, ``_shrink_after_layer``,
``_left_padding``).

When a step is admitted: a model's forward step asks for the mask sizes
(``get_mask_sizes``) before any layer updates, and a step that has to shrink
the cache does it there, so that the mask is built for what the step
attends to; the step's first layer then finds it admitted. A lone layer
update (``store``, a caller's own ``update``) is admitted when it comes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._compat import DummyLayer
from .budget import MIB, budget_problem, layer_nbytes, layer_nbytes_after
from .layer import QuantizedKVLayer
from .padding import left_padding_counts
from .shrink import fit_to_budget, smallest_nbytes_after

__all__ = ["BudgetedCache"]

logger = logging.getLogger(__name__)


class BudgetedCache:
    """The byte-budget half of ``QuantizedKVCache`` (see the module docstring)."""

    @property
    def max_size_mb(self) -> float | None:
        """The byte budget in MiB (2**20 bytes); None: unbounded."""
        return self.cache_config.max_size_mb

    @property
    def budget_bytes(self) -> int | None:
        return None if self.max_size_mb is None else int(self.max_size_mb * MIB)

    def resize(self, new_size_mb: float) -> None:
        """Set the byte budget to ``new_size_mb`` MiB (what ``create_adaptive_sizer(resize_callback=cache.resize)``
        calls). Only the number changes here, so any thread may call it (the sizer's runs beside ``generate``, and
        re-packing under a forward step would pull its history away). The next update, on the model's thread, is
        admitted against the new budget: the cache shrinks then as ``budget_policy`` allows, or the update is refused
        (``CacheBudgetExceeded``). ``shrink_to_budget()`` shrinks at once, between forward steps.
        """
        problem = budget_problem("new_size_mb", new_size_mb)
        if problem:
            raise ValueError(problem)
        self.cache_config = dataclasses.replace(self.cache_config, max_size_mb=float(new_size_mb))
        self._admitted_step = (set(), None)
        held = sum(layer_nbytes(layer) for layer in self.layers)
        if held > self.budget_bytes:
            logger.warning(
                "cache budget set to %d bytes (%.3f MiB) while the cache holds %d bytes: the next update shrinks it "
                "(budget_policy %r) or is refused", self.budget_bytes, new_size_mb, held,
                self.cache_config.budget_policy,
            )  # fmt: skip

    def shrink_to_budget(self) -> None:
        """Shrink the cache under its budget now, as ``budget_policy`` allows, or raise ``CacheBudgetExceeded``
        (what was shrunk stays shrunk). Call it between forward steps, on the thread that runs the model."""
        self._admit(lambda: {}, f"holding the cache under {self.max_size_mb} MiB")

    def _admit(
        self, after: Callable[[], dict[int, int]], what: str, smallest: Callable[[], dict[int, int]] | None = None
    ) -> bool:
        """Make room for what ``after()`` predicts (bytes per layer about to change), shrinking as the policy
        allows, or refuse. ``after`` is called again after each shrink step: shrinking changes the prediction.
        True: admitted only with its own new blocks shrunk (``smallest``; see ``fit_to_budget``), so the caller
        shrinks once the update is in."""
        # whatever is admitted now changes what an earlier admission foresaw: its remaining layers are checked again
        self._admitted_step = (set(), None)
        policy = self.cache_config.budget_policy
        return fit_to_budget(self.layers, after, self.budget_bytes, policy, self._shrink_log, what, smallest,
                             self._left_padding)  # fmt: skip

    def set_left_padding(self, attention_mask: torch.Tensor | Sequence[int] | None) -> None:
        """Declare the left padding of the batch this cache holds: the ``[batch, length]`` attention mask given to
        ``generate`` (or the padding tokens per row; None: none). Only drops (``budget_policy``) read it: each row
        then keeps its own first tokens as sinks and loses its padding first (module ``padding``). Batch
        selection, reordering and repetition keep it in step; ``reset`` forgets it."""
        self._left_padding = left_padding_counts(attention_mask)

    def reset(self) -> None:
        super().reset()
        self._left_padding = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._left_padding is not None:
            self._left_padding = self._left_padding[beam_idx.cpu()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self._left_padding is not None:
            self._left_padding = self._left_padding.repeat_interleave(repeats)

    def _shrink_after_step(self) -> None:
        """The step admitted with its own blocks shrunk is in: shrink the cache to its budget now."""
        self._shrink_after_layer = None
        self._admit(lambda: {}, f"holding the cache under {self.max_size_mb} MiB after a step larger than it")

    def get_mask_sizes(self, query_length: int, *args: Any, **kwargs: Any) -> tuple[int, int]:
        # the model builds the step's mask from these sizes before any layer updates: a step that has to shrink the
        # cache (drop blocks) does it now, so that the mask's columns are those of what the step attends to (a
        # drop later in the step would leave the mask one drop behind: padding read at the wrong columns)
        if self.max_size_mb is not None and isinstance(query_length, int) and query_length > 0:
            self._admit_step_of(query_length)
        return super().get_mask_sizes(query_length, *args, **kwargs)

    def _admit_step_of(self, query_length: int) -> None:
        """Admit the coming forward step of ``query_length`` tokens, from the shapes the layers hold."""
        held = next((layer for layer in self.layers if isinstance(layer, QuantizedKVLayer) and layer.is_initialized
                     and not layer.is_sliding), None)  # fmt: skip
        if held is None:
            return  # a prefill: nothing held yet, so nothing dropped under the mask
        shape = (held.batch_size, held.num_heads, query_length)
        key_states = torch.empty(*shape, held.head_dim, dtype=held.dtype, device="meta")
        value_states = torch.empty(*shape, held.value_head_dim, dtype=held.dtype, device="meta")
        self._admit_update(self._first_layer, key_states, value_states)
        self._admitted_step[0].add(self._first_layer)  # its own update need not be admitted again

    def _admit_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.max_size_mb is None:
            return
        shapes = (key_states.shape, value_states.shape)
        pending, admitted_shapes = self._admitted_step
        if layer_idx in pending and shapes == admitted_shapes:
            pending.discard(layer_idx)  # admitted with its step, and untouched since
            return
        # A forward step updates every layer in turn: it is admitted whole at its first layer, so that a refusal
        # never leaves layers of different lengths (later layers take K/V of the first one's shape).
        step: Iterable[int] = range(len(self.layers)) if layer_idx == self._first_layer else (layer_idx,)
        step = list(step)
        after = lambda: {i: layer_nbytes_after(self.layers[i], key_states, value_states) for i in step}
        policy = self.cache_config.budget_policy
        smallest = lambda: {i: smallest_nbytes_after(self.layers[i], key_states, value_states, policy) for i in step}
        what = f"layer {layer_idx}: an update of {key_states.shape[-2]} token(s)"
        if self._admit(after, what + (f" for each of the {len(step)} layers" if len(step) > 1 else ""), smallest):
            self._shrink_after_layer = max(i for i in step if not isinstance(self.layers[i], DummyLayer))
        if len(step) > 1:
            self._admitted_step = (set(step) - {layer_idx}, shapes)
