"""The sections of the YAML file, one validated dataclass each; every default lives here.

Types and bounds are in the annotations; ``_problems`` holds the checks across
keys. Checks that need the model (group size vs head_dim, layer indices) run
in ``CacheConfig.validate_for_model``.
"""

import dataclasses
from collections.abc import Iterator
from dataclasses import field
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import Field, Strict

from ..quantization import SUPPORTED_BITS
from .validation import (
    Bool,
    Checked,
    ConfigError,
    Float,
    Fraction,
    MiB,
    NonNegativeFloat,
    NonNegativeInt,
    NonNegativeMiB,
    NonNegativeSeconds,
    PositiveFloat,
    PositiveInt,
    Problem,
    Seconds,
    Str,
    doc,
    exact_choice,
    section,
)

__all__ = [
    "ATTENTION_PATHS", "BITS_OF_QUANT_TYPE", "BUDGET_POLICIES", "CPU_KERNEL_MODES", "BreakerConfig", "CacheConfig", "DEFAULT_GROUP_SIZE",
    "DistributedConfig", "EVICTION_POLICIES", "GROUP_AXES", "HealthConfig", "HealthServerConfig", "LayerOverride",
    "MIXED_AGED_BITS", "PluginConfig", "PrefixStoreConfig", "QUANT_TYPES", "RATE_LIMIT_ACTIONS", "RateLimitConfig",
    "SCALE_DTYPES", "ApiServerConfig", "ServingConfig", "SizerConfig", "check_prefix_reuse_settings", "section_dependencies",
]  # fmt: skip

QUANT_TYPES = ("int8", "int4", "int2", "mixed")
GROUP_AXES = ("channel", "token")
ATTENTION_PATHS = ("fused", "dequantize")
CPU_KERNEL_MODES = ("auto", "off")
BUDGET_POLICIES = ("refuse", "repack", "repack_then_drop", "repack_to_4_then_drop", "drop")  # shrink.py says what each does
SCALE_DTYPES = ("float16", "bfloat16", "float32", "compute")
BITS_OF_QUANT_TYPE = {"int8": 8, "int4": 4, "int2": 2, "mixed": 8}
EVICTION_POLICIES = ("lru", "lfu")
RATE_LIMIT_ACTIONS = ("reject", "wait")
MIXED_AGED_BITS = 4
DEFAULT_GROUP_SIZE = 64

Bits = exact_choice(SUPPORTED_BITS)
# YAML may quote a mapping key, so a layer index is taken from "3" too
LayerIndex = Annotated[int, Field(ge=0), doc("layer indices (integers >= 0)")]
Pressure = Annotated[float, Strict(), Field(gt=0, le=1)]


@section
class LayerOverride(Checked):
    """Bits for one layer; ``null`` keeps the cache-wide setting."""

    key_bits: Bits | None = None
    value_bits: Bits | None = None


