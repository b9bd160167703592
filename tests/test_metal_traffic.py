"""The traffic build of the emulator (tests/tools/metal_emulator/traffic.py): its
counters must tell a coalesced read from a strided one, see every weight byte
a kernel reads, and find the expert kernels' weight loads at full sectors,
each byte read once, on a small shape, for every quantization."""

import os

import numpy as np
import pytest

from tools import metal_emulator
from tools.metal_emulator import traffic

WEIGHT_BUFFERS = ("_weight", "_scales", "_biases")


@pytest.fixture(scope="module")
def tracer(request):
    if not metal_emulator.compiler_available(trace=True):
        missing = f"the traffic build needs clang 19 ({metal_emulator.TRACE_CXX}), which is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; .ci/run installs it")  # never skipped silently in CI
        pytest.skip(missing)
    cache = request.config.cache.mkdir("metal_traffic")
    return traffic.Tracer(cache)


def by_name(buffers):
    return {b.name: b for b in buffers}


def test_a_coalesced_read_uses_whole_sectors(tracer):
    """Lane l reads uint32 l: 128 bytes, 4 full sectors per instruction."""
    b = by_name(tracer.run_probe(stride=1, groups=4))
    src, dst = b["src"], b["dst"]
    assert (src.load.instructions, src.load.lane_accesses, src.load.sectors) == (4, 128, 16)
    assert src.load.efficiency == 1.0 and src.reread == 1.0
    assert src.distinct_read == src.size == 512
    assert dst.store.efficiency == 1.0 and dst.load.instructions == 0
    assert src.load.divergent_accesses == 0


@pytest.mark.parametrize("stride,efficiency", [(2, 0.5), (8, 4 / 32), (64, 4 / 32)])
def test_a_strided_read_shows_as_low_efficiency(tracer, stride, efficiency):
    """Lane l reads uint32 l * stride: the counter must fall with the stride."""
    src = by_name(tracer.run_probe(stride=stride, groups=4))["src"]
    assert src.load.efficiency == pytest.approx(efficiency)
    assert src.distinct_read == 512 and src.reread == 1.0


def test_a_broadcast_read_counts_as_rereads(tracer):
    """Every lane of every threadgroup reads the same 4-byte stride: one byte
    range, read once per threadgroup."""
    arg = by_name(tracer.run_probe(stride=1, groups=4))["stride"]
    assert arg.distinct_read == 4 and arg.reread == 4.0
    assert arg.load.bytes_requested == 4 * 32 * 4 and arg.load.bytes_used == 16


def check_weight_buffers(case, result):
    """Every weight byte of the touched experts seen (so no load escapes the
    tracer), at full sectors, read once (decode) or reused across pairs
    (prefill); returns the weight buffers checked."""
    buffers = by_name(result.buffers)
    checked = []
    for name, b in buffers.items():
        if not name.endswith(WEIGHT_BUFFERS):
            continue
        per_expert = case.weight_bytes_per_expert(name)
        assert b.distinct_read == result.experts_touched * per_expert, name
        assert b.load.divergent_accesses == 0, name
        assert b.load.efficiency >= 0.9, (name, b.load.efficiency)
        if case.T == 1:
            assert b.reread <= 1.05, (name, b.reread)
        else:
            assert traffic.tile_reuse(case, result, b) > 1.0, name
        checked.append(name)
    return checked


