"""AdaptiveSizer decisions from injected memory readings and an injected clock (no sleeps)."""

from __future__ import annotations

import math
import threading

import pytest

from hf_kvcache_plugin import (
    AdaptiveCacheSizer,
    AdaptiveSizer,
    MemoryMonitor,
    MemoryPressure,
    MemoryReading,
    PrefixStore,
    SizerConfig,
    WorkloadAnalyzer,
    create_adaptive_sizer,
)
from hf_kvcache_plugin.reuse.memory import read_memory


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Memory:
    """A settable memory reader: `memory.used = 0.9` makes the next reading 90% used."""

    def __init__(self, used: float = 0.5) -> None:
        self.used = used

    def __call__(self) -> MemoryReading:
        return MemoryReading.at_fraction(self.used)


def make_sizer(memory: Memory, clock: FakeClock, usage_bytes=None, **options) -> tuple[AdaptiveSizer, list[float]]:
    resizes: list[float] = []
    options = {"min_size_mb": 16, "max_size_mb": 256, "initial_size_mb": 64, "cooldown_s": 30, "min_requests": 4,
               **options}
    sizer = create_adaptive_sizer(
        resize_callback=resizes.append,
        monitor=MemoryMonitor(window=4, clock=clock, reader=memory),
        clock=clock,
        usage_bytes=usage_bytes,
        **options,
    )
    return sizer, resizes


def feed(sizer: AdaptiveSizer, hits: int, misses: int, hit_ms: float = 5.0, miss_ms: float = 50.0) -> None:
    for _ in range(hits):
        sizer.record_hit(hit_ms)
    for _ in range(misses):
        sizer.record_miss(miss_ms)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------------- readings and pressure
def test_reading_fractions_take_the_tighter_of_system_and_accelerator():
    system_only = MemoryReading(100, 40)
    assert system_only.used_fraction == pytest.approx(0.6) and system_only.accelerator_used_fraction is None
    with_gpu = MemoryReading(100, 40, accelerator_free_bytes=5, accelerator_total_bytes=100)
    assert with_gpu.used_fraction == pytest.approx(0.95)
    with pytest.raises(ValueError, match="used_fraction"):
        MemoryReading.at_fraction(1.5)


def test_real_reading_is_sane():
    reading = read_memory()
    assert reading.system_total_bytes > 0 and 0 <= reading.used_fraction <= 1 and reading.process_rss_bytes > 0


@pytest.mark.parametrize(
    "used,level",
    [(0.1, "low"), (0.69, "low"), (0.70, "moderate"), (0.849, "moderate"), (0.85, "high"), (0.95, "critical"),
     (1.0, "critical")],
)
def test_pressure_levels_follow_the_thresholds(used, level):
    assert AdaptiveSizer(SizerConfig()).pressure_of(used) is MemoryPressure(level)


def test_trend_is_the_slope_over_the_window(clock):
    memory = Memory(0.5)
    monitor = MemoryMonitor(window=3, clock=clock, reader=memory)
    assert monitor.trend() == 0.0
    for used in (0.50, 0.51, 0.52, 0.53):
        memory.used = used
        monitor.sample()
        clock.advance(10)
    assert len(monitor.readings) == 3
    assert monitor.trend() == pytest.approx(0.001, rel=1e-3)  # 0.01 per 10 s


# ---------------------------------------------------------------------- decisions
def test_critical_pressure_drops_to_the_minimum_at_once_even_in_cooldown(clock):
    memory = Memory(0.9)
    sizer, resizes = make_sizer(memory, clock)
    assert sizer.step().action == "shrink"  # HIGH: 64 -> 32
    clock.advance(1)  # inside the cooldown
    memory.used = 0.97
    decision = sizer.step()
    assert (decision.action, decision.pressure, decision.new_size_mb) == ("emergency", MemoryPressure.CRITICAL, 16)
    assert resizes == [32, 16]
    assert sizer.step().action == "hold"  # already at the minimum: no repeated callbacks
    assert resizes == [32, 16] and sizer.get_stats()["emergencies"] == 1


def test_high_pressure_shrinks_within_bounds_and_cooldown_prevents_thrashing(clock):
    memory = Memory(0.9)
    sizer, resizes = make_sizer(memory, clock)
    assert sizer.step().new_size_mb == 32
    clock.advance(10)
    held = sizer.step()
    assert held.action == "hold" and "cooldown" in held.reason
    clock.advance(25)
    assert sizer.step().new_size_mb == 16
    clock.advance(60)
    assert sizer.step().action == "hold"  # at min_size_mb
    assert resizes == [32, 16]


