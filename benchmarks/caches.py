"""The caches under comparison, built the same way in every benchmark, and their exact byte counts.

``CacheSpec`` names one contender: full precision (``DynamicCache``), ours
(``QuantizedKVCache``) or a peer (transformers' ``QuantizedCache`` with the quanto
or HQQ backend). ``cache_bytes`` counts every byte a cache holds — packed data,
scales, zeros, full-precision residual and sinks — reading the peers' own
tensors, so that no figure depends on a formula.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, QuantizedCache

from hf_kvcache_plugin import QuantizedKVCache

FAMILIES = ("dynamic", "ours", "quanto", "hqq")


@dataclass(frozen=True)
class CacheSpec:
    """One contender. ``options`` go to ``QuantizedKVCache`` for ours."""

    name: str
    family: str
    bits: int | None = None
    group_size: int | None = None
    residual_length: int | None = None
    quant_type: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def make(self, config: PretrainedConfig) -> Cache:
        if self.family == "dynamic":
            return DynamicCache(config=config)
        if self.family == "ours":
            # None: the cache's own default
            sizes = {"group_size": self.group_size, "residual_length": self.residual_length}
            return QuantizedKVCache(
                config, self.quant_type, **{k: v for k, v in sizes.items() if v is not None}, **self.options
            )
        if self.family in ("quanto", "hqq"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return QuantizedCache(
                    self.family,
                    config,
                    nbits=self.bits,
                    q_group_size=self.group_size,
                    residual_length=self.residual_length,
                )
        raise ValueError(f"`family` has to be one of {list(FAMILIES)} but got {self.family!r}")

    @property
    def fused(self) -> bool:
        """Ours read by the ``kvquant_sdpa`` attention (the model must select it; see speed.py)."""
        return self.family == "ours" and self.options.get("attention") == "fused"

    def metadata_bits(self, compute_dtype: torch.dtype) -> float:
        """Bits of scale + zero per element (asymmetric groups): the part of the floor above ``bits``."""
        if self.family == "dynamic":
            return 0.0
        # ours stores scales/zeros in float16 (CacheConfig default); the peers in the compute dtype
        meta_bytes = 2 if self.family == "ours" else torch.empty((), dtype=compute_dtype).element_size()
        return 2 * 8 * meta_bytes / self.group_size

    def floor_bits(self, compute_dtype: torch.dtype, aged_fraction: float = 0.0) -> float:
        """Physical floor in bits per element: code bits plus group metadata, no residual window.

        For ``mixed``, ``aged_fraction`` of the tokens are INT4 and the rest INT8.
        """
        if self.family == "dynamic":
            return 8.0 * torch.empty((), dtype=compute_dtype).element_size()
        bits = self.bits
        if self.quant_type == "mixed":
            bits = 4 * aged_fraction + 8 * (1 - aged_fraction)
        return bits + self.metadata_bits(compute_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "bits": self.bits,
            "group_size": self.group_size,
            "residual_length": self.residual_length,
            "quant_type": self.quant_type,
            "options": dict(self.options),
        }


def standard_specs(
    group_size: int | None, residual_length: int | None, include: tuple[str, ...] | None = None,
    mixed_int8_tokens: int = 512,
) -> list[CacheSpec]:
    """Full precision, ours at every bit width and mixed, and the peers at the bits they support.

    Peers get the same group size and residual length as ours, so their nominal
    bits per element match; their defaults for the grouping axes are kept.
    ``None`` sizes are ours' defaults for head_dim 128 (64 and 128 for the peers).
    The ``-fused`` and ``-dequantize`` variants (same bytes, attention on the
    packed blocks or on the dequantized history) are only returned when
    ``include`` names them: they matter for speed alone.
    """
    g, r = group_size, residual_length
    pg, pr = g or 64, r if r is not None else 128
    specs = [
        CacheSpec("dynamic", "dynamic"),
        CacheSpec("ours-int8", "ours", 8, g, r, "int8"),
        CacheSpec("ours-int4", "ours", 4, g, r, "int4"),
        CacheSpec("ours-int2", "ours", 2, g, r, "int2"),
        CacheSpec("ours-mixed", "ours", 8, g, r, "mixed", {"mixed_int8_tokens": mixed_int8_tokens}),
        CacheSpec("quanto-int4", "quanto", 4, pg, pr),
        CacheSpec("quanto-int2", "quanto", 2, pg, pr),
        CacheSpec("hqq-int8", "hqq", 8, pg, pr),
        CacheSpec("hqq-int4", "hqq", 4, pg, pr),
        CacheSpec("hqq-int2", "hqq", 2, pg, pr),
    ]
    if include is None:
        return specs
    specs += [
        CacheSpec("ours-int8-fused", "ours", 8, g, r, "int8", {"attention": "fused"}),
        CacheSpec("ours-int4-fused", "ours", 4, g, r, "int4", {"attention": "fused"}),
        CacheSpec("ours-int8-dequantize", "ours", 8, g, r, "int8", {"attention": "dequantize"}),
        CacheSpec("ours-int4-dequantize", "ours", 4, g, r, "int4", {"attention": "dequantize"}),
    ]
    unknown = sorted(set(include) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"unknown cache name(s) {unknown}; known: {[s.name for s in specs]}")
    return [s for s in specs if s.name in include]


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable from ``obj``; tensor subclasses (quanto) are opened up."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            inner, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, name)) for name in inner)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def cache_bytes(cache: Cache) -> dict[str, int]:
    """Exact bytes held: ``quantized`` (codes + scales + zeros), ``full_precision`` (residual, sinks,
    or everything for ``DynamicCache``) and ``total``."""
    if isinstance(cache, QuantizedKVCache):
        stats = cache.get_stats()
        fp = stats["residual_bytes"] + stats["sink_bytes"]
        return {"quantized": stats["quantized_bytes"], "full_precision": fp, "total": stats["total_bytes"]}
    quantized = full = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        quantized += _tensor_bytes(getattr(layer, "_quantized_keys", None))
        quantized += _tensor_bytes(getattr(layer, "_quantized_values", None))
        full += _tensor_bytes(layer.keys) + _tensor_bytes(layer.values)
    return {"quantized": quantized, "full_precision": full, "total": quantized + full}
