"""Prefix reuse: the byte-budgeted store of quantized prompt chunks, the generation hook, the adaptive sizer.

``prefix_store`` (chained chunk keys -> quantized blocks, LRU/LFU within a
byte budget) <- ``hook`` (``model.generate`` looks prompts up, loads hits,
stores new chunks; ``chunk_codec`` makes their bytes) <- ``sizer`` (the
store's budget follows memory pressure, read by ``MemoryMonitor``, and the
hit figures of ``WorkloadAnalyzer``).
"""

from .hook import PrefixCacheHook, RequestRecord, attach_prefix_cache
from .prefix_store import (
    PrefixEntry,
    PrefixEntryInfo,
    PrefixMatch,
    PrefixStore,
    chunk_keys,
    model_fingerprint,
    prefix_namespace,
)
from .memory import MemoryMonitor, MemoryPressure, MemoryReading
from .sizer import AdaptiveCacheSizer, AdaptiveSizer, SizerDecision, create_adaptive_sizer
from .workload import WorkloadAnalyzer

__all__ = [
    "AdaptiveCacheSizer",
    "AdaptiveSizer",
    "MemoryMonitor",
    "MemoryPressure",
    "MemoryReading",
    "PrefixCacheHook",
    "PrefixEntry",
    "PrefixEntryInfo",
    "PrefixMatch",
    "PrefixStore",
    "RequestRecord",
    "SizerDecision",
    "WorkloadAnalyzer",
    "attach_prefix_cache",
    "chunk_keys",
    "create_adaptive_sizer",
    "model_fingerprint",
    "prefix_namespace",
]