def test_low_pressure_grows_when_misses_would_become_hits(clock):
    full = lambda: int(sizer.current_size_mb * 2**20)  # noqa: E731 - the store fills whatever it gets
    sizer, resizes = make_sizer(Memory(0.3), clock, usage_bytes=lambda: full())
    feed(sizer, hits=2, misses=6)
    decision = sizer.step()
    assert (decision.action, decision.new_size_mb) == ("grow", 96)
    for _ in range(3):
        clock.advance(31)
        sizer.step()
    assert resizes == [96, 144, 216, 256]  # bounded by max_size_mb
    clock.advance(31)
    assert sizer.step().reason == "at the maximum"


@pytest.mark.parametrize(
    "setup,reason",
    [
        (lambda s: feed(s, 0, 2), "requests seen"),
        (lambda s: feed(s, 20, 1), "miss rate"),
        (lambda s: feed(s, 2, 6, hit_ms=60, miss_ms=50), "no faster"),
    ],
    ids=["too-few-requests", "few-misses", "hits-not-faster"],
)
def test_low_pressure_holds_when_growth_would_not_help(clock, setup, reason):
    sizer, resizes = make_sizer(Memory(0.3), clock, usage_bytes=lambda: 64 * 2**20)
    setup(sizer)
    decision = sizer.step()
    assert decision.action == "hold" and reason in decision.reason and resizes == []


def test_low_pressure_holds_while_the_store_has_room(clock):
    sizer, resizes = make_sizer(Memory(0.3), clock, usage_bytes=lambda: 10 * 2**20)
    feed(sizer, 0, 10)
    assert "more room would stay empty" in sizer.step().reason and resizes == []


def test_low_pressure_holds_while_memory_rises_fast(clock):
    memory = Memory(0.3)
    # proactive sizing off: the rise only stops growth
    sizer, resizes = make_sizer(memory, clock, usage_bytes=lambda: 64 * 2**20, trend_horizon_s=0.0)
    feed(sizer, 2, 6)
    for used in (0.30, 0.40, 0.50):  # +1% per second, still LOW at each reading
        memory.used = used
        sizer.monitor.sample()
        clock.advance(10)
    memory.used = 0.60
    decision = sizer.step()
    assert decision.action == "hold" and "rising" in decision.reason and resizes == []


def test_moderate_pressure_holds(clock):
    sizer, resizes = make_sizer(Memory(0.75), clock, usage_bytes=lambda: 64 * 2**20)
    feed(sizer, 0, 10)
    assert sizer.step().reason == "moderate memory pressure" and resizes == []


def test_step_if_due_follows_the_interval(clock):
    sizer, _ = make_sizer(Memory(0.5), clock, interval_s=5)
    assert sizer.step_if_due() is not None
    clock.advance(4)
    assert sizer.step_if_due() is None
    clock.advance(1)
    assert sizer.step_if_due() is not None


# ---------------------------------------------------------------------- store wiring, thread, API
def test_for_store_resizes_the_store_and_reads_its_usage(clock):
    store = PrefixStore(max_size_mb=1000, chunk_size=16)
    memory = Memory(0.97)
    sizer = AdaptiveSizer.for_store(
        store, SizerConfig(min_size_mb=8, max_size_mb=512), monitor=MemoryMonitor(clock=clock, reader=memory),
        clock=clock,
    )
    assert sizer.current_size_mb == 512 and store.max_size_mb == 512  # clipped to max_size_mb
    sizer.step()
    assert store.max_size_mb == 8


def test_background_thread_steps_and_stops():
    resized = threading.Event()
    sizer = create_adaptive_sizer(
        min_size_mb=1, max_size_mb=8, initial_size_mb=4, interval_s=0.001,
        resize_callback=lambda mb: resized.set(), monitor=MemoryMonitor(reader=Memory(0.99)),
    )
    with sizer:
        assert sizer.running
        assert resized.wait(timeout=10)  # waits on the thread's first resize, not on a timer
    assert not sizer.running and sizer.current_size_mb == 1