@section
class CacheConfig(Checked):
    """Settings of ``QuantizedKVCache``.

    ``group_size`` G is both the number of tokens per block (the unit that
    leaves the residual window and gets quantized) and the group length:
    G tokens per channel for ``channel`` grouping, G channels of head_dim per
    token for ``token`` grouping (then G must divide head_dim). ``None`` picks
    ``min(DEFAULT_GROUP_SIZE, head_dim)`` once the model is known.
    ``max_size_mb`` bounds every byte the cache holds (codes, scales,
    zeros, sinks, residual window); ``QuantizedKVCache.resize`` changes it.
    """

    quant_type: Annotated[Literal[QUANT_TYPES], doc("bits of keys and values; mixed: INT8, aged blocks INT4")] = "int4"
    key_bits: Annotated[Bits | None, doc("overrides the bits of quant_type for keys")] = None
    value_bits: Annotated[Bits | None, doc("overrides the bits of quant_type for values")] = None
    group_size: Annotated[PositiveInt | None, doc("tokens per block and group length; null: min(64, head_dim)")] = None
    residual_length: Annotated[NonNegativeInt, doc("newest tokens kept exact; a multiple of group_size")] = 128
    sink_tokens: Annotated[NonNegativeInt, doc("first tokens kept exact (attention sinks)")] = 0
    key_axis: Annotated[Literal[GROUP_AXES], doc("keys grouped per channel or per token")] = "channel"
    value_axis: Annotated[Literal[GROUP_AXES], doc("values grouped per channel or per token")] = "token"
    symmetric: Annotated[Bool, doc("scale only (no zero offset)")] = False
    scale_dtype: Annotated[Literal[SCALE_DTYPES], doc("dtype of scales and zeros; compute: the model's")] = "float16"
    clip_percentile: Annotated[
        Annotated[float, Strict(), Field(gt=50, le=100)] | None,
        doc("clip each group to this percentile before choosing its range; null: min/max"),
    ] = None
    mixed_int8_tokens: Annotated[NonNegativeInt, doc("mixed: newest quantized tokens kept INT8")] = 512
    layer_overrides: Annotated[
        dict[LayerIndex, LayerOverride],
        Field(description="bits per layer index", json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}),
    ] = field(default_factory=dict)
    skip_layers: Annotated[list[NonNegativeInt], doc("layer indices cached in full precision")] = field(
        default_factory=list
    )
    attention: Annotated[Literal[ATTENTION_PATHS], doc("fused: attention reads the codes")] = "fused"
    cpu_kernel: Annotated[
        Literal[CPU_KERNEL_MODES],
        doc("fused attention on CPU: auto = the C++ kernel where it builds, off = the PyTorch reference path"),
    ] = "auto"
    max_size_mb: Annotated[
        MiB | None,
        doc("byte budget of the live cache in MiB (2**20 bytes): over it the cache shrinks by budget_policy, else the update is refused; "
            "null: unbounded"),
    ] = None
    budget_policy: Annotated[
        Literal[BUDGET_POLICIES],
        doc("over max_size_mb: refuse; repack = oldest blocks 8->4->2 bits, then refuse; repack_then_drop = "
            "then drop the oldest blocks between sinks and residual window (StreamingLLM); repack_to_4_then_drop = "
            "8->4 only, then drop; drop = bits fixed, drop only"),
    ] = "repack"

    def _problems(self) -> Iterator[Problem]:
        g = self.group_size
        if g is None:
            return
        if self.residual_length % g != 0:
            yield Problem(
                ("residual_length",), f"has to be a multiple of `group_size` ({g}) but got {self.residual_length}"
            )
        if self.quant_type == "mixed" and self.mixed_int8_tokens % g != 0:
            yield Problem(
                ("mixed_int8_tokens",), f"has to be a multiple of `group_size` ({g}) but got {self.mixed_int8_tokens}"
            )
        all_bits = {self.resolved_key_bits, self.resolved_value_bits}
        for override in self.layer_overrides.values():
            all_bits |= {b for b in (override.key_bits, override.value_bits) if b}
        if self.quant_type == "mixed":
            all_bits.add(MIXED_AGED_BITS)
        per_byte = 8 // min(all_bits)
        if g % per_byte != 0:
            yield Problem(
                ("group_size",), f"has to be a multiple of {per_byte} to pack {min(all_bits)}-bit codes but got {g}"
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
        """Checks that need the model's shape (``head_dim=None``: unknown until the first tensors); one
        ``ConfigError`` lists every problem."""
        if self.group_size is None:
            raise ValueError("`group_size` is unresolved; call `for_model` first")
        problems = []
        uses_token_axis = "token" in (self.key_axis, self.value_axis)
        if head_dim is not None and uses_token_axis and head_dim % self.group_size != 0:
            problems.append(
                f"`group_size` ({self.group_size}) has to divide head_dim ({head_dim}) when keys or values are "
                f"grouped per token (along head_dim); use a divisor of {head_dim}, e.g. "
                f"{[d for d in (8, 16, 32, 64, 128) if head_dim % d == 0] or [head_dim]}"
            )
        for name, indices in (("layer_overrides", list(self.layer_overrides)), ("skip_layers", self.skip_layers)):
            bad = [i for i in indices if i >= num_layers]
            if bad:
                problems.append(f"`{name}` names layers {bad} but the model has {num_layers} layers (0..{num_layers - 1})")
        if problems:
            raise ConfigError([Problem((), text, whole=True) for text in problems])


# ---------------------------------------------------------------------- serving (hardening)
@section
class BreakerConfig(Checked):
    """Circuit breaker around store and coordinator calls (``pybreaker``).

    ``fail_max`` consecutive failures open it; after ``reset_timeout_s`` one
    trial call is let through (half-open); ``success_threshold`` successes in a
    row close it again. Validation errors (``ValueError``) never count.
    """

    fail_max: PositiveInt = 5
    reset_timeout_s: Seconds = 30.0
    success_threshold: PositiveInt = 1


@section
class RateLimitConfig(Checked):
    """Token bucket per client key: ``rate_per_s`` tokens a second, at most ``burst`` saved up.

    Over the limit, ``reject`` raises ``RateLimitExceeded`` at once; ``wait``
    blocks until a token is free if that takes at most ``max_wait_s``, else
    rejects. ``max_clients`` buckets are kept (least recently used go first)
    so that many distinct keys cannot grow memory without bound.
    """

    enabled: Bool = False
    rate_per_s: PositiveFloat = 10.0
    burst: PositiveInt = 20
    on_limit: Literal[RATE_LIMIT_ACTIONS] = "reject"
    max_wait_s: NonNegativeSeconds = 1.0
    max_clients: PositiveInt = 10_000


@section
class HealthConfig(Checked):
    """Memory pressure levels by the used fraction of system memory (psutil).

    From ``memory_high`` the service reports DEGRADED; from
    ``memory_critical`` UNHEALTHY (not ready), and new store entries are not
    stored. The levels and defaults are those of the adaptive sizer. A request
    in flight for longer than ``stall_after_s`` makes liveness UNHEALTHY.
    """

    memory_moderate: Pressure = 0.70
    memory_high: Pressure = 0.85
    memory_critical: Pressure = 0.95
    stall_after_s: Annotated[
        Seconds, doc("a request in flight this long makes /healthz (liveness) UNHEALTHY: the loop is stuck")
    ] = 300.0

    def _problems(self) -> Iterator[Problem]:
        if not self.memory_moderate < self.memory_high < self.memory_critical:
            yield Problem(
                (),
                "memory thresholds have to satisfy 0 < memory_moderate < memory_high < memory_critical <= 1 but got "
                f"{self.memory_moderate}, {self.memory_high}, {self.memory_critical}",
                whole=True,
            )


@section
class HealthServerConfig(Checked):
    """The optional HTTP endpoint serving ``/healthz``, ``/readyz`` and ``/metrics``.

    It binds to loopback by default; exposing it wider is a deliberate choice.
    ``port: 0`` picks a free port.
    """

    enabled: Bool = False
    host: Str = "127.0.0.1"
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] = 9464

    def _problems(self) -> Iterator[Problem]:
        if not self.host:
            yield Problem(("host",), "has to be an address to bind (e.g. '127.0.0.1') but got an empty string")


