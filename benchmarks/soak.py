"""Soak test: thousands of requests through the prefix hook, with faults injected. Not part of the test run.

    python benchmarks/soak.py --quick                    # 300 requests, about a minute on 2 CPU cores
    python benchmarks/soak.py --requests 3000 --seconds 900

The service is ``build_service`` on the embedded stories260K (``--model
random``: a random tiny Llama) with a small prefix store behind a
``GuardedStore``. Faults, on a fixed schedule plus random ones (``--seed``):

- store exceptions: each store call fails with ``--store-error-rate``, and
  every ``--outage-every`` requests the store is down for ``--outage-length``;
- peer timeouts: a stand-in peer (the coordinator is not in this branch) is
  asked on every request through its own breaker; it times out at
  ``--peer-timeout-rate`` and is down for stretches;
- memory pressure spikes: every ``--pressure-every`` requests the memory
  reading is 97% for ``--pressure-length`` requests (critical: not stored);
- corrupted entries: every ``--corrupt-every`` requests one stored entry gets
  an Inf scale (bit rot); a later hit on it fails to load, and the endpoint
  recomputes that request without the cache ("degraded").
- peer migration batches (issue 14): every ``--peer-batch-every`` requests a
  peer process sends this one a batch over a loopback c10d store, received
  and imported as the coordinator does (signature check, its breaker, the
  model's ``EntryLayout`` and the insert guard), in turn: valid (chunks a
  fault-free hook made), unsigned, a bit flipped after signing, NaN scales,
  one layer only, wrong bit width. Valid entries serve later hits (checked
  like every output); no damaged one may be stored. The same faults from
  real processes (a lying peer, a SIGKILLed one, a stalled one):
  benchmarks/soak_cluster.py.

Breakers run on a virtual clock of 10 ms per request, so opens and
recoveries do not depend on the machine's speed. Reported: requests served,
degraded, failed; entries lost (acknowledged by the store, not evicted by its
policy, yet gone or changed: must be 0); breaker opens and recoveries;
sampled outputs against a reference without the store (a mismatch on a store
hit is replayed on a fault-free hook and store holding the same chunks, the
same bytes when the soak's store still has them: if that reproduces it, reuse
itself changed the tokens (a near-tie: the reference's top-2 logit margin at
the first differing token is reported) and it is counted apart; otherwise it
is a mismatch, which must be 0); scrapes of the HTTP endpoint;
RSS at the start and end. Writes JSON (and a plot when matplotlib is there).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import platform
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pybreaker
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_kvcache_plugin import BreakerConfig, QuantizedKVCache, attach_prefix_cache, parse_config  # noqa: E402
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG  # noqa: E402
from hf_kvcache_plugin.embedded import STORIES260K  # noqa: E402
from hf_kvcache_plugin.reuse.prefix_store import PrefixStore, chunk_keys  # noqa: E402
from hf_kvcache_plugin.resilience import CircuitGuard, create_breaker, peers_check  # noqa: E402
from hf_kvcache_plugin.resilience.degradation import prefix_store_problems  # noqa: E402
from hf_kvcache_plugin.app.service import build_service  # noqa: E402

REAL_MODEL, TEXT = STORIES260K, REPO.parent / "shared" / "data" / "tinystories_val.txt"
TICK_S = 0.01  # virtual seconds per request for the breakers


@dataclass
class FaultPlan:
    seed: int = 0
    store_error_rate: float = 0.03
    outage_every: int = 400
    outage_length: int = 40
    peer_timeout_rate: float = 0.1
    peer_outage_every: int = 700
    peer_outage_length: int = 60
    pressure_every: int = 500
    pressure_length: int = 30
    corrupt_every: int = 300
    peer_batch_every: int = 10

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.request = 0

    def store_fails(self) -> bool:
        in_outage = self.request % self.outage_every >= self.outage_every - self.outage_length
        return in_outage or self.rng.random() < self.store_error_rate

    def peer_times_out(self) -> bool:
        in_outage = self.request % self.peer_outage_every >= self.peer_outage_every - self.peer_outage_length
        return in_outage or self.rng.random() < self.peer_timeout_rate

    def memory_used(self) -> float:
        spike = self.request % self.pressure_every >= self.pressure_every - self.pressure_length
        return 0.97 if spike else 0.50


class FaultyPrefixStore(PrefixStore):
    """A real PrefixStore whose calls fail when the plan says so; records what it acknowledged and evicted."""

    def __init__(self, plan: FaultPlan, **kwargs):
        self.plan = plan
        # key -> ("stored" | "evicted" | "corrupted", checksum when stored)
        self.state: dict[bytes, tuple[str, str | None]] = {}
        self.injected = 0
        super().__init__(on_evict=self._evicted, **kwargs)

    def _maybe_fail(self, what: str) -> None:
        if self.plan.store_fails():
            self.injected += 1
            raise ConnectionError(f"injected: prefix store unreachable during {what}")

    def lookup(self, *args, **kwargs):
        self._maybe_fail("lookup")
        return super().lookup(*args, **kwargs)

    def put_chain(self, entries):
        self._maybe_fail("put_chain")
        stored = super().put_chain(entries)
        for entry in entries[:stored]:
            if self.get(entry.key) is not None:  # acknowledged and held (not evicted at once by the budget)
                self.state[entry.key] = ("stored", entry_checksum(self.get(entry.key)))
        return stored

    def __contains__(self, key: object) -> bool:
        self._maybe_fail("contains")
        return super().__contains__(key)

    def _evicted(self, entry, reason: str) -> None:
        self.state[entry.key] = ("evicted", None)

    def corrupt_one(self, rng: random.Random) -> bool:
        """Bit rot: an Inf in one stored entry's first key scale (the entry is then excluded from the loss count)."""
        with self._lock:
            keys = list(self._slots)
            if not keys:
                return False
            key = rng.choice(keys)
            self.get(key).keys[0].scale.view(-1)[0] = float("inf")
            self.state[key] = ("corrupted", None)
        return True