def test_seed_compatible_api_and_errors():
    sizer = create_adaptive_sizer(min_size_mb=10, max_size_mb=100, initial_size_mb=50, resize_callback=None)
    sizer.record_hit(3.0)
    sizer.record_miss(30.0)
    stats = sizer.get_stats()
    assert stats["current_size_mb"] == 50 and stats["hits"] == 1 and stats["misses"] == 1
    assert stats["hit_rate"] == 0.5 and stats["mean_hit_ms"] == 3.0 and stats["mean_miss_ms"] == 30.0
    for bad in (-1, "fast", None):
        with pytest.raises(ValueError, match="latency_ms"):
            sizer.record_hit(bad)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['speed'\]"):
        create_adaptive_sizer(speed=3)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"min_size_mb": 100, "max_size_mb": 10}, "min_size_mb"),
        ({"initial_size_mb": 5000}, "initial_size_mb"),
        ({"moderate_pressure": 0.9, "high_pressure": 0.8}, "pressure thresholds"),
        ({"grow_factor": 1.0}, "grow_factor"),
        ({"shrink_factor": 1.0}, "shrink_factor"),
        ({"cooldown_s": -1}, "cooldown_s"),
        ({"interval_s": 0}, "interval_s"),
        ({"memory_window": 1}, "memory_window"),
    ],
)
def test_config_errors_name_the_setting(options, message):
    with pytest.raises(ValueError, match=message):
        SizerConfig(**options)


# ---------------------------------------------------------------------- memory section and workload
def test_stats_describe_the_latest_memory_reading_with_its_pressure_level(clock):
    memory = Memory(0.9)
    sizer, _ = make_sizer(memory, clock)
    memory_stats = sizer.get_stats()["memory"]  # no step yet: a reading is taken for the stats
    assert memory_stats["pressure_level"] == "high" and memory_stats["used_fraction"] == pytest.approx(0.9)
    assert memory_stats["system_total_bytes"] == 16 * 2**30 and memory_stats["accelerator_used_fraction"] is None
    assert memory_stats["read_at"] == clock.now
    memory.used = 0.97
    clock.advance(60)
    sizer.step()
    stats = sizer.get_stats()
    assert stats["memory"]["pressure_level"] == "critical" == stats["pressure"]
    assert stats["memory"]["read_at"] == clock.now and stats["memory"]["trend_per_s"] > 0


def test_the_sizer_keeps_its_hit_figures_in_a_workload_analyzer(clock):
    workload = WorkloadAnalyzer(window=4)
    sizer, _ = make_sizer(Memory(0.5), clock, workload=workload)
    assert sizer.workload is workload and AdaptiveCacheSizer is AdaptiveSizer
    feed(sizer, hits=1, misses=5, hit_ms=2.0, miss_ms=20.0)
    assert workload.totals() == {"hits": 1, "misses": 5}
    figures = workload.figures()  # the last 4 requests
    assert figures["requests"] == 4 and figures["miss_rate"] == 1.0 and figures["mean_hit_ms"] is None
    stats = sizer.get_stats()
    assert stats["hits"] == 1 and stats["misses"] == 5 and stats["requests"] == 4
    for bad in (-1, math.nan, math.inf, True):
        with pytest.raises(ValueError, match=rf"`latency_ms` has to be a finite number >= 0 but got {bad!r}"):
            workload.record_miss(bad)
    with pytest.raises(ValueError, match="`window` has to be a positive integer"):
        WorkloadAnalyzer(window=0)


def rising(sizer, clock, memory, fractions):
    for used in fractions:
        memory.used = used
        sizer.monitor.sample()
        clock.advance(10)


def test_a_trend_that_reaches_high_pressure_within_the_horizon_shrinks_ahead_of_it(clock):
    memory = Memory(0.3)
    sizer, resizes = make_sizer(memory, clock, trend_horizon_s=30.0)
    rising(sizer, clock, memory, (0.30, 0.40, 0.50))  # +1% per second
    memory.used = 0.60  # LOW now; 0.60 + 0.01 * 30 = 0.90 >= high_pressure 0.85
    decision = sizer.step()
    assert decision.action == "proactive_shrink" and resizes == [32.0]
    assert "projected to reach 0.900" in decision.reason and "within 30 s" in decision.reason
    assert sizer.get_stats()["last_action"] == "proactive_shrink"


def test_a_trend_that_stays_below_high_pressure_within_the_horizon_does_not_shrink(clock):
    memory = Memory(0.3)
    sizer, resizes = make_sizer(memory, clock, trend_horizon_s=10.0)
    rising(sizer, clock, memory, (0.30, 0.40, 0.50))
    memory.used = 0.60  # 0.60 + 0.01 * 10 = 0.70: MODERATE at most
    assert sizer.step().action == "hold" and resizes == []


def test_the_trend_horizon_is_a_config_key():
    from hf_kvcache_plugin import ConfigError, parse_config

    assert parse_config({"prefix_store": {}, "sizer": {"trend_horizon_s": 15}}).sizer.trend_horizon_s == 15.0
    with pytest.raises(ConfigError, match="trend_horizon_s"):
        parse_config({"prefix_store": {}, "sizer": {"trend_horizon_s": -1}})
