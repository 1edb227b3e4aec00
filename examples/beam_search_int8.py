"""Beam search with an INT8 cache returns the same beams as DynamicCache."""

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from _model import model_argument
from hf_kvcache_plugin import QuantizedKVCache

args = model_argument(__doc__)
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
inputs = tokenizer(args.prompt, return_tensors="pt")

kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=args.max_new_tokens, do_sample=False)
# generate expands the batch to num_beams itself; an empty cache follows it on the first update
quantized = model.generate(**inputs, **kwargs, past_key_values=QuantizedKVCache(model.config, "int8"))
reference = model.generate(**inputs, **kwargs, past_key_values=DynamicCache(config=model.config))
for text in tokenizer.batch_decode(quantized, skip_special_tokens=True):
    print(text, "\n---")
print("identical to DynamicCache:", bool((quantized == reference).all()))
