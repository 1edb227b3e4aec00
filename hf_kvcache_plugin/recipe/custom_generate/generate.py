"""transformers ``custom_generate`` recipe: generate with hf_kvcache_plugin's ``QuantizedKVCache``.

``model.generate(..., custom_generate=<folder holding this custom_generate/>, trust_remote_code=True)``,
``pipeline(..., custom_generate=..., trust_remote_code=True)``, or a model folder carrying it loaded with
``from_pretrained(..., trust_remote_code=True)``. The cache's settings: the ``kvcache`` keyword of ``generate``
or ``generation_config.kvcache`` (a YAML path, its contents, or its ``cache`` section); see
``hf_kvcache_plugin.generate_recipe``.
"""

from hf_kvcache_plugin.generate_recipe import generate

__all__ = ["generate"]
