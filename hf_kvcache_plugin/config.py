"""YAML configuration: one dataclass per component, one loader, every default here.

Unknown keys, wrong types and impossible values raise ``ValueError`` naming the
key, the value received and what is allowed. Checks that need the model
(group size vs head_dim, layer indices) run in ``CacheConfig.validate_for_model``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .quantization import SUPPORTED_BITS

__all__ = [
    "BreakerConfig",
    "CacheConfig",
    "DistributedConfig",
    "HealthConfig",
    "HealthServerConfig",
    "LayerOverride",
    "PluginConfig",
    "PrefixStoreConfig",
    "RateLimitConfig",
    "ServingConfig",
    "SizerConfig",
    "load_config",
    "parse_config",
]

QUANT_TYPES = ("int8", "int4", "int2", "mixed")
GROUP_AXES = ("channel", "token")
ATTENTION_PATHS = ("fused", "dequantize")
SCALE_DTYPES = ("float16", "bfloat16", "float32", "compute")
BITS_OF_QUANT_TYPE = {"int8": 8, "int4": 4, "int2": 2, "mixed": 8}
EVICTION_POLICIES = ("lru", "lfu")
MIXED_AGED_BITS = 4
DEFAULT_GROUP_SIZE = 64


@dataclass
class LayerOverride:
    """Bits for one layer; ``None`` keeps the cache-wide setting."""

    key_bits: int | None = None
    value_bits: int | None = None

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            _check_bits_field(f"layer_overrides.{name}", getattr(self, name))


@dataclass
class CacheConfig:
    """Settings of ``QuantizedKVCache``.

    ``group_size`` G is both the number of tokens per block (the unit that
    leaves the residual window and gets quantized) and the group length:
    G tokens per channel for ``channel`` grouping, G channels of head_dim per
    token for ``token`` grouping (then G must divide head_dim). ``None`` picks
    ``min(DEFAULT_GROUP_SIZE, head_dim)`` once the model is known.
    """

    quant_type: str = "int4"
    key_bits: int | None = None
    value_bits: int | None = None
    group_size: int | None = None
    residual_length: int = 128
    sink_tokens: int = 0
    key_axis: str = "channel"
    value_axis: str = "token"
    symmetric: bool = False
    scale_dtype: str = "float16"
    clip_percentile: float | None = None
    mixed_int8_tokens: int = 512
    layer_overrides: dict[int, LayerOverride] = field(default_factory=dict)
    skip_layers: list[int] = field(default_factory=list)
    attention: str = "fused"

    def __post_init__(self) -> None:
        _check_choice("quant_type", self.quant_type, QUANT_TYPES)
        _check_choice("attention", self.attention, ATTENTION_PATHS)
        _check_choice("key_axis", self.key_axis, GROUP_AXES)
        _check_choice("value_axis", self.value_axis, GROUP_AXES)
        _check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _check_bits_field("key_bits", self.key_bits)
        _check_bits_field("value_bits", self.value_bits)
        for name in ("residual_length", "sink_tokens", "mixed_int8_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` has to be >= 0 but got {getattr(self, name)}")
        if self.clip_percentile is not None and not (50.0 < self.clip_percentile <= 100.0):
            raise ValueError(f"`clip_percentile` has to be in (50, 100] or null but got {self.clip_percentile}")
        self.layer_overrides = {
            int(k): v if isinstance(v, LayerOverride) else LayerOverride(**v) for k, v in self.layer_overrides.items()
        }
        for idx in list(self.layer_overrides) + list(self.skip_layers):
            if idx < 0:
                raise ValueError(f"layer indices in `layer_overrides`/`skip_layers` must be >= 0 but got {idx}")
        if self.group_size is not None:
            self._check_group_size()

    def _check_group_size(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"`group_size` has to be a positive integer but got {self.group_size}")
        if self.residual_length % self.group_size != 0:
            raise ValueError(
                f"`residual_length` has to be a multiple of `group_size` ({self.group_size}) "
                f"but got {self.residual_length}"
            )
        if self.quant_type == "mixed" and self.mixed_int8_tokens % self.group_size != 0:
            raise ValueError(
                f"`mixed_int8_tokens` has to be a multiple of `group_size` ({self.group_size}) "
                f"but got {self.mixed_int8_tokens}"
            )
        all_bits = {self.resolved_key_bits, self.resolved_value_bits}
        for override in self.layer_overrides.values():
            all_bits |= {b for b in (override.key_bits, override.value_bits) if b}
        if self.quant_type == "mixed":
            all_bits.add(MIXED_AGED_BITS)
        per_byte = 8 // min(all_bits)
        if self.group_size % per_byte != 0:
            raise ValueError(
                f"`group_size` has to be a multiple of {per_byte} to pack {min(all_bits)}-bit codes but got "
                f"{self.group_size}"
            )

    @property
    def resolved_key_bits(self) -> int:
        return self.key_bits or BITS_OF_QUANT_TYPE[self.quant_type]

    @property
    def resolved_value_bits(self) -> int:
        return self.value_bits or BITS_OF_QUANT_TYPE[self.quant_type]

    def for_model(self, num_layers: int, head_dim: int | None) -> "CacheConfig":
        """A copy with ``group_size`` resolved for this model, checked against its shape."""
        resolved = self
        if self.group_size is None:
            group = DEFAULT_GROUP_SIZE if head_dim is None else min(DEFAULT_GROUP_SIZE, head_dim)
            resolved = dataclasses.replace(self, group_size=group)
        resolved.validate_for_model(num_layers, head_dim)
        return resolved

    def validate_for_model(self, num_layers: int, head_dim: int | None) -> None:
        """Checks that need the model's shape (``head_dim=None``: unknown until the first tensors)."""
        if self.group_size is None:
            raise ValueError("`group_size` is unresolved; call `for_model` first")
        uses_token_axis = "token" in (self.key_axis, self.value_axis)
        if head_dim is not None and uses_token_axis and head_dim % self.group_size != 0:
            raise ValueError(
                f"`group_size` ({self.group_size}) has to divide head_dim ({head_dim}) when keys or values are "
                f"grouped per token (along head_dim); use a divisor of {head_dim}, e.g. "
                f"{[d for d in (8, 16, 32, 64, 128) if head_dim % d == 0] or [head_dim]}"
            )
        for name, indices in (("layer_overrides", list(self.layer_overrides)), ("skip_layers", self.skip_layers)):
            bad = [i for i in indices if i >= num_layers]
            if bad:
                raise ValueError(f"`{name}` names layers {bad} but the model has {num_layers} layers (0..{num_layers - 1})")


