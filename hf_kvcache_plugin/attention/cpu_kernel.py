"""The CPU decode kernel (``cpu_kernel.cpp``): built once per machine, PyTorch reference as fallback.

``attention_from_layer`` reads quantized tiers through ``key_scores`` and
``value_output``. The C++ kernel reads each packed byte once per (batch, head)
and accumulates in float32 registers, where the reference runs a dozen small
ops per chunk of 256 tokens; both compute the same sums (tested against each
other). The kernel is compiled with ``torch.utils.cpp_extension`` the first
time a process needs it (about a minute, once: the build is cached under
``TORCH_EXTENSIONS_DIR``, keyed by the source, the torch version and this
CPU's instruction set, since it is built for the CPU it runs on). Without a
working C++ compiler, or with ``HF_KVCACHE_CPU_KERNEL=0``, the reference runs
instead and one log line says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from ..quantization import QuantizedTensor

__all__ = [
    "cpu_kernel_available",
    "cpu_kernel_unsupported",
    "kernel_key_scores_parts",
    "kernel_value_output_parts",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -fopenmp: at::parallel_for splits (batch, head) over torch's own OpenMP threads (same libgomp, loaded by torch)
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_DISABLE_ENV = "HF_KVCACHE_CPU_KERNEL"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once the build was tried; "reason": why it is unavailable


def _cpu_signature() -> str:
    """What a -march=native build depends on: the CPU model and its flags (from /proc/cpuinfo on Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build_name() -> str:
    digest = hashlib.sha256()
    # the source's path too: the build folder's ninja file names it, so copies of the package at other paths
    # (clones, worktrees, installed wheels) would otherwise rebuild each other's build in turn
    parts = (_SOURCE.read_bytes(), str(_SOURCE.resolve()).encode(), torch.__version__.encode(),
             " ".join(_FLAGS).encode(), _cpu_signature().encode())
    for part in parts:
        digest.update(part)
    return f"hf_kvcache_cpu_{digest.hexdigest()[:16]}"


def _build() -> tuple[bool, str]:
    if os.environ.get(_DISABLE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return False, f"{_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
    try:
        from torch.utils.cpp_extension import load

        logger.info("hf_kvcache: building the CPU decode kernel (once per machine; cached)")
        load(name=_build_name(), sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        _register_fakes()
    except Exception as exc:  # no compiler, no headers, a failed build: the reference path still works
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"the C++ build failed ({first_line})"
    return True, ""


def _register_fakes() -> None:
    """Shape-only versions of the ops, so that ``torch.compile`` traces them as ops instead of breaking the graph.

    Both ops write into a tensor they are given and return nothing: their fake does nothing.
    """
    for op in ("hf_kvcache::key_scores_parts", "hf_kvcache::value_output_parts"):
        torch.library.register_fake(op)(lambda *args: None)


def cpu_kernel_available() -> bool:
    """Build (or load the cached build of) the kernel once per process; False when it cannot be built.

    ``QuantizedKVCache`` calls this when it selects fused attention, so the build happens eagerly, before any
    ``torch.compile`` trace reaches the attention function (where the lock below would break the graph).
    """
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                ok, reason = _build()
                _state["reason"] = reason
                _state["ok"] = ok
                if not ok:
                    logger.warning("hf_kvcache: the CPU decode kernel is unavailable (%s); fused attention on CPU runs "
                                   "the PyTorch reference path, which is slower", reason)
    return bool(_state["ok"])


def cpu_kernel_unsupported(query: torch.Tensor) -> str | None:
    """Why the kernel cannot serve this query (None: it can)."""
    if query.device.type != "cpu":
        return f"the query is on {query.device.type}"
    if not cpu_kernel_available():
        return str(_state["reason"])
    return None


def _ops():
    """``torch.ops.hf_kvcache``, built or loaded first if this process has not yet."""
    if not cpu_kernel_available():
        raise RuntimeError(f"the CPU decode kernel is unavailable: {_state['reason']}")
    return torch.ops.hf_kvcache


def kernel_key_scores_parts(qf: torch.Tensor, parts: list[QuantizedTensor], scores: torch.Tensor, offset: int) -> None:
    """scores[..., offset : offset + n*G] = qf @ keys^T over consecutive parts of one tier of keys grouped per
    channel (same bits and codec), in one call: the layout changes are done in C++, so a long history held in
    many parts costs no Python per part."""
    zeros = [] if parts[0].zero is None else [p.zero for p in parts]
    _ops().key_scores_parts(qf, [p.data for p in parts], [p.scale for p in parts], zeros, parts[0].bits, scores,
                            offset)


def kernel_value_output_parts(probs: torch.Tensor, offset: int, parts: list[QuantizedTensor], out: torch.Tensor) -> None:
    """out += probs[..., offset : offset + n*G] @ values over consecutive parts of one tier of values grouped per
    token, summed with one set of accumulators (so how the tier is cut never changes the bits)."""
    zeros = [] if parts[0].zero is None else [p.zero for p in parts]
    _ops().value_output_parts(probs, offset, [p.data for p in parts], [p.scale for p in parts], zeros,
                              parts[0].bits, out)
