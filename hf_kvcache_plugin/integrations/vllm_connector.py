"""``HFKVCacheConnector``: our quantized prefix store as a KV tier behind vLLM (v1 KV connector API).

The scheduler side cuts each prompt into chunks of vLLM's block size, keyed
by the same chained digests as the ``transformers`` hook (``chunk_keys``),
and asks the store how long a stored chain prefixes the prompt
(``get_num_new_matched_tokens``); vLLM then allocates blocks and skips
computing those tokens. Each step's metadata tells the worker side which
stored chunks to load into which blocks, and which freshly computed prompt
blocks to save. The worker reads saved blocks out of vLLM's paged buffer
(``BlockLayout``), quantizes keys per channel and values per token
(``ChunkCodec``) and puts the chain into the ``PrefixStore``, whose byte
budget and eviction apply as for ``transformers``; loads dequantize and write
through vLLM's own cache-write op. The store lives in the worker process and
the scheduler reaches it over a local socket (``vllm_store``).

Settings come from ``kv_connector_extra_config`` (``vllm_settings``): our
YAML's ``cache:``, ``prefix_store:``, ``sizer:`` and ``distributed:`` sections
apply as for ``transformers``: the byte budget and eviction, the
``AdaptiveSizer`` resizing that budget under memory pressure, and the
coordinator sharing stored chains between vLLM instances (``vllm_cluster``).

With vLLM's own prefix cache on, the tier is asked only for the tokens beyond
vLLM's hit, and loads just those blocks.

``prefix_store.chunk_size`` is vLLM's block size (set it only to that value).
One worker only (no tensor or pipeline parallelism); CPU backend only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm import _custom_ops as ops
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from ..config import CacheConfig
from ..reuse.prefix_store import PrefixEntry, PrefixStore, chunk_keys, prefix_namespace
from .vllm_blocks import BlockLayout, ChunkCodec, split_kv
from .vllm_settings import connector_settings
from .vllm_store import StoreService, connect_store, host_store, stop_hosting

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["HFKVCacheConnector", "HFKVCacheMetadata", "connector_settings", "store_address"]

logger = logging.getLogger(__name__)

# hf_config fields that name a checkout rather than what the weights compute
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


@dataclass
class LoadSpec:
    """Stored chunks ``keys`` go into ``block_ids`` (one block per chunk); ``pinned`` are unpinned after."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    pinned: list[bytes]


@dataclass
class SaveSpec:
    """Computed prompt blocks to store as the chain ``keys`` (``parent`` precedes the first)."""

    req_id: str
    keys: list[bytes]
    parent: bytes | None
    block_ids: list[int]


@dataclass
class HFKVCacheMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Request:
    """What the scheduler side remembers of a running request."""

    prompt: list[int]
    keys: list[bytes]  # one per full chunk of the prompt
    block_ids: list[int]
    saved_chunks: int  # chunks before this one are stored or were loaded
    looked_up_at: float  # when the scheduler first asked the tier about it (monotonic s)
    tier_tokens: int  # tokens the tier gave it
    first_token_due: bool = False  # its prefill ends in the step being built: its first token comes next
    first_token_seen: bool = False  # reported, or due


def store_address(vllm_config: "VllmConfig") -> tuple[str, bytes]:
    """Socket path and authkey both sides of one engine derive from its kv_transfer_config."""
    kv = vllm_config.kv_transfer_config
    default = os.path.join(tempfile.gettempdir(), f"hf_kvcache-{kv.engine_id}.sock")
    return kv.get_from_extra_config("store_address", default), str(kv.engine_id).encode()


