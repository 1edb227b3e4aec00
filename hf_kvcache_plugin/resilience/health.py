"""Health: registered checks aggregated into HEALTHY / DEGRADED / UNHEALTHY, with reasons.

=============  ===============================================================
status         meaning for operators
=============  ===============================================================
HEALTHY        everything works
DEGRADED       requests are served, some slower (a breaker is open and the
               service recomputes locally, memory is high, a peer is down)
UNHEALTHY      the instance should not take traffic (memory critical)
=============  ===============================================================

*Readiness* runs every check: ready unless UNHEALTHY. *Liveness* runs only
checks registered with ``liveness=True`` (none by default: a process that can
answer is alive), so a degraded dependency never gets the process restarted.
A check that raises reports ``on_error`` (DEGRADED by default) with the error
as its reason. ``register_check`` and ``get_overall_health`` are the
specification's names for ``register`` and ``readiness``.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pybreaker

from ..config import HealthConfig
from ..reuse.memory import pressure_level, used_fraction_now
from .metrics import ServingMetrics

__all__ = [
    "CheckResult",
    "HealthChecker",
    "HealthReport",
    "HealthStatus",
    "MemoryPressureProbe",
    "breaker_check",
    "consistency_check",
    "peers_check",
    "system_memory_used_fraction",
]

logger = logging.getLogger(__name__)


class HealthStatus(str, enum.Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def severity(self) -> int:
        return ("healthy", "degraded", "unhealthy").index(self.value)


@dataclass(frozen=True)
class CheckResult:
    status: HealthStatus
    reason: str = ""

    @classmethod
    def healthy(cls, reason: str = "") -> "CheckResult":
        return cls(HealthStatus.HEALTHY, reason)

    @classmethod
    def degraded(cls, reason: str) -> "CheckResult":
        return cls(HealthStatus.DEGRADED, reason)

    @classmethod
    def unhealthy(cls, reason: str) -> "CheckResult":
        return cls(HealthStatus.UNHEALTHY, reason)


@dataclass(frozen=True)
class HealthReport:
    """The worst status of the checks run, and every check's own result."""

    status: HealthStatus
    checks: dict[str, CheckResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Ready / alive: anything but UNHEALTHY."""
        return self.status is not HealthStatus.UNHEALTHY

    @property
    def reasons(self) -> list[str]:
        """``"name: reason"`` of every check that is not HEALTHY, worst first."""
        bad = [(n, r) for n, r in self.checks.items() if r.status is not HealthStatus.HEALTHY]
        bad.sort(key=lambda item: -item[1].status.severity)
        return [f"{name}: {result.reason}" for name, result in bad]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "reasons": self.reasons,
            "checks": {n: {"status": r.status.value, "reason": r.reason} for n, r in self.checks.items()},
        }


Check = Callable[[], CheckResult]


@dataclass
class _Registered:
    check: Check
    liveness: bool
    on_error: HealthStatus


class HealthChecker:
    """Named checks; ``readiness()`` runs all, ``liveness()`` those registered with ``liveness=True``."""

    def __init__(self) -> None:
        self._checks: dict[str, _Registered] = {}
        self._lock = threading.Lock()

    def register(
        self, name: str, check: Check, *, liveness: bool = False, on_error: HealthStatus = HealthStatus.DEGRADED
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a health check needs a non-empty name but got {name!r}")
        if not callable(check):
            raise ValueError(f"health check {name!r} has to be callable but got {type(check).__name__}")
        with self._lock:
            if name in self._checks:
                raise ValueError(f"a health check named {name!r} is registered already")
            self._checks[name] = _Registered(check, liveness, HealthStatus(on_error))

    # The specification's name: ``HealthChecker().register_check("cache", fn)``.
    register_check = register

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._checks.pop(name, None) is None:
                raise ValueError(f"no health check named {name!r}; registered: {sorted(self._checks)}")

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    def readiness(self) -> HealthReport:
        return self._run(lambda reg: True)

    def liveness(self) -> HealthReport:
        return self._run(lambda reg: reg.liveness)

    def get_overall_health(self) -> HealthReport:
        """Every check, aggregated (the same as ``readiness``)."""
        return self.readiness()

    def _run(self, select: Callable[[_Registered], bool]) -> HealthReport:
        with self._lock:
            chosen = [(name, reg) for name, reg in self._checks.items() if select(reg)]
        results = {name: self._run_one(name, reg) for name, reg in chosen}
        worst = max((r.status for r in results.values()), key=lambda s: s.severity, default=HealthStatus.HEALTHY)
        return HealthReport(worst, results)

    @staticmethod
    def _run_one(name: str, reg: _Registered) -> CheckResult:
        try:
            result = reg.check()
        except Exception as exc:  # noqa: BLE001 - a failing check is a finding, not a crash of the endpoint
            logger.warning("health check %r raised %r", name, exc)
            return CheckResult(reg.on_error, f"check raised {type(exc).__name__}: {exc}")
        if not isinstance(result, CheckResult):
            return CheckResult(reg.on_error, f"check returned {type(result).__name__}, not a CheckResult")
        return result


# ---------------------------------------------------------------------- built-in checks
def system_memory_used_fraction() -> float:
    """Used fraction of system memory: 1 - available / total (``reuse.memory``, the reader the sizer uses too)."""
    return used_fraction_now()


class MemoryPressureProbe:
    """Reads memory use and names its pressure level (``low``, ``moderate``, ``high``, ``critical``).

    The same level feeds the health check (``check``), the metrics gauge and
    the "do not store new entries when critical" rule of ``GuardedStore``
    (``level``). ``read_used_fraction`` is injectable for tests and faults.
    """

    def __init__(
        self,
        config: HealthConfig | None = None,
        read_used_fraction: Callable[[], float] = system_memory_used_fraction,
        metrics: ServingMetrics | None = None,
    ):
        self.config = config or HealthConfig()
        self.read_used_fraction = read_used_fraction
        self.metrics = metrics

    def level_of(self, used_fraction: float) -> str:
        c = self.config
        return pressure_level(used_fraction, c.memory_moderate, c.memory_high, c.memory_critical).value

    def read(self) -> tuple[str, float]:
        used = float(self.read_used_fraction())
        level = self.level_of(used)
        if self.metrics is not None:
            self.metrics.record_pressure(level, used)
        return level, used

    def level(self) -> str:
        return self.read()[0]

    def check(self) -> CheckResult:
        level, used = self.read()
        described = f"memory {used:.0%} used ({level})"
        if level == "critical":
            return CheckResult.unhealthy(f"{described}: new cache entries are not stored")
        if level == "high":
            return CheckResult.degraded(described)
        return CheckResult.healthy(described)


def breaker_check(breakers: Iterable[pybreaker.CircuitBreaker]) -> Check:
    """DEGRADED while any breaker is open or half-open (the service then recomputes locally)."""
    breakers = list(breakers)

    def check() -> CheckResult:
        states = {b.name: b.current_state for b in breakers}
        not_closed = {n: s for n, s in states.items() if s != pybreaker.STATE_CLOSED}
        if not_closed:
            described = ", ".join(f"{n} {s}" for n, s in sorted(not_closed.items()))
            return CheckResult.degraded(f"circuit breakers not closed ({described}): serving without them")
        return CheckResult.healthy(f"{len(states)} breaker(s) closed")

    return check


def consistency_check(find_problems: Callable[[], Iterable[str]], what: str = "store") -> Check:
    """DEGRADED when ``find_problems()`` (provided by the store) lists any, e.g. byte accounting != sum of entries."""

    def check() -> CheckResult:
        problems = list(find_problems())
        if problems:
            return CheckResult.degraded(f"{what} inconsistent: " + "; ".join(problems))
        return CheckResult.healthy(f"{what} consistent")

    return check


def peers_check(peers_alive: Callable[[], Mapping[str, bool]]) -> Check:
    """DEGRADED when coordinator peers are unreachable (``peers_alive()`` is provided by the coordinator)."""

    def check() -> CheckResult:
        alive = dict(peers_alive())
        down = sorted(p for p, ok in alive.items() if not ok)
        if down:
            return CheckResult.degraded(f"{len(down)} of {len(alive)} peer(s) unreachable {down}: serving locally")
        return CheckResult.healthy(f"{len(alive)} peer(s) reachable")

    return check
