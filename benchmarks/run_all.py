"""Run every benchmark (memory, quality, speed, throughput, fused attention, prefix reuse),
then turn their JSON into results/REPORT.md and the plots.

    python benchmarks/run_all.py --quick     # small sizes, under 10 minutes on 2 cores
    python benchmarks/run_all.py             # the full grid behind the README figures
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["memory", "quality", "speed", "throughput", "fused_attention", "prefix_reuse"]
# how each script is told where to write
OUT_FLAGS = {
    "memory": lambda d: ["--out", str(d)],
    "quality": lambda d: ["--out", str(d)],
    "speed": lambda d: ["--out", str(d)],
    "throughput": lambda d: ["--out", str(d)],
    "fused_attention": lambda d: ["--out", str(d / "fused_attention.json")],
    "prefix_reuse": lambda d: ["--out-dir", str(d)],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every script in --quick mode")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run these scripts only")
    parser.add_argument("--out", help="results folder (default benchmarks/results, or results/quick with --quick)")
    args = parser.parse_args(argv)
    # a quick run never overwrites the full results the README cites
    out = Path(args.out) if args.out else HERE / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or SCRIPTS:
        cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if args.quick else [])
        cmd += OUT_FLAGS[name](out)
        start = time.perf_counter()
        print(f"$ {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    report = [sys.executable, str(HERE / "report.py"), "--results", str(out)]
    subprocess.run(report, check=True)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
