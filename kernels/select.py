"""Single-program kernels that turn the histograms into the cut, on the device.

They implement, step for step, m2po_ops/histogram.py's select1 / select2 (the PyTorch
description of the algorithm; read it first). Level-1 prefix sums are float64 and computed by
chunked scans in a fixed order, so select1 and select2 see the same bits; level-2 prefix sums
are exact int64. Inside a run of tied values the boundary is found by a 32-step binary search.
No full sort, no host round-trip: only O(buckets) work in one program.
"""

import triton
import triton.language as tl

from .common import L1_SHIFT, as_f64, bits_to_f64, bucket_scale, exp_f64

SEARCH_STEPS = tl.constexpr(32)


@triton.jit
def _cond_paper(s, k, tau_hi, tau_lo, TAU_INF: tl.constexpr):
    """S_k <= tau * k as (S - k*tau_hi) <= k*tau_lo in float64."""
    kf = k.to(tl.float64)
    if TAU_INF:
        return s == s
    else:
        return (s - kf * tau_hi) <= kf * tau_lo


@triton.jit
def _f_official(v, k, c, nf, eps):
    """The authors' test value (v_k - 1e-12) * (n - k - 1) + c_k in float64."""
    return (v - eps) * (nf - k.to(tl.float64) - 1.0) + c


@triton.jit
def _level1_chunk(hist1_ptr, c, k_carry, s_carry, NB1: tl.constexpr, CHUNK: tl.constexpr):
    """Counts, inclusive prefix counts / sums of one chunk of level-1 buckets, and new carries."""
    idx = c + tl.arange(0, CHUNK)
    cnt = tl.load(hist1_ptr + idx)
    sig = tl.load(hist1_ptr + NB1 + idx)
    # (the scale of an empty bucket is zeroed first: 0 * inf would be NaN)
    sums = sig.to(tl.float64) * tl.where(cnt > 0, bucket_scale(idx), 0.0)
    k_end = k_carry + tl.cumsum(cnt, 0)
    s_end = s_carry + tl.cumsum(sums, 0)
    last = tl.arange(0, CHUNK) == CHUNK - 1
    return idx, cnt, k_end, s_end, tl.sum(tl.where(last, k_end, 0)), tl.sum(tl.where(last, s_end, 0.0))


@triton.jit
def _total_count(hist1_ptr, NB1: tl.constexpr, CHUNK: tl.constexpr):
    n = tl.zeros((), tl.int64)
    for c in range(0, NB1, CHUNK):
        n += tl.sum(tl.load(hist1_ptr + c + tl.arange(0, CHUNK)))
    return n


@triton.jit(do_not_specialize=["tau_hi_bits", "tau_lo_bits", "tau_bits", "tau_eps_bits", "eps_bits"],
            do_not_specialize_on_alignment=["state_ptr"])
def select1_kernel(
    hist1_ptr, state_ptr, tau_hi_bits: tl.int64, tau_lo_bits: tl.int64, tau_bits: tl.int64, tau_eps_bits: tl.int64,
    eps_bits: tl.int64,
    OFFICIAL: tl.constexpr, TAU_INF: tl.constexpr, NB1: tl.constexpr, CHUNK: tl.constexpr,
):
    tau_hi = as_f64(tau_hi_bits)
    tau_lo = as_f64(tau_lo_bits)
    tau = as_f64(tau_bits)
    eps = as_f64(eps_bits)
    n = _total_count(hist1_ptr, NB1, CHUNK)
    nf = n.to(tl.float64)
    target = tau * nf
    k_carry = tl.zeros((), tl.int64)
    s_carry = tl.zeros((), tl.float64)
    b1 = tl.full((), NB1, tl.int64)
    for c in range(0, NB1, CHUNK):
        idx, cnt, k_end, s_end, k_carry, s_carry = _level1_chunk(hist1_ptr, c, k_carry, s_carry, NB1, CHUNK)
        if OFFICIAL:
            hi = bits_to_f64(tl.minimum((idx + 1).to(tl.int64) << L1_SHIFT, 0x7F7FFFFF))  # <= FLT_MAX: no inf * 0
            pred = (cnt > 0) & (_f_official(hi, k_end - 1, s_end, nf, eps) >= target - eps)
        else:
            pred = (cnt > 0) & ~_cond_paper(s_end, k_end, tau_hi, tau_lo, TAU_INF)
        b1 = tl.minimum(b1, tl.min(tl.where(pred, idx, NB1)).to(tl.int64))
    total = s_carry
    if OFFICIAL:
        refine = (n > 0) & (total / tl.maximum(nf, 1.0) > as_f64(tau_eps_bits)) & (target < total - eps)
        refine = refine & (target > eps)
    else:
        refine = ~_cond_paper(total, n, tau_hi, tau_lo, TAU_INF)
    b1 = tl.where(b1 == NB1, 0, b1)
    b0 = tl.full((), -1, tl.int64)
    for c in range(0, NB1, CHUNK):
        idx = c + tl.arange(0, CHUNK)
        cnt = tl.load(hist1_ptr + idx)
        b0 = tl.maximum(b0, tl.max(tl.where((cnt > 0) & (idx < b1), idx, -1)).to(tl.int64))
    tl.store(state_ptr + 0, refine.to(tl.int64))
    tl.store(state_ptr + 1, b1)
    tl.store(state_ptr + 2, b0)