# ---------------------------------------------------------------------- serving (hardening)
RATE_LIMIT_ACTIONS = ("reject", "wait")


@dataclass
class BreakerConfig:
    """Circuit breaker around store and coordinator calls (``pybreaker``).

    ``fail_max`` consecutive failures open it; after ``reset_timeout_s`` one
    trial call is let through (half-open); ``success_threshold`` successes in a
    row close it again. Validation errors (``ValueError``) never count.
    """

    fail_max: int = 5
    reset_timeout_s: float = 30.0
    success_threshold: int = 1

    def __post_init__(self) -> None:
        for name in ("fail_max", "success_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` has to be a positive integer but got {getattr(self, name)}")
        if self.reset_timeout_s <= 0:
            raise ValueError(f"`reset_timeout_s` has to be > 0 but got {self.reset_timeout_s}")


@dataclass
class RateLimitConfig:
    """Token bucket per client key: ``rate_per_s`` tokens a second, at most ``burst`` saved up.

    Over the limit, ``reject`` raises ``RateLimitExceeded`` at once; ``wait``
    blocks until a token is free if that takes at most ``max_wait_s``, else
    rejects. ``max_clients`` buckets are kept (least recently used go first)
    so that many distinct keys cannot grow memory without bound.
    """

    enabled: bool = False
    rate_per_s: float = 10.0
    burst: int = 20
    on_limit: str = "reject"
    max_wait_s: float = 1.0
    max_clients: int = 10_000

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0:
            raise ValueError(f"`rate_per_s` has to be > 0 but got {self.rate_per_s}")
        for name in ("burst", "max_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` has to be a positive integer but got {getattr(self, name)}")
        _check_choice("on_limit", self.on_limit, RATE_LIMIT_ACTIONS)
        if self.max_wait_s < 0:
            raise ValueError(f"`max_wait_s` has to be >= 0 but got {self.max_wait_s}")


