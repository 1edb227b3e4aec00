"""Trust boundaries (#14), snapshots: a crafted file with a valid checksum is refused whole, never half-loaded."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvcache_plugin import QuantizedKVCache, SnapshotError
from hf_kvcache_plugin.cache_io import read_snapshot, write_snapshot

from .test_cache_faults import kv, make

KIND = "QuantizedKVCache"


def filled(quant_type: str = "int4", layers: int = 2, tokens: int = 40, **options) -> QuantizedKVCache:
    cache = make(quant_type, layers=layers, sink_tokens=2, **options)
    k, v = kv(tokens)
    for layer in range(layers):
        cache.update(k, v, layer)
    return cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "cache.safetensors"
    filled().save(path)
    state, meta = read_snapshot(path, KIND)
    return state, meta


def crafted(tmp_path, state, meta, edit) -> str:
    """``state`` changed by ``edit`` and written with a valid checksum, as a crafted file would be."""
    state = copy.deepcopy(state)
    edit(state)
    path = tmp_path / "crafted.safetensors"
    write_snapshot(path, KIND, state, meta)
    return path


def tier(state, layer=0, stream="keys"):
    return state["layers"][layer][stream]["recent"]


def _set(obj, key, value):
    obj[key] = value


CRAFTED = {
    # the rows: a truncated data tensor used to load and fail at generate
    "truncated data": (lambda s: _set(tier(s), "data", tier(s)["data"][..., :-1]), r"keys blocks: `data` has shape"),
    "fewer blocks": (lambda s: _set(tier(s), "data", tier(s)["data"][:, :, :1]), r"`data` has shape"),
    "NaN scale": (lambda s: tier(s)["scale"].view(-1).__setitem__(0, math.nan), r"`scale` .* not finite"),
    "Inf zero": (lambda s: tier(s, 1, "values")["zero"].view(-1).__setitem__(3, math.inf), r"`zero` .* not finite"),
    "scale of ints": (lambda s: _set(tier(s), "scale", tier(s)["scale"].to(torch.int32)), r"`scale` has dtype"),
    "data not uint8": (lambda s: _set(tier(s), "data", tier(s)["data"].to(torch.int16)), r"`data` has dtype"),
    "zero group size": (lambda s: _set(tier(s), "group_size", 0), r"group size 0|do not match the codec"),
    "bits 3": (lambda s: _set(tier(s), "bits", 3), r"bits 3|do not match the codec"),
    "settings vs cache_config": (
        lambda s: _set(s["layers"][1]["settings"], "key_bits", 8),
        r"layer 1 was saved with other settings than the file's cache_config: \['key_bits 8 \(the cache_config gives 4",
    ),
    "group size 0 everywhere": (lambda s: _set(s["layers"][0]["settings"], "group_size", 0), r"group_size"),
    "unknown scale dtype": (lambda s: _set(s["layers"][0]["settings"], "scale_dtype", "fp7"), r"scale_dtype"),
    "token count": (lambda s: _set(s["layers"][0], "length", 41), r"layer 0: the saved keys hold 40 tokens but .* 41"),
    "negative length": (lambda s: _set(s["layers"][0], "length", -1), r"`length` has to be an integer >= 0"),
    "layers of two lengths": (
        lambda s: (_set(s["layers"][1], "length", 39), _set(s["layers"][1], "residual_keys",
                   s["layers"][1]["residual_keys"][:, :, :-1]), _set(s["layers"][1], "residual_values",
                   s["layers"][1]["residual_values"][:, :, :-1])),
        r"full-attention layers hold different numbers of tokens: \{0: 40, 1: 39\}",
    ),  # fmt: skip
    "residual dtype": (
        lambda s: _set(s["layers"][0], "residual_keys", s["layers"][0]["residual_keys"].half()),
        r"layer 0 residual_keys is .* of torch.float16, not .* of torch.float32",
    ),
    "residual heads": (
        lambda s: _set(s["layers"][0], "residual_values", s["layers"][0]["residual_values"][:, :1]),
        r"layer 0 residual_values is \[2, 1, ",
    ),
    "shape of two": (lambda s: _set(s["layers"][0], "shape", [2, 2]), r"`shape` has to be 4 positive integers"),
    "int dtype": (lambda s: _set(s["layers"][0], "dtype", "int64"), r"dtype torch.int64 is not a floating point"),
    "no such dtype": (lambda s: _set(s["layers"][0], "dtype", "__class__"), r"is not a torch dtype"),
    "unknown kind": (lambda s: _set(s["layers"][0], "kind", "paged"), r"layer 0 is of unknown kind 'paged'"),
    "missing key": (lambda s: s["layers"][0].pop("residual_keys"), r"inconsistent \(KeyError"),
    "no layers": (lambda s: _set(s, "layers", []), r"`layers` has to be a non-empty list"),
    "bad cache_config": (lambda s: _set(s["cache_config"], "group_size", 0), r"inconsistent \(ConfigError"),
    "too many sinks": (
        lambda s: _set(s["layers"][0]["settings"], "sink_tokens", 1) or _set(s["cache_config"], "sink_tokens", 1),
        r"layer 0: 2 sink tokens, the settings keep 1|other settings",
    ),
    "exact block out of range": (
        lambda s: _set(s["layers"][0]["keys"], "full_precision_blocks", {"7": torch.zeros(2, 2, 8, 8)}),
        r"exceed",
    ),
}


@pytest.mark.parametrize("case", list(CRAFTED), ids=lambda c: c)
def test_a_crafted_file_with_a_valid_checksum_is_refused_naming_the_fault(tmp_path, saved, case):
    edit, message = CRAFTED[case]
    path = crafted(tmp_path, *saved, edit)
    with pytest.raises(SnapshotError, match=message) as info:
        QuantizedKVCache.load(path)
    assert "nothing was loaded" in str(info.value) and str(path) in str(info.value)


def test_an_untouched_state_loads_so_the_crafted_cases_test_their_edit(tmp_path, saved):
    path = crafted(tmp_path, *saved, lambda s: None)
    assert QuantizedKVCache.load(path).get_seq_length() == 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["int8", "int4", "mixed"])
def test_round_trip_keeps_every_tensor_its_values_dtype_and_memory_layout(tmp_path, quant_type, dtype):
    cache = make(quant_type, layers=2, sink_tokens=2, mixed_int8_tokens=16)
    k, v = kv(70, dtype=dtype)
    for layer in range(2):
        cache.update(k, v, layer)
    cache.save(tmp_path / "c")
    loaded = QuantizedKVCache.load(tmp_path / "c")
    for a, b in zip(cache.layers, loaded.layers):
        for stream in ("quantized_keys", "quantized_values"):
            for ta, tb in zip(getattr(a, stream).tiers, getattr(b, stream).tiers):
                for name in ("data", "scale", "zero"):
                    x, y = getattr(ta, name), getattr(tb, name)
                    assert torch.equal(x, y) and x.stride() == y.stride() and x.dtype == y.dtype
        assert all(torch.equal(x, y) for x, y in zip(a.dequantized(), b.dequantized()))
    step = kv(1, seed=3, dtype=dtype)
    assert all(torch.equal(x, y) for x, y in zip(cache.update(*step, 0), loaded.update(*step, 0)))


def test_the_file_is_safetensors_with_no_pickle(tmp_path):
    import safetensors

    path = tmp_path / "c.safetensors"
    filled().save(path)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == "hf_kvcache_plugin.snapshot" and f.metadata()["kind"] == KIND
    assert b"\x80\x04" not in path.read_bytes()[:64]  # no pickle protocol header anywhere near the start


# ---------------------------------------------------------------------- fuzzing: only SnapshotError comes out
@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("blob") / "c"
    filled(layers=1, tokens=24).save(path)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_load_or_raise_a_snapshot_error(tmp_path, blob, data):
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        what = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if what == "flip" and mutated:
            mutated[at] ^= data.draw(st.integers(1, 255))
        elif what == "cut":
            del mutated[at : at + data.draw(st.integers(1, 64))]
        else:
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path / "fuzzed"
    path.write_bytes(bytes(mutated))
    try:
        QuantizedKVCache.load(path)
    except SnapshotError:
        pass


_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 100), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["int4", "float16", "quantized", "token", "x", "int64"]),
    st.builds(lambda n, d: torch.zeros(tuple(n), dtype=d), st.lists(st.integers(0, 4), max_size=5),
              st.sampled_from([torch.float32, torch.float16, torch.uint8, torch.int64, torch.bool])),
)  # fmt: skip


def _paths(value, prefix=()):
    """Every place in a state a fuzzer may replace."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_states_with_valid_checksums_load_or_raise_a_snapshot_error(tmp_path, saved, data):
    state, meta = saved
    places = [p for p in _paths(state) if p]
    edits = data.draw(st.lists(st.tuples(st.sampled_from(places), _LEAVES), min_size=1, max_size=3))

    def edit(s):
        for where, leaf in edits:
            target = s
            for key in where[:-1]:
                if not isinstance(target, (dict, list)) or key not in (target if isinstance(target, dict)
                                                                        else range(len(target))):
                    target = None  # an earlier edit replaced a parent of this place
                    break
                target = target[key]
            if isinstance(target, dict) or isinstance(target, list) and where[-1] in range(len(target)):
                target[where[-1]] = leaf

    path = crafted(tmp_path, state, meta, edit)
    try:
        loaded = QuantizedKVCache.load(path)
    except SnapshotError:
        return
    # what loads has to be usable: its history reads back and a step appends
    for layer in loaded.layers:
        layer.dequantized()
    loaded.update(*kv(1, seed=5), 0)