def entry_checksum(entry) -> str:
    h = hashlib.sha256()
    for q in entry.keys + entry.values:
        for t in (q.data, q.scale, q.zero):
            if t is not None:
                h.update(t.contiguous().flatten().view(torch.uint8).numpy().tobytes())  # flat: a size-1 last dim may keep a stride
    return h.hexdigest()


class PeerStub:
    """Stands in for a coordinator peer: answers nothing useful, or times out."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan

    def fetch(self, key: bytes) -> None:
        if self.plan.peer_times_out():
            raise TimeoutError("injected: peer did not answer within its deadline")
        return None


class PeerBatches:
    """A peer's migration batches into this process's store; see the module docstring (peer migration batches)."""

    # a signed batch is a successful receive (it resets the breaker) before its entries are refused: the two
    # unsigned kinds follow a signed bad one, so that three failures in a row open the breaker now and then
    KINDS = ("valid", "nan_scales", "unsigned", "bit_flipped", "one_layer", "wrong_bits")

    def __init__(self, source: PrefixStore, target: PrefixStore, layout, metrics, clock):
        from hf_kvcache_plugin.distributed import PrefixStoreAdapter
        from hf_kvcache_plugin.distributed.transport import StoreTransport, host_c10d_store
        from hf_kvcache_plugin.resilience.degradation import entry_problem

        self.wire = host_c10d_store("127.0.0.1", 0)  # loopback only
        secret = b"soak launch secret"
        common = dict(namespace="soak", heartbeat_interval_s=0.5, heartbeat_timeout_s=5.0, clock=clock, secret=secret,
                      breaker=BreakerConfig(fail_max=3, reset_timeout_s=1.0, success_threshold=1))
        self.sender = StoreTransport(self.wire, 1, 2, **common)
        self.receiver = StoreTransport(self.wire, 0, 2, metrics=metrics, **common)
        self.source = PrefixStoreAdapter(source)
        self.target = PrefixStoreAdapter(target, checks=(layout.problem, entry_problem))
        self.roots = [info.key for info in source.entry_infos()]
        self.sent = {kind: 0 for kind in self.KINDS}
        self.refused = {kind: 0 for kind in self.KINDS}
        self.imported_entries = {kind: 0 for kind in self.KINDS}
        self.store_faults = 0

    def inject(self, rng: random.Random) -> None:
        from hf_kvcache_plugin.distributed.payloads import PayloadError, decode_entries, encode_entries
        from hf_kvcache_plugin.distributed.transport import BadMessage, PeerUnavailable

        kind = self.KINDS[sum(self.sent.values()) % len(self.KINDS)]
        self.sent[kind] += 1
        payloads = self.source.export_entries(rng.sample(self.roots, 1))
        q = payloads[0]["keys"][0]
        if kind == "nan_scales":
            q["scale"] = q["scale"].clone().fill_(float("nan"))
        elif kind == "one_layer":
            payloads[0]["keys"], payloads[0]["values"] = payloads[0]["keys"][:1], payloads[0]["values"][:1]
        elif kind == "wrong_bits":
            q["bits"] = 4
        key = self.sender.key("migrate", 1, 0, sum(self.sent.values()))
        body = encode_entries(payloads)
        if kind == "unsigned":
            self.wire.set(key, body)
        elif kind == "bit_flipped":
            sealed = bytearray(self.sender.signer.seal(key, body))
            sealed[len(sealed) // 2] ^= 0x10
            self.wire.set(key, bytes(sealed))
        else:
            self.sender.post(key, body)
        self.wire.add(self.sender.key("heartbeat", 1), 1)  # the peer is alive
        try:
            data = self.receiver.receive(1, key, 0.0)  # through its breaker; refused values are dropped
            imported = self.target.import_entries(decode_entries(data))
            self.imported_entries[kind] += imported
        except PayloadError as exc:
            self.receiver.reject(1, key, str(exc))
            self.refused[kind] += 1
        except (BadMessage, PeerUnavailable, pybreaker.CircuitBreakerError):  # dropped, or its breaker is open
            self.refused[kind] += 1
        except ConnectionError:  # the soak's own injected store fault during the import
            self.store_faults += 1
        finally:
            self.wire.delete_key(key)


def load_model(name: str):
    torch.manual_seed(0)
    if name == "random":
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=1024)
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(3, 512, (20000,), generator=torch.Generator().manual_seed(0))
        return model, ids
    model = AutoModelForCausalLM.from_pretrained(name).eval()
    ids = AutoTokenizer.from_pretrained(name)(TEXT.read_text()[:60000], add_special_tokens=False)["input_ids"]
    return model, torch.tensor(ids)


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=900.0, help="stop after this much wall time")
    parser.add_argument("--quick", action="store_true", help="300 requests, 120 s at most")
    parser.add_argument("--model", default=str(REAL_MODEL), help="a model path, or 'random' for a random tiny Llama")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a model this small is fastest on 1)")
    parser.add_argument("--check-every", type=int, default=25, help="compare every n-th output with a reference")
    parser.add_argument("--verbose", action="store_true", help="log every fallback (warnings are otherwise muted)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/soak[_quick].json)")
    for name, value in asdict(FaultPlan()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.seconds = min(args.requests, 300), min(args.seconds, 120.0)
        args.outage_every, args.outage_length, args.peer_outage_every = 150, 20, 200
        args.pressure_every, args.pressure_length, args.corrupt_every = 120, 15, 100
    plan = FaultPlan(**{k: getattr(args, k) for k in asdict(FaultPlan())})
    if not args.verbose:
        # thousands of injected faults would each log a warning; the summary counts them all
        logging.getLogger("hf_kvcache_plugin").setLevel(logging.ERROR)
    rng = random.Random(args.seed + 1)
    torch.set_num_threads(args.threads)

    model, stream = load_model(args.model)
    replay_model = copy.deepcopy(model)  # before the service hooks `model.generate`
    config = parse_config({
        "cache": {"quant_type": "int8", "group_size": 8, "residual_length": 16},
        "prefix_store": {"chunk_size": 16, "max_size_mb": 0.25},  # small: the LRU policy evicts during the run
        "serving": {"breaker": {"fail_max": 5, "reset_timeout_s": 0.5, "success_threshold": 2}},
    })  # fmt: skip
    store = FaultyPrefixStore(plan, max_size_mb=0.25, chunk_size=16)
    virtual_time = {"now": 0.0}
    svc = build_service(model, config, store=store, memory_reader=plan.memory_used,
                        breaker_clock=lambda: virtual_time["now"], http=True, http_port=0)  # fmt: skip
    peer = PeerStub(plan)
    peer_breaker = create_breaker("peer-1", BreakerConfig(fail_max=3, reset_timeout_s=1.0, success_threshold=1),
                                  metrics=svc.metrics, clock=lambda: virtual_time["now"])  # fmt: skip
    peer_guard = CircuitGuard(peer_breaker, "peer-1", svc.metrics)
    svc.checker.register("peers", peers_check(lambda: {"peer-1": peer_breaker.current_state == "closed"}))

    # a few dozen shared openings (the prefixes worth storing) and varied continuations
    openings = [stream[i * 97 : i * 97 + rng.choice([40, 56, 72])] for i in range(24)]
    # the peer's entries: what a fault-free process made of the same openings
    from hf_kvcache_plugin.reuse.entry_layout import EntryLayout

    peer_store = PrefixStore(max_size_mb=4, chunk_size=16)
    with attach_prefix_cache(replay_model, peer_store, config):
        for opening in openings:
            replay_model.generate(opening.unsqueeze(0), max_new_tokens=1)
    layout = EntryLayout.for_model(model.config, svc.hook.cache_config, 16, model.dtype)
    peer_batches = PeerBatches(peer_store, store, layout, svc.metrics, lambda: virtual_time["now"])
    weights = [1 / (rank + 1) for rank in range(len(openings))]  # Zipf-like: a few hot prefixes

    def prompt_for() -> torch.Tensor:
        opening = rng.choices(openings, weights)[0]
        start = rng.randrange(20000, len(stream) - 40)
        return torch.cat([opening, stream[start : start + rng.randint(2, 24)]]).unsqueeze(0)

    def reference(ids: torch.Tensor, outcome: str) -> torch.Tensor:
        options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
        if outcome == "degraded":  # recomputed without any cache of ours
            return type(model).generate(model, ids, **options)
        cache = QuantizedKVCache.from_config(config, model.config)
        return type(model).generate(model, ids, **options, **{GENERATE_CACHE_KWARG: cache})

    def replay_with_reuse(ids: torch.Tensor, hit_tokens: int) -> tuple[torch.Tensor, bool]:
        """The request on a fault-free hook and store holding the chunks the soak's request hit: the very
        entries (same bytes) when the soak's store still has them, else chunks made afresh. A chunk's
        bytes depend on how it was stored (a chunk stored by a request that reused the chunks before it
        was computed attending to them quantized), so only the same bytes replay the request exactly."""
        options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
        keys = chunk_keys(svc.hook.namespace, ids[0], store.chunk_size)[: hit_tokens // store.chunk_size]
        entries = [store.get(key) for key in keys]
        same_bytes = all(e is not None for e in entries)
        replay_store = PrefixStore(max_size_mb=4, chunk_size=store.chunk_size)
        with attach_prefix_cache(replay_model, replay_store, config):
            if same_bytes:
                replay_store.put_chain([copy.deepcopy(e) for e in entries])
            else:
                replay_model.generate(ids[:, : hit_tokens + 1], max_new_tokens=1)  # stores hit_tokens / 16 chunks
            return replay_model.generate(ids, **options), same_bytes

    def reference_margin(ids: torch.Tensor, outcome: str, step: int) -> float:
        """Top-2 logit gap of the reference at new token `step` (a near-tie flips on tiny numeric changes)."""
        options = {"max_new_tokens": step + 1, "min_new_tokens": step + 1, "do_sample": False,
                   "output_scores": True, "return_dict_in_generate": True}  # fmt: skip
        extra = {} if outcome == "degraded" else {GENERATE_CACHE_KWARG: QuantizedKVCache.from_config(config, model.config)}
        top = type(model).generate(model, ids, **options, **extra).scores[step][0].topk(2).values
        return round(float(top[0] - top[1]), 6)

    process = psutil.Process()
    results = {"escaped": 0, "checked": 0, "mismatched": 0, "scrapes": 0, "scrape_failures": 0,
               "inconsistent_checks": 0, "not_ready_checks": 0, "health_checks": 0, "corrupted": 0,
               "reuse_divergences": 0, "over_budget_checks": 0}  # fmt: skip
    trace: list[dict] = []
    mismatches: list[dict] = []
    rss_start = None
    started = time.perf_counter()
    i = 0
    # a bar on a terminal only (disable=None): logs and CI output stay clean
    progress = tqdm(total=args.requests, desc="soak", unit="req", disable=None)
    with torch.inference_mode():
        while i < args.requests and time.perf_counter() - started < args.seconds:
            plan.request, virtual_time["now"] = i, i * TICK_S
            if i and i % plan.corrupt_every == 0:
                results["corrupted"] += int(store.corrupt_one(rng))
            if i % plan.peer_batch_every == 0:
                peer_batches.inject(rng)
            ids = prompt_for()
            peer_guard.call(peer.fetch, ids.numpy().tobytes(), fallback=lambda: None, operation="fetch")
            before = svc.outcomes()
            try:
                out = svc.endpoint(ids, client=f"client-{i % 8}", max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - counted: the soak measures exactly this
                results["escaped"] += 1
                print(f"request {i} escaped: {exc!r}", file=sys.stderr)
                out = None
            after = svc.outcomes()
            outcome = next((k for k in after if after[k] > before[k]), "escaped")
            if out is not None and i % args.check_every == 0:
                results["checked"] += 1
                expected = reference(ids, outcome)
                hit = svc.hook.records[-1].hit_tokens if outcome == "served" else 0
                if not torch.equal(out, expected):
                    # reusing quantized prefix K/V may change greedy tokens by itself: faults must change nothing more
                    replayed, same_bytes = replay_with_reuse(ids, hit) if hit else (None, False)
                    by_reuse = hit > 0 and torch.equal(out, replayed)
                    results["reuse_divergences" if by_reuse else "mismatched"] += 1
                    new = slice(ids.shape[1], None)
                    step = int((out[0, new] != expected[0, new]).nonzero()[0])
                    mismatches.append({"request": i, "outcome": outcome, "explained_by_reuse": by_reuse,
                                       "replayed_with_the_same_chunk_bytes": same_bytes,
                                       "prompt": ids[0].tolist(), "hit_tokens": hit, "got": out[0, new].tolist(),
                                       "expected": expected[0, new].tolist(), "first_differing_new_token": step,
                                       "reference_top2_margin_there": reference_margin(ids, outcome, step)})  # fmt: skip
            if i % 10 == 0:
                report = svc.checker.readiness()
                results["health_checks"] += 1
                results["not_ready_checks"] += int(not report.ok)
                results["inconsistent_checks"] += int(bool(prefix_store_problems(store)))
                results["over_budget_checks"] += int(store.used_bytes > store.max_bytes)
            if i % 50 == 0:
                results["scrapes"] += 2
                results["scrape_failures"] += int(get(svc.server.url + "/metrics") != 200)
                results["scrape_failures"] += int(get(svc.server.url + "/readyz") not in (200, 503))
                rss = process.memory_info().rss
                if i == 100 or (rss_start is None and i > 100):
                    rss_start = rss
                trace.append({"request": i, "rss_mb": rss / 2**20, "store_mb": store.used_bytes / 2**20,
                              "status": report.status.value, "store_breaker": svc.store.state,
                              "peer_breaker": peer_breaker.current_state, **svc.outcomes()})  # fmt: skip
            i += 1
            progress.update(1)
    progress.close()
    elapsed = time.perf_counter() - started
    rss_end = process.memory_info().rss
    if rss_start is None:
        rss_start = rss_end

    # entries the store acknowledged and its policy did not evict must still be there, unchanged
    plan.store_error_rate, plan.outage_length = 0.0, 0  # read the final state without faults
    acknowledged = {k: c for k, (state, c) in store.state.items() if state == "stored"}
    lost = [k for k in acknowledged if store.get(k) is None]
    changed = [k for k, c in acknowledged.items() if store.get(k) is not None and entry_checksum(store.get(k)) != c]
    value = svc.metrics.value
    outcomes = svc.outcomes()

    def fallbacks(component: str, operation: str, reason: str) -> int:
        labels = {"component": component, "operation": operation, "reason": reason}
        return int(value("hf_kvcache_fallbacks_total", **labels) or 0)

    summary = {
        "machine": f"{platform.machine()} {psutil.cpu_count(logical=True)} CPUs, {platform.python_version()}, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": "random tiny Llama" if args.model == "random" else Path(args.model).name,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "requests": i,
        "elapsed_s": round(elapsed, 1),
        "requests_per_s": round(i / elapsed, 2),
        **{f"requests_{k}": v for k, v in outcomes.items()},
        "requests_escaped": results["escaped"],
        "store_faults_injected": store.injected,
        "store_hits": int(value("hf_kvcache_hits_total", component="prefix_store") or 0),
        "store_misses": int(value("hf_kvcache_misses_total", component="prefix_store") or 0),
        "store_lookups_recomputed_locally": {r: fallbacks("prefix_store", "lookup", r)
                                             for r in ("error", "breaker_open")},  # fmt: skip
        "store_inserts_skipped": {r: fallbacks("prefix_store", "insert", r)
                                  for r in ("error", "breaker_open", "memory_critical", "invalid_entry")},  # fmt: skip
        "peer_calls_fallen_back": {r: fallbacks("peer-1", "fetch", r) for r in ("error", "breaker_open")},
        "entries_corrupted_by_injection": results["corrupted"],
        "peer_batches_sent": peer_batches.sent,
        "peer_batches_refused": peer_batches.refused,
        "peer_entries_imported": peer_batches.imported_entries,
        "peer_bad_entries_imported": sum(v for k, v in peer_batches.imported_entries.items() if k != "valid"),
        "peer_messages_dropped": {r: int(value("hf_kvcache_cluster_messages_dropped_total", rank="0", peer="1",
                                               reason=r) or 0) for r in ("unsigned", "bad_signature", "malformed")},
        "breaker_opens": {b: int(value("hf_kvcache_breaker_opens_total", breaker=b) or 0)
                          for b in ("prefix_store", "peer-1", "rank0->peer1")},  # fmt: skip
        "breaker_recoveries": {b: int(value("hf_kvcache_breaker_recoveries_total", breaker=b) or 0)
                               for b in ("prefix_store", "peer-1", "rank0->peer1")},  # fmt: skip
        "entries_acknowledged_and_kept": len(acknowledged),
        "entries_evicted_by_policy": int(store.stats()["evictions"]),
        "entries_lost": len(lost),
        "entries_changed": len(changed),
        "store_used_bytes_end": store.used_bytes,
        "store_budget_bytes": store.max_bytes,
        "outputs_checked": results["checked"],
        "outputs_mismatched": results["mismatched"],
        "outputs_diverging_by_prefix_reuse_alone": results["reuse_divergences"],
        "mismatch_details": mismatches,
        "http_scrapes": results["scrapes"],
        "http_scrape_failures": results["scrape_failures"],
        "health_checks": results["health_checks"],
        "health_not_ready": results["not_ready_checks"],
        "store_over_budget_checks": results["over_budget_checks"],
        "store_inconsistent_checks": results["inconsistent_checks"],
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
    }
    svc.close()

    width = max(len(k) for k in summary)
    for key, val in summary.items():
        print(f"{key:<{width}}  {val}")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"soak{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "trace": trace}, indent=2))
    print(f"wrote {out}")
    _plot(trace, out.with_suffix(".png"))
    must_be_zero = ("requests_failed", "requests_escaped", "peer_bad_entries_imported", "entries_lost", "entries_changed", "outputs_mismatched",
                    "http_scrape_failures", "store_inconsistent_checks", "store_over_budget_checks")  # fmt: skip
    healthy_run = all(summary[k] == 0 for k in must_be_zero)
    return 0 if healthy_run else 1


def _plot(trace: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    x = [t["request"] for t in trace]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(x, [t["served"] for t in trace], label="served")
    axes[0].plot(x, [t["degraded"] for t in trace], label="degraded (recomputed)")
    axes[0].plot(x, [t["failed"] for t in trace], label="failed")
    axes[0].set_ylabel("requests (cumulative)")
    axes[0].legend()
    axes[1].step(x, [t["store_breaker"] != "closed" for t in trace], label="store breaker not closed", where="post")
    axes[1].step(x, [t["peer_breaker"] != "closed" for t in trace], label="peer breaker not closed", where="post")
    axes[1].step(x, [t["status"] == "unhealthy" for t in trace], label="not ready (memory critical)", where="post")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [t["rss_mb"] for t in trace], label="RSS MiB")
    axes[2].plot(x, [t["store_mb"] for t in trace], label="store MiB")
    axes[2].set_xlabel("request")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
