"""``QuantizedKVCache``: a ``transformers.Cache`` whose layers keep K/V quantized (``layer.QuantizedKVLayer``).

The model's layout picks each layer's kind: full-attention layers are
quantized (``QuantizedKVLayer``), sliding-window and chunked layers too, their
window bound kept (``sliding_layer.QuantizedSlidingWindowLayer``);
``skip_layers`` stay ``DynamicLayer`` / ``DynamicSlidingWindowLayer``; a layer
kind with no per-token K/V to quantize (linear attention, ...) keeps
transformers' own layer, with a warning. With fused attention (the default for a
model on SDPA) a decode step hands the layer to ``kvquant_sdpa`` instead of
materialising its history (``fused_update``). ``save(path)`` /
``QuantizedKVCache.load(path)`` write and read a checksummed snapshot
(``cache_io``) that is refused whole if it is damaged. ``max_size_mb`` /
``resize(new_size_mb)`` give the cache a byte budget that every update is
admitted against (``budget``); over it the cache first shrinks as
``budget_policy`` allows (``shrink``: re-pack old blocks 8 -> 4 -> 2 bits,
drop middle blocks).

``QuantizedKVCacheManager`` (the specification's name) is ``QuantizedKVCache``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers import cache_utils as _cache_utils
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from ._compat import DummyLayer
from .attention.dispatch import (
    QUANTIZED_ATTENTION,
    position_bias_follows_keys,
    prepare_fused_attention,
    select_fused_attention,
)
from .attention.history import FusedStep, hand_over
from .budget import CacheBudgetExceeded, layer_nbytes_after, layer_stats
from .cache_budget import BudgetedCache
from .cache_io import (
    SnapshotError,
    cache_state,
    check_same_layout,
    config_differences,
    layers_from_state,
    read_snapshot,
    write_snapshot,
)
from .config import CacheConfig, PluginConfig, parse_config
from .layer import LayerSettings, QuantizedKVLayer, batch_indices, tracks_grad
from .quantization import QuantizedTensor
from .shrink import ShrinkLog, budget_stats, smallest_nbytes_after
from .sliding_layer import QuantizedSlidingWindowLayer

__all__ = [
    "CacheBudgetExceeded",
    "QuantizedKVCache",
    "QuantizedKVCacheManager",
    "QuantizedKVLayer",
    "create_quantized_kv_cache",
]

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")
_SNAPSHOT_KIND = "QuantizedKVCache"

logger = logging.getLogger(__name__)


class QuantizedKVCache(BudgetedCache, Cache):
    """Quantized KV cache for ``model.generate(..., past_key_values=QuantizedKVCache(model.config))``.

    Args:
        config: the model's ``PretrainedConfig`` (its decoder part is used). May be
            ``None`` when ``num_layers`` is given (a model-free cache).
        quant_type: ``int8 | int4 | int2 | mixed``.
        cache_config: a full ``CacheConfig``; exclusive with ``quant_type``/``options``.
        num_layers: number of layers when ``config`` is ``None``.
        **options: any other ``CacheConfig`` field (``group_size``, ``residual_length``,
            ``sink_tokens``, ``key_bits``, ``value_bits``, ``layer_overrides``,
            ``max_size_mb``, ...).

    Full-attention and sliding-window layers are quantized (a sliding layer shows
    attention exactly the window ``DynamicSlidingWindowLayer`` would); layers listed
    in ``skip_layers`` keep transformers' full-precision layers. Other layer kinds
    (linear attention, ...) keep transformers' own layer, with a warning naming them.

    ``offloading=True`` moves each layer's tensors to the CPU between its updates,
    as ``DynamicCache(offloading=True)`` does (``offload_only_non_sliding`` likewise);
    decode steps then read the history dequantized (the fused path would read a
    layer while it is offloaded), and a model on the CPU has nothing to move.
    """

    def __init__(
        self,
        config: PretrainedConfig | None = None,
        quant_type: str | None = None,
        *,
        cache_config: CacheConfig | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        offloading: bool = False,
        offload_only_non_sliding: bool = False,
        **options: Any,
    ):
        if cache_config is not None and (quant_type is not None or options):
            raise ValueError("pass either `cache_config` or `quant_type`/options, not both")
        if cache_config is None:
            cache_config = CacheConfig(quant_type=quant_type or CacheConfig.quant_type, **options)
        if config is not None and (num_heads is not None or head_dim is not None):
            raise ValueError("`num_heads`/`head_dim` describe a model-free cache; with a model `config` they come from it")
        layer_types, layer_kwargs, heads, head_dim = self._model_layout(config, num_layers, num_heads, head_dim)
        self.cache_config = cache_config.for_model(len(layer_types), head_dim)
        # read at every update: the model's attention modules look at this same config object. An encoder-decoder
        # model's modules read the model's config (or copies of it: T5), never the decoder copy get_text_config
        # makes, so its cache reads the history fused only when the model was set to kvquant_sdpa by the user
        # (`enable_quantized_attention(model)`), and is not switched here.
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self._attention_config = config if encoder_decoder else config.get_text_config(decoder=True) if config else None
        layers = [
            self._make_layer(i, layer_type, kwargs, heads, head_dim)
            for i, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs))
        ]
        super().__init__(layers=layers, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        # a forward step updates the layers in order, from the first that stores anything
        self._first_layer = next((i for i, layer in enumerate(layers) if not isinstance(layer, DummyLayer)), 0)
        # an encoder-decoder model's cache has to be the self-attention half of an EncoderDecoderCache: a bare one
        # is recognised by the cross-attention updating the layer its self-attention just updated (module
        # `encoder_decoder`). With one layer that is every step's pattern, so it is not checked there.
        self._whole_cache_check = encoder_decoder and len(layers) > 1
        self._last_update: tuple[int, int] | None = None
        # the layers of the step admitted at its first layer that are still to come, and the K/V shapes admitted
        self._admitted_step: tuple[set[int], Any] = (set(), None)
        self._shrink_log = ShrinkLog()  # what getting under the budget has done (get_stats()["budget"])
        # the layer after whose update the cache shrinks to its budget: a step admitted only with its own new
        # blocks shrunk (a prompt larger than the budget, `shrink.fit_to_budget`); None: no such step pending
        self._shrink_after_layer: int | None = None
        self._left_padding: torch.Tensor | None = None  # padding tokens before each row (`set_left_padding`)
        if self.cache_config.attention == "fused" and self._attention_config is not None and not encoder_decoder:
            # the default: kvquant_sdpa is plain SDPA for every other cache, so the model loses nothing
            if select_fused_attention(self._attention_config) and self.cache_config.cpu_kernel == "auto":
                prepare_fused_attention()

    @staticmethod
    def _model_layout(config, num_layers, num_heads=None, head_dim=None):
        if config is None:
            if num_layers is None or num_layers < 1:
                raise ValueError("`QuantizedKVCache` needs the model `config` or a positive `num_layers`")
            return ["full_attention"] * num_layers, [{}] * num_layers, num_heads, head_dim
        if not isinstance(config, PretrainedConfig):
            raise ValueError(
                f"`config` has to be the model's `PretrainedConfig` (model.config) but got {type(config).__name__}"
            )
        decoder = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder)
        heads = getattr(decoder, "num_key_value_heads", None) or getattr(decoder, "num_attention_heads", None)
        head_dim = getattr(decoder, "head_dim", None)
        if head_dim is None and getattr(decoder, "hidden_size", None) and getattr(decoder, "num_attention_heads", None):
            head_dim = decoder.hidden_size // decoder.num_attention_heads
        return layer_types, layer_kwargs, heads, head_dim

    def _make_layer(self, idx: int, layer_type: str, kwargs: dict, heads: int | None, head_dim: int | None):
        cfg = self.cache_config
        if layer_type == "dummy":
            return DummyLayer()
        if layer_type in _SLIDING_TYPES:
            if idx in cfg.skip_layers:
                return DynamicSlidingWindowLayer(**kwargs)
            layer = QuantizedSlidingWindowLayer(LayerSettings.for_layer(cfg, idx, heads, head_dim), **kwargs)
            if layer.sliding_window - 1 <= cfg.residual_length:
                logger.warning(
                    "QuantizedKVCache: layer %d's sliding window (%d tokens) fits in `residual_length` (%d), so it "
                    "stays in full precision (no compression for this layer); lower `residual_length` below %d to "
                    "quantize it", idx, layer.sliding_window, cfg.residual_length, layer.sliding_window - 1,
                )  # fmt: skip
            return layer
        if layer_type != "full_attention":
            return _transformers_layer(idx, layer_type, kwargs)
        if idx in cfg.skip_layers:
            return DynamicLayer()
        return QuantizedKVLayer(LayerSettings.for_layer(cfg, idx, heads, head_dim))

    @classmethod
    def from_config(cls, cfg: CacheConfig | PluginConfig, model_config: PretrainedConfig | None = None, **kwargs):
        """Build from a loaded YAML config (``load_config(path)``) or a ``CacheConfig``."""
        cache_config = cfg.cache if isinstance(cfg, PluginConfig) else cfg
        if not isinstance(cache_config, CacheConfig):
            raise ValueError(f"`cfg` has to be a PluginConfig or CacheConfig but got {type(cfg).__name__}")
        return cls(model_config, cache_config=cache_config, **kwargs)

    # ------------------------------------------------------------------ checks on Cache entry points
    def _check_layer_idx(self, layer_idx: int, name: str = "layer_idx") -> None:
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"`{name}` has to be in [0, {len(self.layers) - 1}] but got {layer_idx!r}")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self._check_layer_idx(layer_idx)
        if self._whole_cache_check:
            self._refuse_as_whole_encoder_decoder_cache(layer_idx, key_states)
        self._admit_update(layer_idx, key_states, value_states)
        layer = self.layers[layer_idx]
        if (
            isinstance(layer, QuantizedKVLayer) and layer.holds_tokens and self.uses_fused_attention
            and not tracks_grad(key_states, value_states)  # the fused kernels have no backward: dense K/V then
        ):  # fmt: skip
            # transformers >= 5.24 passes the attention kwargs as `kwargs=` (the same dict reaches the attention
            # function); older models pass nothing, and the step then rides on the returned keys
            attention_kwargs = kwargs.get("kwargs")
            attention_kwargs = attention_kwargs if isinstance(attention_kwargs, dict) else None
            return self._fused_step(layer, key_states, value_states, attention_kwargs)
        if self.offloading and key_states.device.type == "cpu":
            # already where offloading puts it, and transformers' offloading waits on CUDA streams
            out = layer.update(key_states, value_states, *args, **kwargs)
        else:
            out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self._shrink_after_layer:
            self._shrink_after_step()  # the returned K/V are copies: this step's attention reads what it was given
        return out

    def _refuse_as_whole_encoder_decoder_cache(self, layer_idx: int, key_states: torch.Tensor) -> None:
        update = (layer_idx, key_states.shape[-2])
        last, self._last_update = self._last_update, update
        if last is not None and last[0] == layer_idx and last[1] != update[1]:
            self._last_update = None
            model = getattr(self._attention_config, "model_type", "this model")
            raise ValueError(
                f"QuantizedKVCache was given to the encoder-decoder model `{model}` as its whole cache: its "
                f"cross-attention would write the encoder's states into the self-attention history (layer {layer_idx} "
                "was updated twice in one step). Pass `quantized_encoder_decoder_cache(model.config, ...)` (from "
                "hf_kvcache_plugin; `quantize_cross_attention=True` quantizes the cross-attention too) or "
                "`EncoderDecoderCache(QuantizedKVCache(model.config, ...), DynamicCache(config=model.config))`"
            )

    def fused_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, attention_kwargs: dict | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step for fused attention: append without materialising the history, and hand the layer to
        ``kvquant_sdpa`` through ``attention_kwargs`` (``attention.history``). Its full blocks are flushed once
        attention has read this step's window, so both paths see the same exact tokens. With
        ``attention_kwargs=None`` the step rides on the returned keys instead."""
        self._check_layer_idx(layer_idx)
        layer = self.layers[layer_idx]
        if not isinstance(layer, QuantizedKVLayer) or not layer.holds_tokens:
            raise ValueError(f"layer {layer_idx} holds no quantized history to attend to; call `update` for a prefill")
        self._admit_update(layer_idx, key_states, value_states)
        return self._fused_step(layer, key_states, value_states, attention_kwargs)

    def _fused_step(
        self, layer: QuantizedKVLayer, key_states: torch.Tensor, value_states: torch.Tensor,
        attention_kwargs: dict | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # per token and layer: the caller has checked the index and the layer already
        if layer.flush_pending:
            # the previous step's keys went to an attention function that did not read the layer: its output
            # attended to that step's tokens alone. Say so rather than go on computing wrong tokens.
            raise RuntimeError(
                f"{layer._name()}: the model's attention did not read the quantized history handed to it on the "
                f"last decode step (it runs {QUANTIZED_ATTENTION!r} for the cache, yet the step was not taken); "
                "build the cache with attention='dequantize' for this model"
            )
        layer.append(key_states, value_states, defer_flush=True)
        finish = layer.flush_deferred
        if self._shrink_after_layer is not None and layer is self.layers[self._shrink_after_layer]:
            # the step's last layer: shrink once attention has read it and its blocks are flushed
            finish = lambda: (layer.flush_deferred(), self._shrink_after_step())  # noqa: E731
        step = FusedStep(history=layer, finish=finish, cpu_kernel=self.cache_config.cpu_kernel == "auto")
        hand_over(step, attention_kwargs, key_states)
        return key_states, value_states

    @property
    def uses_fused_attention(self) -> bool:
        """True when the model runs ``kvquant_sdpa`` and the config asks for the fused path (never for a model
        whose position bias follows the returned keys' length: T5, see ``position_bias_follows_keys``)."""
        return (
            self.cache_config.attention == "fused"
            and not self.offloading
            and self._attention_config is not None
            and getattr(self._attention_config, "_attn_implementation", None) == QUANTIZED_ATTENTION
            and not position_bias_follows_keys(self._attention_config)
        )

    def batch_select_indices(self, indices: torch.Tensor | Sequence[int]) -> None:
        """Keep the batch rows ``indices`` in every layer (a tuple ``(0, 2)`` selects rows 0 and 2)."""
        batch = next((layer.batch_size for layer in self.layers if getattr(layer, "is_initialized", False)
                      and isinstance(layer, QuantizedKVLayer)), None)  # fmt: skip
        if batch is None:
            batch = next((layer.keys.shape[0] for layer in self.layers if getattr(layer, "is_initialized", False)
                          and getattr(layer, "keys", None) is not None), 0)  # fmt: skip
        selected = batch_indices(indices, batch, torch.device("cpu"))
        super().batch_select_indices(selected)
        if self._left_padding is not None:
            self._left_padding = self._left_padding[selected]
        self._admitted_step = (set(), None)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and -tokens_to_remove > self.get_seq_length():
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens, the cache holds only {self.get_seq_length()}"
            )
        self._admitted_step = (set(), None)
        super().crop(tokens_to_remove)

    # ------------------------------------------------------------------ prefix reuse: whole-block import
    def load_blocks(
        self,
        keys: Sequence[QuantizedTensor],
        values: Sequence[QuantizedTensor],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Prefill an empty cache from quantized blocks, one [B, H, n, G, D] pair per layer."""
        if len(keys) != len(self.layers) or len(values) != len(self.layers):
            raise ValueError(
                f"`load_blocks` needs key and value blocks for each of the {len(self.layers)} layers but got "
                f"{len(keys)} and {len(values)}"
            )
        for idx, layer in enumerate(self.layers):
            if not isinstance(layer, QuantizedKVLayer) or layer.is_sliding:
                raise ValueError(
                    f"layer {idx} is a {type(layer).__name__}; quantized blocks load into quantized full-attention "
                    "layers only"
                )
        if self.max_size_mb is not None:
            after = lambda: {i: layer.nbytes_after_load(keys[i], values[i], dtype) for i, layer in enumerate(self.layers)}
            self._admit(after, f"loading {keys[0].shape[2] if keys else 0} block(s) per layer")
        for layer, k, v in zip(self.layers, keys, values):
            layer.load_blocks(k, v, dtype, device)

    def flush_residual(self) -> None:
        """Quantize the whole blocks of every layer's residual window now (``QuantizedKVLayer.flush_residual``).

        ``model(ids[:, :h], cache=c); c.flush_residual(); model.generate(ids, cache=c)``
        is the no-store computation a prefix hit of h tokens reproduces exactly:
        the suffix attends to the quantized prefix (docs/prefix_reuse.md).
        """
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                layer.flush_residual()

    # ------------------------------------------------------------------ seed-compatible helpers
    def store(
        self,
        layer_id: int,
        key_states: torch.Tensor | None = None,
        value_states: torch.Tensor | None = None,
        *,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> None:
        """Append K/V ``[batch, heads, seq, head_dim]`` to layer ``layer_id`` (``k``/``v`` are the specification's
        names for ``key_states``/``value_states``). One layer, admitted against the budget on its own."""
        key_states = _one_of("key_states", key_states, "k", k)
        value_states = _one_of("value_states", value_states, "v", v)
        self._check_layer_idx(layer_id, "layer_id")
        shrink_after = False
        if self.max_size_mb is not None:
            after = lambda: {layer_id: layer_nbytes_after(self.layers[layer_id], key_states, value_states)}
            policy = self.cache_config.budget_policy
            smallest = lambda: {layer_id: smallest_nbytes_after(self.layers[layer_id], key_states, value_states, policy)}
            shrink_after = self._admit(after, f"layer {layer_id}: storing {key_states.shape[-2]} token(s)", smallest)
        # the plain path (never the fused hand-over, which expects the model's attention to read the layer)
        super().update(key_states, value_states, layer_id)
        if shrink_after:
            self._shrink_after_step()

    def retrieve(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All K/V of layer ``layer_id``, dequantized to the compute dtype."""
        self._check_layer_idx(layer_id, "layer_id")
        layer = self.layers[layer_id]
        if isinstance(layer, QuantizedKVLayer):
            return layer.dequantized()
        if not getattr(layer, "is_initialized", False):
            raise ValueError(f"layer {layer_id} holds no tokens yet")
        return layer.keys, layer.values

    def get_stats(self) -> dict[str, Any]:
        """Exact bytes held (data, scales, zeros, residual, sinks, blocks kept in full precision) against a
        full-precision cache; ``fallback_events`` counts blocks that could not be quantized. ``max_size_mb`` /
        ``budget_bytes`` are the byte budget (None: unbounded); ``budget`` says how the cache got under it
        (``shrink.budget_stats``: tokens held at each bit width, tokens and blocks dropped, each step's totals)."""
        per_layer = [layer_stats(layer) for layer in self.layers]
        quantized = sum(s["quantized_bytes"] for s in per_layer)
        residual = sum(s["residual_bytes"] for s in per_layer)
        sinks = sum(s["sink_bytes"] for s in per_layer)
        fallback = sum(s["fallback_bytes"] for s in per_layer)
        fp = sum(s["fp_bytes"] for s in per_layer)
        total = quantized + residual + sinks + fallback
        return {
            "seq_length": self.get_seq_length(),
            "num_layers": len(self.layers),
            "quant_type": self.cache_config.quant_type,
            "quantized_bytes": quantized,
            "residual_bytes": residual,
            "sink_bytes": sinks,
            "fallback_bytes": fallback,
            "fallback_blocks": sum(s["fallback_blocks"] for s in per_layer),
            "fallback_events": sum(s["fallback_events"] for s in per_layer),
            "total_bytes": total,
            "fp_bytes": fp,
            "compression_ratio": fp / total if total else 1.0,
            "max_size_mb": self.max_size_mb,
            "budget_bytes": self.budget_bytes,
            "budget": budget_stats(self.layers, self.cache_config.budget_policy, self._shrink_log),
        }

    # ------------------------------------------------------------------ snapshot files
    def save(self, path: str | Path) -> int:
        """Write this cache to ``path`` as a checksummed snapshot, atomically; returns the file size in bytes."""
        state, meta = cache_state(self.layers, self.cache_config, self.get_seq_length())
        return write_snapshot(path, _SNAPSHOT_KIND, state, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model_config: PretrainedConfig | None = None,
        *,
        cache_config: CacheConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> "QuantizedKVCache":
        """A new cache from a ``save``d snapshot; the file is verified whole before anything is built.

        With ``model_config`` the snapshot must fit that model (layers, kinds,
        key/value heads, head_dim); with ``cache_config`` it must have been made
        with those settings. A damaged file raises ``SnapshotError``, a
        mismatch or an inconsistent content a ``SnapshotError`` (a ``ValueError``) too; either way no cache is
        returned.
        """
        state, _ = read_snapshot(path, _SNAPSHOT_KIND)
        try:
            return cls._from_state(state, model_config, cache_config, device)
        except SnapshotError as exc:
            raise SnapshotError(f"snapshot {str(path)!r} is refused: {exc}; nothing was loaded") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError, RuntimeError) as exc:
            # a file that passed its checksum but was crafted or written by a buggy build
            raise SnapshotError(
                f"snapshot {str(path)!r} is refused: its contents are inconsistent ({type(exc).__name__}: {exc}); "
                "nothing was loaded"
            ) from None

    @classmethod
    def _from_state(
        cls, state: Any, model_config: PretrainedConfig | None, cache_config: CacheConfig | None,
        device: torch.device | str,
    ) -> "QuantizedKVCache":
        if not isinstance(state, dict):
            raise SnapshotError(f"its state is a {type(state).__name__}, not a mapping")
        saved_config = parse_config({"cache": state["cache_config"]}).cache
        if saved_config.group_size is None:
            raise SnapshotError("its cache_config has no resolved group_size")
        layers = layers_from_state(state, device, saved_config)
        if cache_config is not None:
            differences = config_differences(saved_config, cache_config)
            if differences:
                raise SnapshotError(f"it was made with other cache settings: {'; '.join(differences)}")
            # the budget bounds the live cache, not how the file's bytes were made: the caller's applies
            saved_config = dataclasses.replace(saved_config, max_size_mb=cache_config.max_size_mb)
        if model_config is None:
            cache = cls(None, cache_config=saved_config, num_layers=len(layers))
        else:
            cache = cls(model_config, cache_config=saved_config)
            check_same_layout(cache.layers, layers)
        cache.layers = layers
        return cache


# The specification's name for the same class.
QuantizedKVCacheManager = QuantizedKVCache


def _transformers_layer(idx: int, layer_type: str, kwargs: dict):
    """transformers' own cache layer for a kind with nothing to quantize here, with a warning saying what it costs."""
    layer_class = getattr(_cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {}).get(layer_type)
    if layer_class is None:
        raise ValueError(
            f"layer {idx} is a `{layer_type}` layer, which neither `QuantizedKVCache` nor this transformers "
            f"version's DynamicCache knows; `QuantizedKVCache` quantizes `full_attention` and {list(_SLIDING_TYPES)} "
            "layers"
        )
    logger.warning(
        "QuantizedKVCache: layer %d is a `%s` layer, which it cannot quantize; it keeps transformers' %s in full "
        "precision (the memory DynamicCache uses for it, no compression)", idx, layer_type, layer_class.__name__,
    )  # fmt: skip
    return layer_class(**kwargs)


def _one_of(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    if value is not None and alias_value is not None:
        raise ValueError(f"pass `{name}` or `{alias}`, not both")
    if value is None and alias_value is None:
        raise ValueError(f"`store` needs `{name}` (or `{alias}`): a tensor [batch, heads, seq, head_dim]")
    return value if value is not None else alias_value


def create_quantized_kv_cache(
    quant_type: str = "int4",
    num_layers: int = 1,
    num_heads: int | None = None,
    head_dim: int | None = None,
    **options: Any,
) -> QuantizedKVCache:
    """Model-free cache: ``num_layers`` quantized layers checked against ``num_heads``/``head_dim``;
    ``options`` are other ``CacheConfig`` fields (``max_size_mb=`` for a byte budget)."""
    return QuantizedKVCache(None, quant_type, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim, **options)
