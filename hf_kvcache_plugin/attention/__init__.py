"""Attention over a quantized cache: the ``kvquant_sdpa`` dispatch, its PyTorch reference and Triton kernels.

``history`` (what attention reads from a layer, and the hand-over from the
cache) -> ``masks`` -> ``reference`` (PyTorch) and ``triton_attention`` /
``triton_kernels`` (CUDA) -> ``dispatch`` (the registered attention function).
"""

from .dispatch import (
    QUANTIZED_ATTENTION,
    enable_quantized_attention,
    quantized_attention_forward,
    register_quantized_attention,
    select_fused_attention,
)
from .history import FUSED_STEP_KEY, FusedStep, QuantizedHistory, hand_over
from .reference import attention_from_layer

__all__ = [
    "FUSED_STEP_KEY",
    "QUANTIZED_ATTENTION",
    "FusedStep",
    "QuantizedHistory",
    "attention_from_layer",
    "enable_quantized_attention",
    "hand_over",
    "quantized_attention_forward",
    "register_quantized_attention",
    "select_fused_attention",
]
