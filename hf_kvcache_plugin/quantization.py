"""Group-wise integer quantization primitives: pure functions, no cache state.

A tensor is cut into groups of ``group_size`` consecutive elements along one
``axis``; each group gets its own scale (and, in asymmetric mode, its own zero
offset). Codes are packed into bytes: 1 per byte at INT8, 2 at INT4, 4 at INT2.

=================  ========================  ==================================
mode               stored per group          dequantized value
=================  ========================  ==================================
asymmetric         scale, zero (= group min) ``code * scale + zero``
symmetric          scale (= absmax / qmax)   ``(code - 2**(bits-1)) * scale``
=================  ========================  ==================================

The KV layout used by the cache (KIVI): keys grouped per *channel* (the group
runs along the token axis), values grouped per *token* (the group runs along
head_dim).

``quantize`` / ``dequantize`` are the vectorised paths; ``quantize_reference``
/ ``dequantize_reference`` compute the same thing one group at a time and are
what the fast paths are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "quantize_reference",
    "dequantize_reference",
    "pack_codes",
    "unpack_codes",
    "sqnr_db",
]

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class QuantizedTensor:
    """Packed codes plus per-group metadata.

    ``data`` is uint8 in the *grouped layout*: ``axis`` moved last and split into
    ``[..., n_groups, group_size * bits / 8]``. ``scale`` / ``zero`` have shape
    ``[..., n_groups]``. Dimensions before ``axis`` keep their positions, so
    quantized tensors can be concatenated or indexed along them directly.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    axis: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Every byte held: packed codes, scales and zeros."""
        total = self.data.numel() * self.data.element_size()
        total += self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            total += self.zero.numel() * self.zero.element_size()
        return total

    @property
    def device(self) -> torch.device:
        return self.data.device

    def map_tensors(self, fn, new_shape: tuple[int, ...] | None = None) -> "QuantizedTensor":
        """Apply ``fn`` to data, scale and zero (batch selection, device moves).

        Without ``new_shape``, dim 0 of the logical shape follows dim 0 of the
        new data (batch selection); ``fn`` must leave the other dims alone.
        """
        data = fn(self.data)
        if new_shape is None:
            new_shape = self.shape if self.axis == 0 else (data.shape[0],) + tuple(self.shape[1:])
        return QuantizedTensor(
            data=data,
            scale=fn(self.scale),
            zero=None if self.zero is None else fn(self.zero),
            bits=self.bits,
            group_size=self.group_size,
            axis=self.axis,
            shape=tuple(new_shape),
            dtype=self.dtype,
        )


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` has to be one of {list(SUPPORTED_BITS)} but got {bits!r}")


def _grouped_view(x: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    """[..., L(axis), ...] -> [...(axis removed)..., L // group_size, group_size]."""
    length = x.shape[axis]
    if group_size <= 0 or length % group_size != 0:
        raise ValueError(
            f"`group_size` must divide the length {length} of axis {axis}, but got group_size={group_size}"
        )
    moved = x.movedim(axis, -1)
    return moved.reshape(*moved.shape[:-1], length // group_size, group_size)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) along the last dim: 8 // bits codes per byte, low bits first."""
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte != 0:
        raise ValueError(f"the last dim ({codes.shape[-1]}) must be a multiple of {per_byte} to pack {bits}-bit codes")
    # [..., n] -> [..., n // per_byte, per_byte]; code i of a byte sits at bits [i*bits, (i+1)*bits)
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = c[..., 0].clone()
    for i in range(1, per_byte):
        packed |= c[..., i] << (i * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: [..., n // per_byte] uint8 -> [..., n] uint8."""
    _check_bits(bits)
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _storage_eps(scale_dtype: torch.dtype) -> float:
    # The smallest normal number of the storage dtype: a scale of exactly 0
    # would divide by zero, and anything smaller would round to 0 once stored.
    return torch.finfo(scale_dtype).tiny


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int = -1,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
    clip_percentile: float | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` group-wise along ``axis``.

    Statistics are computed in float32 whatever the input dtype; scales and
    zeros are stored in ``scale_dtype`` (default: ``x.dtype``) and the codes
    are computed against the *stored* (rounded) scale so that dequantization
    sees exactly the grid the codes were chosen on.
    ``clip_percentile`` (e.g. 99.9) clips each group to its [100-p, p]
    percentiles before choosing the range, trading outliers for resolution.
    """
    _check_bits(bits)
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-dim tensor")
    if not x.is_floating_point():
        raise ValueError(f"`x` must be a floating point tensor but got dtype {x.dtype}")
    if clip_percentile is not None and not (50.0 < clip_percentile <= 100.0):
        raise ValueError(f"`clip_percentile` has to be in (50, 100] but got {clip_percentile!r}")
    axis = axis % x.dim()
    scale_dtype = scale_dtype or x.dtype
    eps = _storage_eps(scale_dtype)
    groups = _grouped_view(x, axis, group_size).float()  # [..., n_groups, G]

    if clip_percentile is not None and clip_percentile < 100.0:
        q = torch.tensor([1.0 - clip_percentile / 100.0, clip_percentile / 100.0], device=groups.device)
        lo_hi = torch.quantile(groups, q, dim=-1)
        groups = torch.maximum(torch.minimum(groups, lo_hi[1].unsqueeze(-1)), lo_hi[0].unsqueeze(-1))

    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = groups.abs().amax(dim=-1)
        scale = (absmax / qmax).clamp_min(eps).to(scale_dtype)
        codes = torch.round(groups / scale.float().unsqueeze(-1)).clamp_(-qmax, qmax) + 2 ** (bits - 1)
        zero = None
    else:
        qmax = 2**bits - 1
        lo = groups.amin(dim=-1)
        hi = groups.amax(dim=-1)
        scale = ((hi - lo) / qmax).clamp_min(eps).to(scale_dtype)
        zero = lo.to(scale_dtype)
        codes = torch.round((groups - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, qmax)

    data = pack_codes(codes.to(torch.uint8), bits)
    return QuantizedTensor(data, scale, zero, bits, group_size, axis, tuple(x.shape), x.dtype)


def _codes_to_float(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack_codes(q.data, q.bits).to(dtype)
    if q.zero is None:
        codes -= 2 ** (q.bits - 1)
    return codes


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to a dense tensor of ``q.shape`` in ``dtype`` (default: the original dtype)."""
    dtype = dtype or q.dtype
    # Arithmetic in the output dtype: for bf16/fp16 this halves the bytes moved,
    # and codes <= 255 are exact in every float dtype.
    values = _codes_to_float(q, dtype) * q.scale.to(dtype).unsqueeze(-1)
    if q.zero is not None:
        values += q.zero.to(dtype).unsqueeze(-1)
    # [..., n_groups, G] -> original layout
    moved_shape = list(q.shape)
    length = moved_shape.pop(q.axis)
    values = values.reshape(*moved_shape, length)
    return values.movedim(-1, q.axis)


def quantize_reference(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int = -1,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedTensor:
    """One group at a time with Python-int packing: slow, obviously correct."""
    _check_bits(bits)
    axis = axis % x.dim()
    scale_dtype = scale_dtype or x.dtype
    eps = _storage_eps(scale_dtype)
    moved = x.movedim(axis, -1).float()
    lead_shape = moved.shape[:-1]
    length = moved.shape[-1]
    if length % group_size != 0:
        raise ValueError(f"`group_size` must divide the length {length} of axis {axis}")
    n_groups = length // group_size
    per_byte = 8 // bits
    rows = moved.reshape(-1, length)
    data_rows, scale_rows, zero_rows = [], [], []
    for row in rows:
        for g in range(n_groups):
            group = row[g * group_size : (g + 1) * group_size]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                scale = torch.tensor(max(group.abs().max().item() / qmax, eps)).to(scale_dtype)
                codes = [
                    int(min(max(torch.round(v / scale.float()).item(), -qmax), qmax)) + 2 ** (bits - 1)
                    for v in group
                ]
                zero_rows.append(None)
            else:
                qmax = 2**bits - 1
                lo, hi = group.min(), group.max()
                scale = torch.clamp_min((hi - lo) / qmax, eps).to(scale_dtype)
                zero = lo.to(scale_dtype)
                codes = [
                    int(min(max(torch.round((v - zero.float()) / scale.float()).item(), 0), qmax)) for v in group
                ]
                zero_rows.append(zero)
            scale_rows.append(scale)
            packed = []
            for start in range(0, group_size, per_byte):
                byte = 0
                for i, code in enumerate(codes[start : start + per_byte]):
                    byte |= code << (i * bits)
                packed.append(byte)
            data_rows.append(packed)
    data = torch.tensor(data_rows, dtype=torch.uint8).reshape(*lead_shape, n_groups, group_size // per_byte)
    scale = torch.stack(scale_rows).reshape(*lead_shape, n_groups)
    zero = None if symmetric else torch.stack(zero_rows).reshape(*lead_shape, n_groups)
    return QuantizedTensor(data, scale, zero, bits, group_size, axis, tuple(x.shape), x.dtype)


def dequantize_reference(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Element by element inverse of ``quantize_reference``, in float64 then cast."""
    dtype = dtype or q.dtype
    per_byte = 8 // q.bits
    mask = (1 << q.bits) - 1
    lead_shape = q.data.shape[:-2]
    n_groups = q.data.shape[-2]
    data = q.data.reshape(-1, n_groups, q.data.shape[-1])
    scale = q.scale.reshape(-1, n_groups).double()
    zero = None if q.zero is None else q.zero.reshape(-1, n_groups).double()
    out_rows = []
    for r in range(data.shape[0]):
        row = []
        for g in range(n_groups):
            for byte in data[r, g].tolist():
                for i in range(per_byte):
                    code = (byte >> (i * q.bits)) & mask
                    if zero is None:
                        row.append((code - 2 ** (q.bits - 1)) * scale[r, g].item())
                    else:
                        row.append(code * scale[r, g].item() + zero[r, g].item())
        out_rows.append(row)
    moved = torch.tensor(out_rows, dtype=torch.float64).reshape(*lead_shape, n_groups * q.group_size)
    return moved.movedim(-1, q.axis).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; inf when exact)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
