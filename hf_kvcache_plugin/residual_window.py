"""The residual window of a layer: its newest tokens, exact, in front of the quantized blocks.

The prompt's window is a plain tensor per stream. From the first decode step
the window moves into buffers of ``residual_length + group_size`` tokens
(``window_capacity``) that each step writes its token into in place, and a
flush shifts the kept tokens to the front: no step copies the whole window.
While the buffers exist the window is their first ``_window_held`` tokens,
and ``nbytes`` counts the buffers whole.
"""

from __future__ import annotations

import torch

__all__ = ["ResidualWindow", "tensor_nbytes"]


def tensor_nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class ResidualWindow:
    """The window part of ``QuantizedKVLayer`` (a mixin: the layer supplies ``residual_length`` and
    ``group_size``)."""

    residual_length: int
    group_size: int

    def _clear_window(self) -> None:
        self._window_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._window_held = 0
        self.residual_keys = self.residual_values = None

    # The window is read through these properties, never held as a view next to its buffer: a compiled step
    # would otherwise take the buffer and a view of it as two graph inputs, one mutated, and Inductor cannot
    # merge aliased inputs of symbolic size (it fails once the window's length varies between steps).
    @property
    def residual_keys(self) -> torch.Tensor | None:
        buffers = self._window_buffers
        return self._residual_keys if buffers is None else buffers[0][:, :, : self._window_held]

    @residual_keys.setter
    def residual_keys(self, value: torch.Tensor | None) -> None:
        self._release_window_buffers()
        self._residual_keys = value

    @property
    def residual_values(self) -> torch.Tensor | None:
        buffers = self._window_buffers
        return self._residual_values if buffers is None else buffers[1][:, :, : self._window_held]

    @residual_values.setter
    def residual_values(self, value: torch.Tensor | None) -> None:
        self._release_window_buffers()
        self._residual_values = value

    def _release_window_buffers(self) -> None:
        """Leave buffer mode: the window becomes plain tensors (views of the buffers until replaced)."""
        buffers = self._window_buffers
        if buffers is not None:
            self._window_buffers = None
            self._residual_keys = buffers[0][:, :, : self._window_held]
            self._residual_values = buffers[1][:, :, : self._window_held]

    @property
    def window_capacity(self) -> int:
        """Tokens the window can hold between flushes: the kept ``residual_length`` plus one block being filled."""
        return self.residual_length + self.group_size

    def _writes_window_in_place(self, held: int, new: int, had_history: bool) -> bool:
        """Whether an append of ``new`` tokens to a window of ``held`` goes into the capacity buffers.

        Decode-sized appends (after the first) do: concatenating would copy the whole window every token, a
        transient as large as the window per step. The first append (the prompt) and appends too large for
        the capacity concatenate, so a cache after prefill holds no spare capacity."""
        return had_history and held + new <= self.window_capacity

    def _append_to_window(self, key_states: torch.Tensor, value_states: torch.Tensor, had_history: bool) -> None:
        held, new = self.residual_keys.shape[-2], key_states.shape[-2]
        if new == 0:
            return
        if not self._writes_window_in_place(held, new, had_history):
            self.residual_keys = torch.cat([self.residual_keys, key_states], dim=-2)
            self.residual_values = torch.cat([self.residual_values, value_states], dim=-2)
            return
        if self._window_buffers is None:
            # once per sequence (and after a crop or a batch reorder): the window moves into buffers of
            # `window_capacity` tokens; nbytes counts them whole from then on
            buffers = []
            for held_states in (self.residual_keys, self.residual_values):
                b, h, _, d = held_states.shape
                buffer = held_states.new_empty(b, h, self.window_capacity, d)
                buffer[:, :, :held] = held_states
                buffers.append(buffer)
            self._window_buffers = (buffers[0], buffers[1])
            self._residual_keys = self._residual_values = None  # the buffers hold the window now
        key_buffer, value_buffer = self._window_buffers
        key_buffer[:, :, held : held + new] = key_states
        value_buffer[:, :, held : held + new] = value_states
        self._window_held = held + new

    def _drop_window_head(self, n_tokens: int) -> None:
        """Remove the window's oldest ``n_tokens`` (just quantized)."""
        if self._window_buffers is None:
            # clone: a slice would keep the whole old window alive
            self.residual_keys = self.residual_keys[:, :, n_tokens:].clone()
            self.residual_values = self.residual_values[:, :, n_tokens:].clone()
            return
        kept = self.residual_keys.shape[-2] - n_tokens
        for buffer in self._window_buffers:
            # shift left in pieces of at most n_tokens: source and destination of a copy never overlap
            for start in range(0, kept, n_tokens):
                length = min(n_tokens, kept - start)
                buffer[:, :, start : start + length] = buffer[:, :, n_tokens + start : n_tokens + start + length]
        self._window_held = kept

    @property
    def _window_nbytes(self) -> int:
        """The window's bytes: its capacity buffers whole while decode writes into them, else its tokens."""
        if self._window_buffers is not None:
            return sum(tensor_nbytes(t) for t in self._window_buffers)
        return tensor_nbytes(self.residual_keys) + tensor_nbytes(self.residual_values)
