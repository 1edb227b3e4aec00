"""Tiny random models of each architecture family, and how a quantized cache compares on them with DynamicCache.

Shared by ``tests/test_model_matrix.py`` (thresholds) and
``benchmarks/architecture_matrix.py`` (the table and JSON). Nothing is
downloaded: every model is built from a config here, seeded.

The comparison is teacher-forced: one greedy sequence is generated with
``DynamicCache``, then fed token by token through a forward with each cache,
and the next-token logits of every decode step are compared (top-1 agreement,
largest logit error over the logits' range). Free-running greedy agreement
on random tiny models is a poor measure: their logits are nearly flat, so one
near-tie flips a token and every later token differs; teacher forcing scores
each step on the same history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DynamicCache,
    EncoderDecoderCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from hf_kvcache_plugin import QuantizedKVCache, quantized_encoder_decoder_cache
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG
from hf_kvcache_plugin.attention import dispatch

VOCAB = 96
WINDOW = 24  # sliding window of the sliding layers: the prompt outgrows it, so blocks leave the window
PROMPT = 32
NEW_TOKENS = 10
# small blocks and residual window so that a short sequence is mostly quantized
CACHE_OPTIONS = {"group_size": 8, "residual_length": 8}

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256)  # fmt: skip
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)  # fmt: skip


def _builders() -> dict[str, Callable[[], torch.nn.Module]]:
    two_kinds = ["sliding_attention", "full_attention"]
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)),
        # every layer sliding (Mistral's default layout)
        "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=WINDOW)),
        # Qwen2 with use_sliding_window: layers from max_window_layers on slide
        "qwen2": lambda: Qwen2ForCausalLM(
            Qwen2Config(**_DECODER, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        ),
        "qwen3": lambda: Qwen3ForCausalLM(
            Qwen3Config(**_DECODER, use_sliding_window=True, sliding_window=WINDOW, layer_types=two_kinds)
        ),
        "gemma2": lambda: Gemma2ForCausalLM(
            Gemma2Config(**{**_DECODER, "head_dim": 16}, sliding_window=WINDOW, layer_types=two_kinds)
        ),
        "gemma3": lambda: Gemma3ForCausalLM(
            Gemma3TextConfig(**{**_DECODER, "head_dim": 16}, sliding_window=WINDOW, layer_types=two_kinds)
        ),
        "phi3": lambda: Phi3ForCausalLM(Phi3Config(**_DECODER, sliding_window=WINDOW, pad_token_id=0)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(
            GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=256)  # fmt: skip
        ),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)),
        "t5": lambda: T5ForConditionalGeneration(
            T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
        ),
        "bart": lambda: BartForConditionalGeneration(BartConfig(**_SEQ2SEQ, max_position_embeddings=256)),
        "whisper": lambda: WhisperForConditionalGeneration(
            WhisperConfig(**_SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=256,
                          decoder_start_token_id=1, pad_token_id=0, eos_token_id=2)  # fmt: skip
        ),
    }


ARCHITECTURES = tuple(_builders())


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _builders()[name]().eval()


def encoder_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The encoder's inputs of an encoder-decoder model (None: decoder-only)."""
    if not model.config.is_encoder_decoder:
        return None
    generator = torch.Generator().manual_seed(1)
    if model.config.model_type == "whisper":
        # 32 frames of 8 mel bins: the two stride-1/stride-2 convolutions give 16 encoder positions
        return {"input_features": torch.randn(1, model.config.num_mel_bins, 32, generator=generator)}
    return {"input_ids": torch.randint(3, VOCAB, (1, 20), generator=generator)}


def make_cache(model: torch.nn.Module, quant_type: str, quantize_cross_attention: bool = False, **options: Any):
    options = {**CACHE_OPTIONS, **options}
    if model.config.is_encoder_decoder:
        return quantized_encoder_decoder_cache(
            model.config, quant_type, quantize_cross_attention=quantize_cross_attention, **options
        )
    return QuantizedKVCache(model.config, quant_type, **options)


def dynamic_cache(model: torch.nn.Module):
    if model.config.is_encoder_decoder:
        return EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    return DynamicCache(config=model.config)


