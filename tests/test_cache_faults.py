"""Cache-level faults: blocks that cannot be quantized, and damaged snapshot files."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from hf_kvcache_plugin import CacheConfig, QuantizedKVCache, SnapshotError, create_quantized_kv_cache
from hf_kvcache_plugin.blocks import unquantizable_blocks
from hf_kvcache_plugin.quantization import quantize

from .conftest import tiny_llama_config

B, H, D, G = 2, 2, 8, 8


def kv(tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, tokens, D)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def make(quant_type: str = "int4", layers: int = 1, **options) -> QuantizedKVCache:
    options = {"group_size": G, "residual_length": 16, **options}
    return create_quantized_kv_cache(quant_type, num_layers=layers, num_heads=H, head_dim=D, **options)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal including NaN in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


# ---------------------------------------------------------------------- NaN / Inf / overflow -> full precision
@pytest.mark.parametrize(
    "poison",
    [
        pytest.param(lambda t: t.__setitem__((0, 1, 3, 2), float("nan")), id="nan"),
        pytest.param(lambda t: t.__setitem__((1, 0, 5, 7), float("inf")), id="inf"),
        pytest.param(lambda t: t.__setitem__((1, 1, 0, 0), float("-inf")), id="-inf"),
        pytest.param(lambda t: t[0, 0].mul_(1e7), id="fp16-scale-overflow"),
    ],
)
@pytest.mark.parametrize("quant_type", ["int8", "int4", "int2"])
def test_unquantizable_block_stays_exact_in_place_and_is_counted(poison, quant_type):
    cache = make(quant_type)
    k, v = kv(64)
    bad_block = 2  # tokens [16, 24) of the history
    poisoned = k[:, :, bad_block * G : (bad_block + 1) * G]
    poison(poisoned)
    cache.update(k, v, 0)
    cache.update(*kv(1, seed=1), 0)

    stats = cache.get_stats()
    assert stats["fallback_blocks"] == 1 and stats["fallback_events"] == 1
    keys, values = cache.layers[0].dequantized()
    assert same(keys[:, :, bad_block * G : (bad_block + 1) * G], poisoned)  # exact, NaN/Inf included
    # neighbours are still quantized (close, finite) and in their places
    good = torch.cat([keys[:, :, : bad_block * G], keys[:, :, (bad_block + 1) * G : 48]], dim=2)
    ref = torch.cat([k[:, :, : bad_block * G], k[:, :, (bad_block + 1) * G : 48]], dim=2)
    assert torch.isfinite(good).all() and (good - ref).abs().max() < 1.5
    assert torch.equal(keys[:, :, 48:65], torch.cat([k[:, :, 48:], kv(1, seed=1)[0]], dim=2))  # residual exact
    assert torch.isfinite(values).all()


def test_fallback_bytes_are_exact_and_total_stays_the_sum():
    cache = make("int4")
    k, v = kv(64)
    k[0, 0, 20, 0] = float("nan")
    cache.update(k, v, 0)
    stats = cache.get_stats()
    clean = make("int4")
    clean.update(*kv(64), 0)
    clean_stats = clean.get_stats()
    # the placeholder keeps the packed tier's size; the exact block [B, H, G, D] fp32 comes on top
    assert stats["quantized_bytes"] == clean_stats["quantized_bytes"]
    assert stats["fallback_bytes"] == B * H * G * D * 4
    parts = ("quantized_bytes", "residual_bytes", "sink_bytes", "fallback_bytes")
    assert stats["total_bytes"] == sum(stats[n] for n in parts)


def test_fallback_blocks_survive_crop_reorder_and_aging():
    cache = make("mixed", mixed_int8_tokens=16)
    k, v = kv(80)
    k[:, :, 9, 1] = float("inf")  # block 1
    cache.update(k, v, 0)
    assert cache.get_stats()["fallback_blocks"] == 1
    # aged from INT8 to INT4: the exact block stays exact
    assert cache.layers[0].quantized_keys.aged is not None
    assert same(cache.layers[0].dequantized()[0][:, :, 8:16], k[:, :, 8:16])

    cache.reorder_cache(torch.tensor([1, 0]))
    assert same(cache.layers[0].dequantized()[0][:, :, 8:16], k.flip(0)[:, :, 8:16])

    cache.crop(-(80 - 12))  # keeps tokens [0, 12): block 0 and the head of the exact block 1
    assert cache.get_seq_length() == 12
    assert cache.get_stats()["fallback_blocks"] == 0
    assert cache.get_stats()["fallback_events"] == 1  # the event stays counted
    assert same(cache.layers[0].residual_keys, k.flip(0)[:, :, 8:12])


def test_unquantizable_blocks_detector():
    x = torch.randn(1, 2, 3, G, D)
    assert unquantizable_blocks(quantize(x, 4, G, axis=3)) == []
    x[0, 1, 2, 0, 0] = float("nan")
    assert unquantizable_blocks(quantize(x, 4, G, axis=3)) == [2]
    assert unquantizable_blocks(quantize(x, 4, G, axis=3, symmetric=True)) == [2]


def test_blocks_kept_exact_cannot_be_exported_as_quantized():
    cache = make("int4")
    k, v = kv(40)
    k[0, 0, 3, 3] = float("nan")
    cache.update(k, v, 0)
    with pytest.raises(ValueError, match=r"blocks \[0\] hold values that could not be quantized"):
        cache.layers[0].quantized_keys.take_blocks(0, 1)
    assert cache.layers[0].quantized_keys.take_blocks(1, 2).shape[2] == 1


# ---------------------------------------------------------------------- snapshots
def _filled(quant_type: str = "mixed", **options) -> QuantizedKVCache:
    cache = make(quant_type, layers=2, sink_tokens=2, **options)
    k, v = kv(75)
    k[1, 1, 30, 0] = float("nan")
    for layer in range(2):
        cache.update(k, v, layer)
    return cache


@pytest.mark.parametrize("quant_type", ["int8", "int2", "mixed"])
def test_save_load_round_trip_is_exact(tmp_path, quant_type):
    cache = _filled(quant_type, mixed_int8_tokens=16) if quant_type == "mixed" else _filled(quant_type)
    path = tmp_path / "cache.kvsnap"
    size = cache.save(path)
    assert path.stat().st_size == size
    loaded = QuantizedKVCache.load(path)
    assert loaded.get_stats() == cache.get_stats()
    for a, b in zip(loaded.layers, cache.layers):
        assert all(same(x, y) for x, y in zip(a.dequantized(), b.dequantized()))
    step = kv(1, seed=7)
    assert all(same(x, y) for x, y in zip(loaded.update(*step, 0), cache.update(*step, 0)))


def test_save_load_with_a_model_keeps_layer_kinds(tmp_path):
    config = tiny_llama_config(layers=3)
    cache = QuantizedKVCache(config, "int4", skip_layers=[1], group_size=8, residual_length=8)
    for layer in range(3):
        cache.update(*kv(20), layer)
    cache.save(tmp_path / "c")
    loaded = QuantizedKVCache.load(tmp_path / "c", config)
    assert [type(x).__name__ for x in loaded.layers] == [type(x).__name__ for x in cache.layers]
    assert torch.equal(loaded.layers[1].keys, cache.layers[1].keys)
    assert loaded.get_seq_length() == 20


def _rewritten(blob: bytes, **metadata) -> bytes:
    """The same tensors under changed metadata (a file another writer could make, checksum and all)."""
    header = json.loads(blob[8 : 8 + struct.unpack_from("<Q", blob)[0]])
    return safetensors.torch.save(safetensors.torch.load(blob), {**header.get("__metadata__", {}), **metadata})


def _corruptions(blob: bytes) -> dict[str, tuple[bytes, str]]:
    payload_start = 8 + struct.unpack_from("<Q", blob)[0]
    flipped = bytearray(blob)
    flipped[payload_start + (len(blob) - payload_start) // 2] ^= 0x40
    bad_header = bytearray(blob)
    bad_header[8] ^= 0xFF  # the header's opening brace
    return {
        "empty": (b"", "truncated"),
        "cut in the preamble": (blob[:5], "truncated"),
        "cut in the header": (blob[: payload_start - 5], "truncated or not a snapshot"),
        "cut in the payload": (blob[:-100], "truncated or corrupted"),
        "one byte short": (blob[:-1], "truncated or corrupted"),
        "trailing bytes": (blob + b"\0", "truncated or corrupted"),
        "flipped payload bit": (bytes(flipped), "checksum does not match"),
        "corrupted header": (bytes(bad_header), "header is corrupted or foreign"),
        "other format version": (_rewritten(blob, format_version="99"), "format version '99' is not supported"),
        "other kind": (_rewritten(blob, kind="PrefixStore"), "it holds a 'PrefixStore', not a 'QuantizedKVCache'"),
        "not a snapshot": (b"PK\x03\x04" + blob[4:], "truncated or not a snapshot"),
        "another safetensors file": (safetensors.torch.save({"w": torch.ones(2)}), "not a hf_kvcache_plugin snapshot"),
        "format 1": (b"HFKVSNAP" + struct.pack("<II", 1, 30) + b"x" * 300, "format 1 .*save it again"),
    }


@pytest.mark.parametrize("case", list(_corruptions(safetensors.torch.save({"t": torch.ones(64)}))), ids=lambda c: c)
def test_damaged_snapshots_are_refused_whole(tmp_path, case):
    path = tmp_path / "cache.kvsnap"
    _filled().save(path)
    data, message = _corruptions(path.read_bytes())[case]
    path.write_bytes(data)
    with pytest.raises(SnapshotError, match=message) as info:
        QuantizedKVCache.load(path)
    assert "nothing was loaded" in str(info.value) and str(path) in str(info.value)


def test_missing_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(SnapshotError, match="does not exist"):
        QuantizedKVCache.load(tmp_path / "nope")


def test_snapshot_from_another_model_or_setting_is_refused(tmp_path):
    config = tiny_llama_config(layers=2, head_dim=8, kv_heads=2)
    cache = QuantizedKVCache(config, "int4", group_size=8, residual_length=8)
    for layer in range(2):
        cache.update(*kv(20), layer)
    path = tmp_path / "c"
    cache.save(path)
    with pytest.raises(ValueError, match=r"holds 2 layers but this model has 3"):
        QuantizedKVCache.load(path, tiny_llama_config(layers=3))
    with pytest.raises(ValueError, match=r"from another model or setting: layer 0 was saved as \('quantized', 2, 8"):
        QuantizedKVCache.load(path, tiny_llama_config(layers=2, head_dim=8, kv_heads=4, heads=4))
    with pytest.raises(ValueError, match=r"other cache settings: `quant_type` is 'int4' in the file, 'int8' expected"):
        QuantizedKVCache.load(path, config, cache_config=CacheConfig(quant_type="int8", residual_length=8))
    # the settings it was made with are accepted, an unresolved group size too
    QuantizedKVCache.load(path, config, cache_config=CacheConfig(quant_type="int4", residual_length=8))


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c"
    _filled().save(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_kvcache_plugin.snapshot_file.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        make().save(path)
    assert path.read_bytes() == before  # the old snapshot is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("quant_type", ["int8", "int4", "int2", "mixed"])
def test_a_flush_inside_torch_compile_keeps_unquantizable_blocks_like_eager(quant_type, symmetric, caplog):
    """Traced code cannot branch on the data: the unquantizable block gets its placeholder codes branch-free and
    an opaque op keeps its exact tokens when the compiled code runs (no eager read needed: a compiled generate
    makes none). The result equals the eager path's, bit for bit."""
    k, v = kv(64)
    k[0, 1, 19, 3] = float("nan")  # block 2 (tokens 16-23)
    k[1, 0, 40:48].mul_(1e7)  # block 5: a range fp16 scales cannot hold
    eager, traced = (make(quant_type, symmetric=symmetric, mixed_int8_tokens=16) for _ in range(2))
    eager.update(k, v, 0)

    def prefill(cache, k, v):
        cache.layers[0].update(k, v)

    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="hf_kvcache_plugin.blocks"):
        torch.compile(prefill, backend="eager", fullgraph=True)(traced, k, v)  # fullgraph: a break would raise
        assert "2 block(s) flushed inside torch.compile could not be quantized" in caplog.text
        assert len(traced.layers[0].quantized_keys.full_precision_blocks) == 2  # kept by the run itself
        stats = traced.get_stats()
    assert stats["fallback_blocks"] == eager.get_stats()["fallback_blocks"] == 2
    assert stats["fallback_events"] == 2
    for stream in ("quantized_keys", "quantized_values"):
        a, b = getattr(eager.layers[0], stream), getattr(traced.layers[0], stream)
        assert sorted(a.full_precision_blocks) == sorted(b.full_precision_blocks)
        for tier_a, tier_b in zip(a.tiers, b.tiers):
            assert torch.equal(tier_a.data, tier_b.data) and torch.equal(tier_a.scale, tier_b.scale)
            assert (tier_a.zero is None) == (tier_b.zero is None)
            assert tier_a.zero is None or torch.equal(tier_a.zero, tier_b.zero)
    for x, y in zip(eager.layers[0].dequantized(), traced.layers[0].dequantized()):
        assert same(x, y)