def _model_fingerprint(vllm_config: "VllmConfig") -> str:
    """The model's identity from what both sides see: its name, revision and config (not the weights)."""
    model = vllm_config.model_config
    described = {k: v for k, v in model.hf_config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps({"model": model.model, "revision": model.revision, "config": described}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()


class HFKVCacheConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if vllm_config.parallel_config.world_size > 1:
            raise ValueError(
                f"HFKVCacheConnector serves one worker but world_size is {vllm_config.parallel_config.world_size}"
            )
        model = vllm_config.model_config
        self.block_size = vllm_config.cache_config.block_size
        self.dtype = model.dtype
        self.num_layers = model.get_num_layers(vllm_config.parallel_config)
        self.head_size = model.get_head_size()
        self.settings = connector_settings(
            self._kv_transfer_config.kv_connector_extra_config or {}, self.block_size, self.num_layers, self.head_size
        )
        self.cache_config = self.settings.cache
        fingerprint = _model_fingerprint(vllm_config)
        cache_for_keys = self.cache_config or CacheConfig().for_model(self.num_layers, self.head_size)
        # the full-precision tier's chunks are other bytes: never under the quantized tier's keys
        self.namespace = prefix_namespace(
            fingerprint + ("/full-precision" if self.cache_config is None else ""), cache_for_keys, self.dtype, self.block_size
        )
        self.address, self._authkey = store_address(vllm_config)
        # scheduler side
        self._service = None
        self._requests: dict[str, _Request] = {}
        self._pending_loads: dict[str, tuple[int, list[bytes]]] = {}  # req_id -> (external tokens, pinned keys)
        self._looked_up: dict[str, tuple[float, int]] = {}  # req_id -> (first lookup, tier tokens) until scheduled
        # worker side
        self.service: StoreService | None = None
        self.store: PrefixStore | None = None
        self._layers: list[tuple[str, torch.Tensor]] = []
        self._layer_index: dict[str, int] = {}
        self._layout: BlockLayout | None = None
        self._codec: ChunkCodec | None = None
        self._isa: str | None = None
        self._save_plan: list[tuple[SaveSpec, list[int]]] | None = None
        self._encoded: dict[bytes, list[tuple[Any, Any] | None]] = {}
        self._load_errors: set[int] = set()

    # ================================================================== scheduler side
    @property
    def remote(self):
        """The worker's ``StoreService`` as the scheduler side reaches it."""
        if self._service is None:
            self._service = connect_store(self.address, self._authkey)
        return self._service

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = request.prompt_token_ids
        if not prompt:
            return 0, False
        # vLLM computes at least the last prompt token itself; with its own prefix cache on,
        # `num_computed_tokens` is its hit and the tier offers only what lies beyond
        matched = self.remote.matched_tokens(self.namespace, list(prompt), len(prompt) - 1)
        external = max(0, matched - num_computed_tokens)
        # asked again while waiting for room: the latency counts from the first time
        first = self._looked_up.get(request.request_id, (time.monotonic(), 0))[0]
        self._looked_up[request.request_id] = (first, external)
        return external, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        looked_up = self._looked_up.get(request.request_id)
        if looked_up is not None:  # what vLLM took of the tier's offer
            self._looked_up[request.request_id] = (looked_up[0], max(0, num_external_tokens))
        if num_external_tokens <= 0:
            return
        prompt = list(request.prompt_token_ids)
        pinned = self.remote.pin_chain(self.namespace, prompt, len(prompt) - 1)
        self._pending_loads[request.request_id] = (num_external_tokens, pinned)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        self._report_first_tokens()
        meta = HFKVCacheMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if not new.prompt_token_ids:
                continue
            prompt = list(new.prompt_token_ids)
            looked_up_at, tier_tokens = self._looked_up.pop(new.req_id, (time.monotonic(), 0))
            state = _Request(
                prompt, chunk_keys(self.namespace, prompt, self.block_size), list(new.block_ids[0]),
                new.num_computed_tokens // self.block_size, looked_up_at, tier_tokens,
            )
            self._requests[new.req_id] = state
            self._add_load(meta, new.req_id, state, new.num_computed_tokens)
            self._add_save(meta, new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # a resumed request gets all of its blocks anew
                state.block_ids = list(new_blocks[0]) if new_blocks is not None else []
                state.saved_chunks = min(state.saved_chunks, cached.num_computed_tokens[i] // self.block_size)
                self._add_load(meta, req_id, state, cached.num_computed_tokens[i])
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            self._add_save(meta, req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _add_load(self, meta: HFKVCacheMetadata, req_id: str, state: _Request, computed: int) -> None:
        if req_id not in self._pending_loads:
            return
        external, pinned = self._pending_loads.pop(req_id)
        first, last = (computed - external) // self.block_size, computed // self.block_size
        meta.loads.append(LoadSpec(req_id, pinned[first:last], state.block_ids[first:last], pinned))

    def _report_first_tokens(self) -> None:
        """Requests whose prefill ended in the last step have their first token now: tell the sizer."""
        for state in self._requests.values():
            if state.first_token_due:
                self._report(state)

    def _report(self, state: _Request) -> None:
        state.first_token_due = False
        self.remote.record_request(state.tier_tokens, 1000 * (time.monotonic() - state.looked_up_at))

    def _add_save(self, meta: HFKVCacheMetadata, req_id: str, state: _Request, computed_after: int) -> None:
        if computed_after >= len(state.prompt) and not state.first_token_seen:
            state.first_token_due = state.first_token_seen = True
        # only prompt chunks whose every token is in the buffer by the end of this step
        upto = min(computed_after, len(state.prompt)) // self.block_size
        start = state.saved_chunks
        if upto > start:
            parent = state.keys[start - 1] if start else None
            meta.saves.append(SaveSpec(req_id, state.keys[start:upto], parent, state.block_ids[start:upto]))
            state.saved_chunks = upto

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        state = self._requests.pop(request.request_id, None)
        if state is not None and state.first_token_due:  # done within the step that ended its prefill
            self._report(state)
        self._looked_up.pop(request.request_id, None)
        pending = self._pending_loads.pop(request.request_id, None)
        if pending is not None:  # allocated but never scheduled: its pins would hold the chain forever
            self.remote.unpin(pending[1])
        return False, None

    # ================================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=extract_layer_index)
        self._layers = [(name, kv_caches[name]) for name in names]
        self._layer_index = {name: i for i, name in enumerate(names)}
        first = self._layers[0][1]
        if first.dim() != 4 or first.shape[2] != self.block_size or first.shape[3] != 2 * self.head_size:
            raise ValueError(
                f"HFKVCacheConnector reads vLLM's CPU KV layout [num_blocks, num_kv_heads, {self.block_size}, "
                f"{2 * self.head_size}] but got {tuple(first.shape)} (another backend?)"
            )
        kv_cache_dtype = self._vllm_config.cache_config.cache_dtype
        if kv_cache_dtype != "auto":
            raise ValueError(f"HFKVCacheConnector needs kv_cache_dtype 'auto' (the model's dtype) but got {kv_cache_dtype!r}")
        self._isa = _get_attn_isa(first.dtype, self.block_size, self.head_size, kv_cache_dtype)
        self._layout = BlockLayout.probe(self._write, self.block_size, self.head_size, first.dtype)
        self._codec = ChunkCodec(self.cache_config, len(self._layers))
        layout = None
        if self.settings.distributed is not None:
            heads = first.shape[1]
            layout = self._codec.entry_layout(heads, self.block_size, self.head_size, first.dtype).problem
        self.service = StoreService.build(self.settings, entry_check=layout)
        self.store = self.service.store
        if os.path.exists(self.address):
            os.unlink(self.address)  # left by an engine of the same id that did not shut down
        host_store(self.address, self._authkey, self.service)

    def _write(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        ops.cpu_attn_reshape_and_cache(
            key, value, key_cache, value_cache, slot_mapping, self._isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
        )

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for load in meta.loads:
            try:
                self._load(load)
            finally:
                self.store.unpin(load.pinned)

    def _load(self, load: LoadSpec) -> None:
        entries = []
        for key in load.keys:
            entry = self.store.get(key)
            if entry is None:
                break
            entries.append(entry)
        # blocks we promised but cannot fill: vLLM recomputes them
        self._load_errors.update(load.block_ids[len(entries):])
        if not entries:
            return
        offsets = torch.arange(self.block_size, dtype=torch.int64)
        slots = (torch.tensor(load.block_ids[: len(entries)], dtype=torch.int64)[:, None] * self.block_size + offsets).flatten()
        for i, (_, kv_layer) in enumerate(self._layers):
            dtype = kv_layer.dtype
            keys = torch.cat([ChunkCodec.decode(e.keys[i], dtype) for e in entries], dim=1)  # [H, T, D]
            values = torch.cat([ChunkCodec.decode(e.values[i], dtype) for e in entries], dim=1)
            key_cache, value_cache = split_kv(kv_layer)
            self._write(keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous(), key_cache, value_cache, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self._save_plan is None:
            self._save_plan = self._plan_saves()
        layer = self._layer_index[layer_name]
        for spec, chunks in self._save_plan:
            if not chunks:
                continue
            keys, values = self._layout.read(kv_layer, torch.tensor([spec.block_ids[j] for j in chunks]))
            for n, j in enumerate(chunks):
                span = slice(n * self.block_size, (n + 1) * self.block_size)
                self._encoded[spec.keys[j]][layer] = self._codec.encode(layer, keys[:, span], values[:, span])

    def _plan_saves(self) -> list[tuple[SaveSpec, list[int]]]:
        """Per save: the chunks to encode (not stored yet, nor planned by another request this step)."""
        plan = []
        for spec in self._get_connector_metadata().saves:
            chunks = [j for j, key in enumerate(spec.keys) if key not in self.store and key not in self._encoded]
            for j in chunks:
                self._encoded[spec.keys[j]] = [None] * len(self._layers)
            plan.append((spec, chunks))
        return plan

    def wait_for_save(self) -> None:
        plan, self._save_plan = self._save_plan or [], None
        encoded, self._encoded = self._encoded, {}
        for spec, chunks in plan:
            entries = []
            for j, key in enumerate(spec.keys):
                if j not in chunks:
                    continue  # stored already, or by another request's chain put before this one
                layers = encoded[key]
                if any(layer is None for layer in layers):
                    break  # a layer never reached save_kv_layer: store nothing past here
                parent = spec.keys[j - 1] if j else spec.parent
                entries.append(
                    PrefixEntry(key, parent, self.block_size, tuple(k for k, _ in layers), tuple(v for _, v in layers))
                )
            if entries:
                self.store.put_chain(entries)
        self.service.step_sizer_if_due()

    def shutdown(self) -> None:
        if self.store is not None:
            stop_hosting(self.address)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
