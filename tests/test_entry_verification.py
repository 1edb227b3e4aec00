"""Issue 14: a peer that holds the launch secret cannot change outputs with entries of scrambled codes.

``EntryVerifier`` recomputes a sampled batch's chunks with the local model
(stories260K, INT8) and refuses values outside the quantization bound: honest
chunks pass however they were made (fresh, after a hit on their first chunk,
after hits on all chunks before them); scrambled codes and a change of two
quantization steps in one code are caught; an entry whose tokens were never
seen is not stored, without blame. Through the entry exchange, refused
batches count against the sender's breaker (reason ``verification``) until it
opens, nothing of them is stored, and outputs stay those of a single process.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_kvcache_plugin import BreakerConfig, CacheConfig, DistributedConfig, NodeInfo, PrefixStore, attach_prefix_cache
from hf_kvcache_plugin.distributed import CacheCoordinator, PrefixStoreAdapter
from hf_kvcache_plugin.distributed.entry_verification import EntryMismatch, EntryUnverifiable, EntryVerifier
from hf_kvcache_plugin.distributed.payloads import encode_entries
from hf_kvcache_plugin.distributed.transport import StoreTransport
from hf_kvcache_plugin.reuse.entry_layout import EntryLayout
from hf_kvcache_plugin.resilience import ServingMetrics
from tests.test_app_service_distributed import DictStore, ManualClock

CHUNK = 16
CONFIG = CacheConfig(quant_type="int8", group_size=8, residual_length=16, cpu_kernel="off")
GENERATE = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def prompt_of(seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (3 * CHUNK + 1,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread (and two threads crawl on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def made(model, one_thread):
    """Per way of making them, a hook's store holding the 3 chunks of one prompt, and the prompt."""
    out = {}
    for seed, how in enumerate(("fresh", "after_first_chunk", "after_every_chunk")):
        prompt = prompt_of(seed)
        hook = attach_prefix_cache(model, PrefixStore(max_size_mb=4, chunk_size=CHUNK), CONFIG)
        with torch.inference_mode():
            lengths = {"fresh": [], "after_first_chunk": [1], "after_every_chunk": [1, 2]}[how]
            for chunks in lengths:
                hook.generate(prompt[: chunks * CHUNK + 1].unsqueeze(0), max_new_tokens=1)
            hook.generate(prompt.unsqueeze(0), max_new_tokens=1)
        hook.detach()
        out[how] = (hook, prompt)
    return out


def verifier_for(model, hook, stored=lambda key: None, **kwargs) -> EntryVerifier:
    return EntryVerifier(model, hook.cache_config, hook.namespace, CHUNK, stored, 1.0, **kwargs)


def chain(hook, prompt) -> list:
    keys = verifier_for(hook.model, hook).learn(prompt[:-1].tolist())
    return [hook.store.get(k) for k in keys]


def learned(model, made, how: str) -> tuple[EntryVerifier, list]:
    """A verifier that saw the prompt made ``how``, and that prompt's 3 stored chunks."""
    hook, prompt = made[how]
    verifier = verifier_for(model, hook)
    verifier.learn(prompt[:-1].tolist())
    return verifier, chain(hook, prompt)


def with_codes(entry, layer: int, stream: str, change):
    """``entry`` with the codes of one layer's keys or values replaced by ``change(codes)``."""
    blocks = list(getattr(entry, stream))
    blocks[layer] = dataclasses.replace(blocks[layer], data=change(blocks[layer].data.contiguous().clone()))
    return dataclasses.replace(entry, **{stream: tuple(blocks)})


def moved_code(data: torch.Tensor, steps: int) -> torch.Tensor:
    flat = data.view(-1)  # INT8: one code per byte
    code = int(flat[7])
    flat[7] = code + steps if code + steps <= 255 else code - steps
    return data


@pytest.mark.parametrize("how", ["fresh", "after_first_chunk", "after_every_chunk"])
def test_honest_chunks_pass_however_they_were_made(model, made, how):
    hook, prompt = made[how]
    verifier = verifier_for(model, hook)
    verifier.learn(prompt[:-1].tolist())
    verifier.check(chain(hook, prompt))
    assert verifier.stats["entries_checked"] == 3 and verifier.stats["mismatches"] == 0
    assert 0.5 < verifier.stats["worst_ratio"] <= 1.0  # the bound is the rounding error itself, and holds


def test_scrambled_codes_are_caught(model, made):
    verifier, entries = learned(model, made, "after_first_chunk")
    order = torch.randperm(entries[1].keys[0].data.shape[-1], generator=torch.Generator().manual_seed(0))
    for layer, stream in [(0, "keys"), (3, "values")]:
        bad = [entries[0], with_codes(entries[1], layer, stream, lambda data: data[..., order])]
        with pytest.raises(EntryMismatch, match=f"layer {layer} {stream} differ from this model's K/V"):
            verifier.check(bad)


def test_two_quantization_steps_in_one_code_of_the_first_layer_are_caught(model, made):
    # the rounding error is at most half a step: a code moved by 2 steps is off by at least 1.5 steps
    verifier, entries = learned(model, made, "fresh")
    for stream in ("keys", "values"):
        bad = entries[:2] + [with_codes(entries[2], 0, stream, lambda data: moved_code(data, 2))]
        with pytest.raises(EntryMismatch, match=r"layer 0 .* by [2-9]\.\d times the quantization bound"):
            verifier.check(bad)


