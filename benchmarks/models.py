"""The two models the benchmarks use: a randomly initialised Llama of realistic head shape, and stories260K."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_kvcache_plugin.embedded import STORIES260K as STORIES

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES_VAL = SHARED / "data" / "tinystories_val.txt"  # text stays on our machines; the model ships with us


def realistic_config(
    num_layers: int = 4, hidden_size: int = 1024, intermediate_size: int = 2816, vocab_size: int = 32000
) -> LlamaConfig:
    """Llama-3-8B's KV shape per layer (8 KV heads of head_dim 128), in a shallow, narrow body that a CPU can run.

    KV bytes per token per layer are those of the large model; the weights are
    far smaller, so the cache's share of decode time is *larger* than in the
    large model (a conservative setting for a cache that costs time).
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 128,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=65536,
        bos_token_id=1,
        eos_token_id=2,
    )


def realistic_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """Random weights in bf16: timing does not depend on their values."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def stories_model(path: Path = STORIES):
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the model is missing: {path}/config.json")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def story_text(chars: int) -> str:
    """The first ``chars`` characters of the TinyStories validation text, or stories260K's own stories where
    this clone has no ``../shared`` (the text stays on our machines).

    Random token ids are no substitute: with no likely next token, greedy decoding meets near-ties that the
    rounding of a different batch shape flips, so equality tests fail for reasons unrelated to the cache.
    Text the model wrote itself is text it predicts with confidence, like real stories.
    """
    if TINYSTORIES_VAL.is_file():
        return TINYSTORIES_VAL.read_text()[:chars]
    return _written_stories(chars)


@torch.inference_mode()
def _written_stories(chars: int, batch: int = 16) -> str:
    model, tok = stories_model()
    bos = torch.full((batch, 1), model.config.bos_token_id)
    stories: list[str] = []
    seed = 0
    while sum(len(s) for s in stories) < chars:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = model.generate(bos, do_sample=True, top_k=8, max_new_tokens=model.config.max_position_embeddings - 2,
                                 pad_token_id=model.config.eos_token_id)
        stories += [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]
        seed += 1
    return "\n".join(stories)[:chars]


# transformers 5.24 renamed the forward/generate argument `past_key_values` to `cache`
FORWARD_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
