"""PrefixStore: content-hash keys, namespaces, exact bytes, LRU/LFU eviction, pinning, resize."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from hf_kvcache_plugin import CacheConfig, PrefixEntry, PrefixStore, chunk_keys, model_fingerprint, prefix_namespace
from hf_kvcache_plugin.blocks import BlockCodec
from hf_kvcache_plugin.reuse.prefix_store import MIB
from hf_kvcache_plugin.reuse.chunk_codec import encode_blocks

from .conftest import tiny_llama_config

H, D, G, CHUNK, LAYERS = 2, 16, 8, 16, 2
NS = bytes(32)


def entry(key: bytes, parent: bytes | None = None, seed: int = 0, bits: int = 4) -> PrefixEntry:
    g = torch.Generator().manual_seed(seed)
    keys = BlockCodec(bits, G, "channel", scale_dtype=torch.float16)
    values = BlockCodec(bits, G, "token", scale_dtype=torch.float16)
    return PrefixEntry(
        key,
        parent,
        CHUNK,
        tuple(keys.encode(torch.randn(1, H, CHUNK, D, generator=g)) for _ in range(LAYERS)),
        tuple(values.encode(torch.randn(1, H, CHUNK, D, generator=g)) for _ in range(LAYERS)),
    )


def chain(tokens: list[int], store: PrefixStore, namespace: bytes = NS) -> list[PrefixEntry]:
    keys = chunk_keys(namespace, tokens, store.chunk_size)
    return [entry(k, keys[i - 1] if i else None, seed=i) for i, k in enumerate(keys)]


ENTRY_BYTES = entry(b"x").nbytes


def expected_entry_bytes(bits: int = 4) -> int:
    blocks = CHUNK // G
    key = H * blocks * (D * G * bits // 8 + 2 * D * 2)  # codes + fp16 scale and zero per channel per block
    value = H * blocks * (G * D * bits // 8 + 2 * G * (D // G) * 2)  # per token, per G channels
    return LAYERS * (key + value)


def store_of(entries: int, **kwargs) -> PrefixStore:
    return PrefixStore(max_size_mb=entries * ENTRY_BYTES / MIB, chunk_size=CHUNK, **kwargs)


# ---------------------------------------------------------------------- keys
def test_keys_are_chained_content_hashes_of_full_chunks_only():
    tokens = list(range(100, 100 + 3 * CHUNK + 5))
    keys = chunk_keys(NS, tokens, CHUNK)
    assert len(keys) == 3 and len(set(keys)) == 3 and all(len(k) == 32 for k in keys)
    assert keys == chunk_keys(NS, torch.tensor(tokens), CHUNK)
    changed_first = tokens.copy()
    changed_first[0] += 1
    assert all(a != b for a, b in zip(keys, chunk_keys(NS, changed_first, CHUNK)))  # a key names the whole prefix
    changed_second = tokens.copy()
    changed_second[CHUNK] += 1
    other = chunk_keys(NS, changed_second, CHUNK)
    assert other[0] == keys[0] and other[1] != keys[1] and other[2] != keys[2]
    assert chunk_keys(NS, tokens[: CHUNK - 1], CHUNK) == []


def test_keys_are_blake2b_over_little_endian_ids_chained_on_the_parent():
    # fixed bytes in, fixed digest out: nothing depends on the process, the platform or PYTHONHASHSEED
    first = hashlib.blake2b(NS + struct.pack("<4q", 0, 1, 2, 3), digest_size=32).digest()
    second = hashlib.blake2b(first + struct.pack("<4q", 4, 5, 6, 7), digest_size=32).digest()
    assert chunk_keys(NS, list(range(8)), 4) == [first, second]


def test_keys_and_namespace_are_identical_in_another_process():
    script = f"""
