"""The `hf-kvcache` console script, run in-process."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from hf_kvcache_plugin.app.cli import main
from hf_kvcache_plugin.app.models import format_bytes, resolve_model
from hf_kvcache_plugin.app.terminal import TokenProgress
from hf_kvcache_plugin.config import PluginConfig
from hf_kvcache_plugin.embedded import STORIES260K

from .conftest import REAL_MODEL

REPO = Path(__file__).resolve().parents[1]
# a bar as tqdm draws it: "generate: 100%|####| 5/5 [...]" (transformers' own: "Loading weights: ... 47/47 [")
BAR = re.compile(r"\d+/\d+ \[")
GENERATE_BAR = re.compile(r"generate: 100%.*3/3 \[")


def test_generate_prints_text_and_memory_summary(capsys, tmp_path):
    """No --model: the embedded stories260K."""
    config = tmp_path / "int4.yaml"
    config.write_text("cache:\n  quant_type: int4\n  residual_length: 16\n")
    code = main(["generate", "--prompt", "Once upon a time", "--config", str(config), "--max-new-tokens", "60"])
    out, err = capsys.readouterr()
    assert not BAR.search(err), err  # stderr is no terminal here: no progress bar
    assert code == 0
    assert out.startswith("Once upon a time")
    summary = out.strip().splitlines()[-1]
    match = re.match(r"\[kv cache\] int4: ([\d.]+ \w+) for (\d+) tokens vs DynamicCache ([\d.]+ \w+) .*\(([\d.]+)x smaller\)", summary)
    assert match, summary
    assert float(match.group(4)) > 1.0


def test_quant_type_flag_overrides_config(capsys):
    assert main(["generate", "--model", str(REAL_MODEL), "--prompt", "Tom", "--quant-type", "int8",
                 "--max-new-tokens", "5"]) == 0
    assert "[kv cache] int8:" in capsys.readouterr().out


def test_model_resolution_order(tmp_path, monkeypatch):
    assert resolve_model("cli/model", PluginConfig(model="cfg/model")) == "cli/model"
    assert resolve_model(None, PluginConfig(model="cfg/model")) == "cfg/model"
    assert resolve_model(None, PluginConfig()) == str(STORIES260K)
    # a copy installed without its package data says so
    monkeypatch.setattr("hf_kvcache_plugin.embedded.STORIES260K", tmp_path)
    with pytest.raises(ValueError, match=r"lacks config.json, model.safetensors.*without its package data"):
        resolve_model(None, PluginConfig())


def test_missing_model_path_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"model path {str(tmp_path / 'nope')!r} does not exist" in err and "Traceback" not in err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert f"model path {str(tmp_path)!r} has no config.json" in capsys.readouterr().err


def test_unavailable_device_is_a_clear_error(capsys):
    """`--device cuda` without CUDA (or one GPU past the last where there is CUDA): exit 2, no traceback."""
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    code = main(["generate", "--device", device, "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"hf-kvcache: error: device {device!r} is not available on this machine" in err
    assert "available here: cpu" in err
    assert main(["generate", "--device", "gpu7", "--prompt", "hi"]) == 2
    assert "device 'gpu7' is no device name" in capsys.readouterr().err


def test_version_names_the_package_and_its_libraries(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hf-kvcache {metadata.version('hf_kvcache_plugin')} ")
    assert f"torch {torch.__version__}" in out and f"transformers {metadata.version('transformers')}" in out


def test_log_level_info_shows_which_attention_runs(capsys):
    assert main(["--log-level", "info", "generate", "--prompt", "Tom", "--max-new-tokens", "3"]) == 0
    assert "[INFO] hf_kvcache_plugin.attention.dispatch: QuantizedKVCache: the model now runs 'kvquant_sdpa'" in (
        capsys.readouterr().err
    )
    assert main(["generate", "--prompt", "Tom", "--max-new-tokens", "3"]) == 0  # default: warnings only
    assert "kvquant_sdpa" not in capsys.readouterr().err


def test_token_progress_counts_generated_tokens(model_and_tokenizer):
    """The bar advances once per new token (not for the prompt), drawn when enabled."""
    model, tok = model_and_tokenizer
    stream = io.StringIO()
    progress = TokenProgress(9, disable=False, file=stream)
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False, streamer=progress)
    assert progress.bar.n == 9
    assert "9/9 [" in stream.getvalue()


def test_no_progress_flag_hides_the_bar_even_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["generate", "--prompt", "Tom", "--max-new-tokens", "3", "--no-progress"]) == 0
    assert not BAR.search(capsys.readouterr().err)
    assert main(["generate", "--prompt", "Tom", "--max-new-tokens", "3"]) == 0
    assert GENERATE_BAR.search(capsys.readouterr().err)  # the same run on a terminal draws it


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
