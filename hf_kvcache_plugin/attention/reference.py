"""Fused decode attention in PyTorch: softmax(q K^T) V over a layer's packed codes, block by block.

Keys are grouped per channel (one scale ``s`` and zero ``z`` per channel per
block of G tokens), so a block's scores are

    q . (s * c + z) = (q * s) . c + q . z        c: [D, G] integer codes

and the query is scaled once per block instead of dequantizing G x D values.
Values are grouped per token, so the probabilities fold into their scales:

    sum_t p_t (s_t * c_t + z_t) = sum_t (p_t * s_t) c_t + sum_t p_t z_t

The score row of a decode step holds ``n_rep * q_len`` floats per key token
(1/head_dim of the key bytes), so it is kept whole and softmaxed once: on a
CPU that is cheaper than an online softmax's rescaling, and only the code
chunks (``chunk_tokens`` tokens at a time, sized to stay in cache) are ever
converted to floats. This is the reference of the Triton kernels
(``triton_attention``) and of the CPU kernel (``cpu_kernel``), which reads
the codes of a tier in one pass instead (``cpu_kernel=True``): the score
row, the mask, the softmax and the dense segments are the same code either way.
"""

from __future__ import annotations

import torch

from ..quantization import QuantizedTensor, dequantize
from .cpu_kernel import kernel_key_scores_parts, kernel_value_output_parts
from .history import QuantizedHistory
from .masks import keep_mask

__all__ = ["DEFAULT_CHUNK_TOKENS", "attention_from_layer", "quantized_key_scores", "quantized_value_output"]

# tokens of codes turned into floats at a time: 256 tokens x head_dim 128 x 4 B = 128 KiB per head
DEFAULT_CHUNK_TOKENS = 256


