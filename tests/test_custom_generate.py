"""The shipped ``custom_generate`` recipe, reached the three ways transformers offers: ``generate(custom_generate=)``,
``pipeline(..., custom_generate=)`` and a model folder carrying it, loaded with ``trust_remote_code=True``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_kvcache_plugin import QuantizedKVCache
from hf_kvcache_plugin.generate_recipe import RECIPE_DIR, recipe_cache_config, write_custom_generate
from tests.conftest import REAL_MODEL


YAML = "cache:\n  quant_type: int4\n  group_size: 8\n  residual_length: 16\n"
NEW = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "stories260K"
    shutil.copytree(REAL_MODEL, folder, ignore=shutil.ignore_patterns("original", "*.py", "README.md"))
    (tmp_path / "kvcache.yaml").write_text(YAML)
    return folder


def _reference(model, ids):
    """The same generation with the cache built by hand from the YAML's settings."""
    cache = QuantizedKVCache(model.config, cache_config=recipe_cache_config({"quant_type": "int4", "group_size": 8,
                                                                            "residual_length": 16}))
    return model.generate(ids, past_key_values=cache, **NEW), cache


def test_generate_with_the_recipe_folder_uses_the_yaml_settings(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(
        ids, custom_generate=str(RECIPE_DIR), trust_remote_code=True, kvcache=str(model_dir.parent / "kvcache.yaml"),
        return_dict_in_generate=True, **NEW,
    )
    cache = out.past_key_values
    assert isinstance(cache, QuantizedKVCache)
    assert (cache.cache_config.quant_type, cache.cache_config.group_size) == ("int4", 8)
    expected, reference_cache = _reference(model, ids)
    assert torch.equal(out.sequences, expected)
    assert cache.get_stats() == reference_cache.get_stats()  # the same bytes: the same settings, the same tokens


def test_pipeline_with_the_recipe(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("Once upon a time", custom_generate=str(RECIPE_DIR), trust_remote_code=True,
                     kvcache={"cache": {"quant_type": "int4", "group_size": 8, "residual_length": 16}},
                     return_full_text=False, **NEW)[0]["generated_text"]
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    expected, _ = _reference(model, ids)
    assert text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_model_folder_carrying_the_recipe_generates_through_it(model_dir):
    written = write_custom_generate(model_dir)
    assert (written / "generate.py").is_file() and (written / "requirements.txt").is_file()
    # the settings travel in the folder's generation_config.json
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    generation_config["kvcache"] = {"quant_type": "int4", "group_size": 8, "residual_length": 16}
    (model_dir / "generation_config.json").write_text(json.dumps(generation_config))
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, return_dict_in_generate=True, **NEW)
    assert isinstance(out.past_key_values, QuantizedKVCache)
    assert out.past_key_values.cache_config.quant_type == "int4"
    assert torch.equal(out.sequences, _reference(model, ids)[0])
    # without trust_remote_code the folder's recipe is not run: the standard generate, DynamicCache
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert not isinstance(plain.generate(ids, return_dict_in_generate=True, **NEW).past_key_values, QuantizedKVCache)


def test_recipe_settings_errors():
    with pytest.raises(ValueError, match="`kvcache` has to be a YAML file's path"):
        recipe_cache_config(8)
    with pytest.raises(ValueError, match="is not a folder"):
        write_custom_generate("/nonexistent/model")
