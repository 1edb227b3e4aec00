"""Quantizer objects: the primitives of ``quantization`` with their settings bound, for K/V tensors.

The specification's ``Int8Quantizer``, ``Int4Quantizer`` and
``MixedPrecisionQuantizer`` are these small classes over ``quantize`` /
``dequantize``; the cache itself quantizes through ``blocks.BlockCodec``.
A K/V tensor is ``[..., seq, head_dim]``:

==========  ============================  ===================================
``axis``    a group runs along            one scale (and zero) per
==========  ============================  ===================================
token       head_dim (the last dim)       token, per ``group_size`` channels
channel     seq (the second-last dim)     channel, per ``group_size`` tokens
==========  ============================  ===================================

``group_size=None`` makes the group the whole axis (one scale per token, or
per channel); a number makes it block-wise. ``symmetric`` stores a scale only
(codes centred on 0), otherwise a scale and a zero offset per group.
``clip_percentile`` clips each group to its [100-p, p] percentiles before the
range is chosen, so that a few outliers do not cost every other value its
resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantization import SUPPORTED_BITS, QuantizedTensor, dequantize, quantize

__all__ = ["GroupQuantizer", "Int4Quantizer", "Int8Quantizer", "MixedPrecisionQuantizer", "MixedQuantized"]

QUANTIZER_AXES = {"token": -1, "channel": -2}


@dataclass(frozen=True)
class GroupQuantizer:
    """Group-wise integer quantization of ``[..., seq, head_dim]`` tensors with fixed settings.

    Args:
        bits: 2, 4 or 8.
        symmetric: scale only (True) or scale and zero per group (False).
        axis: ``"token"`` or ``"channel"`` (see the module docstring).
        group_size: elements per group along ``axis``; None: the whole axis.
        clip_percentile: in (50, 100]; None: each group's min/max.
        scale_dtype: dtype of scales and zeros; None: the input's.
    """

    bits: int
    symmetric: bool = False
    axis: str = "token"
    group_size: int | None = None
    clip_percentile: float | None = None
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise ValueError(f"`bits` has to be one of {list(SUPPORTED_BITS)} but got {self.bits!r}")
        if self.axis not in QUANTIZER_AXES:
            raise ValueError(f"`axis` has to be one of {list(QUANTIZER_AXES)} but got {self.axis!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1
        ):
            raise ValueError(f"`group_size` has to be a positive integer or None but got {self.group_size!r}")
        if self.clip_percentile is not None and not (
            isinstance(self.clip_percentile, (int, float)) and 50.0 < self.clip_percentile <= 100.0
        ):
            raise ValueError(f"`clip_percentile` has to be in (50, 100] or None but got {self.clip_percentile!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"`symmetric` has to be True or False but got {self.symmetric!r}")

    def _group_for(self, x: torch.Tensor) -> int:
        if x.dim() < 2:
            raise ValueError(f"the tensor has to be [..., seq, head_dim] (2-d or more) but got shape {tuple(x.shape)}")
        return self.group_size or x.shape[QUANTIZER_AXES[self.axis]]

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        """``x`` [..., seq, head_dim] -> packed codes with this quantizer's scales (and zeros)."""
        return quantize(
            x,
            self.bits,
            self._group_for(x),
            axis=QUANTIZER_AXES[self.axis],
            symmetric=self.symmetric,
            scale_dtype=self.scale_dtype,
            clip_percentile=self.clip_percentile,
        )

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Back to a dense tensor (``dtype``, default the original one)."""
        return dequantize(q, dtype)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(x))``: what a reader of the quantized ``x`` sees."""
        return self.dequantize(self.quantize(x))


@dataclass(frozen=True)
class Int8Quantizer(GroupQuantizer):
    """8-bit quantization, symmetric or asymmetric, per token or per channel (``GroupQuantizer`` with ``bits=8``)."""

    bits: int = field(default=8, init=False)


@dataclass(frozen=True)
class Int4Quantizer(GroupQuantizer):
    """4-bit block-wise quantization (groups of 64 by default), two codes packed per byte."""

    bits: int = field(default=4, init=False)
    group_size: int | None = 64


@dataclass(frozen=True)
class MixedQuantized:
    """A sequence quantized in two precisions: ``aged`` (the older tokens) then ``recent`` (the newest)."""

    aged: QuantizedTensor | None
    recent: QuantizedTensor | None

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in (self.aged, self.recent) if part is not None)

    @property
    def num_tokens(self) -> int:
        return sum(part.shape[-2] for part in (self.aged, self.recent) if part is not None)


@dataclass(frozen=True)
class MixedPrecisionQuantizer:
    """The newest ``recent_tokens`` tokens in ``recent`` precision (INT8), the older ones in ``aged`` (INT4).

    The precision of a token follows its age, as in the cache's ``mixed`` mode
    (there, a block is re-packed once when it ages out of the INT8 window).
    With ``axis="channel"`` each part's length has to be a multiple of its
    quantizer's ``group_size``.
    """

    recent_tokens: int = 512
    recent: GroupQuantizer = field(default_factory=Int8Quantizer)
    aged: GroupQuantizer = field(default_factory=Int4Quantizer)

    def __post_init__(self) -> None:
        if not isinstance(self.recent_tokens, int) or isinstance(self.recent_tokens, bool) or self.recent_tokens < 0:
            raise ValueError(f"`recent_tokens` has to be an integer >= 0 but got {self.recent_tokens!r}")
        for name in ("recent", "aged"):
            if not isinstance(getattr(self, name), GroupQuantizer):
                raise ValueError(
                    f"`{name}` has to be a quantizer (Int8Quantizer, Int4Quantizer, GroupQuantizer) but got "
                    f"{type(getattr(self, name)).__name__}"
                )

    def bits_for_age(self, age: int) -> int:
        """Bits of a token ``age`` tokens older than the newest (0: the newest)."""
        return self.recent.bits if age < self.recent_tokens else self.aged.bits

    def quantize(self, x: torch.Tensor) -> MixedQuantized:
        """``x`` [..., seq, head_dim]: the last ``recent_tokens`` tokens to ``recent``, the ones before to ``aged``."""
        if x.dim() < 2:
            raise ValueError(f"the tensor has to be [..., seq, head_dim] (2-d or more) but got shape {tuple(x.shape)}")
        split = max(0, x.shape[-2] - self.recent_tokens)
        old, new = x[..., :split, :], x[..., split:, :]
        return MixedQuantized(
            aged=self.aged.quantize(old) if split else None,
            recent=self.recent.quantize(new) if new.shape[-2] else None,
        )

    def dequantize(self, q: MixedQuantized, dtype: torch.dtype | None = None) -> torch.Tensor:
        parts = [dequantize(part, dtype) for part in (q.aged, q.recent) if part is not None]
        if not parts:
            raise ValueError("the mixed-precision tensor holds no tokens")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
