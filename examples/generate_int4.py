"""Generate with an INT4 KV cache and compare its bytes with what DynamicCache would hold."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from _model import model_argument
from hf_kvcache_plugin import QuantizedKVCache, enable_quantized_attention

args = model_argument(__doc__)
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
# attention reads the packed blocks directly instead of dequantizing the history each step
enable_quantized_attention(model)

# KIVI layout: keys grouped per channel, values per token; the newest 128 tokens stay exact.
cache = QuantizedKVCache(model.config, quant_type="int4", residual_length=128)
inputs = tokenizer(args.prompt, return_tensors="pt")
# `past_key_values=` works across transformers 5.x; 5.24+ also accepts `cache=`.
output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, past_key_values=cache)

print(tokenizer.decode(output[0], skip_special_tokens=True))
stats = cache.get_stats()
print(f"{stats['seq_length']} tokens: {stats['total_bytes']} bytes quantized vs {stats['fp_bytes']} bytes "
      f"in a DynamicCache ({stats['compression_ratio']:.2f}x smaller)")
