"""Memory pressure, read in one place: ``read_memory``, ``MemoryMonitor`` and ``pressure_level``.

A reading covers system memory (psutil), this process's RSS and, when there
is a CUDA device, its free/total memory; its ``used_fraction`` is the tighter
of system and accelerator. ``pressure_level`` names that fraction's level
against three thresholds. The adaptive sizer and the health check
(``resilience.health.MemoryPressureProbe``) both read and classify memory
through this module, each with its own thresholds from the config.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from ..config import SizerConfig

__all__ = [
    "MemoryMonitor",
    "MemoryPressure",
    "MemoryReading",
    "pressure_level",
    "read_memory",
    "used_fraction_now",
]


class MemoryPressure(str, enum.Enum):
    LOW = "low"
    MODERATE = "moderate"
    HIGH = "high"
    CRITICAL = "critical"


@dataclass(frozen=True)
class MemoryReading:
    """One look at memory; accelerator fields are None without one."""

    system_total_bytes: int
    system_available_bytes: int
    process_rss_bytes: int = 0
    accelerator_free_bytes: int | None = None
    accelerator_total_bytes: int | None = None
    timestamp: float = 0.0

    @classmethod
    def at_fraction(cls, used_fraction: float, total_bytes: int = 16 * 2**30, timestamp: float = 0.0) -> "MemoryReading":
        """A system-memory reading with ``used_fraction`` in use (for tests and simulations)."""
        if not 0 <= used_fraction <= 1:
            raise ValueError(f"`used_fraction` has to be in [0, 1] but got {used_fraction}")
        return cls(total_bytes, int(total_bytes * (1 - used_fraction)), timestamp=timestamp)

    @property
    def system_used_fraction(self) -> float:
        return 1 - self.system_available_bytes / self.system_total_bytes if self.system_total_bytes else 0.0

    @property
    def accelerator_used_fraction(self) -> float | None:
        if not self.accelerator_total_bytes or self.accelerator_free_bytes is None:
            return None
        return 1 - self.accelerator_free_bytes / self.accelerator_total_bytes

    @property
    def used_fraction(self) -> float:
        """The tighter of system and accelerator memory."""
        accelerator = self.accelerator_used_fraction
        return self.system_used_fraction if accelerator is None else max(self.system_used_fraction, accelerator)


def read_memory(device: torch.device | None = None) -> MemoryReading:
    """System memory and this process's RSS via psutil; a CUDA device's free/total if ``device`` is one."""
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    free = total = None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
    return MemoryReading(vm.total, vm.available, rss, free, total)


class MemoryMonitor:
    """Takes readings, keeps the last ``window`` and fits their trend.

    Args:
        window: readings kept for the trend.
        clock: seconds, monotonic (``time.monotonic``); stamps each reading.
        reader: returns a ``MemoryReading`` (default: ``read_memory`` for ``device``).
        device: accelerator to watch; default the current CUDA device when there is one.
    """

    def __init__(
        self,
        window: int = SizerConfig.memory_window,
        clock: Callable[[], float] = time.monotonic,
        reader: Callable[[], MemoryReading] | None = None,
        device: torch.device | str | None = None,
    ):
        if window < 2:
            raise ValueError(f"`window` has to be >= 2 (a trend needs two readings) but got {window}")
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        device = None if device is None else torch.device(device)
        self.clock = clock
        self.reader = reader if reader is not None else (lambda: read_memory(device))
        self.readings: deque[MemoryReading] = deque(maxlen=window)

    def sample(self) -> MemoryReading:
        reading = dataclasses.replace(self.reader(), timestamp=self.clock())
        self.readings.append(reading)
        return reading

    def trend(self) -> float:
        """Least-squares slope of the used fraction over the kept readings, per second (0 with < 2)."""
        if len(self.readings) < 2:
            return 0.0
        ts = [r.timestamp for r in self.readings]
        ys = [r.used_fraction for r in self.readings]
        t_mean, y_mean = sum(ts) / len(ts), sum(ys) / len(ys)
        spread = sum((t - t_mean) ** 2 for t in ts)
        if spread == 0:
            return 0.0
        return sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys)) / spread


def used_fraction_now(device: torch.device | str | None = None) -> float:
    """The used fraction of memory right now: system, or the tighter of system and ``device`` (a CUDA device)."""
    return read_memory(None if device is None else torch.device(device)).used_fraction


def pressure_level(used_fraction: float, moderate: float, high: float, critical: float) -> MemoryPressure:
    """The level of ``used_fraction``: LOW below ``moderate``, then MODERATE, HIGH from ``high``, CRITICAL from ``critical``."""
    levels = list(MemoryPressure)
    return levels[sum(used_fraction >= t for t in (moderate, high, critical))]
