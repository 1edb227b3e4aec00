"""``StaticQuantizedKVLayer``: one layer's quantized K/V in buffers of fixed shape, for ``torch.compile``.

``QuantizedKVLayer`` grows its tensors as tokens arrive, so a compiled decode
step meets new shapes and recompiles. This layer allocates everything once,
for ``max_cache_len`` tokens, as ``transformers.StaticLayer`` does, and every
step runs the same operations on the same shapes, whatever the position:

- ``key_blocks`` / ``value_blocks``: the quantized blocks of G tokens, one
  slot per block of the capacity plus a scratch slot, packed as
  ``QuantizedKVLayer`` packs them (same codec: the same bits for the same
  tokens);
- a ring of the newest tokens in full precision (``residual_length + 2 G``
  slots, plus ``croppable_tokens``), written at ``position % ring size``;
- ``cumulative_length``: tokens seen, a 0-d tensor (a Python int would be a
  constant of the compiled graph).

The layout in time is ``QuantizedKVLayer``'s: tokens before the boundary
``Q(n) = max(0, (n - residual_length) // G) * G`` are quantized, the rest are
exact, and a step reads the boundary of the tokens it found (``Q(p0)``), so
both layers attend to the same values. A decode step writes its token into
the ring first and attention reads the ring as the window (a prompt, longer
than the ring, gets a window gathered from its own tokens). The blocks that
cross the boundary with a step are quantized from the exact tokens and
written to their slots. Most steps cross none: a compiled step branches inside
its graph (``torch.cond``: quantizing a block every step would cost a third
of the step), eager on the CPU looks and skips. Writing a block's slot again
rewrites the same codes (the same exact tokens), so a rewind by ``crop`` only
moves ``cumulative_length``.

A block that cannot be quantized (NaN/Inf, or a range beyond the scale dtype)
is stored as zeros, branch-free, and counted in ``unquantizable_blocks`` (a
tensor; ``stats()`` reads it and logs a warning). ``QuantizedKVLayer`` keeps
such a block exact instead; that needs storage of data-dependent size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import CacheLayerMixin

from .blocks import as_placeholders, unquantizable_mask
from .layer_inputs import batch_indices, check_key_value_states
from .layer_settings import LayerSettings
from .quantization import QuantizedTensor, unpack_codes
from .residual_window import tensor_nbytes

__all__ = ["DEFAULT_CROPPABLE_TOKENS", "StaticQuantizedKVLayer", "StepWindow"]

# tokens a `crop` may take back beyond a block (assisted and prompt-lookup decoding crop their rejected candidates)
DEFAULT_CROPPABLE_TOKENS = 64

logger = logging.getLogger(__name__)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def dense_blocks(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantized blocks [B, H, n, G, D] back to dense [B, H, n * G, D], in plain tensor ops (no ``out=``), so a
    compiled step fuses them."""
    codes = unpack_codes(q.data, q.bits).to(dtype)  # grouped layout: [..., n_groups, G]
    scale = q.scale.to(dtype).unsqueeze(-1)
    zero = scale * -(2 ** (q.bits - 1)) if q.zero is None else q.zero.to(dtype).unsqueeze(-1)
    grouped = codes * scale + zero
    return grouped.flatten(-2).movedim(-1, q.axis).flatten(2, 3)


class StepWindow(NamedTuple):
    """The exact tokens one step reads: slot ``i`` of ``keys`` / ``values`` [B, H, S, D] holds position
    ``positions[i]``, a token of the window where ``valid[i]``; tokens before ``boundary`` are read from the
    blocks; ``end`` tokens are held after the step. (Tensors all: a compiled step keeps its shapes.)"""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    boundary: torch.Tensor
    end: torch.Tensor

    def targets(self, total: int) -> torch.Tensor:
        """Each slot's position among ``total`` (the block slots' length); a slot outside the window goes to the
        last one, which is the scratch slot's and never read."""
        return torch.where(self.valid, self.positions, torch.full_like(self.positions, total - 1))


