"""Build the cache from a YAML file (configs/*.yaml) and sample from the model."""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _model import DEFAULT_MODEL
from hf_kvcache_plugin import QuantizedKVCache, enable_quantized_attention, load_config

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "mixed.yaml"))
parser.add_argument("--prompt", default="Lily wanted to bake a cake for her mom.")
args = parser.parse_args()

config = load_config(args.config)  # unknown keys or bad values raise a ValueError naming them
model_name = config.model or str(DEFAULT_MODEL)
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoModelForCausalLM.from_pretrained(model_name)

if config.cache.attention == "fused":
    enable_quantized_attention(model)
torch.manual_seed(0)
cache = QuantizedKVCache.from_config(config, model.config)
inputs = tokenizer(args.prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=300, do_sample=True, top_k=40, past_key_values=cache)
print(tokenizer.decode(output[0], skip_special_tokens=True))
print(cache.get_stats())