import torch
from hf_kvcache_plugin import CacheConfig, chunk_keys, model_fingerprint, prefix_namespace
from transformers import LlamaForCausalLM
from tests.conftest import tiny_llama_config
torch.manual_seed(0)
model = LlamaForCausalLM(tiny_llama_config())
ns = prefix_namespace(model_fingerprint(model), CacheConfig(group_size=8, residual_length=16), torch.float32, 16)
print(chunk_keys(ns, list(range(40)), 16)[-1].hex())
"""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(repo)}
    other = subprocess.run([sys.executable, "-c", script], env=env, cwd=repo, capture_output=True, text=True, check=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ns = prefix_namespace(model_fingerprint(model), CacheConfig(group_size=8, residual_length=16), torch.float32, 16)
    assert other.stdout.strip() == chunk_keys(ns, list(range(40)), 16)[-1].hex()


def test_namespaces_separate_models_and_settings():
    torch.manual_seed(0)
    a = LlamaForCausalLM(tiny_llama_config())
    torch.manual_seed(1)
    b = LlamaForCausalLM(tiny_llama_config())  # same architecture, other weights
    cfg = CacheConfig(quant_type="int4", group_size=8, residual_length=16)
    fa, fb = model_fingerprint(a), model_fingerprint(b)
    assert fa == model_fingerprint(a) and fa != fb
    base = prefix_namespace(fa, cfg, torch.float32, 16)
    variants = [
        prefix_namespace(fb, cfg, torch.float32, 16),
        prefix_namespace(fa, CacheConfig(quant_type="int8", group_size=8, residual_length=16), torch.float32, 16),
        prefix_namespace(fa, CacheConfig(quant_type="int4", group_size=4, residual_length=16), torch.float32, 16),
        prefix_namespace(fa, CacheConfig(quant_type="int4", group_size=8, residual_length=16, symmetric=True),
                         torch.float32, 16),
        prefix_namespace(fa, cfg, torch.bfloat16, 16),
        prefix_namespace(fa, cfg, torch.float32, 32),
    ]
    assert len({base, *variants}) == len(variants) + 1
    with pytest.raises(ValueError, match="group_size"):
        prefix_namespace(fa, CacheConfig(), torch.float32, 16)


def test_lookup_never_returns_another_namespaces_entries():
    store = store_of(10)
    tokens = list(range(3 * CHUNK))
    other_ns = bytes([1]) * 32
    assert store.put_chain(chain(tokens, store, NS)) == 3
    assert store.lookup(NS, tokens).num_tokens == 3 * CHUNK
    miss = store.lookup(other_ns, tokens)
    assert miss.num_tokens == 0 and miss.entries == []


# ---------------------------------------------------------------------- bytes and lookup
def test_exact_byte_accounting():
    assert ENTRY_BYTES == expected_entry_bytes()
    store = store_of(10)
    entries = chain(list(range(4 * CHUNK)), store)
    store.put_chain(entries)
    assert store.used_bytes == 4 * expected_entry_bytes() == sum(e.nbytes for e in entries)
    assert store.stats()["used_bytes"] == store.used_bytes
    store.resize(2 * ENTRY_BYTES / MIB)
    assert store.used_bytes == 2 * ENTRY_BYTES and len(store) == 2
    assert store.stats()["evicted_bytes"] == 2 * ENTRY_BYTES


def test_longest_prefix_lookup_and_max_tokens():
    store = store_of(10)
    tokens = list(range(3 * CHUNK + 3))
    store.put_chain(chain(tokens[: 2 * CHUNK], store))
    match = store.lookup(NS, tokens)
    assert match.num_tokens == 2 * CHUNK and len(match.chunk_keys) == 3
    assert [e.key for e in match.entries] == match.chunk_keys[:2]
    assert store.lookup(NS, tokens, max_tokens=2 * CHUNK - 1).num_tokens == CHUNK
    diverged = tokens.copy()
    diverged[CHUNK + 2] = 99999
    assert store.lookup(NS, diverged).num_tokens == CHUNK
    stats = store.stats()
    assert stats["hit_chunks"] == 2 + 1 + 1 and stats["lookups"] == 3


def test_entries_live_on_the_store_device_and_bad_entries_are_refused():
    store = store_of(4, device="cpu")
    e = entry(b"k")
    assert store.put(e) and store.get(b"k").device.type == "cpu"
    with pytest.raises(ValueError, match="chunks of 32 tokens but the entry has 16"):
        PrefixStore(1, chunk_size=32).put(e)
    with pytest.raises(ValueError, match=r"\[1, H, n, G, D\]"):
        PrefixEntry(b"k", None, CHUNK + 8, e.keys, e.values)
    with pytest.raises(ValueError, match="same layers"):
        PrefixEntry(b"k", None, CHUNK, e.keys, e.values[:1])


# ---------------------------------------------------------------------- eviction
def test_lru_evicts_least_recently_used_chain_leaf_first():
    store = store_of(4)
    a = chain(list(range(2 * CHUNK)), store)
    b = chain(list(range(1000, 1000 + 2 * CHUNK)), store)
    store.put_chain(a)
    store.put_chain(b)
    store.lookup(NS, list(range(2 * CHUNK)))  # a is now more recent than b
    store.put_chain(chain(list(range(5000, 5000 + CHUNK)), store))
    # b's leaf goes first; its root stays (a lookup of b still hits one chunk)
    assert b[1].key not in store and b[0].key in store and all(e.key in store for e in a)
    assert store.stats()["evictions"] == 1


def test_lfu_evicts_least_hit_entries_even_when_recent():
    store = store_of(3, eviction="lfu")
    prompts = {name: list(range(i * 100, i * 100 + CHUNK)) for i, name in enumerate(("hot", "warm", "cold"))}
    for name in ("hot", "warm", "cold"):
        store.put_chain(chain(prompts[name], store))
    for name, times in (("hot", 5), ("warm", 2)):
        for _ in range(times):
            store.lookup(NS, prompts[name])
    store.put_chain(chain(list(range(9000, 9000 + CHUNK)), store))
    hits = {name: store.lookup(NS, p).num_tokens for name, p in prompts.items()}
    assert hits == {"hot": CHUNK, "warm": CHUNK, "cold": 0}


def test_evicting_a_chunk_evicts_the_chunks_that_extend_it():
    # Leaf-first recency makes this rare (a root outlives its chain), but an
    # unreachable chunk must never keep bytes: removal cascades, and says why.
    evicted = []
    store = store_of(10, on_evict=lambda e, why: evicted.append((e.key, why)))
    entries = chain(list(range(3 * CHUNK)), store)
    store.put_chain(entries)
    store.remove([entries[0].key], reason="budget")
    assert len(store) == 0 and store.used_bytes == 0
    assert sorted(evicted) == sorted([(entries[0].key, "budget"), (entries[1].key, "orphan"), (entries[2].key, "orphan")])


def test_put_refuses_orphans_and_oversized_entries_and_says_so(caplog):
    store = store_of(2)
    entries = chain(list(range(3 * CHUNK)), store)
    assert store.put_chain(entries[1:]) == 0  # parent missing
    assert store.put_chain(entries) == 2  # the third does not fit beside its pinned-in-progress parents
    assert store.stats()["rejected_puts"] == 3
    assert "refused" in caplog.text
    tiny = PrefixStore(max_size_mb=ENTRY_BYTES / 2 / MIB, chunk_size=CHUNK)
    assert not tiny.put(entries[0]) and tiny.stats()["rejected_puts"] == 1


def test_duplicate_put_is_counted_not_stored_twice():
    store = store_of(4)
    e = entry(b"d" * 32)
    assert store.put(e) and store.put(e)
    assert len(store) == 1 and store.used_bytes == ENTRY_BYTES and store.stats()["duplicate_puts"] == 1


# ---------------------------------------------------------------------- pinning and resize
def test_pinned_entries_survive_resize_and_puts_then_go_when_released():
    store = store_of(3)
    tokens = list(range(2 * CHUNK))
    store.put_chain(chain(tokens, store))
    match = store.lookup(NS, tokens, pin=True)
    assert match.num_tokens == 2 * CHUNK
    assert store.resize(0) == 0
    assert len(store) == 2 and store.used_bytes > store.max_bytes  # over budget while in use
    assert not store.put(entry(b"new" * 11))  # no room: pinned entries hold it all
    assert store.stats()["rejected_puts"] == 1
    store.release(match)
    assert len(store) == 0 and store.used_bytes == 0
    store.release(match)  # releasing twice is harmless


def test_pinning_a_leaf_protects_its_whole_chain():
    store = store_of(3)
    entries = chain(list(range(3 * CHUNK)), store)
    store.put_chain(entries)
    with store.pinned([entries[2].key]):
        store.resize(0)
        assert all(e.key in store for e in entries)
        store.clear()
        assert len(store) == 3
    assert len(store) == 0


def test_entry_infos_list_parents_sizes_recency_hits_and_pins_without_touching_recency():
    store = store_of(8)
    first, second = chain(list(range(2 * CHUNK)), store), chain(list(range(100, 100 + CHUNK)), store)
    store.put_chain(first)
    store.put_chain(second)
    store.lookup(NS, list(range(CHUNK)), pin=True)
    before = {i.key: i for i in store.entry_infos()}
    assert set(before) == {e.key for e in first + second}
    assert before[first[1].key].parent == first[0].key and before[first[0].key].parent is None
    assert all(i.nbytes == ENTRY_BYTES for i in before.values())
    assert before[first[0].key].hits == 1 and before[first[0].key].pins == 1 and before[first[1].key].pins == 0
    assert before[first[0].key].last_used > before[second[0].key].last_used  # looked up after the second put
    assert {i.key: i for i in store.entry_infos()} == before  # listing is not a use


def test_remove_takes_the_chunks_extending_a_key_and_spares_what_is_in_use():
    removed = []
    store = store_of(8, on_evict=lambda e, reason: removed.append((e.key, reason)))
    first, second = chain(list(range(2 * CHUNK)), store), chain(list(range(100, 100 + 2 * CHUNK)), store)
    store.put_chain(first)
    store.put_chain(second)
    store.pin([first[1].key])
    # pinned leaf keeps its parent; missing keys are skipped
    assert store.remove([first[0].key, first[1].key, b"missing"]) == 0 and len(store) == 4
    assert store.remove([second[0].key], reason="coordinator") == 2 * ENTRY_BYTES
    assert removed == [(second[1].key, "orphan"), (second[0].key, "coordinator")]
    assert store.used_bytes == 2 * ENTRY_BYTES and store.stats()["evictions"] == 2
    store.unpin([first[1].key])
    assert store.remove([first[1].key]) == ENTRY_BYTES and first[0].key in store


def test_accounting_problems_name_byte_drift_and_orphaned_chunks():
    store = store_of(8)
    first = chain(list(range(2 * CHUNK)), store)
    store.put_chain(first)
    assert store.accounting_problems() == []
    # simulate the bugs the health check exists for: a lost parent, a byte total that drifted
    del store._slots[first[0].key]
    store._used_bytes += 3
    problems = store.accounting_problems()
    assert any("used_bytes" in p for p in problems)
    assert any("parent chunk is gone" in p and first[1].key.hex()[:12] in p for p in problems)


def test_resize_evicts_until_under_budget_and_rejects_bad_sizes():
    store = store_of(6)
    for i in range(6):
        store.put(entry(bytes([i]) * 32, seed=i))
    assert store.resize(3.5 * ENTRY_BYTES / MIB) == 3
    assert len(store) == 3 and store.used_bytes <= store.max_bytes
    assert [bytes([i]) * 32 in store for i in range(6)] == [False] * 3 + [True] * 3
    for bad in (-1, "big", None, True):
        with pytest.raises(ValueError, match="new_size_mb"):
            store.resize(bad)


def test_pin_errors_name_the_problem():
    store = store_of(2)
    with pytest.raises(ValueError, match="not stored"):
        store.pin([b"absent"])
    store.put(entry(b"p"))
    with pytest.raises(ValueError, match="not pinned"):
        store.unpin([b"p"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"max_size_mb": -1}, "max_size_mb"),
        ({"eviction": "fifo"}, r"eviction.*\['lru', 'lfu'\].*'fifo'"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixStore(**kwargs)


def test_concurrent_puts_lookups_and_resizes_keep_the_accounting_exact():
    store = store_of(8)
    prompts = [list(range(i * 1000, i * 1000 + 2 * CHUNK)) for i in range(6)]
    chains = [chain(p, store) for p in prompts]

    def worker(i: int) -> None:
        for _ in range(20):
            store.put_chain(chains[i])
            match = store.lookup(NS, prompts[(i + 1) % 6], pin=True)
            store.release(match)
            store.resize((4 + i % 3) * ENTRY_BYTES / MIB)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.used_bytes == sum(s.nbytes for s in store._slots.values()) <= store.max_bytes
    assert store.pinned_bytes == 0
    for key, slot in store._slots.items():  # every stored chunk is reachable
        assert slot.entry.parent is None or slot.entry.parent in store


# ---------------------------------------------------------------------- the cache's export / import API
@pytest.mark.parametrize("quant_type", ["int8", "int4", "mixed"])
def test_encoded_blocks_are_the_bytes_the_cache_stores_and_load_back_exactly(quant_type):
    from hf_kvcache_plugin import create_quantized_kv_cache

    def make():
        return create_quantized_kv_cache(quant_type, num_layers=1, num_heads=H, head_dim=D, group_size=G,
                                         residual_length=G, mixed_int8_tokens=2 * G)

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, H, 5 * G, D, generator=g), torch.randn(2, H, 5 * G, D, generator=g)
    reference = make()
    reference.update(k, v, 0)  # 4 blocks leave the window of G tokens
    layer = reference.layers[0]
    qk, qv = encode_blocks(layer, k[:, :, : 4 * G], v[:, :, : 4 * G])
    assert qk.shape == (2, H, 4, G, D)
    if quant_type != "mixed":  # mixed re-packs aged blocks to INT4 inside the cache
        assert torch.equal(qk.data, layer.quantized_keys.recent.data)
        assert torch.equal(qv.scale, layer.quantized_values.recent.scale)

    loaded = make()
    loaded.load_blocks([qk], [qv], torch.float32, "cpu")
    assert loaded.get_seq_length() == 4 * G
    assert loaded.get_stats()["quantized_bytes"] == layer.quantized_keys.nbytes + layer.quantized_values.nbytes
    ref_k, ref_v = layer.dequantized()
    got_k, got_v = loaded.layers[0].dequantized()
    assert torch.equal(got_k, ref_k[:, :, : 4 * G]) and torch.equal(got_v, ref_v[:, :, : 4 * G])

    with pytest.raises(ValueError, match="empty layer"):
        loaded.load_blocks([qk], [qv], torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not match this layer's codec"):
        create_quantized_kv_cache("int2", num_layers=1, group_size=G, residual_length=G).load_blocks(
            [qk], [qv], torch.float32, "cpu"
        )
    with pytest.raises(ValueError, match="whole blocks"):
        encode_blocks(layer, k[:, :, :3], v[:, :, :3])


# ---------------------------------------------------------------------- YAML sections
def test_prefix_store_and_sizer_sections_parse_and_are_checked():
    from hf_kvcache_plugin import PrefixStoreConfig, SizerConfig, parse_config

    cfg = parse_config({"cache": {"group_size": 8, "residual_length": 16}, "prefix_store": {"chunk_size": 64},
                        "sizer": {"min_size_mb": 4}})
    assert cfg.prefix_store == PrefixStoreConfig(chunk_size=64) and cfg.sizer == SizerConfig(min_size_mb=4)
    assert parse_config({}).prefix_store is None and parse_config({"prefix_store": None}).prefix_store is None
    assert parse_config({"prefix_store": {}}).prefix_store == PrefixStoreConfig()  # an empty section turns it on
    store = PrefixStore.from_config(cfg)
    assert (store.chunk_size, store.max_size_mb, store.eviction) == (64, 256.0, "lru")
    bad = [
        ({"prefix_store": {"chunk": 64}}, r"unknown key\(s\) \['chunk'\] in `prefix_store`; allowed keys are"),
        ({"prefix_store": {"chunk_size": "64"}}, "`prefix_store.chunk_size` has to be of type int but got str"),
        ({"prefix_store": {"eviction": "fifo"}}, r"`prefix_store.eviction` has to be one of \['lru', 'lfu'\] but got 'fifo'"),
        ({"cache": {"group_size": 8, "residual_length": 16}, "prefix_store": {"chunk_size": 60}},
         r"`prefix_store.chunk_size` has to be a multiple of `cache.group_size` \(8\) but got 60"),
        ({"cache": {"sink_tokens": 4}, "prefix_store": {}}, "prefix reuse needs `cache.sink_tokens: 0` but got 4"),
        ({"sizer": {}}, "needs a `prefix_store` section"),
        ({"prefix_store": {}, "sizer": {"grow_factor": 0.5}}, "`sizer.grow_factor` has to be > 1 but got 0.5"),
    ]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_config(data)
    with pytest.raises(ValueError, match="no `prefix_store:` section"):
        PrefixStore.from_config(parse_config({}))
