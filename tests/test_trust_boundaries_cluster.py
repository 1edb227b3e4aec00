"""Issue 14, the distributed half: what a peer (or anyone reaching the c10d store) sends cannot corrupt output or
stop a rank. One process, a real loopback ``TCPStore`` (or a dict) and injected clocks; the real processes are in
tests/test_fault_injection_cluster.py."""

from __future__ import annotations

import dataclasses
import datetime
import threading

import psutil
import pybreaker
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvcache_plugin import BreakerConfig, CacheConfig, DistributedConfig, NodeInfo, PrefixStore, attach_prefix_cache
from hf_kvcache_plugin.distributed import CacheCoordinator, PrefixStoreAdapter
from hf_kvcache_plugin.distributed.payloads import PayloadError, decode_entries, decode_json, encode_entries, encode_json
from hf_kvcache_plugin.distributed.round_messages import RoundMessages
from hf_kvcache_plugin.distributed.signing import BadMessage, MessageSigner, launch_secret
from hf_kvcache_plugin.distributed.transport import PeerTimeout, StoreTransport, connect_c10d_store
from hf_kvcache_plugin.distributed.wire import (
    parse_directory,
    parse_evictions,
    parse_node,
    parse_results,
    parse_view,
)
from hf_kvcache_plugin.reuse.entry_layout import EntryLayout
from hf_kvcache_plugin.resilience import ServingMetrics
from tests.test_app_service_distributed import DictStore, ManualClock
from tests.test_coordinator import StepClock

SECRET = b"test secret"
CHUNK = 16


def transport(rank: int, store, *, world: int = 2, clock=None, metrics=None, **kwargs) -> StoreTransport:
    return StoreTransport(store, rank, world, namespace="t", heartbeat_interval_s=10.0, heartbeat_timeout_s=30.0,
                          breaker=BreakerConfig(fail_max=2, reset_timeout_s=100.0), clock=clock or ManualClock(),
                          metrics=metrics, secret=SECRET, **kwargs)


def dropped(metrics: ServingMetrics, reason: str, peer: int = 0, rank: int = 1) -> float:
    return metrics.value("hf_kvcache_cluster_messages_dropped_total", rank=str(rank), peer=str(peer),
                         reason=reason) or 0


# ---------------------------------------------------------------------- signatures
def test_unsigned_forged_misattributed_and_replayed_messages_are_dropped_and_counted():
    store, metrics = DictStore(), ServingMetrics()
    sender, receiver = transport(0, store), transport(1, store, metrics=metrics)
    key = sender.key("directory", 0)

    store.set(key, encode_json({"version": 1, "sizes": {}}))  # what anyone reaching the port could write
    assert receiver.read(key, 0) is None and key not in store.data  # dropped and deleted
    assert dropped(metrics, "unsigned") == 1

    forger = StoreTransport(store, 0, 2, namespace="t", secret=b"another secret")
    forger.post(key, b"{}")
    assert receiver.read(key, 0) is None and dropped(metrics, "bad_signature") == 1

    sealed = sender.signer.seal(key, b"payload")
    store.set(key, sealed[:-1] + bytes([sealed[-1] ^ 1]))  # one bit flipped in transit
    assert receiver.read(key, 0) is None and dropped(metrics, "bad_signature") == 2

    store.set(sender.key("round", 9, "view", 0), sealed)  # a genuine message copied under another key
    assert receiver.read(sender.key("round", 9, "view", 0), 0) is None and dropped(metrics, "bad_signature") == 3

    third = transport(1, store)  # rank 1's own signature on a key rank 0 posts
    third.post(key, b"not mine")
    assert receiver.read(key, 0) is None and dropped(metrics, "wrong_sender", peer=0) == 1

    sender.post(key, b"old")
    old = store.data[key]
    sender.post(key, b"new")
    assert receiver.read(key, 0) == b"new"
    store.set(key, old)  # replayed: signed, but older than what was read
    assert receiver.read(key, 0) is None and dropped(metrics, "stale") == 1
    assert receiver.counters["dropped_stale"] == 1


def test_without_a_secret_only_loopback_is_allowed(monkeypatch):
    monkeypatch.delenv("HF_KVCACHE_CLUSTER_SECRET", raising=False)
    with pytest.raises(ValueError, match=r"not on loopback, so it has to be signed: set \$HF_KVCACHE_CLUSTER_SECRET"):
        launch_secret("HF_KVCACHE_CLUSTER_SECRET", "10.1.2.3")
    assert launch_secret("HF_KVCACHE_CLUSTER_SECRET", "127.0.0.1")  # a fixed stand-in, with a warning
    monkeypatch.setenv("HF_KVCACHE_CLUSTER_SECRET", "s3cret")
    assert launch_secret("HF_KVCACHE_CLUSTER_SECRET", "10.1.2.3") == b"s3cret"


