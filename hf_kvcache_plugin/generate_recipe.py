"""``generate`` with a ``QuantizedKVCache``, as a transformers ``custom_generate`` recipe.

transformers cannot select this cache by name (``cache_implementation`` takes
a fixed set of names), but every way of calling ``generate`` can run a recipe:
a folder holding ``custom_generate/generate.py`` whose ``generate(model, ...)``
replaces the standard one. This package ships one (``RECIPE_DIR``):

    model.generate(ids, custom_generate=str(RECIPE_DIR), trust_remote_code=True)
    pipeline("text-generation", model=..., custom_generate=str(RECIPE_DIR), trust_remote_code=True)

and ``write_custom_generate(model_dir)`` copies it into a model folder, so that
``from_pretrained(model_dir, trust_remote_code=True)`` makes it the model's
``generate`` (``python -m hf_kvcache_plugin.generate_recipe MODEL_DIR``).

The cache's settings come, first found first, from the ``kvcache`` keyword of
``generate``, then from ``generation_config.kvcache`` (a ``GenerationConfig``
passed to ``generate``, else the model's own, which ``generation_config.json``
in the model folder fills): a YAML file's path, a mapping of that file's
contents (``{"cache": {...}}``) or of its ``cache`` section alone, or a
``CacheConfig`` / ``PluginConfig``. With none of them the defaults apply. A
cache passed to ``generate`` is used as it is.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import GenerationMixin

from ._compat import GENERATE_CACHE_KWARG
from .cache import QuantizedKVCache
from .config import CacheConfig, PluginConfig, load_config, parse_config
from .encoder_decoder import quantized_encoder_decoder_cache

__all__ = ["RECIPE_DIR", "generate", "recipe_cache_config", "write_custom_generate"]

# the folder to pass as `custom_generate=`: it holds custom_generate/generate.py (and requirements.txt)
RECIPE_DIR = Path(__file__).resolve().parent / "recipe"
_CACHE_KWARGS = ("cache", "past_key_values")


def recipe_cache_config(kvcache: Any) -> CacheConfig:
    """The ``CacheConfig`` that ``kvcache`` names (see the module docstring for the forms it takes)."""
    if kvcache is None:
        return CacheConfig()
    if isinstance(kvcache, CacheConfig):
        return kvcache
    if isinstance(kvcache, PluginConfig):
        return kvcache.cache
    if isinstance(kvcache, (str, Path)):
        return load_config(kvcache).cache
    if isinstance(kvcache, Mapping):
        data = dict(kvcache)
        return parse_config(data if "cache" in data else {"cache": data}).cache
    raise ValueError(
        "`kvcache` has to be a YAML file's path, a mapping of its contents (or of its `cache` section), a "
        f"CacheConfig or a PluginConfig, but got {type(kvcache).__name__}"
    )


def generate(*args: Any, model, kvcache: Any = None, **kwargs: Any):
    """``model.generate(*args, **kwargs)`` with a ``QuantizedKVCache`` built for ``model`` (the recipe's entry).

    ``model`` is keyword-only: transformers passes it so (``generate(model=self, ...)``), and ``from_pretrained``
    binds it with ``functools.partial(generate, model=model)``, to which the inputs come positionally."""
    if kvcache is None:
        generation_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        kvcache = getattr(generation_config, "kvcache", None)
        if kvcache is None and kwargs.get("generation_config") is not None:
            kvcache = getattr(getattr(model, "generation_config", None), "kvcache", None)
    if not any(kwargs.get(name) is not None for name in _CACHE_KWARGS):
        cache_config = recipe_cache_config(kvcache)
        if model.config.is_encoder_decoder:
            cache = quantized_encoder_decoder_cache(model.config, cache_config=cache_config)
        else:
            cache = QuantizedKVCache(model.config, cache_config=cache_config)
        kwargs[GENERATE_CACHE_KWARG] = cache
    # the standard generate: `from_pretrained` replaced the model's own `generate` with this recipe
    return GenerationMixin.generate(model, *args, **kwargs)


def write_custom_generate(model_dir: str | Path) -> Path:
    """Copy the recipe into ``model_dir/custom_generate/`` (an existing one is replaced); returns that folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"`model_dir` {str(model_dir)!r} is not a folder (a model saved with save_pretrained)")
    target = model_dir / "custom_generate"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(RECIPE_DIR / "custom_generate", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hf_kvcache_plugin.generate_recipe MODEL_DIR")
    print(write_custom_generate(sys.argv[1]))
