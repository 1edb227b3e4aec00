"""What every benchmark writes: the machine it ran on, its settings, its rows; and the table it prints."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the instruction sets that decide how fast bf16 and the CPU decode kernel run
_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of ``_FLAGS_OF_INTEREST`` this CPU has (from /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in _FLAGS_OF_INTEREST if f in present]
    except OSError:
        pass
    return []


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU, threads, memory, library versions and the load at the time of the call."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "optimum_quanto": _version("optimum-quanto"),
        "hqq": _version("hqq"),
        # other processes share this machine: the load says how quiet it was
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


class Recorder:
    """Collects one benchmark's rows and writes ``results/<name>.json`` with the machine record."""

    def __init__(self, name: str, settings: dict[str, Any], out_dir: str | Path | None = None):
        self.name = name
        self.settings = settings
        self.out_dir = Path(out_dir) if out_dir else RESULTS_DIR
        self.started = time.time()
        self.machine_at_start = machine()
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def write(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.name}.json"
        end = machine()
        record = {
            "benchmark": self.name,
            "started": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 1),
            "machine": {**self.machine_at_start, "load_average_1m_at_end": end["load_average_1m"]},
            "settings": self.settings,
            "rows": self.rows,
            **self.extra,
        }
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"wrote {path}")
        return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], floatfmt: str = ".3g") -> str:
    """A Markdown table of ``columns`` (missing values shown as ``-``)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    """One setting for all timed work; recorded by ``machine()``."""
    torch.set_num_threads(threads)


def load_result(name: str, results_dir: str | Path | None = None) -> dict[str, Any] | None:
    path = Path(results_dir or RESULTS_DIR) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
