"""Shared fixtures: the real tiny Llama from ../shared when present, else a random one."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels' tests run in Triton's interpreter on CPU-only machines. triton.jit reads this
    # variable when a function is decorated, and importing transformers imports triton (when installed),
    # so it has to be set before that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_MODEL = SHARED / "models" / "stories260K"
TEXT = SHARED / "data" / "tinystories_val.txt"
HAVE_REAL = (REAL_MODEL / "config.json").is_file() and TEXT.is_file()
REAL_REASON = f"needs the real model and text under {SHARED} (absent in this clone)"

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)


def tiny_llama_config(head_dim: int = 8, layers: int = 2, kv_heads: int = 2, heads: int = 4, vocab: int = 128):
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """stories260K when ../shared is there; otherwise a random tiny Llama and no tokenizer."""
    torch.manual_seed(0)
    if HAVE_REAL:
        model = AutoModelForCausalLM.from_pretrained(REAL_MODEL).eval()
        return model, AutoTokenizer.from_pretrained(REAL_MODEL)
    print(f"\n[tests] {REAL_REASON}: using a randomly initialised tiny Llama; real-model quality tests skip")
    return LlamaForCausalLM(tiny_llama_config()).eval(), None


@pytest.fixture(scope="session")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="session")
def real_model_and_tokenizer(model_and_tokenizer):
    if model_and_tokenizer[1] is None:
        pytest.skip(REAL_REASON)
    return model_and_tokenizer


@pytest.fixture(scope="session")
def realistic_model():
    """Randomly initialised Llama of realistic head shape (head_dim 64), kept shallow for CPU."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(head_dim=64, layers=2, kv_heads=2, heads=4, vocab=256)).eval()


@pytest.fixture(scope="session")
def prompts(model_and_tokenizer):
    """Ordinary story openings as token ids (random ids for the random model)."""
    model, tok = model_and_tokenizer
    texts = [
        "Once upon a time",
        "Tom and his sister went to the park. They saw",
        "The little cat was sad because",
        "One day, a big dog found a ball in the garden. He",
        "Lily wanted to bake a cake for her mom.",
        "There was a small bird who could not fly.",
    ]
    if tok is None:
        g = torch.Generator().manual_seed(1)
        return [torch.randint(3, model.config.vocab_size, (1, 8 + 3 * i), generator=g) for i in range(len(texts))]
    return [tok(t, return_tensors="pt")["input_ids"] for t in texts]
