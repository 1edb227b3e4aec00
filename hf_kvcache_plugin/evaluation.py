"""Quality measurements of a cache against full precision: perplexity read
through the cache, greedy token agreement, attention-output error.

Every function takes a ``make_cache`` callable (``lambda: QuantizedKVCache(...)``
or ``lambda: DynamicCache(config=...)``) so that the peers are measured the
same way as ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ._compat import GENERATE_CACHE_KWARG

__all__ = [
    "GENERATE_CACHE_KWARG",
    "load_token_windows",
    "perplexity_through_cache",
    "greedy_agreement",
]



def load_token_windows(
    tokenizer, text_path: str | Path, window: int = 511, num_windows: int = 16, bos: bool = True
) -> list[torch.Tensor]:
    """Cut the text's token stream into ``num_windows`` consecutive windows of ``window`` tokens,
    each with ``<s>`` prepended (the ``eval_ppl.py`` protocol of the shared model)."""
    text = Path(text_path).read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < window * num_windows:
        raise ValueError(f"{text_path} has {len(ids)} tokens, fewer than {num_windows} windows of {window}")
    windows = []
    for i in range(num_windows):
        chunk = ids[i * window : (i + 1) * window]
        if bos:
            chunk = [tokenizer.bos_token_id] + chunk
        windows.append(torch.tensor([chunk]))
    return windows


@torch.inference_mode()
def perplexity_through_cache(
    model, windows: Sequence[torch.Tensor], make_cache: Callable[[], object], prompt_len: int = 64
) -> float:
    """Perplexity where every prediction after ``prompt_len`` reads the cache.

    The first ``prompt_len`` tokens are prefilled in one forward; each later
    token is fed alone, so its logits come from attention over whatever the
    cache returns (dequantized history for a quantized cache). Predictions
    inside the prompt are scored from the prefill, identical for every cache.
    """
    nll, count = 0.0, 0
    for ids in windows:
        ids = ids.to(model.device)
        cache = make_cache()
        out = model(input_ids=ids[:, :prompt_len], use_cache=True, **{GENERATE_CACHE_KWARG: cache})
        logits = [out.logits[:, :-1]]
        last = out.logits[:, -1:]
        for t in range(prompt_len, ids.shape[1]):
            logits.append(last)
            if t == ids.shape[1] - 1:
                break
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{GENERATE_CACHE_KWARG: cache})
            last = out.logits[:, -1:]
        all_logits = torch.cat(logits, dim=1).float()
        targets = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(all_logits.flatten(0, 1), targets.flatten(), reduction="sum")
        nll += loss.item()
        count += targets.numel()
    return math.exp(nll / count)


@torch.inference_mode()
def greedy_agreement(
    model,
    prompts: Sequence[torch.Tensor],
    make_cache: Callable[[], object],
    reference_cache: Callable[[], object],
    new_tokens: int = 64,
) -> float:
    """Mean fraction of greedy tokens equal to the reference's, position by position."""
    agree, total = 0, 0
    for ids in prompts:
        ids = ids.to(model.device)
        kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        ref = model.generate(input_ids=ids, **kwargs, **{GENERATE_CACHE_KWARG: reference_cache()})
        out = model.generate(input_ids=ids, **kwargs, **{GENERATE_CACHE_KWARG: make_cache()})
        ref_new, out_new = ref[:, ids.shape[1] :], out[:, ids.shape[1] :]
        agree += (ref_new == out_new).sum().item()
        total += ref_new.numel()
    return agree / total
