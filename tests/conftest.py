"""Shared fixtures: the real tiny Llama shipped with the package (stories260K), random models of other shapes."""

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

from hf_kvcache_plugin.embedded import embedded_model_path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_MODEL = embedded_model_path()  # package data: every install has it
# TinyStories validation text: only on our machines; the tests that read it skip elsewhere
TEXT = SHARED / "data" / "tinystories_val.txt"
HAVE_TEXT = TEXT.is_file()
TEXT_REASON = f"needs the TinyStories text {TEXT} (absent in this clone)"

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
    """stories260K and its tokenizer, from the package."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(REAL_MODEL).eval(), AutoTokenizer.from_pretrained(REAL_MODEL)


@pytest.fixture(scope="session")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="session")
def real_model_and_tokenizer(model_and_tokenizer):
    """The same trained model, named for tests whose thresholds assume trained weights."""
    return model_and_tokenizer


@pytest.fixture(scope="session")
def realistic_model():
    """Randomly initialised Llama of realistic head shape (head_dim 64), kept shallow for CPU."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(head_dim=64, layers=2, kv_heads=2, heads=4, vocab=256)).eval()


@pytest.fixture(scope="session")
def prompts(model_and_tokenizer):
    """Ordinary story openings as token ids."""
    _, tok = model_and_tokenizer
    texts = [
        "Once upon a time",
        "Tom and his sister went to the park. They saw",
        "The little cat was sad because",
        "One day, a big dog found a ball in the garden. He",
        "Lily wanted to bake a cake for her mom.",
        "There was a small bird who could not fly.",
    ]
    return [tok(t, return_tensors="pt")["input_ids"] for t in texts]