class StaticQuantizedKVLayer(CacheLayerMixin):
    """A quantized layer of fixed shapes for ``max_cache_len`` tokens (see the module docstring)."""

    is_compileable = True
    is_croppable = True
    is_sliding = False
    is_static = True  # kvquant_sdpa reads this layer with `static_attention`

    def __init__(self, settings: LayerSettings, max_cache_len: int, croppable_tokens: int = DEFAULT_CROPPABLE_TOKENS):
        super().__init__()
        self.settings = settings
        name = self._name()
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"`max_cache_len` has to be a positive int but got {max_cache_len!r}")
        if isinstance(croppable_tokens, bool) or not isinstance(croppable_tokens, int) or croppable_tokens < 0:
            raise ValueError(f"`croppable_tokens` has to be an int >= 0 but got {croppable_tokens!r}")
        if settings.sink_tokens:
            raise ValueError(f"{name}: the static cache keeps no sink tokens but got {settings.sink_tokens}")
        if settings.aged_bits is not None:
            raise ValueError(f"{name}: the static cache quantizes every block once; `mixed` is not supported")
        self.max_cache_len = max_cache_len
        g = settings.group_size
        self.num_blocks = -(-max_cache_len // g)  # block slots for the capacity; slot `num_blocks` is the scratch
        self.ring_size = settings.residual_length + 2 * g + croppable_tokens
        self.cumulative_length = torch.tensor(0, dtype=torch.long)
        self.unquantizable_blocks = torch.tensor(0, dtype=torch.long)
        self.holds_tokens = False  # a Python flag set once: constant over a compiled decode loop
        self._step: StepWindow | None = None

    def _name(self) -> str:
        return f"layer {self.settings.layer_idx}" if self.settings.layer_idx is not None else "this layer"

    @property
    def group_size(self) -> int:
        return self.settings.group_size

    @property
    def residual_length(self) -> int:
        return self.settings.residual_length

    # ------------------------------------------------------------------ buffers
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_key_value_states(self._name(), key_states, value_states)
        b, h, _, d = key_states.shape
        self.settings.check_shape(self._name(), h, d, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = b, h
        self.head_dim, self.value_head_dim = d, value_states.shape[-1]
        self._allocate()

    def _allocate(self) -> None:
        b, h, g, dtype, device = self.batch_size, self.num_heads, self.group_size, self.dtype, self.device
        slots = (self.num_blocks + 1) * g
        # blocks of zeros, encoded: the codec's own layout (what the kernels read), zeros read back as zeros
        self.key_blocks = self.settings.codec("keys").encode(torch.zeros(b, h, slots, self.head_dim, dtype=dtype,
                                                                         device=device))
        self.value_blocks = self.settings.codec("values").encode(torch.zeros(b, h, slots, self.value_head_dim,
                                                                             dtype=dtype, device=device))
        self.ring_keys = torch.zeros(b, h, self.ring_size, self.head_dim, dtype=dtype, device=device)
        self.ring_values = torch.zeros(b, h, self.ring_size, self.value_head_dim, dtype=dtype, device=device)
        self.cumulative_length = self.cumulative_length.to(device)
        self.unquantizable_blocks = self.unquantizable_blocks.to(device)
        if not _compiling():
            # fixed addresses: a compiled step (and CUDA graphs) may then hold these buffers as they are
            for t in self._buffers():
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _buffers(self) -> list[torch.Tensor]:
        found = [self.ring_keys, self.ring_values, self.cumulative_length, self.unquantizable_blocks]
        for q in (self.key_blocks, self.value_blocks):
            found += [q.data, q.scale] + ([] if q.zero is None else [q.zero])
        return found

    def _check_matches(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_key_value_states(self._name(), key_states, value_states)
        got = (*key_states.shape[:2], key_states.shape[-1], value_states.shape[-1], key_states.dtype, key_states.device)
        held = (self.batch_size, self.num_heads, self.head_dim, self.value_head_dim, self.dtype, self.device)
        if got != held or value_states.dtype != self.dtype:
            raise ValueError(f"{self._name()}: got key/value states with (batch, heads, head_dim, value head_dim, "
                             f"dtype, device) = {got} but this cache holds {held}")

    # ------------------------------------------------------------------ writing a step
    def _boundary(self, length: torch.Tensor) -> torch.Tensor:
        """Q(n): tokens before it are quantized, the newest at least ``residual_length`` exact."""
        g = self.group_size
        return torch.clamp((length - self.residual_length) // g, min=0) * g

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write this step's tokens: the blocks that cross the boundary are quantized, the ring takes the newest
        tokens, and the exact window this step reads is kept (``step_window``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif not _compiling():
            self._check_matches(key_states, value_states)
        key_states, value_states = key_states.detach(), value_states.detach()
        q, g, size = key_states.shape[-2], self.group_size, self.ring_size
        start = self.cumulative_length.clone()
        end = start + q
        if not _compiling() and int(end) > self.max_cache_len:
            raise ValueError(f"{self._name()}: {int(end)} tokens do not fit the static cache's max_cache_len "
                             f"({self.max_cache_len}); build it with a larger max_cache_len")
        boundary = self._boundary(start)
        n_blocks = -(-q // g)  # blocks [Q(start), Q(end)) lie among the first ceil(q / G) from the boundary
        short = q + self.residual_length + g <= size
        if short:
            # a short step (decode, a check of candidates): the ring takes the tokens first and is the window
            self._write_ring(key_states, value_states, end)
            slot = torch.arange(size, device=self.device)
            positions = end - 1 - (end - 1 - slot) % size  # the newest position each slot holds
            window = StepWindow(self.ring_keys, self.ring_values, positions, positions >= boundary, boundary, end)
        else:
            # a long step (a prompt): the window is gathered from the ring and the new tokens
            window = self._long_window(key_states, value_states, start, boundary, end)
        index = torch.arange(n_blocks, device=self.device)
        crosses = boundary + (index + 1) * g <= self._boundary(end)
        # Most steps cross no block. Eager on the CPU a look at `crosses` costs nothing and skips the work; a
        # compiled step branches inside its graph (torch.cond); eager on an accelerator, which would wait for the
        # look, quantizes anyway. Blocks that do not cross go to the scratch slot.
        if _compiling() or self.device.type != "cpu" or bool(crosses.any()):
            if short:
                block_slots = (boundary + torch.arange(n_blocks * g, device=self.device)) % size
                exact = (self.ring_keys.index_select(2, block_slots), self.ring_values.index_select(2, block_slots))
            else:
                exact = (window.keys[:, :, : n_blocks * g], window.values[:, :, : n_blocks * g])
            slots = torch.where(crosses, boundary // g + index, torch.full_like(index, self.num_blocks))
            if _compiling():
                encoded = torch.cond(crosses.any(), self._encode, self._encode_nothing, exact)
            else:
                encoded = self._encode(*exact)
            self._store_blocks(encoded, slots, crosses)
        if not short:
            self._write_ring(key_states, value_states, end)
        self.cumulative_length.add_(q)
        self._step = window
        if not self.holds_tokens:
            self.holds_tokens = True

    def _write_ring(self, key_states: torch.Tensor, value_states: torch.Tensor, end: torch.Tensor) -> None:
        q = key_states.shape[-2]
        kept = min(q, self.ring_size)  # a prompt longer than the ring leaves its newest tokens there
        slots = (end - kept + torch.arange(kept, device=self.device)) % self.ring_size
        self.ring_keys.index_copy_(2, slots, key_states[:, :, q - kept :])
        self.ring_values.index_copy_(2, slots, value_states[:, :, q - kept :])

    def _long_window(self, key_states, value_states, start, boundary, end) -> "StepWindow":
        """Positions ``boundary + arange(S)``, from the ring before ``start``, the new tokens after it, zeros past
        ``end``."""
        q = key_states.shape[-2]
        span = self.residual_length + self.group_size + q
        positions = boundary + torch.arange(span, device=self.device)
        from_ring = (positions < start).view(1, 1, span, 1)
        held = (positions < end).view(1, 1, span, 1)
        new_slot = (positions - start).clamp(0, q - 1)
        ring_slot = positions % self.ring_size
        window = []
        for ring, new in ((self.ring_keys, key_states), (self.ring_values, value_states)):
            exact = torch.where(from_ring, ring.index_select(2, ring_slot), new.index_select(2, new_slot))
            window.append(torch.where(held, exact, torch.zeros_like(exact)))
        return StepWindow(window[0], window[1], positions, positions < end, boundary, end)

    def _encode(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Whole blocks of exact tokens, encoded: (data, scale, zero, unquantizable) for keys, then for values
        (zero empty when symmetric). A block that cannot be quantized is encoded as zeros."""
        out: list[torch.Tensor] = []
        for tokens, stream in ((keys, "keys"), (values, "values")):
            encoded = self.settings.codec(stream).encode(tokens)
            bad = unquantizable_mask(encoded)
            encoded = as_placeholders(encoded, bad)
            zero = encoded.scale.new_zeros(0) if encoded.zero is None else encoded.zero
            # flat: both branches of a compiled step's torch.cond have to give the same strides
            out += [encoded.data.flatten(), encoded.scale.flatten(), zero.flatten(), bad]
        return tuple(out)

    def _encode_nothing(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What ``_encode`` returns, in shape only: the branch of a compiled step that crosses no block."""
        n = keys.shape[2] // self.group_size
        out: list[torch.Tensor] = []
        for blocks in (self.key_blocks, self.value_blocks):
            for t in (blocks.data, blocks.scale, blocks.zero):
                out.append(t.new_zeros(0) if t is None else t.new_zeros(t[:, :, :n].numel()))
            out.append(torch.zeros(n, dtype=torch.bool, device=keys.device))
        return tuple(out)

    def _store_blocks(self, encoded: tuple[torch.Tensor, ...], slots: torch.Tensor, crosses: torch.Tensor) -> None:
        for i, blocks in enumerate((self.key_blocks, self.value_blocks)):
            data, scale, zero, bad = encoded[4 * i : 4 * i + 4]
            self.unquantizable_blocks.add_((bad & crosses).sum())
            for held, new in ((blocks.data, data), (blocks.scale, scale), (blocks.zero, zero)):
                if held is not None:
                    held.index_copy_(2, slots, new.view(*held.shape[:2], len(slots), *held.shape[3:]))

    def step_window(self) -> "StepWindow":
        """The exact tokens the last ``append`` left to read (``StepWindow``)."""
        if self._step is None:
            raise RuntimeError(f"{self._name()}: no step was appended to read")
        return self._step

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, max_cache_len, D] at their positions, as ``StaticLayer`` returns them: quantized
        before the boundary, exact after it, zeros past the last token."""
        window = self.step_window()
        n, total = self.max_cache_len, (self.num_blocks + 1) * self.group_size
        quantized = (torch.arange(n, device=self.device) < window.boundary).view(1, 1, n, 1)
        target = window.targets(total)
        out = []
        for blocks, tokens in ((self.key_blocks, window.keys), (self.value_blocks, window.values)):
            exact = tokens.new_zeros(*tokens.shape[:2], total, tokens.shape[3]).index_copy(2, target, tokens)
            out.append(torch.where(quantized, dense_blocks(blocks, self.dtype)[:, :, :n], exact[:, :, :n]))
        return out[0], out[1]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dense()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.append(key_states, value_states)
        out = self.dense()
        self._step = None  # a prompt's window is prompt-sized: not held past the step that read it
        return out

    # ------------------------------------------------------------------ what the Cache API asks
    def get_seq_length(self) -> torch.Tensor | int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    @property
    def nbytes(self) -> int:
        """Bytes held: the block slots (codes, scales, zeros) and the ring, whole: they are allocated whole."""
        if not self.is_initialized:
            return 0
        return sum(tensor_nbytes(t) for t in self._buffers()[:2]) + self.key_blocks.nbytes + self.value_blocks.nbytes

    def stats(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"seq_length": 0, "quantized_bytes": 0, "residual_bytes": 0, "unquantizable_blocks": 0}
        bad = int(self.unquantizable_blocks)
        if bad:
            logger.warning("%s: %d block(s) could not be quantized (NaN/Inf or out of the scale range) and read as "
                           "zeros", self._name(), bad)
        return {
            "seq_length": int(self.cumulative_length),
            "quantized_bytes": self.key_blocks.nbytes + self.value_blocks.nbytes,
            "residual_bytes": tensor_nbytes(self.ring_keys) + tensor_nbytes(self.ring_values),
            "unquantizable_blocks": bad,
        }

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the last ``-tokens_to_remove`` tokens (transformers' convention: n <= 0). The tokens kept
        exact have to be in the ring still: up to a block plus ``croppable_tokens`` past the boundary."""
        if not self.is_initialized:
            return
        if tokens_to_remove > 0:
            raise ValueError(f"{self._name()}: crop takes the number of tokens to remove as n <= 0 but got "
                             f"{tokens_to_remove}")
        length = int(self.cumulative_length)
        new_length = max(0, length + tokens_to_remove)
        oldest_in_ring = length - self.ring_size
        if int(self._boundary(torch.tensor(new_length))) < oldest_in_ring:
            raise ValueError(f"{self._name()}: cannot crop {length - new_length} tokens: the exact tokens from the "
                             f"new boundary on left the ring; build the cache with a larger `croppable_tokens`")
        self.cumulative_length.fill_(new_length)
        self.holds_tokens = new_length > 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow ``beam_idx``, in place (the buffers keep their addresses)."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for t in self._buffers():
            if t.dim():
                t.copy_(t.index_select(0, idx))

    def _replace_rows(self, fn) -> None:
        self.ring_keys, self.ring_values = fn(self.ring_keys), fn(self.ring_values)
        self.key_blocks = self.key_blocks.map_tensors(fn)
        self.value_blocks = self.value_blocks.map_tensors(fn)
        self.batch_size = self.ring_keys.shape[0]

    def batch_select_indices(self, indices: torch.Tensor | Sequence[int]) -> None:
        if self.is_initialized:
            idx = batch_indices(indices, self.batch_size, self.device)
            self._replace_rows(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._replace_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Forget every token; the buffers keep their addresses (a compiled step goes on using them)."""
        if self.is_initialized:
            for t in self._buffers():
                t.zero_()
        self.cumulative_length.zero_()
        self._step = None
        self.holds_tokens = False

    def offload(self) -> None:
        raise NotImplementedError("the static quantized cache stays on its device")

    def prefetch(self) -> None:
        pass

    def __repr__(self) -> str:
        s = self.settings
        return (f"StaticQuantizedKVLayer(key_bits={s.key_bits}, value_bits={s.value_bits}, group_size={s.group_size}, "
                f"residual_length={s.residual_length}, max_cache_len={self.max_cache_len})")

    # transformers reads `layer.keys` / `layer.values` in places: the dense history of the last step, read-only
    keys = property(lambda self: self._dense_stream(0), lambda self, value: self._refuse_write("keys", value))
    values = property(lambda self: self._dense_stream(1), lambda self, value: self._refuse_write("values", value))

    def _dense_stream(self, index: int) -> torch.Tensor | None:
        return self.dense()[index] if self._step is not None else None

    @staticmethod
    def _refuse_write(stream: str, value: Any) -> None:
        if value is not None:  # CacheLayerMixin.__init__ writes None
            raise AttributeError(f"the static quantized layer's {stream} are read-only")
