"""Property-based tests (hypothesis): quantizer error bound and reference agreement for any shape, dtype
and range; consistent-hash ring invariants (once ``hf_kvcache_plugin.distributed`` is merged)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hf_kvcache_plugin.quantization import dequantize, dequantize_reference, quantize, quantize_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def quantization_cases(draw, max_elements: int = 192):
    """(x, bits, group_size, axis, scale_dtype): any rank 1-4, a grouped axis, values of any magnitude."""
    bits = draw(st.sampled_from([2, 4, 8]))
    per_byte = 8 // bits
    group = per_byte * draw(st.integers(1, 4))
    rank = draw(st.integers(1, 4))
    axis = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    shape[axis] = group * draw(st.integers(1, 3))
    while math.prod(shape) > max_elements:
        other = [i for i in range(rank) if i != axis and shape[i] > 1]
        if not other:
            break
        shape[other[0]] -= 1
    dtype = draw(st.sampled_from(DTYPES))
    # magnitudes from denormal-adjacent to large; fp16 data stays inside its finite range
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3] + ([1e5, 1e8] if dtype != torch.float16 else [])))
    offset = draw(st.sampled_from([0.0, 1.0, -5.0])) * magnitude
    values = draw(
        arrays(np.float32, shape, elements=st.floats(-1.0, 1.0, width=32, allow_nan=False, allow_infinity=False))
    )
    x = (torch.from_numpy(values) * magnitude + offset).to(dtype)
    scale_dtype = draw(st.sampled_from([None, torch.float32] + ([torch.float16] if magnitude <= 30 else [])))
    return x, bits, group, axis, scale_dtype


def _grouped(t: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    moved = t.movedim(axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)


@PROPERTY_SETTINGS
@given(quantization_cases())
def test_asymmetric_round_trip_is_within_half_a_step_plus_storage_rounding(case):
    """|x - dequant(x)| <= scale/2 per group, plus what storing scale and zero in their dtype rounds off.

    The codes are chosen against the stored scale s and zero z, so a group of
    min lo and max hi is represented on the grid z + k*s, k = 0..qmax. An
    element inside the grid is at most s/2 away from a grid point; the grid
    can miss [lo, hi] by |z - lo| at the bottom and |hi - lo - qmax*s| at the
    top (the rounding of z and s to their dtype). A few float32 ulps cover
    the arithmetic that picks the codes.
    """
    x, bits, group, axis, scale_dtype = case
    q = quantize(x, bits, group, axis=axis, scale_dtype=scale_dtype)
    restored = dequantize_reference(q, torch.float64)  # exact arithmetic on the stored codes
    qmax = 2**bits - 1
    g = _grouped(x.double(), axis, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s, z = q.scale.double(), q.zero.double()
    slop = 4 * 2.0**-23 * (g.abs().amax(-1) + z.abs() + qmax * s)
    bound = s / 2 + (z - lo).abs() + (hi - lo - qmax * s).abs() + slop
    error = _grouped((restored - x.double()).abs(), axis, group).amax(-1)
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.zero).all()
    assert (error <= bound).all(), (error - bound).max()
    # the storage rounding really is rounding: a small fraction of the range, not a second error source
    step = torch.finfo(q.scale.dtype).eps
    assert ((z - lo).abs() <= step * lo.abs() + torch.finfo(q.scale.dtype).tiny).all()


@PROPERTY_SETTINGS
@given(quantization_cases(max_elements=96), st.booleans())
def test_fast_codes_are_identical_to_the_reference(case, symmetric):
    x, bits, group, axis, scale_dtype = case
    fast = quantize(x, bits, group, axis=axis, symmetric=symmetric, scale_dtype=scale_dtype)
    ref = quantize_reference(x, bits, group, axis=axis, symmetric=symmetric, scale_dtype=scale_dtype)
    assert torch.equal(fast.data, ref.data)
    assert torch.equal(fast.scale, ref.scale)
    assert (fast.zero is None) == (ref.zero is None) == symmetric
    if not symmetric:
        assert torch.equal(fast.zero, ref.zero)
    assert fast.shape == tuple(x.shape) and fast.dtype == x.dtype
    # the fast dequantization agrees with the reference up to the output dtype's rounding
    tolerance = torch.finfo(x.dtype).eps * 4
    fast_out, ref_out = dequantize(fast, torch.float32).double(), dequantize_reference(ref, torch.float64)
    assert ((fast_out - ref_out).abs() <= tolerance * (ref_out.abs() + fast.scale.double().abs().max() * 2**bits)).all()


# ---------------------------------------------------------------------- consistent-hash ring (coordinator)
try:
    from hf_kvcache_plugin.distributed import ConsistentHashRing
except ImportError:  # the coordinator branch is not merged yet
    ConsistentHashRing = None
needs_ring = pytest.mark.skipif(
    ConsistentHashRing is None, reason="the coordinator's ConsistentHashRing is not merged into this branch yet"
)

node_sets = st.sets(st.integers(0, 63), min_size=1, max_size=8)
keys = st.lists(st.binary(min_size=1, max_size=24), min_size=1, max_size=40, unique=True)
RING_SETTINGS = settings(max_examples=40, deadline=None)


def ring_of(nodes, virtual_nodes: int = 16):
    return ConsistentHashRing(virtual_nodes=virtual_nodes, nodes=dict.fromkeys(sorted(nodes), 1.0))


@needs_ring
@RING_SETTINGS
@given(node_sets, keys, st.integers(1, 10))
def test_ring_get_nodes_returns_n_distinct_ring_members(nodes, key_list, n):
    ring = ring_of(nodes)
    for key in key_list:
        owners = ring.get_nodes(key, n)
        assert len(owners) == min(n, len(nodes)) == len(set(owners))
        assert set(owners) <= nodes
        assert owners[0] == ring.get_node(key)


@needs_ring
@RING_SETTINGS
@given(node_sets, keys, st.randoms(use_true_random=False))
def test_ring_is_deterministic_whatever_the_insertion_order(nodes, key_list, rnd):
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    a = ring_of(nodes)
    b = ConsistentHashRing(virtual_nodes=16)
    for node in shuffled:
        b.add_node(node)
    assert all(a.get_nodes(k, 3) == b.get_nodes(k, 3) for k in key_list)


@needs_ring
@RING_SETTINGS
@given(node_sets.filter(lambda s: len(s) >= 2), keys, st.data())
def test_removing_a_node_moves_only_the_keys_it_owned(nodes, key_list, data):
    gone = data.draw(st.sampled_from(sorted(nodes)))
    before = ring_of(nodes)
    after = before.copy()
    after.remove_node(gone)
    for key in key_list:
        assert (after.get_node(key) == before.get_node(key)) or before.get_node(key) == gone
        # replica sets: the old preference list minus the removed node
        expected = [node for node in before.get_nodes(key, len(nodes)) if node != gone][:2]
        assert after.get_nodes(key, 2) == expected
