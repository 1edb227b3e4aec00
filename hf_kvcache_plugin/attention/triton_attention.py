"""Decode attention over a ``QuantizedKVLayer`` with Triton kernels (see ``triton_kernels``).

The same contract as ``reference.attention_from_layer`` -- which is this
path's reference and the path everywhere this one does not apply.
``dispatch.quantized_attention_forward`` calls ``triton_attention_from_layer``
only for CUDA tensors when triton imports and ``triton_unsupported`` returns
None. triton is an optional extra (``pip install hf_kvcache_plugin[gpu]``):
nothing here imports it before a CUDA call asks for it.

Each segment of the layer (sinks, each quantized tier, residual window) is cut
into splits of ``split_tokens`` tokens; one kernel launch per segment writes a
partial softmax per split, and one last launch combines them, so a 32k-token
history is read by hundreds of programs at once instead of one per head.
"""

from __future__ import annotations

import functools
import math

import torch

from ..quantization import QuantizedTensor
from .history import QuantizedHistory
from .masks import keep_mask

__all__ = ["triton_available", "triton_unsupported", "triton_attention_from_layer"]

# tokens per program-loop step; tl.dot needs every dimension >= 16
DEFAULT_BLOCK_TOKENS = 64
# the query rows of one KV head (n_rep * q_len) live in one program's registers
MAX_ROWS = 64
MAX_HEAD_DIM = 256
# splits per (batch, KV head) are sized so that a launch has about this many programs: a few per SM of
# a large GPU (132 on an H100), without making the partials' traffic a large share of the cache's
TARGET_PROGRAMS = 512


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (installed and loadable); checked once, and only when a CUDA call asks."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def triton_unsupported(query: torch.Tensor, layer: QuantizedHistory) -> str | None:
    """Why the Triton kernels cannot serve this call, or None when they can."""
    b, hq, q, d = query.shape
    if hq % layer.num_heads:
        return f"{hq} query heads are not a multiple of {layer.num_heads} KV heads"
    if (hq // layer.num_heads) * q > MAX_ROWS:
        return f"n_rep * q_len = {(hq // layer.num_heads) * q} query rows per KV head exceed {MAX_ROWS}"
    if max(d, layer.value_head_dim) > MAX_HEAD_DIM:
        return f"head_dim above {MAX_HEAD_DIM}"
    for keys, values, _ in layer.attention_segments():
        if isinstance(keys, QuantizedTensor) != isinstance(values, QuantizedTensor):
            return "a segment mixes dense and quantized tensors"
        if isinstance(keys, QuantizedTensor):
            if keys.axis != 3 or values.axis != 4:
                return "only keys grouped per channel and values grouped per token are supported"
            if (keys.zero is None) != (values.zero is None):
                return "keys and values disagree on symmetric quantization"
    return None


def _meta_strides(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """scale and zero with one shared stride tuple (the kernel indexes both the same way)."""
    scale, zero = q.scale, q.zero
    if zero is not None and scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    return scale, (scale if zero is None else zero), tuple(scale.stride())


def _keep_bias(attention_mask, b: int, q: int, total: int, device) -> torch.Tensor | None:
    """[B, q, T] float32 of 0 (attend) / -inf (masked), or None when every position is attended."""
    keep = keep_mask(attention_mask, b, q, total, device)
    if keep is None:
        return None
    keep = keep.expand(b, 1, q, total)[:, 0]
    return torch.zeros(keep.shape, dtype=torch.float32, device=device).masked_fill_(~keep, float("-inf"))


def triton_attention_from_layer(
    query: torch.Tensor,
    layer: QuantizedHistory,
    attention_mask: torch.Tensor | None,
    scaling: float,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    split_tokens: int | None = None,
    low_precision_dots: bool = False,
) -> torch.Tensor:
    """softmax(q K^T * scaling + mask) V over the layer's [sinks | blocks | residual], by Triton kernels.

    query: [B, Hq, q, D]; returns [B, Hq, q, Dv] in the query's dtype (accumulated in float32).
    ``split_tokens`` (tokens per program; a multiple of ``block_tokens``) defaults to a size
    that gives about ``TARGET_PROGRAMS`` programs. The matmuls take float32 inputs and exact
    products unless ``low_precision_dots`` (bf16/fp16 queries only): then K, V and the probabilities
    are rounded to the query's dtype for tensor cores, still accumulated in float32. That mode is
    checked on CUDA only: Triton 3.9's interpreter gives wrong results for bf16 ``tl.dot``.
    """
    reason = triton_unsupported(query, layer)
    if reason:
        raise ValueError(f"the Triton attention path cannot serve this call: {reason}")
    import triton.language as tl

    from .triton_kernels import combine_partials_kernel, segment_partials_kernel

    b, hq, q, d = query.shape
    hkv = layer.num_heads
    n_rep = hq // hkv
    rows = n_rep * q
    dv = layer.value_head_dim
    segments = layer.attention_segments()  # [(keys, values, length)], oldest first
    block_tokens = _pow2(block_tokens)
    groups = {k.group_size for k, _, _ in segments if isinstance(k, QuantizedTensor)}
    if len(groups) == 1 and (group := groups.pop()) >= 16 and group & (group - 1) == 0:
        # tiles that stay inside one block load each key scale/zero once (see _quantized_key_tile)
        block_tokens = min(block_tokens, group)
    total = sum(length for _, _, length in segments)
    if split_tokens is None:
        per_head = max(1, TARGET_PROGRAMS // (b * hkv))
        split_tokens = _pow2(math.ceil(total / per_head), floor=block_tokens)
    split_tokens = max(block_tokens, (split_tokens // block_tokens) * block_tokens)
    splits = [math.ceil(length / split_tokens) for _, _, length in segments]
    total_splits = sum(splits)

    rows_pad, d_pad, dv_pad = _pow2(rows), _pow2(d), _pow2(dv)
    device = query.device
    part_max = torch.empty(b * hkv, total_splits, rows, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(b * hkv, total_splits, rows, dv_pad, dtype=torch.float32, device=device)
    bias = _keep_bias(attention_mask, b, q, total, device)
    bias_arg = part_max if bias is None else bias  # any pointer; unread when HAS_BIAS is False
    bias_str = (0, 0, 0) if bias is None else tuple(bias.stride())

    dot_dtype = tl.float32
    if low_precision_dots:
        dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(query.dtype, tl.float32)
    first_split, seg_offset = 0, 0
    for (keys, values, length), n_splits in zip(segments, splits):
        if isinstance(keys, QuantizedTensor):
            k_scale, k_zero, k_meta = _meta_strides(keys)
            v_scale, v_zero, v_meta = _meta_strides(values)
            tensors = (keys.data, k_scale, k_zero, keys.data.stride(), k_meta,
                       values.data, v_scale, v_zero, values.data.stride(), v_meta)
            bits = (keys.bits, values.bits)
            group, channel_group, has_zero = keys.group_size, values.group_size, keys.zero is not None
        else:
            # dense tokens [B, H, T, D]; the unused metadata slots get the tensors themselves
            tensors = (keys, keys, keys, keys.stride(), (0,) * 5,
                       values, values, values, values.stride(), (0,) * 5)
            bits, group, channel_group, has_zero = (0, 0), 1, 1, False
        segment_partials_kernel[(b * hkv, n_splits)](
            query, tuple(query.stride()), float(scaling),
            *tensors,
            bias_arg, bias_str,
            part_max, part_sum, part_acc,
            hkv, n_rep, q, rows, d, dv,
            length, seg_offset, split_tokens, first_split, total_splits,
            KEY_BITS=bits[0], VALUE_BITS=bits[1], GROUP=group, CHANNEL_GROUP=channel_group,
            HAS_ZERO=has_zero, HAS_BIAS=bias is not None,
            ROWS=rows_pad, D=d_pad, DV=dv_pad, BLOCK_N=block_tokens, DOT_DTYPE=dot_dtype,
        )
        first_split += n_splits
        seg_offset += length

    out = torch.empty(b, hkv, rows, dv, dtype=torch.float32, device=device)
    combine_partials_kernel[(b * hkv,)](
        part_max, part_sum, part_acc, out, rows, dv, total_splits, ROWS=rows_pad, DV=dv_pad,
    )
    # [B, Hkv, n_rep * q, Dv] -> [B, Hq, q, Dv]; rounding to bf16/fp16 here (round-to-nearest) rather than
    # in the kernel keeps the interpreter (which truncates on a bf16 store) and the GPU alike
    return out.view(b, hq, q, dv).to(query.dtype)
