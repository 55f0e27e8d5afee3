"""The mergeable form of the M2PO cut: a two-level radix histogram over the bits of m2.

Why: the cut is a function of every token of the optimizer step, but it only needs, per value
range, how many trust-region tokens fall there and what they sum to. Those counts and sums add
across micro-batches and all-reduce across ranks in O(buckets), whatever the token count.

The key of a token is the int32 bit pattern of its float32 m2 when it is in the trust region
(paper: T; official: the authors' "harmful" tokens), and -1 otherwise. Non-negative floats order
like their bit patterns, so buckets of the bit pattern are value ranges.

Level 1: 32,768 buckets, ``key >> 16`` (the 8 exponent bits and the top 7 mantissa bits).
Level 2: 65,536 buckets, ``key & 0xFFFF``, inside one or two chosen level-1 buckets; a level-2
bucket holds a single value.
Each bucket stores (count, sum of significands) as int64. All values in a level-1 bucket share
an exponent, so the significand sum times 2**(exponent - 150) is the bucket's exact sum, and it
converts to float64 exactly while a bucket holds fewer than 2**29 tokens. Integer sums make the
histogram bit-for-bit deterministic under atomics in any order.

The select steps turn histograms into a ``Cut``. The PyTorch versions here are the executable
description; kernels/select.py implements the same steps as single-program Triton kernels and
must produce the same bits. Float64 prefix sums over buckets differ from the sort-based
reference's prefix sums only by rounding, so the two agree except where S_k lies within a few
float64 ulps of tau * k (where the spec allows either answer); sums of values on a coarse grid
are exact in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import OFFICIAL_EPS, M2POConfig
from .cut import KEEP_ALL_BITS, Cut, make_cut
from .reference import _at, official_cut, official_test_value, within_budget

L1_SHIFT = 16
L1_BUCKETS = 1 << 15
L2_BUCKETS = 1 << 16
L2_SLOTS = 2  # level-2 histograms of the boundary bucket (slot 0) and the bucket before it (slot 1)
SEARCH_STEPS = 32  # binary-search steps inside one value's run of ties (counts < 2**31)

# state1 layout (int64[4]): refine flag, boundary bucket b1, previous non-empty bucket b0 (-1 if none)
REFINE, B1, B0 = 0, 1, 2


def significand(key: Tensor) -> Tensor:
    """The integer significand of a non-negative float32 bit pattern (implicit bit included)."""
    key = key.to(torch.int64)
    exponent = key >> 23
    return (key & 0x7FFFFF) | torch.where(exponent > 0, 1 << 23, 0)


def bucket_scale(bucket: Tensor) -> Tensor:
    """2**(exponent - 150) as float64 for level-1 bucket ids (inf for the inf/NaN exponent)."""
    exponent = (bucket.to(torch.int64) >> 7).clamp(min=1)
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent - 150)
    return torch.where(exponent >= 255, torch.full_like(scale, float("inf")), scale)


def bits_to_float(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32).double()


def level1(key: Tensor) -> Tensor:
    """int64 [2, L1_BUCKETS]: per-bucket (count, significand sum) of the keys >= 0."""
    inside = key >= 0
    bucket = torch.where(inside, key.to(torch.int64) >> L1_SHIFT, 0)
    hist = torch.zeros(2, L1_BUCKETS, dtype=torch.int64, device=key.device)
    hist[0].scatter_add_(0, bucket, inside.to(torch.int64))
    hist[1].scatter_add_(0, bucket, torch.where(inside, significand(key), 0))
    return hist


def level2(key: Tensor, state1: Tensor) -> Tensor:
    """int64 [L2_SLOTS, 2, L2_BUCKETS]: level-2 histograms of buckets state1[B1] and state1[B0]."""
    hist = torch.zeros(L2_SLOTS, 2, L2_BUCKETS, dtype=torch.int64, device=key.device)
    inside = (key >= 0) & (state1[REFINE] != 0)
    bucket = key.to(torch.int64) >> L1_SHIFT
    low = key.to(torch.int64) & (L2_BUCKETS - 1)
    sig = significand(key)
    for slot, which in enumerate((B1, B0)):
        sel = inside & (bucket == state1[which])
        hist[slot, 0].scatter_add_(0, low, sel.to(torch.int64))
        hist[slot, 1].scatter_add_(0, low, torch.where(sel, sig, 0))
    return hist


@dataclass(frozen=True)
class Prefix:
    """Level-1 prefix sums shared by both select steps."""

    count: Tensor  # int64 [L1]: tokens per bucket
    k_excl: Tensor  # int64 [L1]: tokens in earlier buckets
    s_excl: Tensor  # float64 [L1]: sum of earlier buckets
    k_end: Tensor
    s_end: Tensor
    n: Tensor  # int64 0-d
    total: Tensor  # float64 0-d


def prefix(hist1: Tensor) -> Prefix:
    count = hist1[0]
    buckets = torch.arange(L1_BUCKETS, device=hist1.device)
    sums = torch.where(count > 0, hist1[1].double() * bucket_scale(buckets), 0.0)
    k_end = torch.cumsum(count, 0)
    s_end = torch.cumsum(sums, 0)
    return Prefix(count, k_end - count, _shift(s_end), k_end, s_end, k_end[-1], s_end[-1])


def _shift(x: Tensor) -> Tensor:
    return torch.cat([x.new_zeros(1), x[:-1]])


def _first(flags: Tensor) -> Tensor:
    """Index of the first True (0 if none)."""
    return torch.argmax(flags.to(torch.int8)).to(torch.int64)


def _last(flags: Tensor) -> Tensor:
    """Index of the last True (-1 if none)."""
    idx = torch.arange(flags.numel(), device=flags.device, dtype=torch.int64)
    return torch.where(flags, idx, -1).max()


def select1(hist1: Tensor, config: M2POConfig) -> Tensor:
    """Pick the level-1 bucket holding the cut. Returns state1 (int64[4])."""
    p = prefix(hist1)
    nonempty = p.count > 0
    if config.variant == "paper":
        refine = ~within_budget(p.total, p.n, config)
        b1 = _first(nonempty & ~within_budget(p.s_end, p.k_end, config))
    else:
        nf = p.n.double()
        target = config.tau * nf
        refine = (p.n > 0) & (p.total / nf.clamp_min(1) > config.tau + OFFICIAL_EPS) & (target < p.total - OFFICIAL_EPS)
        refine = refine & ~(target <= OFFICIAL_EPS)
        buckets = torch.arange(L1_BUCKETS, device=hist1.device, dtype=torch.int64)
        hi = bits_to_float(((buckets + 1) << L1_SHIFT).clamp(max=0x7F7FFFFF))  # <= FLT_MAX: no inf * 0
        upper = official_test_value(hi, p.k_end - 1, p.s_end, p.n)
        b1 = _first(nonempty & (upper >= target - OFFICIAL_EPS))
    idx = torch.arange(L1_BUCKETS, device=hist1.device, dtype=torch.int64)
    b0 = _last(nonempty & (idx < b1))
    return torch.stack([refine.to(torch.int64), b1, b0, torch.zeros_like(b1)])


def _scaled(sig_sum: Tensor, scale: Tensor) -> Tensor:
    """An exact level-2 significand sum times its bucket's scale (0 stays 0 in the inf bucket)."""
    return torch.where(sig_sum == 0, 0.0, sig_sum.double() * scale)


