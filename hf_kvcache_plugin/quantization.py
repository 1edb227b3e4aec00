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

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "dtype_from_name",
    "dtype_name",
    "quantized_tensor_problem",
    "quantize",
    "dequantize",
    "dequantize_into",
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


    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """Plain tensors, numbers and strings (what snapshots and peer messages carry).

        ``compact``: tensors moved to the CPU and owning just their bytes, since
        ``torch.save`` of a view writes its whole storage.
        """
        own = _compact if compact else (lambda t: t)
        return {
            "data": own(self.data),
            "scale": own(self.scale),
            "zero": None if self.zero is None else own(self.zero),
            "bits": self.bits,
            "group_size": self.group_size,
            "axis": self.axis,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> "QuantizedTensor":
        """Inverse of ``to_dict``; tensors moved to ``device`` when given."""
        move = (lambda t: t) if device is None else (lambda t: None if t is None else t.to(device))
        return cls(
            data=move(state["data"]),
            scale=move(state["scale"]),
            zero=move(state["zero"]),
            bits=int(state["bits"]),
            group_size=int(state["group_size"]),
            axis=int(state["axis"]),
            shape=tuple(int(n) for n in state["shape"]),
            dtype=dtype_from_name(state["dtype"]),
        )


def quantized_tensor_problem(q: QuantizedTensor) -> str | None:
    """What makes ``q`` inconsistent (a tensor from a file or a peer), or None: bits, group size and axis,
    ``data`` / ``scale`` / ``zero`` shapes and dtypes against the logical ``shape``, finite scales and zeros."""
    if q.bits not in SUPPORTED_BITS:
        return f"bits {q.bits!r} is not one of {list(SUPPORTED_BITS)}"
    shape, axis, g = tuple(q.shape), q.axis, q.group_size
    if not shape or any(n < 0 for n in shape) or not 0 <= axis < len(shape):
        return f"axis {axis} does not fit the shape {list(shape)}"
    if g < 1 or shape[axis] % g or g * q.bits % 8:
        return f"group size {g} does not divide axis {axis} of the shape {list(shape)} into whole bytes"
    if not q.dtype.is_floating_point:
        return f"dtype {q.dtype} is not a floating point dtype"
    groups = shape[:axis] + shape[axis + 1 :] + (shape[axis] // g,)
    expected = {"data": groups + (g * q.bits // 8,), "scale": groups, "zero": groups}
    for name, want in expected.items():
        t = getattr(q, name)
        if t is None and name == "zero":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"`{name}` has shape {got}, the shape {list(shape)} needs {want}"
        if name == "data" and t.dtype != torch.uint8:
            return f"`data` has dtype {t.dtype}, packed codes are uint8"
        if name != "data" and (not t.dtype.is_floating_point or not bool(torch.isfinite(t).all())):
            return f"`{name}` has dtype {t.dtype} or values that are not finite"
    return None


def _compact(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.contiguous()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` has to be one of {list(SUPPORTED_BITS)} but got {bits!r}")


def _split_axis(shape: tuple[int, ...], axis: int, group_size: int) -> tuple[int, int, int]:
    """(rows, group_size, post): ``shape`` seen as [pre * n_groups, G, post], the groups' physical layout."""
    length = shape[axis]
    if group_size <= 0 or length % group_size != 0:
        raise ValueError(
            f"`group_size` must divide the length {length} of axis {axis}, but got group_size={group_size}"
        )
    pre = math.prod(shape[:axis])
    post = math.prod(shape[axis + 1 :])
    return pre * (length // group_size), group_size, post


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


# Widening a packed byte into a word of `per_byte` bytes lets one shift-or-mask
# spread its codes into consecutive bytes (SWAR), instead of one strided pass per
# code. The byte order of the word decides which code lands first: little-endian only.
_SWAR = sys.byteorder == "little"
_WORD = {4: (torch.int16, 0x0F0F, (4,)), 2: (torch.int32, 0x03030303, (6, 12, 18))}


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: [..., n // per_byte] uint8 -> [..., n] uint8 (contiguous)."""
    _check_bits(bits)
    if bits == 8:
        return packed
    per_byte = 8 // bits
    out_shape = (*packed.shape[:-1], packed.shape[-1] * per_byte)
    if not _SWAR:
        mask = (1 << bits) - 1
        parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
        return torch.stack(parts, dim=-1).reshape(out_shape)
    word_dtype, mask, shifts = _WORD[bits]
    word = packed.to(word_dtype, memory_format=torch.contiguous_format)
    spread = word.clone()
    for shift in shifts:
        # code i of the byte moves from bit i*bits to bit 8*i
        spread |= word << shift
    spread &= mask
    return spread.view(torch.uint8).view(out_shape)


def _pack_rows(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Integral float32 codes [r, G, P] -> packed bytes ``out`` [r, G // per_byte, P] (codes of a byte run along G).

    The byte is assembled in float32 (``c0 + c1 * 2**bits + ...`` is exact below 256) on the
    already-rounded codes, then converted once, through int16: float32 -> int16 -> uint8 is
    several times faster than float32 -> uint8 on CPU.
    """
    per_byte = 8 // bits
    if per_byte == 1:
        out.copy_(codes.to(torch.int16))
        return
    r, g, p = codes.shape
    grouped = codes.view(r, g // per_byte, per_byte, p)
    folded = torch.add(grouped[:, :, 0], grouped[:, :, 1], alpha=2**bits)
    for i in range(2, per_byte):
        folded.add_(grouped[:, :, i], alpha=2 ** (i * bits))
    out.copy_(folded.to(torch.int16))


def _storage_eps(scale_dtype: torch.dtype) -> float:
    # The smallest normal number of the storage dtype: a scale of exactly 0
    # would divide by zero, and anything smaller would round to 0 once stored.
    return torch.finfo(scale_dtype).tiny


# Rows are quantized in chunks of about this many elements, so that the float32
# working copy and the integer codes stay in the CPU cache across the ~10
# elementwise passes (and are reused instead of freshly page-faulted).
_CHUNK_ELEMENTS = 1 << 18


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

    The work happens in the groups' physical layout ``[pre * n_groups, G, post]``
    (a view of a contiguous ``x``): the axis is never moved, so the returned
    ``data`` and ``scale`` are permuted views whose memory runs in that order.
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
    rows, g, post = _split_axis(tuple(x.shape), axis, group_size)
    per_byte = 8 // bits
    if g % per_byte != 0:
        raise ValueError(f"`group_size` ({g}) must be a multiple of {per_byte} to pack {bits}-bit codes")
    src = x.reshape(rows, g, post)
    if torch.compiler.is_compiling():
        # Inductor does not emulate precision casts by default: it would fuse the scale's round trip through
        # `scale_dtype` away and choose codes against the unrounded scale, so a block flushed inside a compiled
        # step would store other codes than eager. As one opaque op the eager code runs, bit for bit.
        data, scale, zero = torch.ops.hf_kvcache_quant.quantize_groups(src, bits, symmetric, clip_percentile,
                                                                      scale_dtype)
        zero = None if symmetric else zero
    else:
        data, scale, zero = _quantize_groups(src, bits, symmetric, clip_percentile, scale_dtype)
    lead, trail = tuple(x.shape[:axis]), tuple(x.shape[axis + 1 :])
    n_groups = x.shape[axis] // g
    # physical [pre, n_groups, G // per_byte, post] -> grouped layout [pre, post, n_groups, G // per_byte]
    data = data.view(*lead, n_groups, g // per_byte, *trail).movedim((axis, axis + 1), (-2, -1))
    scale = scale.view(*lead, n_groups, *trail).movedim(axis, -1)
    if zero is not None:
        zero = zero.view(*lead, n_groups, *trail).movedim(axis, -1)
    return QuantizedTensor(data, scale, zero, bits, group_size, axis, tuple(x.shape), x.dtype)


def _quantize_groups(
    src: torch.Tensor, bits: int, symmetric: bool, clip_percentile: float | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``src`` [rows, G, P] -> codes [rows, G/per_byte, P] and scale / zero [rows, 1, P], a chunk of rows at a
    time through one float32 work buffer."""
    rows, g, post = src.shape
    per_byte = 8 // bits
    data = torch.empty(rows, g // per_byte, post, dtype=torch.uint8, device=src.device)
    scale = torch.empty(rows, 1, post, dtype=scale_dtype, device=src.device)
    zero = None if symmetric else torch.empty(rows, 1, post, dtype=scale_dtype, device=src.device)
    step = max(1, _CHUNK_ELEMENTS // (g * post))
    work = torch.empty(min(step, rows), g, post, dtype=torch.float32, device=src.device)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        _quantize_rows(
            src[start:end],
            bits,
            symmetric,
            clip_percentile,
            work[: end - start],
            data[start:end],
            scale[start:end],
            None if zero is None else zero[start:end],
        )
    return data, scale, zero


@torch.library.custom_op("hf_kvcache_quant::quantize_groups", mutates_args=())
def _quantize_groups_op(
    src: torch.Tensor, bits: int, symmetric: bool, clip_percentile: float | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_quantize_groups`` as an op ``torch.compile`` does not look into; a symmetric zero is an empty tensor."""
    data, scale, zero = _quantize_groups(src, bits, symmetric, clip_percentile, scale_dtype)
    return data, scale, scale.new_empty(0) if zero is None else zero


@_quantize_groups_op.register_fake
def _(src, bits, symmetric, clip_percentile, scale_dtype):
    rows, g, post = src.shape
    data = src.new_empty(rows, g // (8 // bits), post, dtype=torch.uint8)
    scale = src.new_empty(rows, 1, post, dtype=scale_dtype)
    return data, scale, scale.new_empty(0) if symmetric else src.new_empty(rows, 1, post, dtype=scale_dtype)


def _quantize_rows(
    src: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip_percentile: float | None,
    work: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
) -> None:
    """One chunk: ``src`` [r, G, P] -> codes into ``data`` [r, G/per_byte, P], ``scale``/``zero`` [r, 1, P]."""
    eps = _storage_eps(scale.dtype)
    groups = work.copy_(src)  # float32, and never an alias of the caller's tensor
    if clip_percentile is not None and clip_percentile < 100.0:
        q = torch.tensor([1.0 - clip_percentile / 100.0, clip_percentile / 100.0], device=groups.device)
        lo_hi = torch.quantile(groups, q, dim=1, keepdim=True)
        torch.maximum(torch.minimum(groups, lo_hi[1]), lo_hi[0], out=groups)
    # amin and amax separately: much faster than aminmax on CPU (torch 2.x)
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale.copy_((torch.maximum(hi, -lo) / qmax).clamp_min(eps))
        groups.div_(scale.float()).round_().clamp_(-qmax, qmax).add_(2 ** (bits - 1))
    else:
        qmax = 2**bits - 1
        scale.copy_(((hi - lo) / qmax).clamp_min(eps))
        zero.copy_(lo)
        groups.sub_(zero.float()).div_(scale.float()).round_().clamp_(0, qmax)
    _pack_rows(groups, bits, data)


def _physical(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """data [pre, n_groups, G/per_byte, post...], scale/zero [pre, n_groups, 1, post...] (views of the grouped layout)."""
    a = q.axis
    data = q.data.movedim((-2, -1), (a, a + 1))
    scale = q.scale.movedim(-1, a).unsqueeze(a + 1)
    zero = None if q.zero is None else q.zero.movedim(-1, a).unsqueeze(a + 1)
    return data, scale, zero


def dequantize_into(q: QuantizedTensor, out: torch.Tensor) -> None:
    """Write the dense values of ``q`` into ``out`` (shape ``q.shape``, any float dtype; may be a strided view
    as long as the dims after ``q.axis`` are contiguous among themselves)."""
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"`out` has to have shape {tuple(q.shape)} but got {tuple(out.shape)}")
    a, g = q.axis, q.group_size
    lead, trail = tuple(q.shape[:a]), tuple(q.shape[a + 1 :])
    n_groups, post = q.shape[a] // g, math.prod(trail)
    try:
        target = out.view(*lead, n_groups, g, post)
    except RuntimeError:
        # trailing dims not viewable as one: work in a dense buffer and copy once
        dense = torch.empty(q.shape, dtype=out.dtype, device=out.device)
        dequantize_into(q, dense)
        out.copy_(dense)
        return
    data, scale, zero = _physical(q)
    # [pre, n_groups, G/per_byte, post]; contiguous() is free when the storage already runs in this order
    data = data.reshape(*lead, n_groups, data.shape[a + 1], post).contiguous()
    scale = scale.reshape(*lead, n_groups, 1, post).to(out.dtype)
    if zero is None:
        # (code - 2**(bits-1)) * scale == code * scale + zero with zero = -2**(bits-1) * scale, exact in binary floats
        zero = scale * -(2 ** (q.bits - 1))
    else:
        zero = zero.reshape(*lead, n_groups, 1, post).to(out.dtype)
    _dequantize_rows(data, scale, zero, q.bits, target)


def _dequantize_rows(
    data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, out: torch.Tensor
) -> None:
    """``out[..., G, P] = codes * scale + zero``; ``data`` [..., G/per_byte, P], ``scale``/``zero`` [..., 1, P]."""
    per_byte = 8 // bits
    if out.shape[-1] == 1:
        # Groups along the contiguous dim: unpack codes to consecutive bytes, convert them straight into
        # `out` (no float temporary), then scale in place, all in the output dtype.
        flat = out.squeeze(-1)
        flat.copy_(unpack_codes(data.squeeze(-1), bits))
        flat.mul_(scale.squeeze(-1)).add_(zero.squeeze(-1))
        return
    # Groups across rows of P contiguous values: one pass per code position of a byte, each a whole
    # row of P, with the per-row scale broadcast along the outer dim (vectorised).
    g = out.shape[-2]
    target = out.unflatten(-2, (g // per_byte, per_byte))
    mask = (1 << bits) - 1
    for i in range(per_byte):
        codes = data if per_byte == 1 else (data >> (i * bits)) & mask
        torch.addcmul(zero, codes.to(out.dtype), scale, out=target[..., i, :])


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to a dense tensor of ``q.shape`` in ``dtype`` (default: the original dtype)."""
    # Arithmetic in the output dtype: for bf16/fp16 this halves the bytes moved,
    # and codes <= 255 are exact in every float dtype.
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)
    dequantize_into(q, out)
    return out


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
