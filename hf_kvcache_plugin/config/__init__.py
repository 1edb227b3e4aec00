"""YAML configuration: one validated dataclass per component, one loader, every default here.

Unknown keys, wrong types, non-finite numbers and impossible values raise one
``ConfigError`` (a ``ValueError``) listing every problem, each naming the key
path, the value received and what is allowed. ``config_json_schema()`` (or
``python -m hf_kvcache_plugin.config --schema configs/schema.json``) gives the
JSON schema editors complete the YAML with. Checks that need the model (group
size vs head_dim, layer indices) run in ``CacheConfig.validate_for_model``.
"""

from .loading import load_config, parse_config
from .schema import config_json_schema, write_json_schema
from .sections import (
    ATTENTION_PATHS,
    BITS_OF_QUANT_TYPE,
    BUDGET_POLICIES,
    CPU_KERNEL_MODES,
    DEFAULT_GROUP_SIZE,
    EVICTION_POLICIES,
    GROUP_AXES,
    MIXED_AGED_BITS,
    QUANT_TYPES,
    RATE_LIMIT_ACTIONS,
    SCALE_DTYPES,
    ApiServerConfig,
    BreakerConfig,
    CacheConfig,
    DistributedConfig,
    HealthConfig,
    HealthServerConfig,
    LayerOverride,
    PluginConfig,
    PrefixStoreConfig,
    RateLimitConfig,
    ServingConfig,
    SizerConfig,
    check_prefix_reuse_settings,
)
from .validation import ConfigError

__all__ = [
    "ApiServerConfig",
    "BreakerConfig",
    "CacheConfig",
    "ConfigError",
    "DistributedConfig",
    "HealthConfig",
    "HealthServerConfig",
    "LayerOverride",
    "PluginConfig",
    "PrefixStoreConfig",
    "RateLimitConfig",
    "ServingConfig",
    "SizerConfig",
    "config_json_schema",
    "load_config",
    "parse_config",
]