def test_a_deeper_layer_bound_leaves_room_only_for_what_quantized_parents_move(model, made):
    # deeper layers allow twice how far quantized parents move the chunk: a few INT8 steps, far below a
    # tenth of a group's range (25 steps)
    verifier, entries = learned(model, made, "after_every_chunk")
    for layer in (1, 4):
        with pytest.raises(EntryMismatch, match=f"layer {layer} values"):
            verifier.check(entries[:2] + [with_codes(entries[2], layer, "values", lambda d: moved_code(d, 25))])


def test_chunks_of_tokens_never_seen_are_not_stored_and_nobody_is_blamed(model, made):
    hook, prompt = made["fresh"]
    verifier = verifier_for(model, hook)  # learned nothing
    with pytest.raises(EntryUnverifiable, match="its tokens were never seen here"):
        verifier.check(chain(hook, prompt))
    verifier.learn(prompt[:-1].tolist())
    entries = chain(hook, prompt)
    with pytest.raises(EntryMismatch, match="its parent is not the chunk before it"):
        verifier.check([dataclasses.replace(entries[1], parent=entries[1].key)])


def test_sampling_checks_every_batch_until_one_passed(model, made):
    hook, _ = made["fresh"]
    draws = iter([0.5, 0.05, 0.9])
    verifier = verifier_for(model, hook, draw=lambda: next(draws))
    verifier.sample_rate = 0.1
    assert verifier.wants(3) and verifier.wants(3)  # no draw before a batch of peer 3 passed
    verifier.passed(3)
    assert [verifier.wants(3), verifier.wants(3), verifier.wants(3)] == [False, True, False]
    with pytest.raises(ValueError, match=r"`sample_rate` has to be in \[0, 1\] but got 1.5"):
        EntryVerifier(model, hook.cache_config, hook.namespace, CHUNK, lambda key: None, 1.5)


def test_a_peer_with_the_secret_sending_scrambled_codes_is_cut_off_and_changes_nothing(model, made):
    hook, prompt = made["after_first_chunk"]
    entries = chain(hook, prompt)
    scrambled = [entries[0], with_codes(entries[1], 3, "keys", lambda data: data.flip(-1))]
    wire, metrics = DictStore(), ServingMetrics()
    common = dict(namespace="t", heartbeat_interval_s=10.0, heartbeat_timeout_s=30.0, clock=ManualClock(),
                  secret=b"the launch secret", breaker=BreakerConfig(fail_max=2, reset_timeout_s=100.0))
    sender = StoreTransport(wire, 0, 2, **common)
    target = PrefixStore(max_size_mb=4, chunk_size=CHUNK)
    layout = EntryLayout.for_model(model.config, hook.cache_config, CHUNK, model.dtype)
    coordinator = CacheCoordinator(NodeInfo(1), DistributedConfig(), transport=StoreTransport(wire, 1, 2, metrics=metrics,
                                   **common), local_entries=PrefixStoreAdapter(target, checks=(layout.problem,)))
    verifier = verifier_for(model, hook, stored=target.get)
    verifier.learn(prompt[:-1].tolist())  # as from the sender's round view
    coordinator.entry_exchange.verifier = verifier
    exporter = PrefixStoreAdapter(PrefixStore(max_size_mb=4, chunk_size=CHUNK), checks=())
    exporter.prefix_store.put_chain(scrambled)
    for number in (1, 2):
        sender.post(sender.key("migrate", 0, 1, number), encode_entries(exporter.export_entries([e.key for e in scrambled])))
        coordinator.entry_exchange.absorb(0, {"directory_version": 0, "migrations": {"1": number}, "evictions": 0})
    assert len(target) == 0  # nothing of either batch was stored
    assert coordinator.counters["rejected_migration_batches"] == 2
    assert metrics.value("hf_kvcache_cluster_messages_dropped_total", rank="1", peer="0", reason="verification") == 2
    assert coordinator.transport.breaker_state(0) == "open"
    assert metrics.value("hf_kvcache_breaker_opens_total", breaker="rank1->peer0") == 1
    # what the target serves is what one process computes on its own
    reference = attach_prefix_cache(model, PrefixStore(max_size_mb=4, chunk_size=CHUNK), CONFIG)
    try:
        expected = reference.generate(prompt.unsqueeze(0), **GENERATE)
    finally:
        reference.detach()
    served = attach_prefix_cache(model, target, CONFIG)
    try:
        assert torch.equal(served.generate(prompt.unsqueeze(0), **GENERATE), expected)
    finally:
        served.detach()


def test_an_honest_batch_is_verified_then_stored(model, made):
    hook, prompt = made["after_every_chunk"]
    wire = DictStore()
    common = dict(namespace="t", heartbeat_interval_s=10.0, heartbeat_timeout_s=30.0, clock=ManualClock(),
                  secret=b"the launch secret")
    sender = StoreTransport(wire, 0, 2, **common)
    target = PrefixStore(max_size_mb=4, chunk_size=CHUNK)
    coordinator = CacheCoordinator(NodeInfo(1), DistributedConfig(), transport=StoreTransport(wire, 1, 2, **common),
                                   local_entries=PrefixStoreAdapter(target))
    verifier = verifier_for(model, hook, stored=target.get)
    verifier.learn(prompt[:-1].tolist())
    coordinator.entry_exchange.verifier = verifier
    keys = [e.key for e in chain(hook, prompt)]
    sender.post(sender.key("migrate", 0, 1, 1), encode_entries(PrefixStoreAdapter(hook.store).export_entries(keys)))
    coordinator.entry_exchange.absorb(0, {"directory_version": 0, "migrations": {"1": 1}, "evictions": 0})
    assert all(key in target for key in keys)
    assert coordinator.counters["verified_migration_batches"] == 1 and verifier.stats["entries_checked"] == 3
