"""Architecture matrix: every family's attention layers are quantized, and decode as DynamicCache does.

Tiny random models built from configs (``tests/model_matrix.py``), a 32-token
prompt (longer than the 24-token sliding windows, so blocks leave them) and 10
decode steps, INT8 and INT4, 8-token blocks and an 8-token exact window.

Thresholds, teacher-forced (each step fed the DynamicCache run's greedy token):
the largest logit error, over the reference logits' range, is at most 1% at
INT8 and 5% at INT4. Quantization error per element is about range/255/2
(INT8) and range/15/2 (INT4) of a K/V group; through softmax and the output
projection these tiny models measured at most 0.16% (INT8) and 2.0% (INT4),
both on Gemma 3 (``benchmarks/architecture_matrix.py``), so the bounds leave a
2.5-6x margin, while attending to wrong tokens (a window off by its size,
codes read undequantized) moves logits by tens of percent. Top-1 agreement has to be at
least 90% (INT8) and 75% (INT4) of the steps: random tiny models have nearly
flat logits, so a near-tie may flip one or two of the 10 argmaxes although
the logits agree to the bound above. Free-running greedy agreement is
reported by the benchmark, not asserted: one flipped near-tie changes every
later token.
"""

from __future__ import annotations

import pytest

from tests.model_matrix import ARCHITECTURES, build_model, compare

# architectures whose layers take the fused path (kvquant_sdpa reads the blocks, sliding windows included); the
# others dequantize: softcapping (Gemma 2), encoder-decoder models (their attention modules read the model's config,
# which the cache does not switch; module encoder_decoder)
FUSED = {"llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt_neox", "gpt2"}
SLIDING = {"mistral": {"QuantizedSlidingWindowLayer"}, "phi3": {"QuantizedSlidingWindowLayer"}}
HYBRID = {"qwen2", "qwen3", "gemma2", "gemma3"}
# top-1 agreement, logit error, compression ratio (measured at least 1.28 / 1.35, on the all-sliding models: their
# 23-token window holds an 8-15 token exact residual; the others 1.39-1.50 / 1.56-1.75)
BOUNDS = {"int8": (0.9, 0.01, 1.2), "int4": (0.75, 0.05, 1.3)}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_attention_layer_is_quantized_and_decodes_like_dynamic_cache(name):
    for result in compare(build_model(name), name, tuple(BOUNDS)):
        min_top1, max_error, min_ratio = BOUNDS[result.quant_type]
        quant_type = result.quant_type
        print(f"\n{name} {quant_type}: top-1 {result.top1_agreement:.3f}, logit error {result.logit_error:.4f}, "
              f"greedy {result.greedy_agreement:.2f}, ratio {result.compression_ratio:.2f}, {result.attention_path}")
        assert result.quantized_layers == len(result.layer_kinds), result
        assert result.top1_agreement >= min_top1, result
        assert result.logit_error <= max_error, result
        assert result.compression_ratio >= min_ratio, result
        assert result.attention_path == ("fused" if name in FUSED else "dequantize"), result
        kinds = set(result.layer_kinds)
        if name in SLIDING:
            assert kinds == SLIDING[name]
        elif name in HYBRID:
            assert kinds == {"QuantizedKVLayer", "QuantizedSlidingWindowLayer"}
        else:
            assert kinds == {"QuantizedKVLayer"}