@section
class ApiServerConfig(Checked):
    """The OpenAI-compatible API of ``hf-kvcache serve --http`` (``/v1/...``, probes and metrics on one port).

    API keys come from ``api_keys`` and from the comma-separated environment
    variable named by ``api_keys_env``; with keys, every ``/v1`` request needs
    one (``Authorization: Bearer KEY``). Without keys the server only starts on
    a loopback host. Requests over ``max_prompt_tokens`` or asking for more than
    ``max_tokens`` are refused (400); ``default_max_tokens`` applies when a
    request names none. Waiting requests with the same sampling settings are
    decoded together, at most ``max_batch_size`` rows per ``generate``, after
    waiting at most ``batch_wait_ms`` for company; past ``max_queue`` waiting
    requests new ones get 503.
    """

    host: Str = "127.0.0.1"
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] = 8000
    api_keys: Annotated[list[Str], doc("accepted API keys (keep them out of shared files: prefer the env variable)")] = (
        field(default_factory=list)
    )
    api_keys_env: Annotated[Str, doc("environment variable with more keys, comma-separated")] = "HF_KVCACHE_API_KEYS"
    max_prompt_tokens: PositiveInt = 2048
    max_tokens: Annotated[PositiveInt, doc("the most new tokens one request may ask for")] = 512
    default_max_tokens: Annotated[PositiveInt, doc("new tokens when a request names no max_tokens")] = 16
    max_batch_size: Annotated[PositiveInt, doc("rows (prompts x n) decoded in one generate call")] = 8
    batch_wait_ms: NonNegativeFloat = 2.0
    max_queue: Annotated[PositiveInt, doc("requests waiting for the model before new ones get 503")] = 256

    def _problems(self) -> Iterator[Problem]:
        if not self.host:
            yield Problem(("host",), "has to be an address to bind (e.g. '127.0.0.1') but got an empty string")
        if any(not key.strip() for key in self.api_keys):
            yield Problem(("api_keys",), "has an empty key; remove it or give the key")
        if self.default_max_tokens > self.max_tokens:
            yield Problem(
                (), f"`default_max_tokens` ({self.default_max_tokens}) is over `max_tokens` ({self.max_tokens})",
                whole=True,
            )  # fmt: skip