@triton.jit
def _scaled(sig_sum, scale):
    """An exact level-2 significand sum times its bucket's scale (0 stays 0 in the inf bucket)."""
    return tl.where(sig_sum == 0, 0.0, sig_sum.to(tl.float64) * scale)


@triton.jit
def _pick(x, idx, at):
    """x[at] for a vector x indexed by idx (0 when at is outside); exact."""
    return tl.sum(tl.where(idx == at, x, 0))


@triton.jit(do_not_specialize=["tau_hi_bits", "tau_lo_bits", "tau_bits", "tau_eps_bits", "eps_bits",
                               "mini_lo_bits", "mini_hi_bits"],
            do_not_specialize_on_alignment=["state_ptr", "n_valid_ptr", "cut_i32_ptr", "cut_i64_ptr", "cut_f32_ptr"])
def select2_kernel(
    hist1_ptr, hist2_ptr, state_ptr, n_valid_ptr,
    cut_i32_ptr, cut_i64_ptr, cut_f32_ptr,
    tau_hi_bits: tl.int64, tau_lo_bits: tl.int64, tau_bits: tl.int64, tau_eps_bits: tl.int64, eps_bits: tl.int64,
    mini_lo_bits: tl.int64, mini_hi_bits: tl.int64,
    OFFICIAL: tl.constexpr, TAU_INF: tl.constexpr, HAS_MINI_LO: tl.constexpr, HAS_MINI_HI: tl.constexpr,
    KEEP_ALL: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr, CHUNK: tl.constexpr, INTERP: tl.constexpr,
):
    tau_hi = as_f64(tau_hi_bits)
    tau_lo = as_f64(tau_lo_bits)
    tau = as_f64(tau_bits)
    eps = as_f64(eps_bits)
    refine = tl.load(state_ptr + 0) != 0
    b1 = tl.load(state_ptr + 1)
    n = _total_count(hist1_ptr, NB1, CHUNK)
    nf = n.to(tl.float64)
    # level-1 prefix at b1, with the same chunked scans as select1
    k_carry = tl.zeros((), tl.int64)
    s_carry = tl.zeros((), tl.float64)
    k_base = tl.zeros((), tl.int64)
    s_base = tl.zeros((), tl.float64)
    k_end_b1 = tl.zeros((), tl.int64)
    s_end_b1 = tl.zeros((), tl.float64)
    for c in range(0, NB1, CHUNK):
        idx, cnt, k_end, s_end, k_carry, s_carry = _level1_chunk(hist1_ptr, c, k_carry, s_carry, NB1, CHUNK)
        k_base += tl.sum(tl.where(idx < b1, cnt, 0))
        s_base += _pick(s_end, idx, b1 - 1)
        k_end_b1 += _pick(k_end, idx, b1)
        s_end_b1 += _pick(s_end, idx, b1)
    total = s_carry
    m2_before = (total / tl.maximum(nf, 1.0)).to(tl.float32)
    scale = bucket_scale(b1)
    target = tau * nf

    # level 2 over bucket b1: the first value run where the test flips
    k2_carry = tl.zeros((), tl.int64)
    p_carry = tl.zeros((), tl.int64)
    j1 = tl.full((), NB2, tl.int64)
    kj = tl.zeros((), tl.int64)
    pj = tl.zeros((), tl.int64)
    m = tl.zeros((), tl.int64)
    for c in range(0, NB2, CHUNK):
        idx = c + tl.arange(0, CHUNK)
        cnt2 = tl.load(hist2_ptr + idx)
        sig2 = tl.load(hist2_ptr + NB2 + idx)
        k2_end = k2_carry + tl.cumsum(cnt2, 0)
        p_end = p_carry + tl.cumsum(sig2, 0)
        if OFFICIAL:
            v = bits_to_f64((b1 << L1_SHIFT) | idx)
            f_last = _f_official(v, k_base + k2_end - 1, s_base + _scaled(p_end, scale), nf, eps)
            pred = (cnt2 > 0) & (f_last >= target - eps)
        else:
            pred = (cnt2 > 0) & ~_cond_paper(s_base + _scaled(p_end, scale), k_base + k2_end, tau_hi, tau_lo, TAU_INF)
        jmin = tl.min(tl.where(pred, idx, NB2)).to(tl.int64)
        first = (j1 == NB2) & (jmin < NB2)
        kj = tl.where(first, k_base + _pick(k2_end - cnt2, idx, jmin), kj)
        pj = tl.where(first, _pick(p_end - sig2, idx, jmin), pj)
        m = tl.where(first, _pick(cnt2, idx, jmin), m)
        j1 = tl.where(first, jmin, j1)
        k2_carry += tl.sum(cnt2)
        p_carry += tl.sum(sig2)
    found = j1 < NB2
    j1 = tl.where(found, j1, 0)
    bits = (b1 << L1_SHIFT) | j1
    sig_v = (bits & 0x7FFFFF) | tl.where((bits >> 23) > 0, 0x800000, 0)

    if OFFICIAL:
        vj = bits_to_f64(bits)
        # first t in the run with a hit: binary search for the last miss
        f0 = _f_official(vj, kj, s_base + _scaled(pj + sig_v, scale), nf, eps)
        first_hits = f0 >= target - eps
        lo = tl.zeros((), tl.int64)
        hi = m
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            f_mid = _f_official(vj, kj + mid, s_base + _scaled(pj + (mid + 1) * sig_v, scale), nf, eps)
            go = (f_mid < target - eps) & (hi - lo > 1)
            hi = tl.where(go | (hi - lo <= 1), hi, mid)
            lo = tl.where(go, mid, lo)
        t = tl.where(first_hits, 0, lo + 1)
        # predecessor value of the run: earlier in b1, else the top of the bucket before it (b0)
        b0 = tl.load(state_ptr + 2)
        j_prev = tl.full((), -1, tl.int64)
        j_last = tl.full((), -1, tl.int64)
        top_b0 = tl.full((), -1, tl.int64)
        for c in range(0, NB2, CHUNK):
            idx = c + tl.arange(0, CHUNK)
            cnt2 = tl.load(hist2_ptr + idx)
            cnt0 = tl.load(hist2_ptr + 2 * NB2 + idx)
            j_prev = tl.maximum(j_prev, tl.max(tl.where((cnt2 > 0) & (idx < j1), idx, -1)).to(tl.int64))
            j_last = tl.maximum(j_last, tl.max(tl.where(cnt2 > 0, idx, -1)).to(tl.int64))
            top_b0 = tl.maximum(top_b0, tl.max(tl.where(cnt0 > 0, idx, -1)).to(tl.int64))
        pred_in_b0 = bits_to_f64((tl.maximum(b0, 0) << L1_SHIFT) | tl.maximum(top_b0, 0))
        pred_value = tl.where(j_prev >= 0, bits_to_f64((b1 << L1_SHIFT) | tl.maximum(j_prev, 0)), pred_in_b0)
        k_star = tl.where(found, kj + t, k_end_b1)
        k_star = tl.where(target <= eps, 0, k_star)  # tiny budget: the authors' tau_c = 0 (k = 0)
        v_last = bits_to_f64((b1 << L1_SHIFT) | tl.maximum(j_last, 0))
        v_prev = tl.where(found, tl.where(t > 0, vj, pred_value), v_last)
        c_prev = tl.where(found, s_base + _scaled(pj + t * sig_v, scale), s_end_b1)
        constrained = (n > 0) & (total / tl.maximum(nf, 1.0) > as_f64(tau_eps_bits)) & (target < total - eps)
        constrained = constrained & (k_star < n)  # no hit at all (an inf m2 makes the test NaN)
        at_zero = (k_star == 0) | (target <= eps)
        tau_c2 = tl.where(at_zero, 0.0, tl.maximum(v_prev - eps, 0.0))
        m2_after = tl.where(at_zero, 0.0, (v_prev * (nf - k_star.to(tl.float64)) + c_prev) / tl.maximum(nf, 1.0))
        # the authors' chain from tau_c to float32 clip bounds (see reference.official_bounds)
        # tau_c is rounded to float32 before exp, as the authors' float32 tensor holds it
        # (float64 tl.sqrt compiles to sqrt.rn.f64, correctly rounded: the AOT test checks the PTX)
        tc = tl.sqrt(tau_c2).to(tl.float32).to(tl.float64)
        clip_low = exp_f64(-tc).to(tl.float32).to(tl.float64)
        clip_high = exp_f64(tc).to(tl.float32).to(tl.float64)
        clip_low = tl.where(constrained, clip_low, 0.0)
        clip_high = tl.where(constrained, clip_high, 100000.0)
        eps_lo = 1.0 - clip_low
        eps_hi = clip_high - 1.0
        if HAS_MINI_LO:
            eps_lo = tl.maximum(eps_lo, as_f64(mini_lo_bits))
        if HAS_MINI_HI:
            eps_hi = tl.maximum(eps_hi, as_f64(mini_hi_bits))
        tl.store(cut_i32_ptr, KEEP_ALL)
        tl.store(cut_i64_ptr + 0, 0)
        tl.store(cut_f32_ptr + 0, (1.0 - eps_lo).to(tl.float32))
        tl.store(cut_f32_ptr + 1, (1.0 + eps_hi).to(tl.float32))
        tl.store(cut_f32_ptr + 3, tl.where(constrained, m2_after.to(tl.float32), m2_before))
        tl.store(cut_f32_ptr + 4, tl.where(constrained, tau_c2, float("inf")).to(tl.float32))
    else:
        # largest t in the run whose prefix still satisfies S <= tau * k
        lo = tl.zeros((), tl.int64)
        hi = m
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            ok = _cond_paper(s_base + _scaled(pj + mid * sig_v, scale), kj + mid, tau_hi, tau_lo, TAU_INF)
            go = ok & (hi - lo > 1)
            hi = tl.where(go | (hi - lo <= 1), hi, mid)
            lo = tl.where(go, mid, lo)
        t = lo
        keep_count = kj + t
        kept_sum = s_base + _scaled(pj + t * sig_v, scale)
        # level 1 said bucket b1 fails at its end but no value inside it does (the two prefix sums
        # differ in the last ulp): keep all of b1, cut at the first bits of the next bucket
        bits = tl.where(found, bits, (b1 + 1) << L1_SHIFT)
        t = tl.where(found, t, 0)
        keep_count = tl.where(found, keep_count, k_end_b1)
        kept_sum = tl.where(found, kept_sum, s_end_b1)
        m2_after = tl.where(refine, kept_sum / tl.maximum(keep_count.to(tl.float64), 1.0), total / tl.maximum(nf, 1.0))
        tl.store(cut_i32_ptr, tl.where(refine, bits.to(tl.int32), KEEP_ALL))
        tl.store(cut_i64_ptr + 0, tl.where(refine, t, 0))
        tl.store(cut_f32_ptr + 0, 0.0)
        tl.store(cut_f32_ptr + 1, float("inf"))
        tl.store(cut_f32_ptr + 3, m2_after.to(tl.float32))
        tl.store(cut_f32_ptr + 4, tl.where(refine, bits_to_f64(bits), float("inf")).to(tl.float32))
    tl.store(cut_i64_ptr + 1, n)
    tl.store(cut_i64_ptr + 2, tl.load(n_valid_ptr))
    tl.store(cut_f32_ptr + 2, m2_before)
