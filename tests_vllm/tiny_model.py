"""A random Llama vLLM's CPU backend can run (head_dim 64), saved offline with stories260K's tokenizer.

stories260K itself has head_dim 8, which vLLM's CPU attention does not support.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from hf_kvcache_plugin.embedded import STORIES260K

# the embedded stories260K (package data), so a clone without ../shared runs these tests too
TOKENIZER = STORIES260K
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tiny_llama(
    directory: Path, layers: int = 2, heads: int = 2, max_positions: int = 2048, seed: int = 0
) -> Path:
    """Save a random Llama (``heads`` heads of 64, hidden 64 * heads, vocab 512) and the tokenizer to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,  # stories260K's tokenizer
        hidden_size=64 * heads,
        intermediate_size=128 * heads,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=max_positions,
        # measured over 6 prompts x 16 greedy tokens: 0.05 keeps INT8 load-back exact everywhere; wider
        # weights (0.15, 0.4) make attention logits large, and INT8 error then flips later tokens
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    directory = Path(directory)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, directory / name)
    return directory