@section
class ServingConfig(Checked):
    """The ``serving:`` section: breakers, rate limits, health, its HTTP endpoint and the OpenAI-compatible API."""

    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    http: HealthServerConfig = field(default_factory=HealthServerConfig)
    api: ApiServerConfig = field(default_factory=ApiServerConfig)


# ---------------------------------------------------------------------- prefix reuse
@section
class PrefixStoreConfig(Checked):
    """Settings of ``PrefixStore``: a byte budget of quantized KV for prompt prefixes.

    Prompts are cut into chunks of ``chunk_size`` tokens (a multiple of the
    cache's ``group_size``); only full chunks are stored. ``max_size_mb`` is in
    MiB (2**20 bytes) of tensor data: packed codes, scales and zeros.
    """

    chunk_size: PositiveInt = 256
    max_size_mb: NonNegativeMiB = 256.0
    eviction: Literal[EVICTION_POLICIES] = "lru"
    device: Annotated[Str, doc("torch device of the stored tensors")] = "cpu"

    def _problems(self) -> Iterator[Problem]:
        if not self.device:
            yield Problem(("device",), "has to name a torch device (e.g. 'cpu', 'cuda:0') but got an empty string")


@section
class SizerConfig(Checked):
    """Settings of ``AdaptiveSizer``: how the prefix store's budget follows memory pressure.

    Pressure is the used fraction of system memory (or of the accelerator's,
    whichever is higher): below ``moderate_pressure`` it is LOW, then MODERATE,
    HIGH from ``high_pressure`` and CRITICAL from ``critical_pressure``.
    LOW may grow the budget (by ``grow_factor``) when the store is full and
    requests still miss; HIGH shrinks it (by ``shrink_factor``); CRITICAL drops
    it to ``min_size_mb`` at once. Two resizes are at least ``cooldown_s`` apart,
    except the emergency one.
    """

    min_size_mb: NonNegativeMiB = 16.0
    max_size_mb: NonNegativeMiB = 1024.0
    initial_size_mb: Annotated[
        NonNegativeMiB | None, doc("null: the store's max_size_mb, clipped to the bounds")
    ] = None
    interval_s: Seconds = 5.0
    cooldown_s: NonNegativeSeconds = 30.0
    moderate_pressure: Pressure = 0.70
    high_pressure: Pressure = 0.85
    critical_pressure: Pressure = 0.95
    grow_factor: Annotated[float, Strict(), Field(gt=1)] = 1.5
    shrink_factor: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.5
    grow_min_miss_rate: Annotated[Fraction, doc("grow only if at least this share of recent requests missed")] = 0.1
    grow_min_utilization: Annotated[Fraction, doc("... and the store fills this share of its budget")] = 0.9
    max_rising_trend: Annotated[Float, doc("... and used memory rises slower than this fraction per second")] = 0.002
    trend_horizon_s: Annotated[
        NonNegativeFloat,
        doc("proactive sizing: shrink before HIGH pressure when the memory trend projects it within this many "
            "seconds; 0: off"),
    ] = 60.0
    memory_window: Annotated[
        int, Strict(), Field(ge=2, description="readings the trend is fitted over (a trend needs two)")
    ] = 12
    request_window: Annotated[PositiveInt, doc("recent requests the hit rate is computed over")] = 256
    min_requests: Annotated[PositiveInt, doc("requests seen before any growth")] = 8
    background: Annotated[Bool, doc("a thread steps the sizer every interval_s; else the hook steps it")] = True

    def _problems(self) -> Iterator[Problem]:
        if self.min_size_mb > self.max_size_mb:
            yield Problem(
                ("min_size_mb",), f"has to be <= `max_size_mb` ({self.max_size_mb}) but got {self.min_size_mb}"
            )
        elif self.initial_size_mb is not None and not self.min_size_mb <= self.initial_size_mb <= self.max_size_mb:
            yield Problem(
                ("initial_size_mb",),
                f"has to be in [min_size_mb, max_size_mb] = [{self.min_size_mb}, {self.max_size_mb}] or null but "
                f"got {self.initial_size_mb}",
            )
        if not self.moderate_pressure < self.high_pressure < self.critical_pressure:
            yield Problem(
                (),
                "pressure thresholds have to satisfy 0 < moderate_pressure < high_pressure < critical_pressure <= 1 "
                f"but got {self.moderate_pressure}, {self.high_pressure}, {self.critical_pressure}",
                whole=True,
            )


