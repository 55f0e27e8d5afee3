"""The PyTorch backend's CPU solver (the threshold split: only the tail above tau is ordered)
against the sort-based oracle (tests/sorted_oracle.py) and the exact-arithmetic Algorithm 1
(tests/literal.py).

Masks must be bit-identical to the sort, and to exact arithmetic, except where a prefix sum lies
in the floating-point zone of split.ZONE_EPS (tests/zone.py checks that in exact arithmetic).
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

import literal
import sorted_oracle
from zone import assert_paper_cuts_agree, official_zone
from m2po_ops import m2po_mask, reference, split
from m2po_ops.config import M2POConfig
from m2po_ops.inputs import device_path, prepare

TAU32 = float(torch.tensor(0.04).float())  # a tau that m2 can equal exactly
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# --------------------------------------------------------------------------------------------
# The zone helper itself


def test_zone_helper_accepts_a_prefix_sum_within_1e_15_of_tau_k_and_rejects_one_outside():
    tau = f32(0.04)
    w = f32(2 * tau - 2.0**-27)  # 2 tau minus 2**-27: a float32 in the binade above tau
    z = 2.0**-27 * (1 + 2.0**-23)  # 2**-27 plus 2**-50: a float32
    assert f32(w) == w and f32(z) == z and 2 * tau - w == 2.0**-27
    m2 = [tau] * 98 + [w, z]
    s100 = sum(Fraction(v) for v in m2)
    rel = (s100 - 100 * Fraction(tau)) / (100 * Fraction(tau))
    assert 0 < rel < Fraction(1, 10**15)  # S_100 is above 100 tau by ~1e-16 relative: exact keep count 99
    assert_paper_cuts_agree(m2, tau, 99, 100)  # in the zone: either answer is allowed
    assert_paper_cuts_agree(m2, tau, 99, 99)
    # whatever the solvers answer here lies in the zone
    t = torch.tensor(m2, dtype=torch.float32)
    tr = torch.ones(100, dtype=torch.bool)
    config = M2POConfig(tau=tau)
    for cut in (reference.solve_trust_region(t, tr, torch.tensor(100), config),
                sorted_oracle.solve(t, tr, torch.tensor(100), config)):
        kept = int(reference.keep_paper(t, tr, tr, cut).sum())
        assert_paper_cuts_agree(m2, tau, kept, 99)

    far = [tau] * 99 + [f32(tau * (1 + 1e-6))]  # 1e-8 relative above: far outside 2**-32
    with pytest.raises(AssertionError, match="outside the float zone"):
        assert_paper_cuts_agree(far, tau, 99, 100)
    assert official_zone([tau] * 4, tau)  # the mean is exactly tau: the no-constraint test is on its edge
    assert official_zone([tau / 2] * 4, tau) == []


# --------------------------------------------------------------------------------------------
# The exact below-part sum


@pytest.mark.parametrize("with_numpy", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("variant,tau", [("paper", 0.04), ("official", 0.04), ("paper", math.inf), ("paper", 0.0),
                                         ("official", 0.0), ("paper", 3e38)])
def test_below_sum_has_the_bits_of_limbs_to_float_of_limb_sums(variant, tau, with_numpy, monkeypatch):
    """The host solver's below-part sum (a float64 window sum plus per-exponent sums under it,
    or per-exponent sums alone without numpy) is the exact sum, with the bits the histogram
    path's limbs give; keys of every kind: subnormals, any finite value, small m2, inf, 0."""
    if not with_numpy:
        monkeypatch.setattr(reference, "np", None)
    g = torch.Generator().manual_seed(7)
    n = 5000
    parts = [
        torch.randint(0, 0x800000, (n,), generator=g, dtype=torch.int32),  # subnormals
        torch.randint(0, 0x7F800000, (n,), generator=g, dtype=torch.int32),  # any finite value
        ((torch.randn(n, generator=g) * 0.1) ** 2).view(torch.int32),  # m2 of small log ratios
        torch.full((7,), 0x7F800000, dtype=torch.int32),  # inf: always in the tail
        torch.zeros(5, dtype=torch.int32),
    ]
    keys = torch.cat(parts)[torch.randperm(sum(p.numel() for p in parts), generator=g)]
    thr = split.threshold_bits(variant, tau)
    got = reference._below_sum(keys, thr)
    below = keys <= thr
    want = float(split.limbs_to_float(split.limb_sums(keys, below, split.limb_count(thr))))
    assert struct.pack("<d", got) == struct.pack("<d", want)
    exact = sum((Fraction(v) for v in keys[below].view(torch.float32).tolist()), Fraction(0))
    assert reference._exact_sum(keys[below]) == exact * 2**149
    assert reference._below_exact(keys, thr) == exact * 2**149