@dataclass
class HealthConfig:
    """Memory pressure levels by the used fraction of system memory (psutil).

    From ``memory_high`` the service reports DEGRADED; from
    ``memory_critical`` UNHEALTHY (not ready), and new store entries are not
    stored. The levels and defaults are those of the adaptive sizer.
    """

    memory_moderate: float = 0.70
    memory_high: float = 0.85
    memory_critical: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.memory_moderate < self.memory_high < self.memory_critical <= 1:
            raise ValueError(
                "memory thresholds have to satisfy 0 < memory_moderate < memory_high < memory_critical <= 1 but "
                f"got {self.memory_moderate}, {self.memory_high}, {self.memory_critical}"
            )


@dataclass
class HealthServerConfig:
    """The optional HTTP endpoint serving ``/healthz``, ``/readyz`` and ``/metrics``.

    It binds to loopback by default; exposing it wider is a deliberate choice.
    ``port: 0`` picks a free port.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"`port` has to be in [0, 65535] but got {self.port}")
        if not self.host:
            raise ValueError("`host` has to be an address to bind (e.g. '127.0.0.1') but got an empty string")


@dataclass
class ServingConfig:
    """The ``serving:`` section: breakers, rate limits, health and its HTTP endpoint."""

    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    http: HealthServerConfig = field(default_factory=HealthServerConfig)


@dataclass
class PrefixStoreConfig:
    """Settings of ``PrefixStore``: a byte budget of quantized KV for prompt prefixes.

    Prompts are cut into chunks of ``chunk_size`` tokens (a multiple of the
    cache's ``group_size``); only full chunks are stored. ``max_size_mb`` is in
    MiB (2**20 bytes) of tensor data: packed codes, scales and zeros.
    """

    chunk_size: int = 256
    max_size_mb: float = 256.0
    eviction: str = "lru"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"`chunk_size` has to be a positive integer but got {self.chunk_size}")
        if self.max_size_mb < 0:
            raise ValueError(f"`max_size_mb` has to be >= 0 but got {self.max_size_mb}")
        _check_choice("eviction", self.eviction, EVICTION_POLICIES)
        if not self.device:
            raise ValueError("`device` has to name a torch device (e.g. 'cpu', 'cuda:0') but got an empty string")


@dataclass
class SizerConfig:
    """Settings of ``AdaptiveSizer``: how the prefix store's budget follows memory pressure.

    Pressure is the used fraction of system memory (or of the accelerator's,
    whichever is higher): below ``moderate_pressure`` it is LOW, then MODERATE,
    HIGH from ``high_pressure`` and CRITICAL from ``critical_pressure``.
    LOW may grow the budget (by ``grow_factor``) when the store is full and
    requests still miss; HIGH shrinks it (by ``shrink_factor``); CRITICAL drops
    it to ``min_size_mb`` at once. Two resizes are at least ``cooldown_s`` apart,
    except the emergency one.
    """

    min_size_mb: float = 16.0
    max_size_mb: float = 1024.0
    initial_size_mb: float | None = None  # None: the store's `max_size_mb`, clipped to the bounds
    interval_s: float = 5.0
    cooldown_s: float = 30.0
    moderate_pressure: float = 0.70
    high_pressure: float = 0.85
    critical_pressure: float = 0.95
    grow_factor: float = 1.5
    shrink_factor: float = 0.5
    grow_min_miss_rate: float = 0.1  # grow only if at least this share of recent requests missed
    grow_min_utilization: float = 0.9  # ... and the store fills this share of its budget
    max_rising_trend: float = 0.002  # ... and used memory rises slower than this fraction per second
    memory_window: int = 12  # readings the trend is fitted over
    request_window: int = 256  # recent requests the hit rate is computed over
    min_requests: int = 8  # requests seen before any growth
    background: bool = True  # a thread steps the sizer every `interval_s`; else the hook steps it

    def __post_init__(self) -> None:
        if not 0 <= self.min_size_mb <= self.max_size_mb:
            raise ValueError(
                f"`min_size_mb` ({self.min_size_mb}) and `max_size_mb` ({self.max_size_mb}) have to satisfy "
                "0 <= min_size_mb <= max_size_mb"
            )
        if self.initial_size_mb is not None and not self.min_size_mb <= self.initial_size_mb <= self.max_size_mb:
            raise ValueError(
                f"`initial_size_mb` has to be in [min_size_mb, max_size_mb] = [{self.min_size_mb}, "
                f"{self.max_size_mb}] or null but got {self.initial_size_mb}"
            )
        if not 0 < self.moderate_pressure < self.high_pressure < self.critical_pressure <= 1:
            raise ValueError(
                "pressure thresholds have to satisfy 0 < moderate_pressure < high_pressure < critical_pressure <= 1 "
                f"but got {self.moderate_pressure}, {self.high_pressure}, {self.critical_pressure}"
            )
        if self.grow_factor <= 1:
            raise ValueError(f"`grow_factor` has to be > 1 but got {self.grow_factor}")
        if not 0 < self.shrink_factor < 1:
            raise ValueError(f"`shrink_factor` has to be in (0, 1) but got {self.shrink_factor}")
        if self.interval_s <= 0:
            raise ValueError(f"`interval_s` has to be > 0 but got {self.interval_s}")
        if self.cooldown_s < 0:
            raise ValueError(f"`cooldown_s` has to be >= 0 but got {self.cooldown_s}")
        for name in ("grow_min_miss_rate", "grow_min_utilization"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` has to be in [0, 1] but got {getattr(self, name)}")
        if self.memory_window < 2:
            raise ValueError(f"`memory_window` has to be >= 2 (a trend needs two readings) but got {self.memory_window}")
        for name in ("request_window", "min_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` has to be a positive integer but got {getattr(self, name)}")


@dataclass
class DistributedConfig:
    """Settings of ``CacheCoordinator``: one prefix cache across the processes of a launch.

    Each process's store joins a consistent-hash ring with ``virtual_nodes``
    points per unit of capacity (``capacity_mb``; ``None``: the prefix store's
    ``max_size_mb``); every chain of prefix chunks lives on
    ``replication_factor`` processes. A round routes each prompt to a process
    holding its prefix, no process taking more than ``(1 + load_slack)`` times
    the mean. Peers are declared dead after ``heartbeat_timeout_s`` without a
    heartbeat; a live but slow peer is waited for at most ``round_timeout_s``
    per exchange; after ``breaker_fail_max`` failures in a row a peer's circuit
    breaker opens for ``breaker_reset_s``, and meanwhile its work is done
    locally; ``breaker_success_threshold`` trial successes close it again
    (``breaker_config()``: the serving layer's ``BreakerConfig`` of these).
    Migration sends at most ``migration_mb_per_step`` MiB per round.
    ``store_port``: only when not launched by torchrun / ``accelerate launch``,
    the port where rank 0 hosts the coordinator's store.
    """

    replication_factor: int = 2
    virtual_nodes: int = 128
    capacity_mb: float | None = None
    load_slack: float = 0.25
    migration_mb_per_step: float = 16.0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    round_timeout_s: float = 300.0
    startup_timeout_s: float = 120.0
    breaker_fail_max: int = 3
    breaker_reset_s: float = 30.0
    breaker_success_threshold: int = 1
    store_port: int | None = None
    namespace: str = "hf_kvcache"

    def __post_init__(self) -> None:
        for name in ("replication_factor", "virtual_nodes", "breaker_fail_max", "breaker_success_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` has to be an integer >= 1 but got {getattr(self, name)}")
        positive = (
            "migration_mb_per_step", "heartbeat_interval_s", "heartbeat_timeout_s", "round_timeout_s", "breaker_reset_s"
        )
        for name in positive + ("startup_timeout_s",):
            value = getattr(self, name)
            if value < 0 or (name in positive and value == 0):
                raise ValueError(f"`{name}` has to be a number {'> 0' if name in positive else '>= 0'} but got {value}")
        if self.capacity_mb is not None and self.capacity_mb <= 0:
            raise ValueError(f"`capacity_mb` has to be a number > 0 or null but got {self.capacity_mb}")
        if self.load_slack < 0:
            raise ValueError(f"`load_slack` has to be a number >= 0 but got {self.load_slack}")
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"`heartbeat_timeout_s` ({self.heartbeat_timeout_s}) has to exceed twice `heartbeat_interval_s` "
                f"({self.heartbeat_interval_s}), or one late beat would declare a live peer dead"
            )
        if self.store_port is not None and not 0 < self.store_port < 65536:
            raise ValueError(f"`store_port` has to be a port in [1, 65535] or null but got {self.store_port}")
        if not self.namespace or "/" in self.namespace:
            raise ValueError(f"`namespace` has to be a non-empty string without '/' but got {self.namespace!r}")

    def breaker_config(self) -> BreakerConfig:
        """The thresholds of the per-peer (and store) breakers, in the serving layer's terms."""
        return BreakerConfig(
            fail_max=self.breaker_fail_max,
            reset_timeout_s=self.breaker_reset_s,
            success_threshold=self.breaker_success_threshold,
        )


@dataclass
class PluginConfig:
    """The whole YAML file. ``model`` is a Hugging Face id or a local path.

    A ``prefix_store:`` section (a mapping, possibly empty) turns prefix reuse
    on; ``sizer:`` adds the adaptive budget and needs ``prefix_store:``;
    ``distributed:`` makes the processes of a launch share their prefix stores
    and needs ``prefix_store:``.
    """

    model: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    prefix_store: PrefixStoreConfig | None = None
    sizer: SizerConfig | None = None
    distributed: DistributedConfig | None = None

    def __post_init__(self) -> None:
        if self.prefix_store is not None:
            check_prefix_reuse_settings(self.cache, self.prefix_store.chunk_size)
        if self.sizer is not None and self.prefix_store is None:
            raise ValueError("`sizer` sizes the prefix store's budget; it needs a `prefix_store` section too")
        if self.distributed is not None and self.prefix_store is None:
            raise ValueError("`distributed` shares the prefix stores of processes; it needs a `prefix_store` section too")


def check_prefix_reuse_settings(cache: CacheConfig, chunk_size: int) -> None:
    """Cache settings a prefix store can serve; ``group_size`` is checked once it is resolved."""
    if cache.sink_tokens:
        # Sinks sit in full precision at the first cache slots; a stored chunk is
        # quantized blocks only, and with left padding those slots hold padding.
        raise ValueError(f"prefix reuse needs `cache.sink_tokens: 0` but got {cache.sink_tokens}")
    if cache.skip_layers:
        raise ValueError(
            f"prefix reuse stores quantized blocks of every layer; `cache.skip_layers` has to be empty but got "
            f"{cache.skip_layers}"
        )
    if cache.group_size is not None and chunk_size % cache.group_size != 0:
        raise ValueError(
            f"`prefix_store.chunk_size` has to be a multiple of `cache.group_size` ({cache.group_size}) "
            f"but got {chunk_size}"
        )


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` has to be one of {list(allowed)} but got {value!r}")


def _check_bits_field(name: str, value: Any) -> None:
    if value is not None and value not in SUPPORTED_BITS:
        raise ValueError(f"`{name}` has to be one of {list(SUPPORTED_BITS)} or null but got {value!r}")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation))
    return True


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass of a ``Section`` or ``Section | None`` annotation, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _describe(annotation: Any) -> str:
    if dataclasses.is_dataclass(annotation):
        return "mapping"
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, data: Any, where: str) -> Any:
    """Turn a mapping into ``cls``, naming the offending key on any mismatch."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"`{where or 'config'}` has to be a mapping but got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in `{where or 'config'}`; allowed keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        annotation = hints[name]
        if not _type_ok(value, annotation):
            raise ValueError(f"`{key}` has to be of type {_describe(annotation)} but got {type(value).__name__}: {value!r}")
        section = _dataclass_in(annotation)
        if section is not None and value is not None:
            value = _build(section, value, key)
        elif name == "layer_overrides":
            value = {_layer_index(key, k): _build(LayerOverride, v, f"{key}.{k}") for k, v in value.items()}
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        prefix = f"{where}." if where else ""
        raise ValueError(f"{exc} (in `{prefix}*`)" if prefix else str(exc)) from None


def _layer_index(where: str, key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ValueError(f"`{where}` keys have to be layer indices (integers) but got {key!r}") from None


def parse_config(data: dict | None) -> PluginConfig:
    """Build a ``PluginConfig`` from an already-parsed mapping."""
    return _build(PluginConfig, data, "")


def load_config(path: str | Path) -> PluginConfig:
    """Read a YAML file into a ``PluginConfig``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    try:
        return parse_config(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
