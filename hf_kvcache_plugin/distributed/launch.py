"""Wiring a hooked model into a ``CacheCoordinator``: the rank, the c10d store, the serve function, the keys."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..config import DistributedConfig
from ..reuse.entry_layout import EntryLayout
from ..reuse.hook import PrefixCacheHook
from ..reuse.prefix_store import PrefixStore
from ..resilience.degradation import entry_problem
from ..resilience.metrics import ServingMetrics
from ..resilience.rate_limit import RateLimiter
from .coordinator import CacheCoordinator
from .entry_verification import EntryVerifier
from .nodes import NodeInfo
from .prefix_adapter import PrefixStoreAdapter
from .signing import launch_secret
from .transport import StoreTransport, connect_c10d_store

__all__ = ["attach_coordinator", "generate_new_tokens", "launch_rank"]


def launch_rank() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed if initialised, else the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@torch.inference_mode()
def generate_new_tokens(model: Any, prompts: Sequence[Sequence[int]], pad_token_id: int, **generate_kwargs: Any
                        ) -> list[list[int]]:
    """One left-padded ``model.generate`` over token lists; the new tokens of each row (padding removed)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    device = getattr(model, "device", torch.device("cpu"))
    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_token_id,
                         **generate_kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new = sequences[:, width:].tolist()
    eos = generate_kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None))
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    # rows that stopped early are padded to the batch's length; cut them after their end token
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in new]


def attach_coordinator(
    hook: PrefixCacheHook,
    config: DistributedConfig | None = None,
    *,
    pad_token_id: int = 0,
    generate_kwargs: dict[str, Any] | None = None,
    wait_for: int | None = None,
    metrics: ServingMetrics | None = None,
    limiter: RateLimiter | None = None,
) -> CacheCoordinator:
    """A started ``CacheCoordinator`` for this process of the launch, serving with ``hook``'s model and store.

    One process (no distributed launch): no transport, ``generate`` serves locally. ``metrics`` receives the
    breakers' state changes and the coordinator's requests and fallbacks; ``limiter`` rate-limits
    ``generate`` per client. A hook whose store is hardened (``harden_cache``) serves through the guarded
    store, while entries migrate from and to the ``PrefixStore`` behind it.

    Trust: messages are signed with the secret in ``$<config.secret_env>`` (refused when unset and the store is
    not on loopback); imported entries have to match this model's ``EntryLayout`` and pass the store's insert
    guard, and sampled batches have to be the K/V this model computes for their tokens
    (``config.verify_sample_rate``, ``EntryVerifier``); peers' prompts have to be within the model's vocabulary.
    """
    config = config or DistributedConfig()
    prefix_store = hook.store if isinstance(hook.store, PrefixStore) else getattr(hook.store, "wrapped", hook.store)
    rank, world_size = launch_rank()
    transport = None
    if world_size > 1:
        host = os.environ.get("MASTER_ADDR", config.bind_address)
        secret = launch_secret(config.secret_env, host)  # before connecting: no secret, no traffic
        # an operation on a live c10d store takes well under a millisecond: a short op timeout keeps a
        # vanished key or a lost store from blocking a rank for long
        c10d_store = connect_c10d_store(rank, world_size, config.store_port, timeout_s=config.heartbeat_timeout_s,
                                        bind_address=config.bind_address)
        transport = StoreTransport(
            c10d_store,
            rank,
            world_size,
            namespace=config.namespace,
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            breaker=config.breaker_config(),
            metrics=metrics,
            secret=secret,
            max_payload_bytes=int(config.max_payload_mb * 2**20),
            progress_timeout_s=config.round_deadline_s,
        )
    namespace = hook.namespace
    chunk = prefix_store.chunk_size
    capacity = config.capacity_mb or prefix_store.max_size_mb or 1.0
    node = NodeInfo(rank, f"{socket.gethostname()}:{os.getpid()}", capacity)
    layout = EntryLayout.for_model(hook.model.config, hook.cache_config, chunk, hook.model.dtype)
    # a hardened store's own insert guard too: an imported entry passes what a local insert passes
    guard = getattr(hook.store, "validate_entry", None) or entry_problem
    text_config = hook.model.config.get_text_config(decoder=True)
    # it learns the tokens of every prompt hashed below (this process's and its peers'), so that it can
    # recompute a peer's entries for those prompts
    verifier = EntryVerifier(hook.model, hook.cache_config, namespace, chunk, prefix_store.get,
                             config.verify_sample_rate)
    coordinator = CacheCoordinator(
        node,
        config,
        local_entries=PrefixStoreAdapter(prefix_store, checks=(layout.problem, guard)),
        transport=transport,
        serve_batch=lambda prompts, max_new_tokens=None: generate_new_tokens(
            hook.model, prompts, pad_token_id,
            **{**(generate_kwargs or {}), **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})},
        ),  # fmt: skip
        # the hook never reuses a prompt's last token (its logits start generation): route on the rest
        prompt_keys=lambda prompt: verifier.learn(list(prompt)[:-1]),
        metrics=metrics,
        limiter=limiter,
        vocab_size=getattr(text_config, "vocab_size", None),
    )
    coordinator.entry_exchange.verifier = verifier
    return coordinator.start(wait_for=wait_for)
