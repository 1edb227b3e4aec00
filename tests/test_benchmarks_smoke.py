"""Every benchmark script runs end to end on tiny sizes and writes meaningful JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import HAVE_TEXT, TEXT_REASON

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(BENCH / script), *args], check=True, capture_output=True, text=True,
                   timeout=240)


def by(rows, **match):
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    run("memory.py", "--contexts", "256", "--stories-contexts", "128", "--window", "8", "--peak-context", "256",
        "--peak-steps", "4", "--peak-layers", "1", "--caches", "dynamic", "ours-int4", "quanto-int4",
        "--out", str(out))
    run("speed.py", "--grid", "64:1", "200:2", "--max-prefill", "100", "--new-tokens", "4", "--repeats", "1",
        "--num-layers", "1", "--dtypes", "bfloat16", "--caches", "dynamic", "ours-int4", "quanto-int4",
        "--out", str(out))
    run("throughput.py", "--tokens", "512", "--repeats", "1", "--out", str(out))
    run("fused_attention.py", "--contexts", "256", "--configs", "dynamic", "ours_int4_dequantize", "ours_int4_fused",
        "--repeats", "1", "--steps", "2", "--out", str(out / "fused_attention.json"))
    if HAVE_TEXT:  # quality.py scores TinyStories text
        run("quality.py", "--windows", "1", "--prompts", "2", "--batch", "2", "--new-tokens", "8",
            "--caches", "dynamic", "ours-int4", "quanto-int4", "--out", str(out))
    run("spec_table.py", "--tokens", "64", "--repeats", "1", "--out", str(out))
    run("report.py", "--results", str(out))
    return out


def load(results, name):
    return json.loads((results / f"{name}.json").read_text())


def test_memory_bytes_and_peak(results):
    mem = load(results, "memory")
    assert mem["machine"]["torch"] and mem["settings"]["contexts"] == [256]
    rows = [r for r in mem["rows"] if r["model"] == "realistic"]
    dynamic, ours = by(rows, cache="dynamic"), by(rows, cache="ours-int4")
    assert ours["total_bytes"] < dynamic["total_bytes"]
    assert ours["bits_per_element"] >= ours["floor_bits_per_element"]
    assert {r["cache"] for r in mem["peak_decode"]} <= {"dynamic", "ours-int4", "quanto-int4"}


def test_speed_rows_have_ratios(results):
    speed = load(results, "speed")
    assert speed["machine"]["cpu_model"] and isinstance(speed["machine"]["cpu_flags"], list)
    prefilled = by(speed["rows"], cache="ours-int4", context=64)
    assert prefilled["generate_step_vs_dynamic"] > 0 and prefilled["generate_vs_dynamic"] > 0
    assert prefilled["forward_step_vs_dynamic"] > 0
    synthetic = by(speed["rows"], cache="ours-int4", context=200)
    assert synthetic["synthetic_prefill"] and synthetic["generate_s"] is None and synthetic["generate_step_s"] > 0


def test_spec_table_has_every_claim_next_to_ours(results):
    rows = load(results, "spec_table")["rows"]
    assert {r["operation"].split(",")[0].split(" (")[0] for r in rows} >= {
        "INT8 quantize", "INT8 dequantize", "INT4 quantize", "INT4 dequantize", "consistent hash lookup",
        "circuit breaker check", "health check"}
    int4 = by(rows, operation="INT4 quantize")
    assert int4["ns_per_token"] > 0 and int4["meta_bytes_per_element"] == 4 / 64  # fp16 scale + zero per 64
    assert all(r["spec_latency"] and r["ours"] for r in rows)


def test_throughput_has_copy_ceiling(results):
    tp = load(results, "throughput")
    kernels = {r["kernel"] for r in tp["rows"]}
    assert "copy" in kernels and "ours-int4-channel" in kernels


def test_fused_attention_rows(results):
    fused = load(results, "fused_attention")
    row = by(fused["speed"], config="ours_int4_fused")
    assert row["vs_dequantize"] > 0
    mem = by(fused["memory"], config="ours_int4_fused")
    assert mem["stored_bytes"] < by(fused["memory"], config="dynamic")["stored_bytes"]


@pytest.mark.skipif(not HAVE_TEXT, reason=TEXT_REASON)
def test_quality_rows(results):
    quality = load(results, "quality")
    assert by(quality["rows"], cache="dynamic")["ppl_delta_pct"] == 0
    assert by(quality["rows"], cache="ours-int4")["perplexity"] > 1


def test_report_and_plots(results):
    report = (results / "REPORT.md").read_text()
    assert "## Memory" in report and "## Speed" in report and "### Capacity" in report
    for plot in ("memory_vs_context.png", "decode_speed_vs_context.png"):
        assert (results / plot).stat().st_size > 1000


@pytest.mark.skipif(not HAVE_TEXT, reason=TEXT_REASON)
def test_reuse_agreement_runs_and_every_fresh_hit_meets_the_specification(tmp_path):
    """benchmarks/reuse_agreement.py asserts that hits on freshly stored chunks equal the prefix-quantized
    reference bit for bit; a few requests of it end to end (it raises otherwise)."""
    run("reuse_agreement.py", "--requests", "4", "--out-dir", str(tmp_path))
    summary = load(tmp_path, "reuse_agreement_int8_4")["summary"]
    assert summary["requests"] == 4
    fresh = summary["requests"] - summary["hits_on_chunks_stored_after_a_hit"]
    assert summary["reuse_eq_oracle"] - summary["those_eq_oracle"] == fresh


@pytest.mark.skipif(not HAVE_TEXT, reason=TEXT_REASON)
def test_budget_quality_holds_every_cache_to_its_budget(tmp_path):
    caches = ("shrink (int8, repack_then_drop)", "int4 fixed (drop)")
    run("budget_quality.py", "--quick", "--chunk", "64", "--variants", *caches, "--out", str(tmp_path))
    record = json.loads((tmp_path / "budget_quality_quick.json").read_text())
    assert (tmp_path / "budget_quality_quick.png").is_file()
    assert {(r["cache"], r["budget_fraction"]) for r in record["rows"]} == {
        (name, f) for name in caches for f in (1.0, 0.2)
    }
    for row in record["rows"]:
        assert row["held_bytes"] <= row["budget_bytes"] and row["perplexity"] > 1
    tight = by(record["rows"], cache="shrink (int8, repack_then_drop)", budget_fraction=0.2)
    # JSON keys: bits as strings
    assert tight["steps"]["repack_8_to_4"]["blocks"] > 0 and tight["key_tokens_at_bits"]["2"] > 0
