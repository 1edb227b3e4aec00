"""The `hf-kvcache` console script, run in-process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_kvcache_plugin.app.cli import main
from hf_kvcache_plugin.app.models import format_bytes, resolve_model
from hf_kvcache_plugin.config import PluginConfig

from .conftest import HAVE_REAL, REAL_MODEL, REAL_REASON

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not HAVE_REAL, reason=REAL_REASON)
def test_generate_prints_text_and_memory_summary(capsys, tmp_path):
    config = tmp_path / "int4.yaml"
    config.write_text("cache:\n  quant_type: int4\n  residual_length: 16\n")
    code = main(
        ["generate", "--model", str(REAL_MODEL), "--prompt", "Once upon a time", "--config", str(config),
         "--max-new-tokens", "60"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("Once upon a time")
    summary = out.strip().splitlines()[-1]
    match = re.match(r"\[kv cache\] int4: ([\d.]+ \w+) for (\d+) tokens vs DynamicCache ([\d.]+ \w+) .*\(([\d.]+)x smaller\)", summary)
    assert match, summary
    assert float(match.group(4)) > 1.0


@pytest.mark.skipif(not HAVE_REAL, reason=REAL_REASON)
def test_quant_type_flag_overrides_config(capsys):
    assert main(["generate", "--model", str(REAL_MODEL), "--prompt", "Tom", "--quant-type", "int8",
                 "--max-new-tokens", "5"]) == 0
    assert "[kv cache] int8:" in capsys.readouterr().out


def test_model_resolution_order(tmp_path, monkeypatch):
    assert resolve_model("cli/model", PluginConfig(model="cfg/model")) == "cli/model"
    assert resolve_model(None, PluginConfig(model="cfg/model")) == "cfg/model"
    monkeypatch.setattr("hf_kvcache_plugin.app.models._default_model_candidates", lambda: [tmp_path / "none"])
    with pytest.raises(ValueError, match="no model given: pass `--model` with a Hugging Face model id"):
        resolve_model(None, PluginConfig())
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "config.json").write_text("{}")
    assert resolve_model(None, PluginConfig()) == str(tmp_path / "none")


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "could not load model" in err and "Hugging Face id or a local path" in err


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("cache:\n  quant_type: int5\n")
    assert main(["generate", "--prompt", "hi", "--config", str(bad)]) == 2
    assert "`cache.quant_type` has to be one of" in capsys.readouterr().err


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(2048) == "2.0 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"


def test_console_script_module_runs():
    proc = subprocess.run([sys.executable, "-m", "hf_kvcache_plugin", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "generate" in proc.stdout
