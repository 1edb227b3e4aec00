"""Which devices this machine offers, and a ``--device`` checked against them before anything is loaded."""

from __future__ import annotations

import torch

__all__ = ["available_devices", "check_device"]


def _accelerator() -> str | None:
    """The accelerator type torch can use here (``cuda``, ``xpu``, ``mps``, ...), or None."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6: one API for every backend
        current = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return current.type if current is not None else None
    return "cuda" if torch.cuda.is_available() else None


def _device_count() -> int:
    return torch.accelerator.device_count() if hasattr(torch, "accelerator") else torch.cuda.device_count()


def available_devices() -> list[str]:
    """``cpu`` and every accelerator device torch sees, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    kind = _accelerator()
    return ["cpu"] + ([f"{kind}:{i}" for i in range(_device_count())] if kind else [])


def _why_missing(kind: str) -> str:
    if kind == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch ({torch.__version__}) was built without CUDA"
        return "torch was built with CUDA but sees no GPU (driver, CUDA_VISIBLE_DEVICES)"
    return f"torch {torch.__version__} finds no {kind} device"


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` when this machine has it; else a ``ValueError`` naming it and what is available."""
    available = available_devices()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is no device name ({exc}); available here: {', '.join(available)}") from None
    if device.type == "cpu":
        return device
    kind = _accelerator()
    if device.type != kind:
        raise ValueError(
            f"device {name!r} is not available on this machine: {_why_missing(device.type)}; "
            f"available here: {', '.join(available)}"
        )
    count = _device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"device {name!r} is not available on this machine: it has {count} {kind} device(s); "
            f"available here: {', '.join(available)}"
        )
    return device