def test_below_sum_window_is_exact_at_its_limit():
    """The float64 window sum at the edge of its exactness bound: 2**13 - 1 keys (a window of 16
    fields), half at thr and half a few ulps into the window's lowest field, whose exact sum
    needs 52 significant bits of that field's ulp; it must equal the exact sum, not a rounding."""
    thr = split.threshold_bits("paper", 0.04)
    n = 2**13 - 1
    width = 29 - n.bit_length()
    low = ((thr >> 23) - width) << 23
    keys = torch.full((n,), thr, dtype=torch.int32)
    keys[1::2] = low + 1 + torch.arange(n // 2, dtype=torch.int32) % 7  # the lowest field, odd ulps
    keys[5] = low - 3  # one under the window
    exact = sum((Fraction(v) for v in keys.view(torch.float32).tolist()), Fraction(0))
    assert reference._below_exact(keys, thr) == exact * 2**149


@pytest.mark.parametrize("count", [pytest.param(5, id="few-keys-loop"), pytest.param(3000, id="many-keys-bincount")])
def test_exact_sum_skips_infinite_keys_and_is_exact(count):
    """The per-key loop (a few keys) and the per-exponent sums (many) both give the exact sum of
    the finite keys in units of 2**-149: subnormals, zeros and huge values alike, inf skipped."""
    g = torch.Generator().manual_seed(count)
    keys = torch.cat([torch.randint(0, 0x7F800000, (count,), generator=g, dtype=torch.int32),
                      torch.tensor([0, 1, 0x7F7FFFFF, 0x7F800000], dtype=torch.int32)])
    finite = keys[keys < 0x7F800000]
    exact = sum((Fraction(v) for v in finite.view(torch.float32).tolist()), Fraction(0))
    assert reference._exact_sum(keys) == exact * 2**149


def test_below_exact_counts_the_clipped_keys_at_both_window_edges():
    """Keys exactly at the window's lowest key and at thr, keys just outside both edges and
    infinite keys: clipping into the window and taking the clipped values off again leaves the
    exact sum of the keys at or below thr, with the count above thr given or found."""
    thr = split.threshold_bits("paper", 0.04)
    n = 1000
    low = ((thr >> 23) - (29 - n.bit_length())) << 23
    keys = torch.full((n,), low, dtype=torch.int32)
    keys[::5] = thr
    keys[1::5] = thr + 1
    keys[2::5] = low - 1
    keys[3::50] = 0x7F800000
    keys[4::7] = 0x7F7FFFFF
    below = keys <= thr
    exact = sum((Fraction(v) for v in keys[below].view(torch.float32).tolist()), Fraction(0)) * 2**149
    assert reference._below_exact(keys, thr) == exact
    assert reference._below_exact(keys, thr, int((keys > thr).sum())) == exact


# --------------------------------------------------------------------------------------------
# Random trust regions, straight into the solver


def _m2_case(seed: int, style: str, n: int, tau: float):
    """(m2 float32 (n,), trust region bool (n,)) in a given style."""
    g = torch.Generator().manual_seed(seed)
    tr = torch.rand(n, generator=g) < 0.6
    if style == "spread":  # continuous values, a tail of outliers
        m2 = (torch.randn(n, generator=g) * 0.15) ** 2
        out = torch.rand(n, generator=g) < 0.1
        m2 = torch.where(out, torch.rand(n, generator=g) * 4 * max(tau, 0.01) + tau, m2)
    elif style == "ties_at_tau":  # large tie classes at tau and straddling the cut
        choices = torch.tensor([0.0, tau / 4, tau / 2, tau, tau, tau, 2 * tau, 2 * tau, 4 * tau])
        m2 = choices[torch.randint(0, len(choices), (n,), generator=g)]
    elif style == "all_below":
        m2 = torch.rand(n, generator=g) * tau
    elif style == "all_tail":
        m2 = tau + torch.rand(n, generator=g) * 3 * max(tau, 0.01) + 1e-3
    elif style == "equal_tau":  # every trust-region value exactly tau
        m2 = torch.full((n,), tau)
    elif style == "grid":  # a dyadic grid: every sum exact, many ties
        m2 = torch.randint(0, 24, (n,), generator=g).to(torch.float32) / 256
    else:
        raise ValueError(style)
    return m2.float().abs(), tr


def _kept(m2, tr, cut):
    return reference.keep_paper(m2, tr, tr, cut)


STYLES = ("spread", "ties_at_tau", "all_below", "all_tail", "equal_tau", "grid")


@pytest.mark.parametrize("tau", [TAU32, 0.0625, 0.01, 1.0])
@pytest.mark.parametrize("style", STYLES)
def test_paper_split_against_the_sort_and_exact_arithmetic(style, tau):
    for seed, n in ((1, 1), (2, 7), (3, 64), (4, 300)):
        m2, tr = _m2_case(seed, style, n, tau)
        config = M2POConfig(tau=tau)
        nv = torch.tensor(n)
        cut = reference.solve_trust_region(m2, tr, nv, config)
        oracle = sorted_oracle.solve(m2, tr, nv, config)
        keep, keep_o = _kept(m2, tr, cut), _kept(m2, tr, oracle)
        tr_m2 = m2[tr].tolist()
        what = f"{style} tau={tau} seed={seed} n={n}"
        if not torch.equal(keep, keep_o):
            assert_paper_cuts_agree(tr_m2, tau, int(keep[tr].sum()), int(keep_o[tr].sum()), what + " vs sort")
        else:  # the same mask: the same cut fields
            for name in ("value", "ties_kept", "num_trust_region", "threshold"):
                assert torch.equal(getattr(cut, name), getattr(oracle, name)), (name, what)
            torch.testing.assert_close(cut.m2, oracle.m2, rtol=1e-6, atol=0)
            torch.testing.assert_close(cut.m2_after, oracle.m2_after, rtol=1e-6, atol=0)
        exact = literal.algorithm1_keep(m2.tolist(), tr.tolist(), tr.tolist(), tau)
        if keep.tolist() != exact:
            assert_paper_cuts_agree(tr_m2, tau, int(keep[tr].sum()), sum(e for e, t in zip(exact, tr.tolist()) if t),
                                    what + " vs exact")


@pytest.mark.parametrize("tau", [TAU32, 0.0625, 0.01, 1.0, 1e-13])
@pytest.mark.parametrize("style", STYLES)
def test_official_split_against_the_sort(style, tau):
    for seed, n in ((1, 1), (2, 7), (3, 64), (4, 300)):
        m2, tr = _m2_case(seed, style, n, tau)
        config = M2POConfig(tau=tau, variant="official")
        nv = torch.tensor(n)
        cut = reference.solve_trust_region(m2, tr, nv, config)
        oracle = sorted_oracle.solve(m2, tr, nv, config)
        fields = ("lower", "upper", "threshold", "num_trust_region")
        if not all(torch.equal(getattr(cut, f), getattr(oracle, f)) for f in fields):
            assert official_zone(m2[tr].tolist(), tau), f"{style} tau={tau} seed={seed}: {cut} vs {oracle}"
            continue
        torch.testing.assert_close(cut.m2, oracle.m2, rtol=1e-6, atol=0)
        torch.testing.assert_close(cut.m2_after, oracle.m2_after, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("tau", [0.0, math.inf])
def test_tau_zero_and_infinite(variant, tau):
    m2, tr = _m2_case(5, "spread", 200, 0.04)
    m2[:5] = 0.0
    config = M2POConfig(tau=tau, variant=variant)
    nv = torch.tensor(200)
    cut = reference.solve_trust_region(m2, tr, nv, config)
    oracle = sorted_oracle.solve(m2, tr, nv, config)
    for name in ("value", "ties_kept", "lower", "upper", "threshold", "num_trust_region", "m2"):
        assert torch.equal(getattr(cut, name), getattr(oracle, name)), name
    if variant == "paper":
        keep = _kept(m2, tr, cut)
        assert keep.tolist() == literal.algorithm1_keep(m2.tolist(), tr.tolist(), tr.tolist(), tau)
        # tau = 0 masks every trust-region token with m2 > 0; inf masks nothing
        assert torch.equal(keep, tr & (m2 == 0) if tau == 0 else tr)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_empty_trust_region_and_a_single_token(variant):
    config = M2POConfig(tau=0.04, variant=variant)
    for m2, tr in ((torch.zeros(0), torch.zeros(0, dtype=torch.bool)),
                   (torch.tensor([0.5]), torch.tensor([False])),
                   (torch.tensor([0.5]), torch.tensor([True])),
                   (torch.tensor([TAU32]), torch.tensor([True])),
                   (torch.tensor([0.01]), torch.tensor([True]))):
        nv = torch.tensor(m2.numel())
        cut = reference.solve_trust_region(m2, tr, nv, config)
        oracle = sorted_oracle.solve(m2, tr, nv, config)
        for name in ("value", "ties_kept", "lower", "upper", "threshold", "num_trust_region", "m2", "m2_after"):
            assert torch.equal(getattr(cut, name), getattr(oracle, name)), (name, m2, tr)


def test_ties_at_the_cut_are_kept_in_flat_order():
    # 2 tokens at 0.01 and 6 tied at 0.09 (tau = 0.0625): (0.02 + 0.09 j) / (2 + j) <= 0.0625
    # for j <= 3, so the first 3 tied tokens in flat order are kept, the later 3 masked
    m2 = torch.tensor([0.09, 0.01, 0.09, 0.09, 0.01, 0.09, 0.09, 0.09]).float()
    tr = torch.ones(8, dtype=torch.bool)
    cut = reference.solve_trust_region(m2, tr, torch.tensor(8), M2POConfig(tau=0.0625))
    assert int(cut.ties_kept) == 3 and float(cut.threshold) == f32(0.09)
    assert _kept(m2, tr, cut).tolist() == [True, True, True, True, True, False, False, False]
    assert _kept(m2, tr, cut).tolist() == literal.algorithm1_keep(m2.tolist(), [True] * 8, [True] * 8, 0.0625)


# --------------------------------------------------------------------------------------------
# The whole call, every input dtype


def _batch(seed: int, dtype, style: str, n: int = 400):
    """(lp, olp, adv, mask) of a (4, n/4) batch; 'grid' puts m2 on a coarse grid with ties at
    tau = 0.0625 (delta = +-0.25 is exact in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    shape = (4, n // 4)
    olp = -torch.randint(0, 64, shape, generator=g).to(torch.float64) / 16
    if style == "grid":
        delta = torch.randint(-3, 4, shape, generator=g).to(torch.float64) / 8  # m2 in {0, 1/64, 1/16, 9/64}
    else:
        delta = torch.randn(shape, generator=g, dtype=torch.float64) * 0.2
        delta = torch.where(torch.rand(shape, generator=g) < 0.1, delta * 6, delta)
    adv = torch.randn(shape[0], generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) < 0.85
    return ((olp + delta).to(dtype), olp.to(dtype), adv.to(dtype), mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", ["grid", "spread"])
@pytest.mark.parametrize("tau", [0.0625, 0.04, 0.0, math.inf])
def test_paper_masks_of_every_dtype(dtype, style, tau):
    for seed in range(3):
        lp, olp, adv, mask = _batch(seed, dtype, style)
        keep, _ = m2po_mask(lp, olp, adv, mask, tau=tau, backend="torch")
        expected, tr = literal.paper_keep(lp, olp, adv.repeat_interleave(lp.shape[1]), mask, tau)
        if keep.reshape(-1).tolist() != expected:
            _, m2 = literal.m2_float32(lp.reshape(-1), olp.reshape(-1))
            tr_m2 = [v for v, t in zip(m2.tolist(), tr) if t]
            kept = [k for k, t in zip(keep.reshape(-1).tolist(), tr) if t]
            assert_paper_cuts_agree(tr_m2, tau, sum(kept), sum(e for e, t in zip(expected, tr) if t),
                                    f"{dtype} {style} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", ["grid", "spread"])
@pytest.mark.parametrize("tau", [0.0625, 0.04, 0.0])
def test_official_masks_of_every_dtype_equal_the_sort(dtype, style, tau):
    for seed in range(3):
        lp, olp, adv, mask = _batch(seed, dtype, style)
        config = M2POConfig(tau=tau, variant="official")
        keep, metrics = m2po_mask(lp, olp, adv, mask, tau=tau, variant="official", backend="torch")
        tok = prepare(lp, olp, adv, mask, config)
        delta = reference.log_ratio(tok)
        m2 = delta * delta
        tr = reference.trust_region(tok, delta, config)
        oracle = sorted_oracle.solve(m2, tr, tok.valid.sum(), config)
        keep_o, _, _ = reference.per_token(tok, oracle, delta, m2, tr)
        if not torch.equal(keep.reshape(-1), keep_o):
            assert official_zone(m2[tr].tolist(), tau), f"{dtype} {style} seed={seed}"
            continue
        assert torch.equal(metrics["clip_low"], oracle.lower) and torch.equal(metrics["clip_high"], oracle.upper)


# --------------------------------------------------------------------------------------------
# The host paths against the device path, and without numpy


@pytest.mark.parametrize("style", STYLES)
def test_host_keep_equals_the_device_keep(style):
    m2, tr = _m2_case(11, style, 300, TAU32)
    valid = tr | (torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.5)
    for cut in (sorted_oracle.solve(m2, tr, valid.sum(), M2POConfig(tau=TAU32)),
                sorted_oracle.solve(m2, tr, valid.sum(), M2POConfig(tau=TAU32)).for_part(torch.tensor(2))):
        host = reference.keep_paper(m2, tr, valid, cut)
        with device_path():
            dev = reference.keep_paper(m2, tr, valid, cut)
        assert torch.equal(host, dev)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("style", ["spread", "ties_at_tau", "grid"])
def test_the_solver_without_numpy_gives_the_same_cut(monkeypatch, variant, style):
    m2, tr = _m2_case(12, style, 300, TAU32)
    config = M2POConfig(tau=TAU32, variant=variant)
    with_np = reference.solve_trust_region(m2, tr, torch.tensor(300), config)
    monkeypatch.setattr(reference, "np", None)
    without = reference.solve_trust_region(m2, tr, torch.tensor(300), config)
    for name in ("value", "ties_kept", "lower", "upper", "threshold", "num_trust_region", "m2", "m2_after"):
        assert torch.equal(getattr(with_np, name), getattr(without, name)), name
    assert torch.equal(reference.keep_paper(m2, tr, tr, with_np), reference.keep_paper(m2, tr, tr, without))


def test_cpu_call_reads_values_only_where_free():
    """The CPU path reads values on the host (free there); device_path() takes the path a CUDA
    tensor takes, which reads none (any read of a meta tensor raises)."""
    lp, olp, adv, mask = _batch(0, torch.float32, "spread")
    keep_host, m_host = m2po_mask(lp, olp, adv, mask, backend="torch", validate=False)
    with device_path():
        keep_dev, m_dev = m2po_mask(lp, olp, adv, mask, backend="torch", validate=False)
    assert torch.equal(keep_host, keep_dev)
    assert torch.equal(m_host["cut"], m_dev["cut"])
    np.testing.assert_allclose(float(m_host["m2"]), float(m_dev["m2"]), rtol=1e-6)