# ---------------------------------------------------------------------- distributed
# a peer that stops answering is usually gone: its breaker opens sooner than a store's
_PEER_BREAKER = {"fail_max": 3}


@section
class DistributedConfig(Checked):
    """Settings of ``CacheCoordinator``: one prefix cache across the processes of a launch.

    Each process's store joins a consistent-hash ring with ``virtual_nodes``
    points per unit of capacity (``capacity_mb``; ``None``: the prefix store's
    ``max_size_mb``); every chain of prefix chunks lives on
    ``replication_factor`` processes. A round routes each prompt to a process
    holding its prefix, no process taking more than ``(1 + load_slack)`` times
    the mean. Peers are declared dead after ``heartbeat_timeout_s`` without a
    heartbeat (a process beats only while its main thread makes progress); a
    round waits for its peers' messages until one deadline,
    ``round_deadline_s`` after it began, then serves what is missing itself.
    Every message is signed with the secret in the environment variable
    ``secret_env`` (required unless the store is on loopback) and at most
    ``max_payload_mb`` MiB. ``breaker`` is the circuit breaker of each peer (and of the
    store): after ``fail_max`` failures in a row it opens for
    ``reset_timeout_s``, and meanwhile that peer's work is done locally;
    ``success_threshold`` trial successes close it again. Keys left out of
    ``breaker`` take 3 / 30.0 / 1. Migration sends at most
    ``migration_mb_per_step`` MiB per round, in batches sized so that the
    round spends about ``migration_time_budget_ms`` sending them at the
    bandwidth measured to each target (``migration_initial_mb_per_s`` until
    a target was measured; at least one entry per round). ``store_port``: only when not
    launched by torchrun / ``accelerate launch``, the port where rank 0 hosts
    the coordinator's store, listening on ``bind_address`` only.
    ``verify_sample_rate``: the share of peers' migration batches recomputed
    with the local model before they are stored (every batch of a peer until
    one passed, then this share; see ``distributed.entry_verification``).
    """

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "round_timeout_s": "round_deadline_s",
        "breaker_fail_max": "breaker.fail_max",
        "breaker_reset_s": "breaker.reset_timeout_s",
        "breaker_success_threshold": "breaker.success_threshold",
    }

    replication_factor: PositiveInt = 2
    virtual_nodes: PositiveInt = 128
    capacity_mb: PositiveFloat | None = None
    load_slack: NonNegativeFloat = 0.25
    migration_mb_per_step: PositiveFloat = 16.0
    migration_time_budget_ms: Annotated[float, Strict(), Field(gt=0, le=3_600_000)] = 200.0
    migration_initial_mb_per_s: PositiveFloat = 16.0
    heartbeat_interval_s: PositiveFloat = 0.5
    heartbeat_timeout_s: PositiveFloat = 5.0
    round_deadline_s: Annotated[float, Strict(), Field(gt=0, le=3600)] = 30.0
    max_payload_mb: Annotated[float, Strict(), Field(gt=0, le=4096)] = 64.0
    startup_timeout_s: NonNegativeFloat = 120.0
    breaker: BreakerConfig = field(default_factory=lambda: BreakerConfig(**_PEER_BREAKER))
    store_port: Annotated[int, Strict(), Field(ge=1, le=65535)] | None = None
    namespace: Str = "hf_kvcache"
    secret_env: Str = "HF_KVCACHE_CLUSTER_SECRET"
    bind_address: Str = "127.0.0.1"
    verify_sample_rate: Annotated[float, Strict(), Field(ge=0, le=1)] = 0.1

    @pydantic.field_validator("breaker", mode="before")
    @classmethod
    def _peer_breaker_defaults(cls, value: Any) -> Any:
        return {**_PEER_BREAKER, **value} if isinstance(value, dict) else value

    def _problems(self) -> Iterator[Problem]:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            yield Problem(
                ("heartbeat_timeout_s",),
                f"has to exceed twice `heartbeat_interval_s` ({self.heartbeat_interval_s}), or one late beat would "
                f"declare a live peer dead, but got {self.heartbeat_timeout_s}",
            )
        if not self.namespace or "/" in self.namespace:
            yield Problem(("namespace",), f"has to be a non-empty string without '/' but got {self.namespace!r}")
        if self.migration_mb_per_step > self.max_payload_mb:
            yield Problem(
                ("migration_mb_per_step",),
                f"has to be at most `max_payload_mb` ({self.max_payload_mb}): a step is one message, but got "
                f"{self.migration_mb_per_step}",
            )
        if self.migration_time_budget_ms > self.round_deadline_s * 1000:
            yield Problem(
                ("migration_time_budget_ms",),
                f"has to be at most `round_deadline_s` ({self.round_deadline_s} s) in ms: migration is part of a "
                f"round, but got {self.migration_time_budget_ms}",
            )
        if not self.secret_env:
            yield Problem(("secret_env",), "has to name an environment variable but got ''")
        if not self.bind_address:
            yield Problem(("bind_address",), "has to be an interface address or name (127.0.0.1 for this machine)")

    def breaker_config(self) -> BreakerConfig:
        """The thresholds of the per-peer (and store) breakers, in the serving layer's terms."""
        return self.breaker


