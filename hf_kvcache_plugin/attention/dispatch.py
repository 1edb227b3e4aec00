"""``kvquant_sdpa``: the attention implementation that reads a quantized layer directly.

Registered with ``transformers.AttentionInterface`` (``register_quantized_attention``).
For a decode step of a ``QuantizedKVCache`` whose model runs it, the cache
hands the layer over (``history.FusedStep``) instead of dequantizing its
history; this function then runs the fused path: the Triton kernels for CUDA
tensors when triton is installed (``triton_attention``), the C++ kernel for
CPU tensors (``cpu_kernel``, built once per machine), else the PyTorch
reference (``reference``). Everything else -- prefill, any other cache -- is
plain SDPA, and so is anything the fused path does not support (attention
weights output, softcapping, a sliding window over a full-attention layer's
history, dropout, position bias), with one log line saying so. A sliding-window
layer's history (``QuantizedSlidingWindowLayer``) is read fused: the tokens it
holds before its window are masked out.

``select_fused_attention(config)`` is how a cache makes this path the default:
a decoder on plain SDPA is switched to ``kvquant_sdpa``; eager, flash and
custom attention are the user's explicit choice and are left alone.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cpu_kernel import cpu_kernel_available, cpu_kernel_unsupported
from .history import QuantizedHistory, take_over
from .masks import keep_mask
from .reference import attention_from_layer
from .static_attention import static_attention
from .triton_attention import triton_attention_from_layer, triton_available, triton_unsupported

__all__ = [
    "QUANTIZED_ATTENTION",
    "enable_quantized_attention",
    "position_bias_follows_keys",
    "prepare_fused_attention",
    "quantized_attention_forward",
    "register_quantized_attention",
    "select_fused_attention",
]

QUANTIZED_ATTENTION = "kvquant_sdpa"

logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    """One log line per distinct reason for the process's lifetime: decode steps repeat every token."""
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def register_quantized_attention() -> None:
    """Register ``"kvquant_sdpa"`` (attention and its SDPA-style mask) with transformers."""
    AttentionInterface.register(QUANTIZED_ATTENTION, quantized_attention_forward)
    AttentionMaskInterface.register(QUANTIZED_ATTENTION, sdpa_mask)


def enable_quantized_attention(model) -> None:
    """Select ``"kvquant_sdpa"`` for ``model``. With any other cache it behaves like SDPA."""
    register_quantized_attention()
    model.set_attn_implementation(QUANTIZED_ATTENTION)


def select_fused_attention(decoder_config) -> bool:
    """Switch a decoder config on plain SDPA to ``kvquant_sdpa``; True when it runs ``kvquant_sdpa`` now.

    ``kvquant_sdpa`` is SDPA for every other cache and for prefill, so the
    switch changes nothing else the model does. Only the decoder's config is
    touched: a vision tower or encoder of a composite model keeps its attention.
    """
    current = getattr(decoder_config, "_attn_implementation", None)
    if current == "sdpa":
        register_quantized_attention()
        decoder_config._attn_implementation = QUANTIZED_ATTENTION
        logger.info("QuantizedKVCache: the model now runs %r (SDPA that reads the quantized blocks); "
                    "pass attention='dequantize' to keep plain SDPA", QUANTIZED_ATTENTION)
        return True
    if current != QUANTIZED_ATTENTION:
        _log_once(logging.INFO, f"QuantizedKVCache: the model runs {current!r} attention, not SDPA, so decode steps "
                                "dequantize the history instead of reading the packed blocks (fused attention is "
                                f"{QUANTIZED_ATTENTION!r}: load the model with attn_implementation='sdpa' to use it)")
        return False
    return True


def position_bias_follows_keys(config) -> bool:
    """True for models whose attention derives a relative position bias from the length of the keys the cache
    returns (T5 and its family: ``relative_attention_num_buckets``). A fused step returns only the new tokens' keys,
    so such a model would build its bias for those alone and add it to every position of the history: their
    decode steps have to get the whole history from the cache (the dequantized path)."""
    return getattr(config, "relative_attention_num_buckets", None) is not None


def prepare_fused_attention() -> None:
    """Build or load the CPU kernel now (once per process), outside any decode step or compiled region."""
    cpu_kernel_available()


