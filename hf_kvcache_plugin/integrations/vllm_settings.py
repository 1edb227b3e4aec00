"""The vLLM connector's settings (``kv_connector_extra_config``), parsed without importing vLLM.

Keys of ``kv_connector_extra_config``:

- ``config``: path to our YAML (its ``cache:``, ``prefix_store:``, ``sizer:`` and ``distributed:`` sections),
  and/or ``cache`` / ``prefix_store`` / ``sizer`` / ``distributed``: the same sections inline;
- ``full_precision``: store exact KV instead (a full-precision tier, for comparison);
- ``store_address``: the scheduler-to-worker socket path (default: the temp dir, named by the engine id);
- ``instance_rank`` / ``instances``: with ``distributed:``, this vLLM instance's number among the instances
  that share their tiers (vLLM runs no launcher that would say it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import CacheConfig, DistributedConfig, PrefixStoreConfig, SizerConfig, parse_config

__all__ = ["TierSettings", "connector_settings"]

_SECTIONS = ("cache", "prefix_store", "sizer", "distributed")
_EXTRA_KEYS = {"config", *_SECTIONS, "full_precision", "store_address", "instance_rank", "instances"}


@dataclass(frozen=True)
class TierSettings:
    """What one engine's tier is made of.

    ``cache`` is resolved for the model (None: the full-precision tier); ``sizer`` / ``distributed`` are None
    when their sections are absent; ``instance_rank`` of ``instances`` only with ``distributed``.
    """

    cache: CacheConfig | None
    prefix_store: PrefixStoreConfig
    sizer: SizerConfig | None = None
    distributed: DistributedConfig | None = None
    instance_rank: int = 0
    instances: int = 1


def _count(extra: dict[str, Any], name: str, low: int) -> int:
    value = extra[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"kv_connector_extra_config `{name}` has to be an integer >= {low} but got {value!r}")
    return value


def connector_settings(extra: dict[str, Any], block_size: int, num_layers: int, head_size: int) -> TierSettings:
    """The tier's settings for a model of ``num_layers`` layers of ``head_size`` under vLLM's ``block_size``."""
    unknown = set(extra) - _EXTRA_KEYS
    if unknown:
        raise ValueError(f"kv_connector_extra_config has unknown keys {sorted(unknown)}; known: {sorted(_EXTRA_KEYS)}")
    data: dict[str, Any] = {}
    if "config" in extra:
        path = extra["config"]
        if not os.path.isfile(path):
            raise ValueError(f"kv_connector_extra_config `config`: file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    ignored = set(data) - set(_SECTIONS)
    if ignored:
        raise ValueError(
            f"the vLLM connector applies only the {', '.join(f'`{s}:`' for s in _SECTIONS)} sections but the config "
            f"has {sorted(ignored)}"
        )
    for section in _SECTIONS:
        if section in extra:
            data[section] = {**(data.get(section) or {}), **extra[section]}
    store = dict(data.get("prefix_store") or {})
    if store.setdefault("chunk_size", block_size) != block_size:
        raise ValueError(
            f"prefix_store.chunk_size has to be vLLM's block size ({block_size}) but got {store['chunk_size']}"
        )
    config = parse_config({**data, "cache": data.get("cache") or {}, "prefix_store": store})
    full = extra.get("full_precision", False)
    if not isinstance(full, bool):
        raise ValueError(f"kv_connector_extra_config `full_precision` has to be true or false but got {full!r}")
    rank, instances = 0, 1
    if config.distributed is not None:
        if full:
            raise ValueError("`distributed:` exchanges quantized entries; the full-precision tier cannot join it")
        if config.distributed.store_port is None:
            raise ValueError(
                "`distributed.store_port` has to be set for vLLM instances: instance 0 hosts the coordinator's "
                "store there (vLLM is not launched by torchrun, whose store the coordinator would use)"
            )
        missing = [k for k in ("instance_rank", "instances") if k not in extra]
        if missing:
            raise ValueError(f"`distributed:` needs kv_connector_extra_config {missing}: this instance's number "
                             "and how many instances share their tiers")
        rank, instances = _count(extra, "instance_rank", 0), _count(extra, "instances", 1)
        if rank >= instances:
            raise ValueError(f"`instance_rank` has to be below `instances` ({instances}) but got {rank}")
    else:
        stray = [k for k in ("instance_rank", "instances") if k in extra]
        if stray:
            raise ValueError(f"kv_connector_extra_config {stray} apply only with a `distributed:` section")
    cache = config.cache.for_model(num_layers, head_size)
    return TierSettings(None if full else cache, config.prefix_store, config.sizer, config.distributed, rank, instances)