def self_attention(cache) -> Any:
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


@torch.inference_mode()
def teacher_forced_logits(model, sequence: torch.Tensor, cache, prompt_len: int = PROMPT) -> torch.Tensor:
    """Next-token logits [steps, vocab] of every decode step after a prefill of ``prompt_len`` tokens of
    ``sequence`` (decoder tokens for an encoder-decoder model), each step fed the sequence's next token."""
    inputs = encoder_inputs(model)
    extra: dict[str, Any] = {}
    if inputs is not None:
        extra["encoder_outputs"] = model.get_encoder()(**inputs)
    name = "decoder_input_ids" if inputs is not None else "input_ids"
    out = model(**{name: sequence[:, :prompt_len]}, **extra, use_cache=True, **{GENERATE_CACHE_KWARG: cache})
    logits = [out.logits[0, -1]]
    for t in range(prompt_len, sequence.shape[1] - 1):
        out = model(**{name: sequence[:, t : t + 1]}, **extra, use_cache=True, **{GENERATE_CACHE_KWARG: cache})
        logits.append(out.logits[0, -1])
    return torch.stack(logits).float()


@torch.inference_mode()
def greedy_sequence(model, cache, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """A prompt of ``PROMPT`` random tokens (decoder tokens for an encoder-decoder model) and its greedy
    continuation of ``new_tokens`` tokens through ``cache``."""
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=generator)
    inputs = encoder_inputs(model)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **{GENERATE_CACHE_KWARG: cache})
    if inputs is None:
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    out = model.generate(**inputs, decoder_input_ids=prompt, **kwargs)
    # Whisper's generate returns the new tokens alone
    return out if out.shape[1] > new_tokens else torch.cat([prompt, out], dim=1)


@dataclass
class Comparison:
    architecture: str
    quant_type: str
    layer_kinds: list[str]
    top1_agreement: float  # teacher-forced, over the decode steps
    logit_error: float  # max |logits - reference| / (max - min of the reference logits)
    greedy_agreement: float  # free-running generate, position by position
    compression_ratio: float  # self-attention cache, against what DynamicCache holds
    quantized_layers: int  # self-attention layers holding quantized blocks at the end
    attention_path: str  # "fused" (kvquant_sdpa read the blocks) or "dequantize"


def compare(model, name: str, quant_types: tuple[str, ...] = ("int8", "int4")) -> list[Comparison]:
    """One ``Comparison`` per quant type, against one DynamicCache run."""
    reference = greedy_sequence(model, dynamic_cache(model))
    ref_logits = teacher_forced_logits(model, reference, dynamic_cache(model))
    span = (ref_logits.amax(-1) - ref_logits.amin(-1)).clamp_min(1e-6)
    results = []
    for quant_type in quant_types:
        generated = greedy_sequence(model, make_cache(model, quant_type))
        # generate returns prompt + new tokens (the decoder prompt for an encoder-decoder model)
        agree = (reference[0, -NEW_TOKENS:] == generated[0, -NEW_TOKENS:]).float().mean().item()
        cache = make_cache(model, quant_type)
        fused_calls = _count_fused_calls()
        try:
            logits = teacher_forced_logits(model, reference, cache)
        finally:
            fused = fused_calls.stop()
        layers = self_attention(cache).layers
        results.append(Comparison(
            architecture=name,
            quant_type=quant_type,
            layer_kinds=[type(layer).__name__ for layer in layers],
            top1_agreement=(logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            logit_error=((logits - ref_logits).abs().amax(-1) / span).max().item(),
            greedy_agreement=agree,
            compression_ratio=self_attention(cache).get_stats()["compression_ratio"],
            quantized_layers=sum(1 for layer in layers if layer.stats()["quantized_bytes"] > 0),
            attention_path="fused" if fused else "dequantize",
        ))
    return results


class _count_fused_calls:
    """Counts the fused attention's reads of a quantized layer (the PyTorch / CPU-kernel path)."""

    def __init__(self):
        self.calls = 0
        self._original = dispatch.attention_from_layer

        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dispatch.attention_from_layer = counting

    def stop(self) -> int:
        dispatch.attention_from_layer = self._original
        return self.calls