def quantized_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    step = take_over(kwargs, key)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    history = step.history
    if getattr(history, "is_static", False):
        return _static_step(module, query, history, attention_mask, dropout, scaling, is_causal, step, kwargs)
    # a sliding layer holds up to a block's worth of tokens before its window, which the model's mask leaves out
    window = history.attention_window(query.shape[2]) if getattr(history, "is_sliding", False) else None
    unsupported = _unsupported(module, dropout, kwargs, window)
    if unsupported:
        _log_once(logging.WARNING, f"{QUANTIZED_ATTENTION}: {unsupported}; dequantizing the history for the "
                                   "standard path")
        key, value = history.dequantized() if window is None else history.window_dequantized(query.shape[2])
        step.finish()
        bias = kwargs.get("position_bias")
        if bias is not None and bias.shape[-1] != key.shape[-2]:
            # made by the model from the keys `update` returned (this step's alone): added to the whole history, it
            # would shift every score by one position's bias; wrong logits, silently
            raise RuntimeError(
                f"{QUANTIZED_ATTENTION}: the model built its position bias for {bias.shape[-1]} key(s) but the "
                f"history holds {key.shape[-2]}; build the cache with attention='dequantize' for this model"
            )
        if kwargs.get("output_attentions") or kwargs.get("softcap") is not None:
            return _eager_attention(query, key, value, attention_mask, dropout, scaling, kwargs.get("softcap"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if window is not None and window[0]:
        attention_mask = _mask_before_window(attention_mask, *window, query)
    if _use_triton(query, history):
        out = triton_attention_from_layer(query, history, attention_mask, scaling)
    else:
        use_kernel = step.cpu_kernel and _use_cpu_kernel(query)
        out = attention_from_layer(query, history, attention_mask, scaling, cpu_kernel=use_kernel)
    step.finish()
    return out.transpose(1, 2).contiguous(), None


def _static_step(module, query, layer, attention_mask, dropout, scaling, is_causal, step, kwargs):
    """A decode step of a ``StaticQuantizedKVLayer``: ``static_attention``, or SDPA over its dense read."""
    unsupported = _unsupported(module, dropout, kwargs)
    if unsupported:
        _log_once(logging.WARNING, f"{QUANTIZED_ATTENTION}: {unsupported}; dequantizing the static history")
        key, value = layer.dequantized()
        step.finish()
        if kwargs.get("output_attentions") or kwargs.get("softcap") is not None:
            return _eager_attention(query, key, value, attention_mask, dropout, scaling, kwargs.get("softcap"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = static_attention(query, layer, attention_mask, scaling, cpu_kernel=step.cpu_kernel and _use_cpu_kernel(query))
    step.finish()
    return out.transpose(1, 2).contiguous(), None


def _use_triton(query: torch.Tensor, history: QuantizedHistory) -> bool:
    """The Triton kernels serve CUDA tensors when triton is installed; the PyTorch path stays their reference."""
    if not query.is_cuda or not triton_available():
        return False
    reason = triton_unsupported(query, history)
    if reason:
        _log_once(logging.INFO, f"{QUANTIZED_ATTENTION}: Triton kernels do not support this case ({reason}); "
                                "using the PyTorch fused path")
        return False
    return True


def _use_cpu_kernel(query: torch.Tensor) -> bool:
    if query.device.type != "cpu" or (query.requires_grad and torch.is_grad_enabled()):
        return False  # the kernel has no backward: a pass that needs gradients runs the PyTorch path
    reason = cpu_kernel_unsupported(query)
    if reason:
        _log_once(logging.INFO, f"{QUANTIZED_ATTENTION}: the CPU kernel does not apply ({reason}); "
                                "using the PyTorch fused path")
        return False
    return True


def _eager_attention(query, key, value, attention_mask, dropout, scaling, softcap):
    """Plain attention with weights (and optional tanh softcapping) on dense K/V."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = keep_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _mask_before_window(attention_mask, hidden: int, visible: int, query: torch.Tensor) -> torch.Tensor:
    """The model's mask over a sliding layer's window (``visible`` keys), preceded by ``hidden`` masked keys: the
    held tokens that left the window. Boolean [B, 1, q, hidden + visible]."""
    b, _, q, _ = query.shape
    keep = keep_mask(attention_mask, b, q, visible, query.device)
    if keep is None:
        keep = torch.ones(b, 1, q, visible, dtype=torch.bool, device=query.device)
    keep = keep.expand(b, 1, q, visible)
    return torch.cat([torch.zeros(b, 1, q, hidden, dtype=torch.bool, device=query.device), keep], dim=-1)


def _unsupported(module, dropout: float, kwargs: dict, window: tuple[int, int] | None = None) -> str | None:
    """Why the fused path cannot serve this step (None: it can). ``window``: a sliding layer's (held tokens before
    its window, tokens in it), whose sliding mask the fused path serves; None for a full-attention layer."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True needs the attention weights"
    if kwargs.get("softcap") is not None:
        return "softcapping"
    if window is None and (kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None)):
        return "sliding-window attention over a full-attention layer's history"
    if window is not None and window[0] < 0:
        return "a sliding-window layer that no longer holds its whole window (a budget shrink dropped part of it)"
    if dropout:
        return "attention dropout"
    if kwargs.get("position_bias") is not None:
        return "position bias"
    return None
