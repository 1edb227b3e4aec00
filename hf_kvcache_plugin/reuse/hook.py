"""Generation hook: after ``hook = attach_prefix_cache(model, store)``, ``model.generate`` reuses stored prefixes.

Per call the hook looks up each prompt's longest stored chain of chunks,
prefills a ``QuantizedKVCache`` with those quantized blocks, lets ``generate``
run the forward over the unmatched suffix only, and stores the prompt's new
full chunks afterwards. It records hit/miss tokens and latencies per request
and feeds them to an ``AdaptiveSizer``. ``hook.detach()`` restores the model.

How stored chunks are made: while the suffix is prefilled the cache receives
its exact K/V; the hook quantizes each new full chunk with the layer's own
codec (``chunk_codec.encode_blocks``). These are the bytes the cache
stores for a block-aligned chunk, and quantizing from exact K/V does not
depend on the cache's residual window, its flush schedule or the prompt's
left padding (which shifts block boundaries inside the cache). A hit loads
the blocks as the cache's history (``load_blocks``), with no re-quantization.
A chunk stored by a request that hit the chunks before it was computed by a
prefill attending to those chunks quantized, so an entry's bytes depend on
how it was stored (its key does not).

What a hit computes, bit for bit: a fresh cache, the hit's h tokens
prefilled, ``cache.flush_residual()`` (all h quantized as blocks), then the
rest of the prompt (for chunks stored by one prefill from the prompt's
start). A plain prefill of the whole prompt attends to the prefix exactly,
so greedy tokens can differ from it at near-ties (docs/prefix_reuse.md).

Batch layout when some prompts hit: every row gets the same cache length P
(the longest hit). Row i holds ``[zero blocks (P - h_i) | its h_i hit tokens]``
in the cache and ``[padding | its suffix]`` in the new input ids, all masked
padding. P - h_i is a multiple of the chunk size, so hits stay block-aligned;
positions come from the attention mask, so every real token keeps its
position. The returned sequences carry the caller's own prompt ids.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel
from transformers.generation.stopping_criteria import StoppingCriteriaList

from ..blocks import concat_blocks
from ..cache import QuantizedKVCache
from ..config import CacheConfig, PluginConfig, check_prefix_reuse_settings
from .._compat import GENERATE_CACHE_KWARG
from .prefix_store import PrefixEntry, PrefixMatch, PrefixStore, model_fingerprint, prefix_namespace
from ..layer import QuantizedKVLayer
from ..quantization import QuantizedTensor
from ..token_clock import TokenClock
from .chunk_codec import encode_blocks, zero_blocks

if TYPE_CHECKING:
    from .sizer import AdaptiveSizer

__all__ = ["PrefixCacheHook", "RequestRecord", "attach_prefix_cache"]

_CACHE_KWARGS = ("cache", "past_key_values")
# chunk key -> (per-layer key blocks, per-layer value blocks), filled layer by layer during the prefill
_Pending = dict[bytes, tuple[list[QuantizedTensor | None], list[QuantizedTensor | None]]]


@dataclass(frozen=True)
class RequestRecord:
    """Figures of one prompt (one batch row) of one ``generate`` call; latencies are per call."""

    prompt_tokens: int
    hit_tokens: int
    miss_tokens: int
    stored_chunks: int
    lookup_ms: float
    load_ms: float  # building the cache from stored blocks
    prefill_ms: float  # `generate` start to first token: the forward over the unmatched tokens
    ttft_ms: float  # hook entry to first token: lookup + load + prefill
    batch_size: int


class _PromptRecordingCache(QuantizedKVCache):
    """A ``QuantizedKVCache`` that hands each layer's exact prompt K/V to ``on_prompt_kv``.

    ``on_prompt_kv(layer_idx, layer, keys, values)`` is called once per layer
    with the K/V of cache slots [first slot written, ``prompt_length``), i.e.
    the part of the prompt this call computes (pieces of a chunked prefill are
    joined first).
    """

    def __init__(
        self,
        model_config: Any,
        cache_config: CacheConfig,
        prompt_length: int,
        on_prompt_kv: Callable[[int, QuantizedKVLayer, torch.Tensor, torch.Tensor], None],
    ):
        super().__init__(model_config, cache_config=cache_config)
        self._prompt_length = prompt_length
        self._on_prompt_kv = on_prompt_kv
        self._pieces: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer.is_initialized and key_states.shape[0] != layer.batch_size:
            # `generate` expands its inputs for num_beams / num_return_sequences, not a cache passed in
            factor, rest = divmod(key_states.shape[0], layer.batch_size)
            if rest or factor < 1:
                raise ValueError(
                    f"layer {layer_idx}: got a batch of {key_states.shape[0]} rows for a cache of "
                    f"{layer.batch_size} prompts"
                )
            layer.batch_repeat_interleave(factor)
        seen = layer.get_seq_length()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if seen < self._prompt_length:
            take = min(key_states.shape[-2], self._prompt_length - seen)
            self._pieces[layer_idx].append((key_states[:, :, :take], value_states[:, :, :take]))
            if seen + take == self._prompt_length:
                pieces = self._pieces[layer_idx]
                self._pieces[layer_idx] = []
                keys = pieces[0][0] if len(pieces) == 1 else torch.cat([p[0] for p in pieces], dim=-2)
                values = pieces[0][1] if len(pieces) == 1 else torch.cat([p[1] for p in pieces], dim=-2)
                self._on_prompt_kv(layer_idx, layer, keys, values)
        return out


@dataclass
class _Row:
    """One prompt of the batch as the hook sees it."""

    tokens: torch.Tensor  # [L] real token ids
    match: PrefixMatch
    lookup_ms: float
    suffix_start: int = 0  # slot of the row's first suffix token in the new layout

    @property
    def hit_tokens(self) -> int:
        return self.match.num_tokens


class PrefixCacheHook:
    """Wraps ``model.generate`` on the instance; see the module docstring. Use ``attach_prefix_cache``."""

    def __init__(
        self,
        model: PreTrainedModel,
        store: PrefixStore,
        cache_config: CacheConfig,
        sizer: AdaptiveSizer | None = None,
        *,
        owns_sizer: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        max_records: int = 10_000,
    ):
        if not isinstance(store, PrefixStore):
            raise ValueError(f"`store` has to be a PrefixStore but got {type(store).__name__}")
        if isinstance(getattr(model.generate, "__self__", None), PrefixCacheHook):
            raise ValueError("this model already has a prefix cache hook; detach it first")
        check_prefix_reuse_settings(cache_config, store.chunk_size)  # sinks, skipped layers: before the probe
        probe = QuantizedKVCache(model.config, cache_config=cache_config)
        for idx, layer in enumerate(probe.layers):
            if not isinstance(layer, QuantizedKVLayer) or layer.is_sliding:
                window = getattr(layer, "sliding_window", None)
                why = "" if window is None else (
                    f": a prefix entry holds every layer's blocks from the prompt's first token, but a sliding-window "
                    f"layer keeps only the last {window - 1} tokens (`sliding_window` {window}, older ones dropped), "
                    "so by the time a prompt is stored the blocks of any prefix longer than the window are gone, and "
                    "a hit would need the window ending where the hit ends, which no entry holds"
                )
                raise ValueError(
                    f"layer {idx} of this model is cached as a {type(layer).__name__}; prefix reuse needs every "
                    f"layer to be a quantized full-attention layer{why}"
                )
        self.cache_config = probe.cache_config  # group_size resolved for this model
        self._num_layers = len(probe.layers)
        check_prefix_reuse_settings(self.cache_config, store.chunk_size)  # chunk vs the resolved group size
        self.model = model
        self.store = store
        self.sizer = sizer
        self.records: deque[RequestRecord] = deque(maxlen=max_records)
        self._owns_sizer = owns_sizer
        self._clock = clock
        self._fingerprint = model_fingerprint(model)
        self._original_generate = model.generate
        self._instance_generate = model.__dict__.get("generate")
        self._installed = self.generate
        model.generate = self._installed
        self.attached = True
        self._totals = dict.fromkeys(("requests", "hit_requests", "prompt_tokens", "hit_tokens", "stored_chunks"), 0)
        self._totals_lock = threading.Lock()  # concurrent `generate` calls (threaded servers) add up exactly

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        """Put back exactly the ``generate`` the model had; stops a sizer the hook started."""
        if not self.attached:
            return
        if self.model.__dict__.get("generate") is not self._installed:
            raise ValueError("`model.generate` was replaced after this hook was attached; undo that first")
        if self._instance_generate is None:
            del self.model.__dict__["generate"]
        else:
            self.model.generate = self._instance_generate
        self.attached = False
        if self._owns_sizer and self.sizer is not None:
            self.sizer.stop()

    def __enter__(self) -> "PrefixCacheHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def namespace(self) -> bytes:
        return prefix_namespace(self._fingerprint, self.cache_config, self.model.dtype, self.store.chunk_size)

    # ------------------------------------------------------------------ generate
    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """``model.generate`` with prefix reuse; takes the same arguments except a cache."""
        entry_time = self._clock()
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
        passed = [k for k in _CACHE_KWARGS if kwargs.get(k) is not None]
        if passed:
            raise ValueError(
                f"the prefix cache hook builds the cache itself; do not pass `{passed[0]}=` to `generate` "
                "(detach the hook to use your own cache)"
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("prefix reuse looks prompts up by token ids; pass `input_ids`, not `inputs_embeds`")
        if kwargs.get("use_cache") is False:
            raise ValueError("prefix reuse needs `use_cache=True`")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"`input_ids` has to be an integer tensor [batch, seq_len] but got {got}")
        user_mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if user_mask is None else user_mask
        _check_left_padded(input_ids, mask)

        namespace = self.namespace
        rows = []
        try:
            for i in range(input_ids.shape[0]):
                tokens = input_ids[i, mask[i].bool()]
                start = self._clock()
                # the last prompt token is always computed: its logits give the first new token
                match = self.store.lookup(namespace, tokens, max_tokens=len(tokens) - 1, pin=True)
                rows.append(_Row(tokens, match, (self._clock() - start) * 1e3))
            return self._generate_with(rows, input_ids, user_mask, kwargs, entry_time)
        finally:
            # the rows looked up so far, also when a later row's lookup raised
            for row in rows:
                self.store.release(row.match)

    def _generate_with(
        self,
        rows: list[_Row],
        input_ids: torch.Tensor,
        user_mask: torch.Tensor | None,
        kwargs: dict[str, Any],
        entry_time: float,
    ) -> Any:
        width = input_ids.shape[1]
        cached = max(row.hit_tokens for row in rows)
        load_start = self._clock()
        if cached == 0:
            # no hit: the very inputs of a plain `generate` call
            new_ids, new_mask = input_ids, user_mask
            for row in rows:
                row.suffix_start = width - len(row.tokens)
        else:
            new_ids, new_mask = self._relayout(rows, cached, input_ids, kwargs)
            self._pin_new_token_counts(kwargs, width, new_ids.shape[1])
        pending: _Pending = {}
        to_store = self._chunks_to_store(rows, pending)
        cache = _PromptRecordingCache(
            self.model.config,
            self.cache_config,
            new_ids.shape[1],
            lambda idx, layer, k, v: self._encode_new_chunks(idx, layer, k, v, rows, cached, to_store, pending),
        )
        if cached:
            self._load_hits(cache, rows, cached)
        load_ms = (self._clock() - load_start) * 1e3

        clock = TokenClock(self._clock)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), clock])
        if new_mask is not None:
            kwargs["attention_mask"] = new_mask
        generate_start = self._clock()
        out = self._original_generate(new_ids, **{GENERATE_CACHE_KWARG: cache}, **kwargs)
        first_token = clock.first if clock.first is not None else self._clock()

        stored = self._store_new_chunks(rows, to_store, pending)
        self._record(rows, stored, load_ms, (first_token - generate_start) * 1e3, (first_token - entry_time) * 1e3)
        return _with_caller_prompt(out, input_ids, new_ids.shape[1]) if new_ids is not input_ids else out

    def _relayout(
        self, rows: list[_Row], cached: int, input_ids: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[padding | hit tokens] in the cache slots [0, cached), [padding | suffix] after them."""
        suffix = max(len(row.tokens) - row.hit_tokens for row in rows)
        pad_id = kwargs.get("pad_token_id", self.model.generation_config.pad_token_id)
        pad_id = 0 if pad_id is None else int(pad_id)
        new_ids = input_ids.new_full((len(rows), cached + suffix), pad_id)
        new_mask = input_ids.new_zeros((len(rows), cached + suffix))
        for i, row in enumerate(rows):
            h, tail = row.hit_tokens, len(row.tokens) - row.hit_tokens
            new_ids[i, cached - h : cached] = row.tokens[:h]
            new_ids[i, cached + suffix - tail :] = row.tokens[h:]
            new_mask[i, cached - h : cached] = 1
            new_mask[i, cached + suffix - tail :] = 1
            row.suffix_start = cached + suffix - tail
        return new_ids, new_mask

    def _pin_new_token_counts(self, kwargs: dict[str, Any], old_width: int, new_width: int) -> None:
        """The new layout can be wider than the caller's: turn total lengths into new-token counts."""
        if new_width == old_width:
            return
        gen_config = kwargs.get("generation_config") or self.model.generation_config
        for total_name, new_name in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if kwargs.get(new_name) is not None or getattr(gen_config, new_name, None) is not None:
                continue
            total = kwargs.pop(total_name, None)
            total = getattr(gen_config, total_name, None) if total is None else total
            if total:
                kwargs[new_name] = max(total - old_width, 0 if new_name == "min_new_tokens" else 1)

    def _chunks_to_store(self, rows: list[_Row], pending: _Pending) -> dict[bytes, tuple[int, int]]:
        """New full chunks of each prompt as key -> (row, chunk index); each key once."""
        wanted: dict[bytes, tuple[int, int]] = {}
        for i, row in enumerate(rows):
            first = row.hit_tokens // self.store.chunk_size
            for c in range(first, len(row.match.chunk_keys)):
                key = row.match.chunk_keys[c]
                if key not in wanted and key not in self.store:
                    wanted[key] = (i, c)
                    pending[key] = ([None] * self._num_layers, [None] * self._num_layers)
        return wanted

    def _encode_new_chunks(
        self,
        layer_idx: int,
        layer: QuantizedKVLayer,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: list[_Row],
        cached: int,
        to_store: dict[bytes, tuple[int, int]],
        pending: _Pending,
    ) -> None:
        # keys/values: [B * expand, H, new_width - cached, D], slot `cached` first
        expand = keys.shape[0] // len(rows)
        size = self.store.chunk_size
        for key, (i, c) in to_store.items():
            row = rows[i]
            # the suffix (prompt tokens from hit_tokens on) ends at the last slot
            col = row.suffix_start + (c * size - row.hit_tokens) - cached
            k = keys[i * expand : i * expand + 1, :, col : col + size]
            v = values[i * expand : i * expand + 1, :, col : col + size]
            qk, qv = encode_blocks(layer, k, v)
            pending[key][0][layer_idx] = qk.map_tensors(lambda t: t.to(self.store.device))
            pending[key][1][layer_idx] = qv.map_tensors(lambda t: t.to(self.store.device))

    def _store_new_chunks(
        self, rows: list[_Row], to_store: dict[bytes, tuple[int, int]], pending: _Pending
    ) -> list[int]:
        """Put each prompt's new chunks (parents first); returns chunks stored per row."""
        stored = []
        for row in rows:
            first = row.hit_tokens // self.store.chunk_size
            chain = []
            for c in range(first, len(row.match.chunk_keys)):
                key = row.match.chunk_keys[c]
                if key not in to_store:
                    continue  # stored already, or another row of this batch stores it
                layer_keys, layer_values = pending[key]
                if any(q is None for q in layer_keys + layer_values):
                    break  # the forward did not reach every layer (it raised); nothing half-made is stored
                parent = row.match.chunk_keys[c - 1] if c > 0 else None
                chain.append(PrefixEntry(key, parent, self.store.chunk_size, tuple(layer_keys), tuple(layer_values)))
            stored.append(self.store.put_chain(chain) if chain else 0)
        return stored

    def _load_hits(self, cache: QuantizedKVCache, rows: list[_Row], cached: int) -> None:
        """Per layer: rows of [zero blocks | hit blocks], [B, H, cached / G, G, D], into the empty cache."""
        template = next(row.match.entries[0] for row in rows if row.match.entries)
        group = self.cache_config.group_size
        streams: dict[str, list[QuantizedTensor]] = {"keys": [], "values": []}
        for name, per_layer in streams.items():
            for layer_idx in range(self._num_layers):
                batch = []
                for row in rows:
                    parts = [getattr(e, name)[layer_idx] for e in row.match.entries]
                    if row.hit_tokens < cached:
                        example = getattr(template, name)[layer_idx]
                        parts.insert(0, zero_blocks(example, (cached - row.hit_tokens) // group))
                    batch.append(concat_blocks(parts, dim=2))
                per_layer.append(concat_blocks(batch, dim=0))
        cache.load_blocks(streams["keys"], streams["values"], self.model.dtype, self.model.device)

    def _record(
        self, rows: list[_Row], stored: list[int], load_ms: float, prefill_ms: float, ttft_ms: float
    ) -> None:
        for row, n_stored in zip(rows, stored):
            record = RequestRecord(
                prompt_tokens=len(row.tokens),
                hit_tokens=row.hit_tokens,
                miss_tokens=len(row.tokens) - row.hit_tokens,
                stored_chunks=n_stored,
                lookup_ms=row.lookup_ms,
                load_ms=load_ms,
                prefill_ms=prefill_ms,
                ttft_ms=ttft_ms,
                batch_size=len(rows),
            )
            with self._totals_lock:  # requests from several threads: `+=` on a dict entry is no atomic update
                self.records.append(record)
                self._totals["requests"] += 1
                self._totals["hit_requests"] += record.hit_tokens > 0
                self._totals["prompt_tokens"] += record.prompt_tokens
                self._totals["hit_tokens"] += record.hit_tokens
                self._totals["stored_chunks"] += n_stored
            if self.sizer is not None:
                if record.hit_tokens:
                    self.sizer.record_hit(ttft_ms)
                else:
                    self.sizer.record_miss(ttft_ms)
        if self.sizer is not None and not self.sizer.running:
            self.sizer.step_if_due()

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Totals since attach plus the store's figures."""
        with self._totals_lock:
            t, recent = dict(self._totals), list(self.records)
        mean = lambda name: sum(getattr(r, name) for r in recent) / len(recent) if recent else 0.0  # noqa: E731
        return {
            **t,
            "request_hit_rate": t["hit_requests"] / t["requests"] if t["requests"] else 0.0,
            "token_hit_rate": t["hit_tokens"] / t["prompt_tokens"] if t["prompt_tokens"] else 0.0,
            "mean_ttft_ms": mean("ttft_ms"),
            "mean_lookup_ms": mean("lookup_ms"),
            "mean_prefill_ms": mean("prefill_ms"),
            "store": self.store.stats(),
        }


def _check_left_padded(input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` has shape {tuple(mask.shape)} but `input_ids` has shape {tuple(input_ids.shape)}"
        )
    if mask.dim() != 2 or ((mask != 0) & (mask != 1)).any():
        raise ValueError("`attention_mask` has to be a 2-d mask of 0s and 1s")
    if (mask[:, 1:] < mask[:, :-1]).any() or (mask[:, -1] == 0).any():
        raise ValueError(
            "prefix reuse needs left-padded prompts (padding first, then the prompt; every row non-empty); "
            "set `tokenizer.padding_side = 'left'`"
        )


def _with_caller_prompt(out: Any, input_ids: torch.Tensor, new_width: int) -> Any:
    """Swap the hook's prompt layout in the returned sequences for the caller's prompt ids."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    prompt = input_ids.to(sequences.device)
    prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
    fixed = torch.cat([prompt, sequences[:, new_width:]], dim=1)
    if isinstance(out, torch.Tensor):
        return fixed
    out.sequences = fixed
    return out


def attach_prefix_cache(
    model: PreTrainedModel,
    store: PrefixStore | None = None,
    config: PluginConfig | CacheConfig | None = None,
    *,
    sizer: AdaptiveSizer | None = None,
    clock: Callable[[], float] = time.perf_counter,
    max_records: int = 10_000,
) -> PrefixCacheHook:
    """Make ``model.generate`` reuse quantized prefixes from ``store``; returns the hook (``hook.detach()``).

    ``config`` gives the cache settings (a ``PluginConfig`` from ``load_config``
    or a ``CacheConfig``; default ``CacheConfig()``). Without ``store`` it is
    built from ``config.prefix_store``; without ``sizer`` and with a ``sizer:``
    section an ``AdaptiveSizer`` is built for the store, started as a thread
    when ``sizer.background`` is true, and stopped by ``detach``.
    """
    if config is None:
        cache_config = CacheConfig()
    elif isinstance(config, PluginConfig):
        cache_config = config.cache
    elif isinstance(config, CacheConfig):
        cache_config = config
    else:
        raise ValueError(f"`config` has to be a PluginConfig, a CacheConfig or None but got {type(config).__name__}")
    if store is None:
        if not isinstance(config, PluginConfig):
            raise ValueError("pass a `store`, or a PluginConfig with a `prefix_store:` section")
        store = PrefixStore.from_config(config)
    owns_sizer = False
    if sizer is None and isinstance(config, PluginConfig) and config.sizer is not None:
        from .sizer import AdaptiveSizer

        sizer = AdaptiveSizer.for_store(store, config.sizer)
        owns_sizer = True
    hook = PrefixCacheHook(
        model, store, cache_config, sizer, owns_sizer=owns_sizer, clock=clock, max_records=max_records
    )
    if owns_sizer and config.sizer.background:
        sizer.start()
    return hook
