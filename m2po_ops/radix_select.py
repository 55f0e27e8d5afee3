"""The mergeable form of the M2PO cut: the threshold split's below part plus a two-level radix
histogram of the tail.

Why: the cut is a function of every token of the optimizer step, but it only needs, per value
range, how many trust-region tokens fall there and what they sum to. Those counts and sums add
across micro-batches and all-reduce across ranks in O(buckets), whatever the token count.

The key of a token is the int32 bit pattern of its float32 m2 when it is in the trust region
(paper: T; official: the authors' "harmful" tokens), and -1 otherwise. Non-negative floats order
like their bit patterns, so buckets of the bit pattern are value ranges.

The threshold split (m2po_ops/split.py): keys at or below ``threshold_bits`` can never be cut;
they enter as a count, an exact limb sum and (official) their largest key. Only tail keys go to
the histograms:
Level 1: 32,768 buckets, ``key >> 16`` (the 8 exponent bits and the top 7 mantissa bits).
Level 2: 65,536 buckets, ``key & 0xFFFF``, inside one or two chosen level-1 buckets; a level-2
bucket holds a single value.
Each bucket stores (count, sum of significands) as int64. All values in a level-1 bucket share
an exponent, so the significand sum times 2**(exponent - 150) is the bucket's exact sum, and it
converts to float64 exactly while a bucket holds fewer than 2**29 tokens. Integer sums make
every part bit-for-bit deterministic under atomics in any order and under any partition of
the tokens (micro-batches, ranks).

The mergeable sums are one int64 vector (``SUMS_LEN``): the level-1 histogram, the below count
and the limbs, so that one all-reduce(SUM) merges them; the below maximum merges by MAX.

The select steps turn them into a ``Cut``. The PyTorch versions here are the executable
description; kernels/select.py implements the same steps in parallel Triton programs: level-1
buckets are walked in chunks of SELECT_CHUNK (each chunk's float64 total is its in-chunk
cumsum's last element, added to the prefix in chunk order), then the boundary chunk is scanned.
Level-2 prefix sums are exact. The decisions agree with exact arithmetic except inside the
floating-point zone of split.ZONE_EPS.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import M2POConfig
from .constants import (B0, B1, BELOW_COUNT, BELOW_LIMBS, F32_INF_BITS, F32_MAX_BITS, K_BASE, K_END,
                        KEEP_ALL_BITS, L1_BUCKETS, L1_SHIFT, L2_BUCKETS, L2_SLOTS, MAX_LIMBS, N_TR,
                        OFFICIAL_EPS, REFINE, S_BASE, S_END, SEARCH_STEPS, SELECT_CHUNK, SUMS_LEN,
                        TAIL_COUNT, TAIL_INF, TAIL_LIMBS, TOTAL)
from .cut import Cut, make_cut
from .rules import _at, official_constrained, official_cut, official_test_value, within_budget
from .split import limb_count, limb_sums, limbs_to_float, threshold_bits


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


def _f64_bits(x: Tensor) -> Tensor:
    return x.double().reshape(1).view(torch.int64).reshape(())


def _bits_f64(x: Tensor) -> Tensor:
    return x.reshape(1).view(torch.float64).reshape(())


def summarize(key: Tensor, config: M2POConfig) -> Tensor:
    """int64 [SUMS_LEN]: the tail's level-1 histogram, the below part's count and limbs."""
    thr = threshold_bits(config.rule, config.tau)
    k = key.to(torch.int64)
    tail = k > thr
    below = (k >= 0) & ~tail
    bucket = torch.where(tail, k >> L1_SHIFT, 0)
    sums = torch.zeros(SUMS_LEN, dtype=torch.int64, device=key.device)
    hist = sums[: 2 * L1_BUCKETS].view(2, L1_BUCKETS)
    hist[0].scatter_add_(0, bucket, tail.to(torch.int64))
    hist[1].scatter_add_(0, bucket, torch.where(tail, significand(k), 0))
    sums[BELOW_COUNT] = below.sum()
    nlimb = limb_count(thr)
    sums[BELOW_LIMBS: BELOW_LIMBS + nlimb] = limb_sums(key, below, nlimb)
    finite = tail & (k < F32_INF_BITS)
    sums[TAIL_COUNT] = tail.sum()
    sums[TAIL_INF] = (tail & ~finite).sum()
    sums[TAIL_LIMBS:] = limb_sums(key, finite, MAX_LIMBS)
    return sums


def totals(sums: Tensor, config: M2POConfig):
    """(n, the trust region's count; its float64 sum from the exact limbs; the below part's
    count; its float64 sum), as the select kernels compute them."""
    nlimb = limb_count(threshold_bits(config.rule, config.tau))
    n_below = sums[BELOW_COUNT]
    s_below = limbs_to_float(sums[BELOW_LIMBS: BELOW_LIMBS + nlimb]).to(sums.device)
    total = limbs_to_float(sums[BELOW_LIMBS: BELOW_LIMBS + MAX_LIMBS] + sums[TAIL_LIMBS: TAIL_LIMBS + MAX_LIMBS])
    total = torch.where(sums[TAIL_INF] > 0, float("inf"), total.to(sums.device))
    return n_below + sums[TAIL_COUNT], total, n_below, s_below


def below_max(key: Tensor, config: M2POConfig) -> Tensor:
    """int64 0-d: the largest key of the below part (0 when it is empty)."""
    thr = threshold_bits(config.rule, config.tau)
    k = key.to(torch.int64)
    return torch.where(k <= thr, k, 0).max().clamp_min(0) if k.numel() else torch.zeros((), dtype=torch.int64,
                                                                                          device=key.device)


def level1(key: Tensor, config: M2POConfig) -> Tensor:
    """int64 [2, L1_BUCKETS]: per-bucket (count, significand sum) of the tail keys."""
    return summarize(key, config)[: 2 * L1_BUCKETS].view(2, L1_BUCKETS)


def level2(key: Tensor, state: Tensor, config: M2POConfig) -> Tensor:
    """int64 [L2_SLOTS, 2, L2_BUCKETS]: level-2 histograms of the tail keys in buckets
    state[B1] and state[B0]."""
    thr = threshold_bits(config.rule, config.tau)
    hist = torch.zeros(L2_SLOTS, 2, L2_BUCKETS, dtype=torch.int64, device=key.device)
    k = key.to(torch.int64)
    inside = (k > thr) & (state[REFINE] != 0)
    bucket = k >> L1_SHIFT
    low = k & (L2_BUCKETS - 1)
    sig = significand(k)
    for slot, which in enumerate((B1, B0)):
        sel = inside & (bucket == state[which])
        hist[slot, 0].scatter_add_(0, torch.where(sel, low, 0), sel.to(torch.int64))
        hist[slot, 1].scatter_add_(0, torch.where(sel, low, 0), torch.where(sel, sig, 0))
    return hist


def _first(flags: Tensor) -> Tensor:
    """Index of the first True (len if none)."""
    idx = torch.arange(flags.numel(), device=flags.device, dtype=torch.int64)
    return torch.where(flags, idx, flags.numel()).min()


def _last(flags: Tensor) -> Tensor:
    """Index of the last True (-1 if none)."""
    idx = torch.arange(flags.numel(), device=flags.device, dtype=torch.int64)
    return torch.where(flags, idx, -1).max()


def _seq_prefix(base: Tensor, x: Tensor) -> Tensor:
    """base + x[0], (base + x[0]) + x[1], ...: the left-to-right float64 sums the kernels run."""
    return torch.cumsum(torch.cat([base.reshape(1), x]), 0)[1:]


def _official_hit(v: Tensor, k_end: Tensor, s_end: Tensor, n: Tensor, config: M2POConfig) -> Tensor:
    return official_test_value(v, k_end - 1, s_end, n) >= config.tau * n.double() - OFFICIAL_EPS


def _bucket_hi(bucket: Tensor) -> Tensor:
    return bits_to_float(((bucket + 1) << L1_SHIFT).clamp(max=F32_MAX_BITS))  # <= FLT_MAX: no inf * 0


def select1(sums: Tensor, config: M2POConfig) -> Tensor:
    """Pick the level-1 bucket holding the cut. Returns the select state (int64 [STATE_LEN])."""
    device = sums.device
    hist1 = sums[: 2 * L1_BUCKETS].view(2, L1_BUCKETS)
    n, total, n_below, s_below = totals(sums, config)
    count = hist1[0]
    buckets = torch.arange(L1_BUCKETS, device=device, dtype=torch.int64)
    scaled = torch.where(count > 0, hist1[1].double() * bucket_scale(buckets), 0.0)
    programs = L1_BUCKETS // SELECT_CHUNK
    c_cnt = count.view(programs, SELECT_CHUNK).sum(1)
    cum = torch.cumsum(scaled.view(programs, SELECT_CHUNK), 1)
    c_last = torch.where(count.view(programs, SELECT_CHUNK) > 0, buckets.view(programs, SELECT_CHUNK), -1).max(1).values
    k_end = n_below + torch.cumsum(c_cnt, 0)
    s_end = _seq_prefix(s_below, cum[:, -1])
    nf = n.double()
    if config.rule == "paper":
        hit = (c_cnt > 0) & ~within_budget(s_end, k_end, config)
        refine = ~within_budget(total, n, config)
    else:
        target = config.tau * nf
        hit = (c_cnt > 0) & _official_hit(_bucket_hi(c_last), k_end, s_end, n, config)
        refine = official_constrained(n, total, config)
    c_star = _first(hit)
    found = c_star < programs
    c_star = torch.where(found, c_star, 0)
    chunk_ids = torch.arange(programs, device=device)
    k_before = torch.where(c_star == 0, n_below, _at(k_end, (c_star - 1).clamp_min(0)))
    s_before = torch.where(c_star == 0, s_below, _at(s_end, (c_star - 1).clamp_min(0)))
    last_before = torch.where((chunk_ids < c_star) & (c_cnt > 0), c_last, -1).max()
    idx = c_star * SELECT_CHUNK + torch.arange(SELECT_CHUNK, device=device)
    cnt = count.index_select(0, idx)
    s_in = s_before + torch.cumsum(scaled.index_select(0, idx), 0)
    k_in = k_before + torch.cumsum(cnt, 0)
    if config.rule == "paper":
        pred = (cnt > 0) & ~within_budget(s_in, k_in, config)
    else:
        pred = (cnt > 0) & _official_hit(_bucket_hi(idx), k_in, s_in, n, config)
    j = _first(pred)
    j = torch.where(j < SELECT_CHUNK, j, _last(cnt > 0))  # (the chunk's end failed: same numbers)
    j = j.clamp(0, SELECT_CHUNK - 1)
    b1 = torch.where(found, _at(idx, j), 0)
    j0 = _last((cnt > 0) & (idx < b1))
    b0 = torch.where(j0 >= 0, _at(idx, j0.clamp_min(0)), last_before)
    k_base = _at(k_in - cnt, j)
    s_base = torch.where(j == 0, s_before, _at(s_in, (j - 1).clamp_min(0)))
    state = torch.stack([
        (refine & found).to(torch.int64), b1, b0, k_base, _f64_bits(s_base), _at(k_in, j), _f64_bits(_at(s_in, j)),
        n, _f64_bits(total), torch.zeros_like(n)])
    return state


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


def select2(hist2: Tensor, state: Tensor, below_max_key: Tensor, config: M2POConfig, num_valid: Tensor) -> Cut:
    """Solve the cut from the select state and the level-2 histograms of its buckets."""
    device = hist2.device
    refine = state[REFINE] != 0
    b1, b0 = state[B1], state[B0]
    k_base, s_base = state[K_BASE], _bits_f64(state[S_BASE])
    k_end_b1, s_end_b1 = state[K_END], _bits_f64(state[S_END])
    n, total = state[N_TR], _bits_f64(state[TOTAL])
    nf = n.double()
    scale = bucket_scale(b1)
    count2, sig2 = hist2[0, 0], hist2[0, 1]
    p_end = torch.cumsum(sig2, 0)
    p_excl = p_end - sig2
    k2_excl = torch.cumsum(count2, 0) - count2
    low_ids = torch.arange(L2_BUCKETS, device=device, dtype=torch.int64)
    values = bits_to_float((b1 << L1_SHIFT) | low_ids)
    nonempty2 = count2 > 0
    m2_before = (total / nf.clamp_min(1)).float()

    if config.rule == "paper":
        k_end2 = k_base + k2_excl + count2
        s_end2 = s_base + _scaled(p_end, scale)
        fails = nonempty2 & ~within_budget(s_end2, k_end2, config)
        found = fails.any()
        j1 = _first(fails).clamp(max=L2_BUCKETS - 1)
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
        keep_count = torch.where(found, keep_count, k_end_b1)
        kept_sum = torch.where(found, kept_sum, s_end_b1)
        value = torch.where(refine, bits.to(torch.int32), torch.full((), KEEP_ALL_BITS, dtype=torch.int32, device=device))
        m2_after = torch.where(refine, kept_sum / keep_count.double().clamp_min(1), total / nf.clamp_min(1))
        return make_cut(
            config,
            device,
            value=value,
            ties_kept=torch.where(refine, t, torch.zeros_like(t)),
            num_valid=num_valid,
            num_trust_region=n,
            m2=m2_before,
            m2_after=m2_after.float(),
            threshold=torch.where(refine, bits_to_float(bits), torch.full((), float("inf"), dtype=torch.float64, device=device)).float(),
        )

    # official: first k with (v_k - e)(n - k - 1) + c_k >= tau*n - e
    e = OFFICIAL_EPS
    target = config.tau * nf
    constrained = refine
    tiny = target <= e
    kj_all = k_base + k2_excl
    hit = nonempty2 & _official_hit(values, kj_all + count2, s_base + _scaled(p_end, scale), n, config)
    found = hit.any()
    j1 = _first(hit).clamp(max=L2_BUCKETS - 1)
    sig_v = significand((b1 << L1_SHIFT) | j1)
    kj, pj, m, vj = _at(kj_all, j1), _at(p_excl, j1), _at(count2, j1), _at(values, j1)

    def f_at(t):
        return official_test_value(vj, kj + t, s_base + _scaled(pj + (t + 1) * sig_v, scale), n)

    # first t with a hit = (largest t without a hit) + 1, or 0 when the run's first token hits
    first_hits = f_at(torch.zeros_like(m)) >= target - e
    t_miss = _bsearch(lambda t: f_at(t) < target - e, torch.zeros_like(m), m)
    t = torch.where(first_hits, torch.zeros_like(m), t_miss + 1)
    # predecessor of the run: earlier in b1, else the top of the tail bucket b0, else the largest
    # below-threshold value
    j_prev = _last(nonempty2 & (low_ids < j1))
    top_b0 = _last(hist2[1, 0] > 0)
    pred_in_b0 = bits_to_float((b0.clamp_min(0) << L1_SHIFT) | top_b0.clamp_min(0))
    pred_value = torch.where(j_prev >= 0, _at(values, j_prev.clamp_min(0)),
                             torch.where(b0 >= 0, pred_in_b0, bits_to_float(below_max_key)))
    k_star = torch.where(found, kj + t, k_end_b1)
    k_star = torch.where(tiny, torch.zeros_like(k_star), k_star)  # tiny budget: the authors' tau_c = 0 (k = 0)
    v_prev = torch.where(found, torch.where(t > 0, vj, pred_value), _at(values, _last(nonempty2).clamp_min(0)))
    c_prev = torch.where(found, s_base + _scaled(pj + t * sig_v, scale), s_end_b1)
    constrained = constrained & (k_star < n)  # no hit at all (an inf m2 makes the test NaN)
    return official_cut(v_prev, c_prev, k_star, n, total, constrained, tiny, num_valid, config)


def solve_keys(key: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """The whole histogram solve on one process's keys (no communication)."""
    sums = summarize(key, config)
    state = select1(sums, config)
    return select2(level2(key, state, config), state, below_max(key, config), config, num_valid)