def _bsearch(pred, lo: Tensor, hi: Tensor) -> Tensor:
    """Largest t in [lo, hi) with pred(t), given pred(lo) and a monotone pred (True then False)."""
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        ok = pred(mid) & (hi - lo > 1)
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok | (hi - lo <= 1), hi, mid)
    return lo


def select2(hist1: Tensor, hist2: Tensor, state1: Tensor, config: M2POConfig, num_valid: Tensor) -> Cut:
    """Solve the cut from the level-1 histogram and the level-2 histograms of state1's buckets."""
    p = prefix(hist1)
    device = hist1.device
    refine = state1[REFINE] != 0
    b1 = state1[B1]
    scale = bucket_scale(b1)
    count2, sig2 = hist2[0, 0], hist2[0, 1]
    p_end = torch.cumsum(sig2, 0)
    p_excl = p_end - sig2
    k2_excl = torch.cumsum(count2, 0) - count2
    k_base, s_base = _at(p.k_excl, b1), _at(p.s_excl, b1)
    low_ids = torch.arange(L2_BUCKETS, device=device, dtype=torch.int64)
    values = bits_to_float((b1 << L1_SHIFT) | low_ids)
    nonempty2 = count2 > 0
    m2_before = (p.total / p.n.double().clamp_min(1)).float()

    if config.variant == "paper":
        k_end2 = k_base + k2_excl + count2
        s_end2 = s_base + _scaled(p_end, scale)
        fails = nonempty2 & ~within_budget(s_end2, k_end2, config)
        found = fails.any()
        j1 = _first(fails)
        bits = (b1 << L1_SHIFT) | j1
        sig_v = significand(bits)
        kj, pj, m = k_base + _at(k2_excl, j1), _at(p_excl, j1), _at(count2, j1)

        def s_at(t):
            return s_base + _scaled(pj + t * sig_v, scale)

        t = _bsearch(lambda t: within_budget(s_at(t), kj + t, config), torch.zeros_like(m), m)
        keep_count = kj + t
        kept_sum = s_at(t)
        # level 1 said bucket b1 fails at its end but no value inside it does (the two prefix sums
        # differ in the last ulp): keep all of b1, cut at the first bits of the next bucket
        bits = torch.where(found, bits, (b1 + 1) << L1_SHIFT)
        t = torch.where(found, t, torch.zeros_like(t))
        keep_count = torch.where(found, keep_count, _at(p.k_end, b1))
        kept_sum = torch.where(found, kept_sum, _at(p.s_end, b1))
        value = torch.where(refine, bits.to(torch.int32), torch.full((), KEEP_ALL_BITS, dtype=torch.int32, device=device))
        m2_after = torch.where(refine, kept_sum / keep_count.double().clamp_min(1), p.total / p.n.double().clamp_min(1))
        return make_cut(
            config,
            device,
            value=value,
            ties_kept=torch.where(refine, t, torch.zeros_like(t)),
            num_valid=num_valid,
            num_trust_region=p.n,
            m2=m2_before,
            m2_after=m2_after.float(),
            threshold=torch.where(refine, bits_to_float(bits), torch.full((), float("inf"), dtype=torch.float64, device=device)).float(),
        )

    # official: first k with (v_k - e)(n - k - 1) + c_k >= tau*n - e
    e = OFFICIAL_EPS
    nf = p.n.double()
    target = config.tau * nf
    constrained = (p.n > 0) & (p.total / nf.clamp_min(1) > config.tau + e) & (target < p.total - e)
    tiny = target <= e
    kj_all = k_base + k2_excl
    f_last = official_test_value(values, kj_all + count2 - 1, s_base + _scaled(p_end, scale), p.n)
    hit = nonempty2 & (f_last >= target - e)
    found = hit.any()
    j1 = _first(hit)
    sig_v = significand((b1 << L1_SHIFT) | j1)
    kj, pj, m, vj = _at(kj_all, j1), _at(p_excl, j1), _at(count2, j1), _at(values, j1)

    def f_at(t):
        return official_test_value(vj, kj + t, s_base + _scaled(pj + (t + 1) * sig_v, scale), p.n)

    # first t with a hit = (largest t without a hit) + 1, or 0 when the run's first token hits
    first_hits = f_at(torch.zeros_like(m)) >= target - e
    t_miss = _bsearch(lambda t: f_at(t) < target - e, torch.zeros_like(m), m)
    t = torch.where(first_hits, torch.zeros_like(m), t_miss + 1)
    # predecessor of the run (the largest value below it): earlier in b1, else the top of b0
    j_prev = _last(nonempty2 & (low_ids < j1))
    b0 = state1[B0]
    top_b0 = _last(hist2[1, 0] > 0)
    pred_in_b0 = bits_to_float((b0.clamp_min(0) << L1_SHIFT) | top_b0.clamp_min(0))
    pred_value = torch.where(j_prev >= 0, _at(values, j_prev.clamp_min(0)), pred_in_b0)
    k_star = torch.where(found, kj + t, _at(p.k_end, b1))
    k_star = torch.where(tiny, torch.zeros_like(k_star), k_star)  # tiny budget: the authors' tau_c = 0 (k = 0)
    v_prev = torch.where(found, torch.where(t > 0, vj, pred_value), _at(values, _last(nonempty2).clamp_min(0)))
    c_prev = torch.where(found, s_base + _scaled(pj + t * sig_v, scale), _at(p.s_end, b1))
    constrained = constrained & (k_star < p.n)  # no hit at all (an inf m2 makes the test NaN)
    return official_cut(v_prev, c_prev, k_star, p.n, p.total, constrained, tiny, num_valid, config)


def solve_keys(key: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """The whole histogram solve on one process's keys (no communication)."""
    hist1 = level1(key)
    state1 = select1(hist1, config)
    return select2(hist1, level2(key, state1), state1, config, num_valid)
