"""A vLLM instance's tier without vLLM (for test_vllm_tier.py): the worker side's StoreService, hosted on its
socket, in a process of its own; and chains of chunks encoded as the connector encodes vLLM's blocks."""

from __future__ import annotations

import torch

from hf_kvcache_plugin.integrations.vllm_blocks import ChunkCodec
from hf_kvcache_plugin.integrations.vllm_settings import TierSettings, connector_settings
from hf_kvcache_plugin.reuse.prefix_store import PrefixEntry, chunk_keys

BLOCK, LAYERS, HEADS, HEAD_SIZE = 128, 2, 2, 64
AUTHKEY = b"test-engine"
NAMESPACE = bytes(range(32))


def settings(**extra) -> TierSettings:
    return connector_settings(
        {"cache": {"quant_type": "int8", "group_size": 32}, **extra}, BLOCK, LAYERS, HEAD_SIZE
    )


def chain(codec: ChunkCodec, tokens: list[int], seed: int = 0) -> list[PrefixEntry]:
    """The stored chain of ``tokens``' full chunks: random K/V encoded per layer as the worker encodes them."""
    generator = torch.Generator().manual_seed(seed)
    keys = chunk_keys(NAMESPACE, tokens, BLOCK)
    entries = []
    for j, key in enumerate(keys):
        layers = [
            codec.encode(i, *torch.randn(2, HEADS, BLOCK, HEAD_SIZE, generator=generator)) for i in range(LAYERS)
        ]
        entries.append(
            PrefixEntry(key, keys[j - 1] if j else None, BLOCK, tuple(k for k, _ in layers), tuple(v for _, v in layers))
        )
    return entries


def run_instance(extra: dict, address: str, stop) -> None:
    """Host an instance's tier at ``address`` (as the worker does) until ``stop`` is set."""
    from hf_kvcache_plugin.integrations.vllm_store import StoreService, host_store, stop_hosting

    tier = settings(**extra)
    codec = ChunkCodec(tier.cache, LAYERS)
    service = StoreService.build(tier, entry_check=codec.entry_layout(HEADS, BLOCK, HEAD_SIZE, torch.float32).problem)
    host_store(address, AUTHKEY, service)
    stop.wait(120)
    stop_hosting(address)