def test_rank_zero_hosts_the_store_on_the_named_interface_only(monkeypatch):
    for name in ("MASTER_ADDR", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    with socket_port() as port:
        pass
    client = connect_c10d_store(0, 2, store_port=port, timeout_s=5.0, bind_address="127.0.0.1")
    listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    client.set("k", b"v")
    assert client.get("k") == b"v"


class socket_port:
    """A free TCP port on loopback."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_payloads_are_capped_both_ways():
    store, metrics = DictStore(), ServingMetrics()
    small = transport(0, store, max_payload_bytes=100)
    with pytest.raises(ValueError, match="a message of 101 bytes exceeds `max_payload_mb`"):
        small.post(small.key("x"), b"x" * 101)
    big = transport(0, store)
    big.post(big.key("x"), b"x" * 1000)
    receiver = transport(1, store, metrics=metrics, max_payload_bytes=100)
    assert receiver.read(receiver.key("x"), 0) is None and dropped(metrics, "oversized") == 1
    with pytest.raises(ValueError, match="`migration_mb_per_step` has to be at most `max_payload_mb`"):
        DistributedConfig(migration_mb_per_step=100.0, max_payload_mb=64.0)
    with pytest.raises(ValueError, match="round_deadline_s"):
        DistributedConfig(round_deadline_s=1e9)
    with pytest.raises(ValueError, match="`distributed.round_timeout_s` moved to `distributed.round_deadline_s`"):
        from hf_kvcache_plugin import parse_config

        parse_config({"prefix_store": {}, "distributed": {"round_timeout_s": 300.0}})


# ---------------------------------------------------------------------- one deadline per round, liveness
class RecordingTransport(StoreTransport):
    """Records the time left that each receive was given; the message never comes."""

    def receive(self, peer, key, timeout_s, **kwargs):
        self.given.append(timeout_s)
        self.clock.now += timeout_s  # the whole wait passes
        raise PeerTimeout(peer, "test")


def test_a_round_waits_once_for_all_its_peers_not_once_per_peer():
    clock, counters = ManualClock(), __import__("collections").Counter()
    t = RecordingTransport(DictStore(), 0, 4, namespace="t", heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0,
                           clock=clock, secret=SECRET)
    t.given = []
    coordinator = CacheCoordinator(NodeInfo(0), DistributedConfig(round_deadline_s=2.0), transport=t)
    for peer in (1, 2, 3):
        coordinator.nodes[peer] = NodeInfo(peer)
    messages: RoundMessages = coordinator.messages
    number = messages.begin()
    for peer in (1, 2, 3):
        assert messages.receive(peer, messages.view_key(number, peer), number) is None
    assert t.given == [2.0, 0.0, 0.0]  # 2 s for the round, not 2 s per peer
    assert DistributedConfig().round_deadline_s == 30.0


def test_a_stuck_main_thread_stops_the_heartbeat():
    clock, store = ManualClock(), dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                                timeout=datetime.timedelta(seconds=5))
    t = StoreTransport(store, 0, 2, namespace="t", heartbeat_interval_s=0.01, heartbeat_timeout_s=0.05, clock=clock,
                       secret=SECRET, progress_timeout_s=3.0)
    t.start_heartbeat()
    try:
        wait_for(lambda: store.add("t/heartbeat/0", 0) >= 3)  # beating while the main thread moves
        clock.now = 10.0  # no progress for longer than progress_timeout_s: the main thread is stuck
        wait_for(lambda: t.counters["heartbeats_withheld"] >= 2)
        frozen = store.add("t/heartbeat/0", 0)
        wait_for(lambda: t.counters["heartbeats_withheld"] >= 6)
        assert store.add("t/heartbeat/0", 0) <= frozen + 1  # at most one beat was already on its way
        t.mark_progress()
        wait_for(lambda: store.add("t/heartbeat/0", 0) >= frozen + 3)  # back to life
    finally:
        t.stop_heartbeat()


def wait_for(condition, tries: int = 2000) -> None:
    """Poll ``condition`` (for at most ``tries`` x 5 ms; a loaded machine may be slow, nothing asserts a time)."""
    for _ in range(tries):
        if condition():
            return
        threading.Event().wait(0.005)
    raise AssertionError("condition never held")


# ---------------------------------------------------------------------- old posts are deleted
def test_every_settled_round_is_forgotten_even_when_rounds_are_skipped_or_a_round_fails():
    store = DictStore()
    t = transport(0, store)
    served = []

    def serve(prompts):
        served.append(prompts)
        if len(served) == 3:
            raise RuntimeError("the model failed")
        return [[1] for _ in prompts]

    coordinator = CacheCoordinator(NodeInfo(0), DistributedConfig(), transport=t, serve_batch=serve)
    coordinator.start(wait_for=1)
    coordinator.generate([[5, 6]])
    coordinator.generate([[5, 6]])
    with pytest.raises(RuntimeError, match="the model failed"):
        coordinator.generate([[5, 6]])  # round 3 fails while serving
    peer = transport(1, store)
    store.add(peer.key("round_no", 1), 7)  # a peer is in round 7: this process skips to it
    coordinator.nodes[1] = NodeInfo(1)
    coordinator.messages.number = 3
    assert coordinator.messages.begin() == 7
    coordinator.messages.forget_settled()
    views = sorted(k for k in store.data if "/view/" in k)
    assert views == [], views  # rounds 1-3: all <= 7 - 2, the failed one included


def test_eviction_orders_are_deleted_after_the_rounds_that_read_them():
    store = DictStore()
    source = PrefixStore(max_size_mb=1.0, chunk_size=CHUNK)
    coordinator = CacheCoordinator(NodeInfo(0), DistributedConfig(replication_factor=1), transport=transport(0, store),
                                   local_entries=PrefixStoreAdapter(source), serve_batch=lambda p: [[1] for _ in p])
    coordinator.start(wait_for=1)
    coordinator.trigger_global_eviction(0.5)
    assert any("/evict/" in k for k in store.data)
    for _ in range(3):
        coordinator.step()
    assert not any("/evict/" in k for k in store.data)


# ---------------------------------------------------------------------- entries
@pytest.fixture(scope="module")
def hooked(model):
    hook = attach_prefix_cache(model, PrefixStore(max_size_mb=4, chunk_size=CHUNK),
                               CacheConfig(quant_type="int4", group_size=8, residual_length=16, cpu_kernel="off"))
    prompt = torch.arange(5, 5 + 3 * CHUNK + 1).unsqueeze(0)
    hook.generate(prompt, max_new_tokens=1, do_sample=False)
    layout = EntryLayout.for_model(model.config, hook.cache_config, CHUNK, model.dtype)
    hook.detach()  # its store keeps the chunks; the model is free for other hooks
    return hook, layout


def damaged(entry, how: str):
    q = entry.keys[0]
    if how == "one_layer":
        return dataclasses.replace(entry, keys=entry.keys[:1], values=entry.values[:1])
    if how == "nan_scale":
        scale = q.scale.clone()
        scale.view(-1)[0] = float("nan")
        return dataclasses.replace(entry, keys=(dataclasses.replace(q, scale=scale),) + entry.keys[1:])
    if how == "bits":
        return dataclasses.replace(entry, keys=(dataclasses.replace(q, bits=8),) + entry.keys[1:])
    if how == "scale_dtype":
        return dataclasses.replace(entry, keys=(dataclasses.replace(q, scale=q.scale.double()),) + entry.keys[1:])
    if how == "truncated_codes":
        return dataclasses.replace(entry, keys=(dataclasses.replace(q, data=q.data[..., :1]),) + entry.keys[1:])
    if how == "heads":
        cut = q.map_tensors(lambda t: t[:, :1], new_shape=(1, 1, *q.shape[2:]))
        return dataclasses.replace(entry, keys=(cut,) + entry.keys[1:])
    raise AssertionError(how)


def test_stored_chunks_fit_the_layout_and_every_kind_of_damage_is_named(hooked):
    hook, layout = hooked
    entries = [hook.store.get(info.key) for info in hook.store.entry_infos()]
    assert len(entries) == 3 and all(layout.problem(e) is None for e in entries)
    expected = {
        "one_layer": f"keys of 1 layers, this model has {len(layout.keys)}",
        "nan_scale": "layer 0 keys has non-finite scales or zeros",
        "bits": "layer 0 keys `bits` is 8 but this cache stores 4",
        "scale_dtype": "layer 0 keys `scale` is",
        "truncated_codes": "layer 0 keys `data` is",
        "heads": "layer 0 keys `shape` is (1, 1,",
    }
    for how, message in expected.items():
        problem = layout.problem(damaged(entries[0], how))
        assert message in problem, (how, problem)


@pytest.mark.parametrize("how", ["one_layer", "nan_scale", "bits", "truncated_codes"])
def test_a_bad_batch_is_deleted_counted_against_its_sender_and_the_next_one_flows(hooked, how):
    hook, layout = hooked
    store, metrics = DictStore(), ServingMetrics()
    entries = [hook.store.get(info.key) for info in hook.store.entry_infos()]
    exporter = PrefixStoreAdapter(hook.store)
    sender = transport(0, store)
    target = PrefixStore(max_size_mb=4, chunk_size=CHUNK)
    coordinator = CacheCoordinator(
        NodeInfo(1), DistributedConfig(), transport=transport(1, store, metrics=metrics),
        local_entries=PrefixStoreAdapter(target, checks=(layout.problem,)),
    )
    roots = [e for e in entries if e.parent is None]
    bad = PrefixStoreAdapter(PrefixStore(max_size_mb=4, chunk_size=CHUNK), checks=())
    bad.prefix_store.put(damaged(roots[0], how))
    key = sender.key("migrate", 0, 1, 1)
    sender.post(key, encode_entries(bad.export_entries([roots[0].key])))
    announce = {"directory_version": 0, "migrations": {"1": 1}, "evictions": 0}
    coordinator.entry_exchange.absorb(0, announce)  # never raises
    assert len(target) == 0 and key not in store.data  # nothing stored, the batch deleted
    assert coordinator.counters["rejected_migration_batches"] == 1
    assert coordinator.transport.events.failures["rank1->peer0"] == 1  # against the sender's breaker
    assert dropped(metrics, "malformed") == 1

    sender.post(sender.key("migrate", 0, 1, 2), encode_entries(exporter.export_entries([roots[0].key])))
    coordinator.entry_exchange.absorb(0, {**announce, "migrations": {"1": 2}})
    assert roots[0].key in target  # the next batch went in


def test_migrations_take_the_insert_guard_and_not_the_raw_store(hooked):
    hook, _ = hooked
    root = next(hook.store.get(i.key) for i in hook.store.entry_infos() if i.parent is None)
    adapter = PrefixStoreAdapter(PrefixStore(max_size_mb=4, chunk_size=CHUNK))  # default checks: the guard's
    payloads = PrefixStoreAdapter(hook.store).export_entries([root.key])
    payloads[0]["keys"][0]["scale"] = payloads[0]["keys"][0]["scale"].clone().fill_(float("inf"))
    with pytest.raises(PayloadError, match="payload 0 refused: layer 0 keys have non-finite scales"):
        adapter.import_entries(payloads)
    assert len(adapter.prefix_store) == 0


# ---------------------------------------------------------------------- peers' control messages
def peer_view(**overrides) -> dict:
    view = {"node": {"node_id": 1, "address": "", "capacity_mb": 64.0, "state": "active", "port": None},
            "prompts": [[3, 4, 5]], "directory_version": 0, "migrations": {}, "evictions": 0}
    return {**view, **overrides}


@pytest.mark.parametrize(
    "view,problem",
    [
        (peer_view(node={"node_id": 1, "bogus": 1}), "not a node record"),
        (peer_view(node={"node_id": 2}), "rank 1 sent the record of node 2"),
        (peer_view(prompts=[[3, 10**6]]), "token id 1000000, outside the vocabulary of 100"),
        (peer_view(prompts=[[-1]]), "greater than or equal to 0"),
        (peer_view(prompts=[["3"]]), "valid integer"),
        (peer_view(migrations={"x": 1}), "migration targets are ranks"),
        (peer_view(keys=["zz"]), "Extra inputs are not permitted"),
    ],
)
def test_malformed_views_are_refused_with_a_reason(view, problem):
    with pytest.raises(PayloadError, match=problem):
        parse_view(encode_json(view), 1, vocab_size=100)


def test_a_peer_view_that_would_have_raised_is_dropped_and_the_round_answers_locally():
    store, metrics = DictStore(), ServingMetrics()
    peer = transport(1, store)
    for key, value in ((peer.key("node", 1), NodeInfo(1).to_json()),):
        peer.post(key, value)
    store.add(peer.key("joined"), 1)
    store.add(peer.key("round_no", 1), 1)
    # out-of-vocabulary prompt and a bad hex directory: before, bytes.fromhex / the model raised out of generate
    peer.post(peer.key("round", 1, "view", 1), encode_json(peer_view(prompts=[[3, 10**6]])))
    coordinator = CacheCoordinator(
        NodeInfo(0), DistributedConfig(), transport=transport(0, store, metrics=metrics, clock=StepClock(0.5)),
        serve_batch=lambda prompts: [[len(p)] for p in prompts], metrics=metrics, vocab_size=100,
    )
    coordinator.start(wait_for=2)
    assert coordinator.generate([[1, 2, 3]]) == [[3]]
    assert coordinator.counters["rejected_messages"] == 1
    assert coordinator.transport.events.failures["rank0->peer1"] >= 1
    with pytest.raises(ValueError, match=r"prompt 0 holds token ids \[100\] outside \[0, 100\)"):
        coordinator.generate([[1, 100]])


def test_results_only_for_routed_prompts_and_in_vocabulary():
    assert parse_results(encode_json({"0": [1, 2]}), {0, 1}, 10) == {0: [1, 2]}
    with pytest.raises(PayloadError, match="results for prompt '5', which was not routed there"):
        parse_results(encode_json({"5": [1]}), {0}, 10)
    with pytest.raises(PayloadError, match="output 0 holds token id 99"):
        parse_results(encode_json({"0": [99]}), {0}, 10)
    with pytest.raises(PayloadError, match="not a directory"):
        parse_directory(encode_json({"version": 1, "sizes": {"not hex": 1}}))
    with pytest.raises(PayloadError, match="not a node record"):
        parse_node(encode_json({"node_id": 1, "state": "gone"}), 1)


# ---------------------------------------------------------------------- fuzzing: only the documented errors
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_raises_only_payload_errors(data):
    for decode in (decode_json, decode_entries, lambda d: parse_view(d, 1, 100), lambda d: parse_results(d, {0}, 100),
                   parse_directory, parse_evictions, lambda d: parse_node(d, 1)):
        try:
            decode(data)
        except PayloadError:
            pass
    signer = MessageSigner(SECRET, 1)
    try:
        signer.open("k", data, 0)
    except BadMessage:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(json_values, st.sampled_from(["node", "prompts", "directory_version", "migrations", "evictions"]))
def test_views_with_any_field_replaced_raise_only_payload_errors(value, field):
    try:
        parse_view(encode_json(peer_view(**{field: value})), 1, 100)
    except PayloadError:
        pass


tensors = st.sampled_from([torch.zeros(1, 2, 2, 8, dtype=torch.uint8), torch.ones(3), torch.zeros(0), None, "x", 1])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["key", "parent", "num_tokens", "keys", "values", "other"]),
                       json_values | tensors | st.lists(st.dictionaries(st.text(max_size=6), json_values | tensors,
                                                                        max_size=8), max_size=3), max_size=6))
def test_entry_payloads_of_any_shape_raise_only_payload_errors(payload):
    adapter = PrefixStoreAdapter(PrefixStore(max_size_mb=1, chunk_size=CHUNK))
    try:
        adapter.import_entries(decode_entries(encode_entries([payload])))
    except PayloadError:
        pass


def test_an_open_breaker_is_not_touched_by_a_rejection():
    t = transport(1, DictStore())
    for _ in range(3):
        t.reject(0, "k", "bad")
    assert t.breaker_state(0) == pybreaker.STATE_OPEN and t.counters["dropped_malformed"] == 3


# ---------------------------------------------------------------------- store and hook
def test_on_evict_runs_outside_the_store_lock(hooked):
    hook, _ = hooked
    source = hook.store
    entries = [source.get(i.key) for i in source.entry_infos()]
    finished = []

    def on_evict(entry, reason):
        # another thread using the store while the callback runs: under the store's lock this deadlocked
        reader = threading.Thread(target=lambda: finished.append(source_copy.stats()["entries"]))
        reader.start()
        reader.join(timeout=30)

    source_copy = PrefixStore(max_size_mb=4, chunk_size=CHUNK, on_evict=on_evict)
    root = next(e for e in entries if e.parent is None)
    source_copy.put(root)
    assert source_copy.remove([root.key]) > 0
    assert finished == [0]  # the reader got in, and saw the removal done


class FailingSecondLookup(PrefixStore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def lookup(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("lookup failed")
        return super().lookup(*args, **kwargs)


def test_pins_of_earlier_rows_are_released_when_a_later_lookup_raises(model):
    store = FailingSecondLookup(max_size_mb=4, chunk_size=CHUNK)
    hook = attach_prefix_cache(model, store, CacheConfig(quant_type="int4", group_size=8, residual_length=16, cpu_kernel="off"))
    try:
        prompt = torch.arange(5, 5 + 2 * CHUNK + 1).unsqueeze(0)
        hook.generate(prompt, max_new_tokens=1, do_sample=False)  # stores 2 chunks (lookup 1)
        with pytest.raises(RuntimeError, match="lookup failed"):
            hook.generate(prompt.repeat(2, 1), max_new_tokens=1, do_sample=False)  # row 0 pins, row 1 raises
        assert store.pinned_bytes == 0
    finally:
        hook.detach()