# ---------------------------------------------------------------------- the whole file
@section
class PluginConfig(Checked):
    """The whole YAML file. ``model`` is a Hugging Face id or a local path.

    A ``prefix_store:`` section (a mapping, possibly empty) turns prefix reuse
    on; ``sizer:`` adds the adaptive budget and needs ``prefix_store:``;
    ``distributed:`` makes the processes of a launch share their prefix stores
    and needs ``prefix_store:``.
    """

    model: Annotated[Str | None, doc("a Hugging Face model id or a local path")] = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    prefix_store: PrefixStoreConfig | None = None
    sizer: SizerConfig | None = None
    distributed: DistributedConfig | None = None

    def _problems(self) -> Iterator[Problem]:
        if self.prefix_store is not None:
            yield from prefix_reuse_problems(self.cache, self.prefix_store.chunk_size)
        yield from section_dependencies({f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None})


def section_dependencies(present: set[str]) -> list[Problem]:
    """Sections that need another one which is absent (``present``: the names of the sections given)."""
    problems = []
    if "sizer" in present and "prefix_store" not in present:
        problems.append(Problem(("sizer",), "sizes the prefix store's budget; it needs a `prefix_store` section too"))
    if "distributed" in present and "prefix_store" not in present:
        problems.append(
            Problem(("distributed",), "shares the prefix stores of processes; it needs a `prefix_store` section too")
        )
    return problems


def prefix_reuse_problems(cache: CacheConfig, chunk_size: int) -> Iterator[Problem]:
    """Cache settings a prefix store cannot serve; ``group_size`` is checked once it is resolved."""
    if cache.sink_tokens:
        # Sinks sit in full precision at the first cache slots; a stored chunk is
        # quantized blocks only, and with left padding those slots hold padding.
        yield Problem((), f"prefix reuse needs `cache.sink_tokens: 0` but got {cache.sink_tokens}", whole=True)
    if cache.skip_layers:
        yield Problem(
            (),
            "prefix reuse stores quantized blocks of every layer; `cache.skip_layers` has to be empty but got "
            f"{cache.skip_layers}",
            whole=True,
        )
    if cache.group_size is not None and chunk_size % cache.group_size != 0:
        yield Problem(
            (),
            f"`prefix_store.chunk_size` has to be a multiple of `cache.group_size` ({cache.group_size}) but got "
            f"{chunk_size}",
            whole=True,
        )


def check_prefix_reuse_settings(cache: CacheConfig, chunk_size: int) -> None:
    """Raise ``ConfigError`` listing every cache setting a prefix store cannot serve."""
    problems = list(prefix_reuse_problems(cache, chunk_size))
    if problems:
        raise ConfigError(problems)