@pytest.mark.parametrize(
    "op,T,bits",
    [("gate_up", 1, 4), ("down", 1, 3), ("gate_up", 40, 3), ("down", 40, 4)],
    ids=["A-decode-b4", "B-decode-b3", "A-prefill-b3", "B-prefill-b4"],
)
def test_expert_kernels_read_weights_in_full_sectors_once(tracer, op, T, bits):
    """A small shape (D=H=512, E=6, k=2): every weight byte of the
    touched experts is seen (so no load escapes the tracer), at full sectors,
    and read once (decode) or once per block of pairs (prefill). D and H
    are multiples of 512 so that every staging loop gives each lane the same
    number of loads: where some lanes of a SIMD group load less in the middle
    of a segment, the tracer cannot line the lanes up and counts divergence
    (traffic.py, ASSUMPTIONS)."""
    case = traffic.Case(op, T, bits, d=512, h=512, k=2, experts=6)
    result = traffic.run_case(tracer, case, with_sites=False)
    assert result.variant == ("decode" if T == 1 else "prefill")
    assert len(check_weight_buffers(case, result)) == 3
    buffers = by_name(result.buffers)
    out = buffers["h" if op == "gate_up" else "y"]
    rows = case.h if op == "gate_up" else case.d
    pairs_or_tokens = T * case.k if op == "gate_up" else T
    # bfloat16, each element once (the gate/up prefill's masked h stores,
    # lanes 0-1 only, come between two syncs and may count as divergent).
    assert out.store.bytes_used + out.store.divergent_bytes == pairs_or_tokens * rows * 2


@pytest.mark.parametrize("quant", list(traffic.QUANTS))
@pytest.mark.parametrize("op", ["gate_up", "down"])
def test_decode_reads_every_quantization_in_full_sectors_once(tracer, op, quant):
    """Decode for every quantization of the traffic report (affine 2 to 8
    bits, mxfp4, mxfp8, nvfp4): weights, scales and (affine) biases at
    sector efficiency >= 0.9, each byte read once, on the small shape. The
    fp modes have no biases: their slot is bound absent, and never read."""
    mode, bits, group = traffic.QUANTS[quant]
    case = traffic.Case(op, 1, bits, d=512, h=512, k=2, experts=6, group=group, mode=mode)
    result = traffic.run_case(tracer, case, with_sites=False)
    assert len(check_weight_buffers(case, result)) == (3 if mode == "affine" else 2)
    if mode != "affine":
        absent = by_name(result.buffers)[f"{op}_biases (absent)"]
        assert absent.size == 0 and absent.load.instructions == 0


@pytest.mark.parametrize("op", ["gate_up", "down"])
def test_sampled_row_blocks_scale_to_the_full_run(tracer, op):
    """traffic.py traces every S-th row block at T=512 and scales: on a
    small prefill case the scaled counts equal the full run's."""
    case = traffic.Case(op, 40, 4, d=512, h=512, k=2, experts=6)
    full = by_name(traffic.run_case(tracer, case, with_sites=False).buffers)
    sampled = by_name(traffic.run_case(tracer, case, sample_stride=4, with_sites=False).buffers)
    for name, b in full.items():
        s = sampled[name]
        assert (s.bytes_read, s.distinct_read, s.load.sectors) == (b.bytes_read, b.distinct_read, b.load.sectors), name
        assert s.store.bytes_used + s.store.divergent_bytes == b.store.bytes_used + b.store.divergent_bytes, name


def test_gate_up_prefill_reads_each_expert_once_per_pass(tracer):
    """Gate/up prefill: a run of one expert in the sorted order belongs to
    the block of kGateUpPrefillPairs entries it starts in, which reads the
    expert's rows once per kGateUpPrefillPairs pairs of it. 80 pairs over 6
    experts make runs of about 13 that cross block boundaries: the weight
    bytes read must be exactly sum over experts of ceil(run / 8) reads."""
    case = traffic.Case("gate_up", 40, 3, d=512, h=512, k=2, experts=6)
    per_pass = traffic.tile_constant("kGateUpPrefillPairs")
    runs = np.bincount(np.array(case.routing()[0]).reshape(-1), minlength=case.experts)
    passes = int(sum(-(-n // per_pass) for n in runs if n))
    buffers = by_name(traffic.run_case(tracer, case, with_sites=False).buffers)
    for name in ("gate_up_weight", "gate_up_scales", "gate_up_biases"):
        assert buffers[name].bytes_read == passes * case.weight_bytes_per_expert(name), name