def attention_from_layer(
    query: torch.Tensor,
    layer: QuantizedHistory,
    attention_mask: torch.Tensor | None,
    scaling: float,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    cpu_kernel: bool = False,
) -> torch.Tensor:
    """softmax(q K^T * scaling + mask) V over the layer's [sinks | blocks | residual].

    query: [B, Hq, q, D]; returns [B, Hq, q, Dv] in the query's dtype.
    ``cpu_kernel``: quantized tiers are read by the C++ kernel (CPU tensors,
    ``cpu_kernel.cpu_kernel_available()``) instead of chunk by chunk.
    """
    b, hq, q, d = query.shape
    hkv = layer.num_heads
    n_rep = hq // hkv
    rows = n_rep * q
    # [B, Hq, q, D] -> [B, Hkv, n_rep * q, D]: the query heads sharing a KV head become rows
    qf = query.float().reshape(b, hkv, rows, d) * scaling

    segments = layer.attention_segments()  # [(keys, values, length)], oldest first
    total = sum(length for _, _, length in segments)
    scores = torch.empty(b, hkv, rows, total, dtype=torch.float32, device=query.device)
    runs = _kernel_runs(segments) if cpu_kernel else {}
    start = 0
    for i, (keys, _, length) in enumerate(segments):
        if i in runs and keys.axis == 3:
            kernel_key_scores_parts(qf, [segments[j][0] for j in runs[i]], scores, start)
        elif cpu_kernel and isinstance(keys, QuantizedTensor) and keys.axis == 3:
            pass  # read with the run it belongs to
        elif isinstance(keys, QuantizedTensor):
            quantized_key_scores(qf, keys, scores[..., start : start + length], chunk_tokens)
        else:
            scores[..., start : start + length].copy_(torch.matmul(qf, keys.float().transpose(-1, -2)))  # out= into a strided view: no compile
        start += length

    keep = keep_mask(attention_mask, b, q, total, query.device)
    if keep is not None:
        # [B, 1, q, T] -> [B, 1, n_rep * q, T] rows in the same order as qf's
        keep = keep.unsqueeze(2).expand(b, 1, n_rep, q, total).reshape(b, 1, rows, total)
        scores.masked_fill_(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # a row with nothing to attend to (fully padded) gives NaN; SDPA gives 0 there
    probs = torch.nan_to_num_(probs, nan=0.0)

    dv = layer.value_head_dim
    out = torch.zeros(b, hkv, rows, dv, dtype=torch.float32, device=query.device)
    start = 0
    for i, (_, values, length) in enumerate(segments):
        if i in runs and values.axis == 4:
            kernel_value_output_parts(probs, start, [segments[j][1] for j in runs[i]], out)
        elif cpu_kernel and isinstance(values, QuantizedTensor) and values.axis == 4:
            pass  # read with the run it belongs to
        elif isinstance(values, QuantizedTensor):
            quantized_value_output(probs[..., start : start + length], values, out, chunk_tokens)
        else:
            out += torch.matmul(probs[..., start : start + length], values.float())
        start += length
    return out.reshape(b, hq, q, dv).to(query.dtype)


def _kernel_runs(segments) -> dict[int, list[int]]:
    """First segment index -> the indices of a run of consecutive quantized segments that one kernel call reads:
    the parts of a tier (same bits, same symmetry). The kernel sums a run's values with one set of accumulators,
    so a tier reads the same however its blocks are cut into parts."""
    runs: dict[int, list[int]] = {}
    head = None
    for i, (keys, values, _) in enumerate(segments):
        if not isinstance(keys, QuantizedTensor):
            head = None
            continue
        prev = segments[head][0:2] if head is not None else None
        if prev is not None and _same_codec(prev[0], keys) and _same_codec(prev[1], values):
            runs[head].append(i)
        else:
            head = i
            runs[head] = [i]
    return runs


def _same_codec(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return (a.bits, a.axis, a.group_size, a.zero is None, a.scale.dtype) == (
        b.bits, b.axis, b.group_size, b.zero is None, b.scale.dtype)


def _chunks(n_blocks: int, group: int, chunk_tokens: int):
    step = max(1, chunk_tokens // group)
    for i in range(0, n_blocks, step):
        yield i, min(n_blocks, i + step)


def _dequantized_chunk(q: QuantizedTensor, start: int, end: int) -> torch.Tensor:
    """Blocks [start, end) as float32 tokens [B, H, (end - start) * G, D]: the generic (bounded) path."""
    shape = (q.shape[0], q.shape[1], end - start) + tuple(q.shape[3:])
    return dequantize(q.map_tensors(lambda t: t[:, :, start:end], new_shape=shape), torch.float32).flatten(2, 3)


def _code_parts(packed: torch.Tensor, bits: int, symmetric: bool):
    """Yield (i, codes) for i in range(8 // bits): the float codes of positions i::(8 // bits)
    along the packed axis. Working part by part avoids interleaving the codes back
    (a slow strided copy); callers write each part's result to strided positions."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    for i in range(per_byte):
        part = packed if bits == 8 else (packed >> (i * bits)) & mask
        codes = part.float()
        if symmetric:
            codes -= 2 ** (bits - 1)
        yield i, codes


def quantized_key_scores(qf: torch.Tensor, keys: QuantizedTensor, out: torch.Tensor, chunk_tokens: int) -> None:
    """Scores of qf [B, H, M, D] against quantized key blocks, written into out [B, H, M, n*G]."""
    b, h, n, g, d = keys.shape
    m = qf.shape[2]
    per_byte = 8 // keys.bits
    out_blocks = out.view(b, h, m, n, g)
    for i, j in _chunks(n, g, chunk_tokens):
        target = out_blocks[:, :, :, i:j]  # [B, H, M, c, G]
        if keys.axis == 3:
            scale = keys.scale[:, :, i:j].float()
            # per channel: packed [B, H, c, D, 1, G/pb], scale/zero [B, H, c, D, 1]
            qs = qf[:, :, None] * scale.squeeze(-1)[:, :, :, None, :]  # [B, H, c, M, D]
            packed = keys.data[:, :, i:j].squeeze(-2)  # [B, H, c, D, G/pb]
            for part, codes in _code_parts(packed, keys.bits, keys.zero is None):
                # tokens part::pb of every block: [B, H, c, M, G/pb]
                target[..., part::per_byte] = torch.matmul(qs, codes).permute(0, 1, 3, 2, 4)
            if keys.zero is not None:
                qz = torch.matmul(qf, keys.zero[:, :, i:j].float().squeeze(-1).transpose(-1, -2))  # [B, H, M, c]
                target += qz[..., None]
        else:
            # per token: dequantize the chunk (bounded), then multiply
            kd = _dequantized_chunk(keys, i, j)
            target.copy_(torch.matmul(qf, kd.transpose(-1, -2)).view(b, h, m, j - i, g))


def quantized_value_output(p: torch.Tensor, values: QuantizedTensor, out: torch.Tensor, chunk_tokens: int) -> None:
    """out [B, H, M, Dv] += p [B, H, M, n*G] @ quantized value blocks."""
    b, h, n, g, d = values.shape
    m = p.shape[2]
    per_byte = 8 // values.bits
    p_blocks = p.reshape(b, h, m, n, g)
    for i, j in _chunks(n, g, chunk_tokens):
        pc = p_blocks[:, :, :, i:j]  # [B, H, M, c, G]
        if values.axis == 4:
            scale = values.scale[:, :, i:j].float()
            # per token: packed [B, H, c, G, ng, gs/pb], scale/zero [B, H, c, G, ng]
            ng = scale.shape[-1]
            gs = d // ng
            ps = pc[..., None] * scale[:, :, None]  # [B, H, M, c, G, ng]
            lhs = ps.reshape(b, h, m, -1, ng).permute(0, 1, 4, 2, 3)  # [B, H, ng, M, cG]
            out_groups = out.view(b, h, m, ng, gs)
            packed = values.data[:, :, i:j]
            for part, codes in _code_parts(packed, values.bits, values.zero is None):
                rhs = codes.reshape(b, h, -1, ng, gs // per_byte).permute(0, 1, 3, 2, 4)  # [B, H, ng, cG, gs/pb]
                out_groups[..., part::per_byte] += torch.matmul(lhs, rhs).permute(0, 1, 3, 2, 4)
            if values.zero is not None:
                pz = torch.einsum("bhmcg,bhcgn->bhmn", pc, values.zero[:, :, i:j].float())  # [B, H, M, ng]
                out_groups += pz[..., None]
        else:
            out += torch.matmul(pc.reshape(b, h, m, -1), _dequantized_chunk(values, i, j))
