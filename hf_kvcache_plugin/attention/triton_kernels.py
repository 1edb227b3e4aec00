"""Triton kernels for decode attention over the cache's segments (flash-decoding).

Imported only by ``triton_attention`` and only when triton is installed: this
module imports triton unconditionally. Whether the kernels are compiled for the
GPU or run by Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU) is
decided when this module is first imported.

Two kernels:

- ``segment_partials_kernel``: one program per (batch x KV head, split of the
  segment's tokens). It reads one segment -- dense ``[B, H, T, D]`` tokens, or
  one quantized tier (keys grouped per channel, values grouped per token) --
  tile by tile, and keeps an online softmax: the running max ``m``, the running
  sum ``l`` and the unnormalised output ``acc`` of its rows. All query heads that
  share a KV head are rows of the same program, so a tier's packed bytes are
  fetched from memory once per KV head, not once per query head.
- ``combine_partials_kernel``: one program per (batch x KV head); it merges the
  partials of every split of every segment into the output.

Packed codes are never unpacked to memory. Each element of a key or value tile
addresses the byte that holds its code and shifts/masks it out in registers;
the ``8 // bits`` elements that share a byte load the same address, which the
GPU serves from one memory transaction (same-address loads in a warp are
broadcast), so the packed data crosses the memory bus once.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["segment_partials_kernel", "combine_partials_kernel"]


@triton.jit
def _quantized_key_tile(data, scale, zero, dstr, sstr, b, h, tok, d, valid, head_dim,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                        TILE_IN_ONE_BLOCK: tl.constexpr):
    """Keys [N, D] of tokens ``tok`` from a channel-grouped tier.

    data [B, H, n, D, 1, G/per_byte] and scale/zero [B, H, n, D, 1] (strides ``dstr``/``sstr``):
    token t is code t % G of block t // G, per channel. TILE_IN_ONE_BLOCK: the tile's tokens all lie
    in one block, so its scales and zeros are one row of D (loaded once, broadcast over the tokens).
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    block = tok // GROUP
    within = tok % GROUP
    byte_ptr = (data + b * dstr[0] + h * dstr[1] + block[:, None] * dstr[2] + d[None, :] * dstr[3]
                + (within // PER_BYTE)[:, None] * dstr[5])
    byte = tl.load(byte_ptr, mask=valid, other=0).to(tl.int32)
    code = ((byte >> ((within % PER_BYTE) * BITS)[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
    if TILE_IN_ONE_BLOCK:
        meta = (b * sstr[0] + h * sstr[1] + tl.min(block, axis=0) * sstr[2] + d * sstr[3])[None, :]
        meta_ok = (d < head_dim)[None, :]
    else:
        meta = b * sstr[0] + h * sstr[1] + block[:, None] * sstr[2] + d[None, :] * sstr[3]
        meta_ok = valid
    s = tl.load(scale + meta, mask=meta_ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zero + meta, mask=meta_ok, other=0.0).to(tl.float32)
        return code * s + z
    else:
        # symmetric codes are stored offset by 2**(bits-1)
        return (code - (1 << (BITS - 1))) * s


@triton.jit
def _quantized_value_tile(data, scale, zero, dstr, sstr, b, h, tok, d, valid,
                          BITS: tl.constexpr, GROUP: tl.constexpr, CHANNEL_GROUP: tl.constexpr,
                          HAS_ZERO: tl.constexpr):
    """Values [N, Dv] of tokens ``tok`` from a token-grouped tier.

    data [B, H, n, G, Dv/gs, gs/per_byte] and scale/zero [B, H, n, G, Dv/gs]: channel d of a token is
    code d % gs of its group d // gs.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    block = tok // GROUP
    within = tok % GROUP
    group = d // CHANNEL_GROUP
    in_group = d % CHANNEL_GROUP
    row = b * dstr[0] + h * dstr[1] + block[:, None] * dstr[2] + within[:, None] * dstr[3]
    byte_ptr = data + row + group[None, :] * dstr[4] + (in_group // PER_BYTE)[None, :] * dstr[5]
    byte = tl.load(byte_ptr, mask=valid, other=0).to(tl.int32)
    code = ((byte >> ((in_group % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    meta = b * sstr[0] + h * sstr[1] + block[:, None] * sstr[2] + within[:, None] * sstr[3] + group[None, :] * sstr[4]
    s = tl.load(scale + meta, mask=valid, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zero + meta, mask=valid, other=0.0).to(tl.float32)
        return code * s + z
    else:
        return (code - (1 << (BITS - 1))) * s


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b accumulated in float32, with inputs rounded to DOT_DTYPE.

    float32: exact products ("ieee"; tf32 would cost ~1e-3 relative error, far above the fp32 bound).
    bf16/fp16 (a cache in that dtype): tensor-core inputs; one rounding of K, V and the probabilities
    stays well inside the bf16 bound, and keeps the matmuls off the slow fp32 path.
    """
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def segment_partials_kernel(
    query, qstr, scaling,
    keys, key_scale, key_zero, kstr, kmeta_str,
    values, value_scale, value_zero, vstr, vmeta_str,
    keep_bias, bias_str,
    part_max, part_sum, part_acc,
    n_kv_heads, n_rep, q_len, rows, head_dim, value_head_dim,
    seg_tokens, seg_offset, split_tokens, first_split, total_splits,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP: tl.constexpr, CHANNEL_GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Partial (max, sum, acc) of one split of one segment. KEY_BITS == 0: the segment is dense.

    query [B, Hq, q, D]; keep_bias [B, q, T_total] (0 or -inf) when HAS_BIAS;
    part_max / part_sum [B*Hkv, S, rows], part_acc [B*Hkv, S, rows, DV] (contiguous, float32).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_kv_heads
    h = bh % n_kv_heads

    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    row_ok = r < rows
    # row r of KV head h is query head h * n_rep + r // q at query position r % q
    q_ptr = query + b * qstr[0] + (h * n_rep + r // q_len)[:, None] * qstr[1] + (r % q_len)[:, None] * qstr[2]
    q = tl.load(q_ptr + d[None, :] * qstr[3], mask=row_ok[:, None] & (d[None, :] < head_dim), other=0.0)
    q = q.to(tl.float32) * scaling

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV], tl.float32)

    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seg_tokens)
    for tile in range(start, end, BLOCK_N):
        tok = tile + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        k_valid = tok_ok[:, None] & (d[None, :] < head_dim)
        v_valid = tok_ok[:, None] & (dv[None, :] < value_head_dim)
        if KEY_BITS == 0:
            k = tl.load(keys + b * kstr[0] + h * kstr[1] + tok[:, None] * kstr[2] + d[None, :] * kstr[3],
                        mask=k_valid, other=0.0).to(tl.float32)
            v = tl.load(values + b * vstr[0] + h * vstr[1] + tok[:, None] * vstr[2] + dv[None, :] * vstr[3],
                        mask=v_valid, other=0.0).to(tl.float32)
        else:
            k = _quantized_key_tile(keys, key_scale, key_zero, kstr, kmeta_str, b, h, tok, d, k_valid, head_dim,
                                    KEY_BITS, GROUP, HAS_ZERO, GROUP % BLOCK_N == 0)
            v = _quantized_value_tile(values, value_scale, value_zero, vstr, vmeta_str, b, h, tok, dv, v_valid,
                                      VALUE_BITS, GROUP, CHANNEL_GROUP, HAS_ZERO)
        s = _dot(q, tl.trans(k), DOT_DTYPE)  # [ROWS, N]
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        if HAS_BIAS:
            bias = tl.load(keep_bias + b * bias_str[0] + (r % q_len)[:, None] * bias_str[1]
                           + (seg_offset + tok)[None, :] * bias_str[2],
                           mask=row_ok[:, None] & tok_ok[None, :], other=float("-inf"))
            s = s + bias
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row that has seen only masked tokens keeps m = -inf; shift by 0 so exp gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_shift)
        p = tl.exp(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v, DOT_DTYPE)
        m_i = m_new

    # only the real rows are stored: the padding rows of a decode step (16 - n_rep) would multiply the
    # partials' traffic several times over
    slot = bh * total_splits + first_split + split
    tl.store(part_max + slot * rows + r, m_i, mask=row_ok)
    tl.store(part_sum + slot * rows + r, l_i, mask=row_ok)
    tl.store(part_acc + (slot * rows + r)[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None])


@triton.jit
def combine_partials_kernel(
    part_max, part_sum, part_acc, out, rows, value_head_dim, total_splits,
    ROWS: tl.constexpr, DV: tl.constexpr,
):
    """out [B*Hkv, rows, Dv] (float32) = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s."""
    bh = tl.program_id(0)
    r = tl.arange(0, ROWS)
    dv = tl.arange(0, DV)
    row_ok = r < rows
    m_all = tl.full([ROWS], float("-inf"), tl.float32)
    for s in range(total_splits):
        m_s = tl.load(part_max + (bh * total_splits + s) * rows + r, mask=row_ok, other=float("-inf"))
        m_all = tl.maximum(m_all, m_s)
    m_shift = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV], tl.float32)
    for s in range(total_splits):
        slot = bh * total_splits + s
        w = tl.exp(tl.load(part_max + slot * rows + r, mask=row_ok, other=float("-inf")) - m_shift)
        l_all += w * tl.load(part_sum + slot * rows + r, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(part_acc + (slot * rows + r)[:, None] * DV + dv[None, :], mask=row_ok[:, None],
                                    other=0.0)
    # a row with nothing to attend to (fully padded) has l = 0: output 0, as SDPA gives
    result = acc / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
    mask = row_ok[:, None] & (dv < value_head_dim)[None, :]
    tl.store(out + (bh * rows + r)[:, None] * value_head_dim + dv[None, :], result, mask=mask)
