"""Attention that reads a ``QuantizedKVLayer`` directly, without materialising its history.

Registered with ``transformers.AttentionInterface`` as ``"kvquant_sdpa"`` (see
``enable_quantized_attention``). With that implementation selected, a
``QuantizedKVCache`` built from the model's config no longer dequantizes its
history in ``update``: it hands the layer to this function through the
attention kwargs, and the function works block by block on the packed codes.

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
converted to floats. Anything this function does not support (attention
weights output, softcapping, sliding windows, dropout, a cache that is not
ours) goes to the standard SDPA path, with one log line saying so.

On CUDA, with triton installed, the decode step goes to the Triton kernels of
``triton_attention`` instead; ``attention_from_layer`` is their reference.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .quantization import QuantizedTensor, dequantize
from .triton_attention import triton_attention_from_layer, triton_available, triton_unsupported

__all__ = [
    "QUANTIZED_ATTENTION",
    "FUSED_STATE_KEY",
    "enable_quantized_attention",
    "register_quantized_attention",
    "quantized_attention_forward",
    "attention_from_layer",
]

QUANTIZED_ATTENTION = "kvquant_sdpa"
# key under which QuantizedKVCache.update hands its layer to this function
FUSED_STATE_KEY = "quantized_kv_layer"
# tokens of codes turned into floats at a time: 256 tokens x head_dim 128 x 4 B = 128 KiB per head
DEFAULT_CHUNK_TOKENS = 256

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("kvquant_sdpa: %s; dequantizing the history for the standard path", reason)


def register_quantized_attention() -> None:
    """Register ``"kvquant_sdpa"`` (attention and its SDPA-style mask) with transformers."""
    AttentionInterface.register(QUANTIZED_ATTENTION, quantized_attention_forward)
    AttentionMaskInterface.register(QUANTIZED_ATTENTION, sdpa_mask)


def enable_quantized_attention(model) -> None:
    """Select ``"kvquant_sdpa"`` for ``model``. With any other cache it behaves like SDPA."""
    register_quantized_attention()
    model.set_attn_implementation(QUANTIZED_ATTENTION)


def quantized_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer = kwargs.pop(FUSED_STATE_KEY, None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    unsupported = _unsupported(module, dropout, kwargs)
    if unsupported:
        _fallback_once(unsupported)
        key, value = layer.dequantized()
        layer.finish_fused_step()
        if kwargs.get("output_attentions") or kwargs.get("softcap") is not None:
            return _eager_attention(query, key, value, attention_mask, dropout, scaling, kwargs.get("softcap"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _use_triton(query, layer):
        out = triton_attention_from_layer(query, layer, attention_mask, scaling)
    else:
        out = attention_from_layer(query, layer, attention_mask, scaling)
    layer.finish_fused_step()
    return out.transpose(1, 2).contiguous(), None


def _use_triton(query: torch.Tensor, layer) -> bool:
    """The Triton kernels serve CUDA tensors when triton is installed; this function stays their reference."""
    if not query.is_cuda or not triton_available():
        return False
    reason = triton_unsupported(query, layer)
    if reason:
        _fallback_once_to_pytorch(reason)
        return False
    return True


def _fallback_once_to_pytorch(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.info("kvquant_sdpa: Triton kernels do not support this case (%s); using the PyTorch fused path", reason)


def _eager_attention(query, key, value, attention_mask, dropout, scaling, softcap):
    """Plain attention with weights (and optional tanh softcapping) on dense K/V."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = _keep_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _unsupported(module, dropout: float, kwargs: dict) -> str | None:
    if kwargs.get("output_attentions"):
        return "output_attentions=True needs the attention weights"
    if kwargs.get("softcap") is not None:
        return "softcapping"
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None):
        return "sliding-window attention"
    if dropout:
        return "attention dropout"
    if kwargs.get("position_bias") is not None:
        return "position bias"
    return None


def _keep_mask(attention_mask, b: int, q: int, total: int, device) -> torch.Tensor | None:
    """Boolean [B, 1, q, T] of positions to keep, or None when every position is kept."""
    if attention_mask is None:
        if q == 1:
            return None
        # bottom-right causal: query i sits at position total - q + i
        pos_q = torch.arange(total - q, total, device=device)[:, None]
        return (torch.arange(total, device=device)[None, :] <= pos_q)[None, None].expand(b, 1, q, total)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :total]
    return attention_mask[..., :total] > torch.finfo(attention_mask.dtype).min / 2


def attention_from_layer(
    query: torch.Tensor,
    layer,
    attention_mask: torch.Tensor | None,
    scaling: float,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """softmax(q K^T * scaling + mask) V over the layer's [sinks | blocks | residual].

    query: [B, Hq, q, D]; returns [B, Hq, q, Dv] in the query's dtype.
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
    start = 0
    for keys, _, length in segments:
        target = scores[..., start : start + length]
        if isinstance(keys, QuantizedTensor):
            _quantized_key_scores(qf, keys, target, chunk_tokens)
        else:
            torch.matmul(qf, keys.float().transpose(-1, -2), out=target)
        start += length

    keep = _keep_mask(attention_mask, b, q, total, query.device)
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
    for _, values, length in segments:
        p = probs[..., start : start + length]
        if isinstance(values, QuantizedTensor):
            _quantized_value_output(p, values, out, chunk_tokens)
        else:
            out += torch.matmul(p, values.float())
        start += length
    return out.reshape(b, hq, q, dv).to(query.dtype)


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


def _quantized_key_scores(qf: torch.Tensor, keys: QuantizedTensor, out: torch.Tensor, chunk_tokens: int) -> None:
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


def _quantized_value_output(p: torch.Tensor, values: QuantizedTensor, out: torch.Tensor, chunk_tokens: int) -> None:
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
