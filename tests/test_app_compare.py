"""`hf-kvcache compare`: the table's figures are those of caches built by hand, the plot's bytes are exact."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache_plugin import QuantizedKVCache
from hf_kvcache_plugin.app.cli import main
from hf_kvcache_plugin.app.compare import DYNAMIC, bytes_by_context, compare_caches
from hf_kvcache_plugin.budget import layer_nbytes
from hf_kvcache_plugin.config import CacheConfig

ROW = re.compile(r"^(\w+)\s+([\d.]+ \w+)\s+([\d.]+)x\s+([\d.]+)\s+(\d+)\s+([\d.]+)%\s+(.+)$")


def test_compare_quick_prints_one_row_per_cache_and_a_plot(capsys, tmp_path):
    plot = tmp_path / "bytes.png"
    code = main(["compare", "--quick", "--quant-types", "int8", "int2", "--plot", str(plot), "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    # --quick: 32 new tokens, one block of 8 tokens (head_dim 8) kept exact
    assert out[0].startswith("stories260K (embedded): 5 prompt + 32 new tokens, greedy; group 8, residual window 8")
    rows = {m.group(1): m for m in map(ROW.match, out[2:5])}
    assert list(rows) == [DYNAMIC, "int8", "int2"], out
    assert rows[DYNAMIC].group(3) == "1.00" and rows[DYNAMIC].group(4) == "32.00"  # float32
    # 37 tokens, of which the window's buffers hold residual + one block (16) exact: INT8 saves less than 2x
    assert 1.3 < float(rows["int8"].group(3)) < float(rows["int2"].group(3))
    assert float(rows["int8"].group(6)) >= 90.0  # greedy agreement with DynamicCache
    assert rows[DYNAMIC].group(7).startswith(", there was")
    assert out[5] == f"[plot] {plot}" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_rows_are_the_caches_figures(model_and_tokenizer):
    """Bytes, ratio, bits and agreement of a row against DynamicCache and QuantizedKVCache run by hand."""
    model, tok = model_and_tokenizer
    config = CacheConfig(quant_type="int8", group_size=8, residual_length=8)
    dynamic, int4 = compare_caches(model, tok, "Tom and his sister", config, 20, ["int4"], disable_progress=True)
    ids = tok("Tom and his sister", return_tensors="pt")["input_ids"]
    runs = {}
    for name, cache in ((DYNAMIC, DynamicCache(config=model.config)),
                        ("int4", QuantizedKVCache(model.config, quant_type="int4", group_size=8, residual_length=8))):
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, past_key_values=cache)
        runs[name] = out[0, ids.shape[1]:], cache
    dynamic_bytes = sum(layer_nbytes(layer) for layer in runs[DYNAMIC][1].layers)
    assert dynamic.cache_bytes == dynamic_bytes and dynamic.ratio == 1.0 and dynamic.agreement == 1.0
    assert int4.cache_bytes == runs["int4"][1].get_stats()["total_bytes"]
    assert int4.ratio == pytest.approx(dynamic_bytes / int4.cache_bytes)
    assert int4.bits_per_element == pytest.approx(32 * int4.cache_bytes / dynamic_bytes)
    same = (runs["int4"][0] == runs[DYNAMIC][0]).float().mean().item()
    assert int4.agreement == pytest.approx(same) and same >= 0.75
    assert int4.text == tok.decode(runs["int4"][0], skip_special_tokens=True)


@pytest.mark.parametrize("quant_type", ["int4", "mixed"])
def test_bytes_by_context_is_what_a_prefill_holds(model, quant_type):
    """The plot's predicted bytes equal those a real prefill of that length leaves (mixed: aged blocks too)."""
    config = CacheConfig(quant_type=quant_type, group_size=8, residual_length=16, mixed_int8_tokens=16)
    contexts = [5, 24, 61]
    predicted = bytes_by_context(model.config, config, model.dtype, contexts, [quant_type])
    for i, n in enumerate(contexts):
        ids = torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(n))
        held = {}
        for name, cache in ((DYNAMIC, DynamicCache(config=model.config)),
                            (quant_type, QuantizedKVCache(model.config, cache_config=config))):
            with torch.inference_mode():
                model(ids, past_key_values=cache)
            held[name] = sum(layer_nbytes(layer) for layer in cache.layers)
        assert predicted[DYNAMIC][i] == held[DYNAMIC] == n * 5 * 2 * 4 * 8 * 4  # tokens, layers, K+V, heads, dim, fp32
        assert predicted[quant_type][i] == held[quant_type]
    assert predicted[quant_type][-1] < predicted[DYNAMIC][-1]
