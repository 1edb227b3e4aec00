"""Names that differ across the supported ``transformers`` versions, decided once here."""

from __future__ import annotations

import inspect

from transformers import LlamaForCausalLM

__all__ = ["GENERATE_CACHE_KWARG"]

# transformers 5.24 renamed `past_key_values` to `cache` in the models' forward and in `generate`
# (the old name still works, with a FutureWarning, until 6.0). Internal callers pass whichever
# name this version takes.
GENERATE_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
