"""The select kernels: histograms to the cut, on the device, in parallel programs.

They implement, step for step, m2po_ops/radix_select.py's select1 / select2 (the PyTorch
description of the algorithm; read it first). Each launch has one program per CHUNK buckets;
each program writes its chunk's totals (count, float64 sum or exact significand sum, last
non-empty bucket), and the last program to arrive (common.last_to_arrive) walks the chunk
totals in order, finds the one chunk that holds the boundary and scans only that chunk. So no
program scans more than CHUNK buckets plus one row per chunk, whatever the data.

Float64 prefix sums: a bucket's prefix is (prefix before its chunk) + (in-chunk cumsum up to
it), and a chunk's total is its in-chunk cumsum's last element, so the chunk walk and the
bucket scan evaluate the same numbers. Level-2 prefix sums are exact int64. Inside a run of tied
values the boundary is found by a 32-step binary search.

The below part of the threshold split (m2po_ops/split.py) is the base of every prefix: its
count, its limb sum as float64 and (official) its largest key.
"""

import triton
import triton.language as tl

from .. import constants as C
from .common import (B0, B1, BELOW_COUNT, BELOW_LIMBS, CUT_LOWER, CUT_M2, CUT_M2_AFTER, CUT_NUM_TRUST_REGION,
                     CUT_NUM_VALID, CUT_THRESHOLD, CUT_TIES_KEPT, CUT_UPPER, F32_MAX_BITS, HIST2_B0_COUNT, HIST2_ROWS,
                     HIST2_B1_COUNT, HIST2_B1_SUM, K_BASE, K_END, L1_SHIFT, MAX_LIMBS, N_TR,
                     OFFICIAL_NO_CONSTRAINT_HIGH, PART_COUNT, PART_LAST, PART_LAST_B0, PART_SUM, REFINE, S_BASE, S_END,
                     SEARCH_STEPS, TAIL_COUNT, TAIL_INF, TAIL_LIMBS, TOTAL, as_f64, bits_to_f64, bucket_scale, exp_f64,
                     last_to_arrive, limbs_to_f64, significand)

PART_COLS = C.PART_COLS  # int64 columns of a chunk's partial row (PART_* slots)
_PART_COLS = tl.constexpr(PART_COLS)


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
def _official_constrained(n, nf, total, tau_eps_bits, target, eps):
    """The authors' "is the budget binding" test (rules.official_constrained): some eligible
    token, mean m2 above tau + 1e-12, and tau * n below the total by more than 1e-12."""
    return (n > 0) & (total / tl.maximum(nf, 1.0) > as_f64(tau_eps_bits)) & (target < total - eps)


@triton.jit
def _f64(bits):
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _bits(x):
    return x.to(tl.int64, bitcast=True)


@triton.jit
def _pick(x, idx, at):
    """x[at] for a vector x indexed by idx (0 when at is outside); exact."""
    return tl.sum(tl.where(idx == at, x, 0))


@triton.jit
def _bucket_hi(idx):
    """The largest value of level-1 bucket idx, capped at FLT_MAX (no inf * 0 in the test)."""
    return bits_to_f64(tl.minimum((idx + 1).to(tl.int64) << L1_SHIFT, F32_MAX_BITS))


@triton.jit(do_not_specialize=["tau_hi_bits", "tau_lo_bits", "tau_bits", "tau_eps_bits", "eps_bits"],
            do_not_specialize_on_alignment=["state_ptr", "counter_ptr"])
def select1_kernel(
    sums_ptr, hist2_ptr, part_ptr, counter_ptr, state_ptr,
    tau_hi_bits: tl.int64, tau_lo_bits: tl.int64, tau_bits: tl.int64, tau_eps_bits: tl.int64, eps_bits: tl.int64,
    OFFICIAL: tl.constexpr, TAU_INF: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr, NLIMB: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Pick the level-1 bucket b1 holding the cut; write the select state (m2po_ops.radix_select).
    Every program first decides from the exact totals (a few scalars) whether anything is cut;
    if not, program 0 writes the state and all return. Otherwise each zeroes its share of the
    level-2 histograms (so the workspace memset does not have to) and adds its chunk's row."""
    pid = tl.program_id(0)
    programs = NB1 // CHUNK
    tau_hi = as_f64(tau_hi_bits)
    tau_lo = as_f64(tau_lo_bits)
    tau = as_f64(tau_bits)
    eps = as_f64(eps_bits)
    n_below = tl.load(sums_ptr + BELOW_COUNT)
    n = n_below + tl.load(sums_ptr + TAIL_COUNT)
    nf = n.to(tl.float64)
    target = tau * nf
    total = limbs_to_f64(sums_ptr + BELOW_LIMBS, sums_ptr + TAIL_LIMBS, MAX_LIMBS, True)
    total = tl.where(tl.load(sums_ptr + TAIL_INF) > 0, float("inf"), total)
    if OFFICIAL:
        refine = _official_constrained(n, nf, total, tau_eps_bits, target, eps)
    else:
        refine = ~_cond_paper(total, n, tau_hi, tau_lo, TAU_INF)
    if not refine:
        if pid == 0:
            tl.store(state_ptr + REFINE, 0)
            tl.store(state_ptr + B0, -1)
            tl.store(state_ptr + N_TR, n)
            tl.store(state_ptr + TOTAL, _bits(total))
    else:
        share = HIST2_ROWS * NB2 // programs
        zero = pid * share + tl.arange(0, CHUNK)
        for z in range(0, share, CHUNK):
            tl.store(hist2_ptr + zero + z, tl.zeros([CHUNK], tl.int64))
        idx = pid * CHUNK + tl.arange(0, CHUNK)
        cnt = tl.load(sums_ptr + idx)
        # (the scale of an empty bucket is zeroed first: 0 * inf would be NaN)
        sums = tl.load(sums_ptr + NB1 + idx).to(tl.float64) * tl.where(cnt > 0, bucket_scale(idx), 0.0)
        cum = tl.cumsum(sums, 0)
        row = part_ptr + pid * _PART_COLS
        tl.store(row + PART_COUNT, tl.sum(cnt))
        tl.store(row + PART_SUM, _bits(tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, cum, 0.0))))
        tl.store(row + PART_LAST, tl.max(tl.where(cnt > 0, idx, -1)).to(tl.int64))
        if last_to_arrive(counter_ptr, programs):
            _walk1(sums_ptr, part_ptr, state_ptr, n, nf, total, n_below, tau_hi, tau_lo, target, eps, OFFICIAL,
                   TAU_INF, NB1, NLIMB, CHUNK)


@triton.jit
def _walk1(sums_ptr, part_ptr, state_ptr, n, nf, total, n_below, tau_hi, tau_lo, target, eps,
           OFFICIAL: tl.constexpr, TAU_INF: tl.constexpr, NB1: tl.constexpr, NLIMB: tl.constexpr,
           CHUNK: tl.constexpr):
    """The last program of select1: walk the chunk rows in order to the first non-empty chunk
    whose end fails the budget (paper) / hits the test (official), then scan that chunk."""
    programs = NB1 // CHUNK
    s_below = limbs_to_f64(sums_ptr + BELOW_LIMBS, sums_ptr, NLIMB, False)
    k_end = n_below
    s_end = s_below
    c_star = tl.full((), programs, tl.int64)
    k_before = n_below
    s_before = s_below
    last_before = tl.full((), -1, tl.int64)  # last non-empty bucket of the chunks before c_star
    for c in range(programs):
        c_cnt = tl.load(part_ptr + c * _PART_COLS + PART_COUNT, cache_modifier=".cg")
        c_sum = _f64(tl.load(part_ptr + c * _PART_COLS + PART_SUM, cache_modifier=".cg"))
        c_last = tl.load(part_ptr + c * _PART_COLS + PART_LAST, cache_modifier=".cg")
        k_prev = k_end
        s_prev = s_end
        k_end = k_end + c_cnt
        s_end = s_end + c_sum
        if OFFICIAL:
            hit = (c_cnt > 0) & (_f_official(_bucket_hi(c_last), k_end - 1, s_end, nf, eps) >= target - eps)
        else:
            hit = (c_cnt > 0) & ~_cond_paper(s_end, k_end, tau_hi, tau_lo, TAU_INF)
        first = hit & (c_star == programs)
        k_before = tl.where(first, k_prev, k_before)
        s_before = tl.where(first, s_prev, s_before)
        c_star = tl.where(first, c, c_star)
        last_before = tl.where((c_star == programs) & (c_cnt > 0), c_last, last_before)
    # the bucket inside chunk c_star (its end fails, so one does)
    found = c_star < programs
    c_star = tl.where(found, c_star, 0)
    idx = c_star * CHUNK + tl.arange(0, CHUNK)
    cnt = tl.load(sums_ptr + idx)
    sums = tl.load(sums_ptr + NB1 + idx).to(tl.float64) * tl.where(cnt > 0, bucket_scale(idx), 0.0)
    s_in = s_before + tl.cumsum(sums, 0)
    k_in = k_before + tl.cumsum(cnt, 0)
    if OFFICIAL:
        pred = (cnt > 0) & (_f_official(_bucket_hi(idx), k_in - 1, s_in, nf, eps) >= target - eps)
    else:
        pred = (cnt > 0) & ~_cond_paper(s_in, k_in, tau_hi, tau_lo, TAU_INF)
    b1 = tl.min(tl.where(pred, idx, NB1)).to(tl.int64)
    # (the chunk's end failed, and its last non-empty bucket has the same prefix numbers)
    b1 = tl.where(b1 < NB1, b1, tl.max(tl.where(cnt > 0, idx, -1)).to(tl.int64))
    b1 = tl.where(found, b1, 0)
    b0 = tl.max(tl.where((cnt > 0) & (idx < b1), idx, -1)).to(tl.int64)
    b0 = tl.where(b0 >= 0, b0, last_before)
    first_of_chunk = b1 == c_star * CHUNK
    tl.store(state_ptr + REFINE, found.to(tl.int64))
    tl.store(state_ptr + B1, b1)
    tl.store(state_ptr + B0, b0)
    tl.store(state_ptr + K_BASE, _pick(k_in - cnt, idx, b1))
    tl.store(state_ptr + S_BASE, _bits(tl.where(first_of_chunk, s_before, _pick(s_in, idx, b1 - 1))))
    tl.store(state_ptr + K_END, _pick(k_in, idx, b1))
    tl.store(state_ptr + S_END, _bits(_pick(s_in, idx, b1)))
    tl.store(state_ptr + N_TR, n)
    tl.store(state_ptr + TOTAL, _bits(total))


@triton.jit
def _scaled(sig_sum, scale):
    """An exact level-2 significand sum times its bucket's scale (0 stays 0 in the inf bucket)."""
    return tl.where(sig_sum == 0, 0.0, sig_sum.to(tl.float64) * scale)


@triton.jit(do_not_specialize=["tau_hi_bits", "tau_lo_bits", "tau_bits", "tau_eps_bits", "eps_bits",
                               "mini_lo_bits", "mini_hi_bits"],
            do_not_specialize_on_alignment=["state_ptr", "below_max_ptr", "counter_ptr", "n_valid_ptr", "cut_i32_ptr",
                                            "cut_i64_ptr", "cut_f32_ptr"])
def select2_kernel(
    hist2_ptr, state_ptr, below_max_ptr, part_ptr, counter_ptr, n_valid_ptr,
    cut_i32_ptr, cut_i64_ptr, cut_f32_ptr,
    tau_hi_bits: tl.int64, tau_lo_bits: tl.int64, tau_bits: tl.int64, tau_eps_bits: tl.int64, eps_bits: tl.int64,
    mini_lo_bits: tl.int64, mini_hi_bits: tl.int64,
    OFFICIAL: tl.constexpr, TAU_INF: tl.constexpr, HAS_MINI_LO: tl.constexpr, HAS_MINI_HI: tl.constexpr,
    KEEP_ALL: tl.constexpr, NB2: tl.constexpr, CHUNK: tl.constexpr,
):
    """Solve the cut from the select state and the level-2 histograms into the cut buffers.
    When select1 found nothing to refine, program 0 writes the no-cut answer and every program
    returns at once."""
    pid = tl.program_id(0)
    programs = NB2 // CHUNK
    refine = tl.load(state_ptr + REFINE) != 0
    n = tl.load(state_ptr + N_TR)
    nf = n.to(tl.float64)
    total = _f64(tl.load(state_ptr + TOTAL))
    m2_before = (total / tl.maximum(nf, 1.0)).to(tl.float32)
    eps = as_f64(eps_bits)
    if not refine:
        if pid == 0:
            _store_no_cut(cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, n, m2_before, n_valid_ptr, eps,
                          mini_lo_bits, mini_hi_bits, OFFICIAL, HAS_MINI_LO, HAS_MINI_HI, KEEP_ALL)
    else:
        idx = pid * CHUNK + tl.arange(0, CHUNK)
        cnt2 = tl.load(hist2_ptr + HIST2_B1_COUNT * NB2 + idx)
        row = part_ptr + pid * _PART_COLS
        tl.store(row + PART_COUNT, tl.sum(cnt2))
        tl.store(row + PART_SUM, tl.sum(tl.load(hist2_ptr + HIST2_B1_SUM * NB2 + idx)))
        tl.store(row + PART_LAST, tl.max(tl.where(cnt2 > 0, idx, -1)).to(tl.int64))
        if OFFICIAL:
            b0_cnt = tl.load(hist2_ptr + HIST2_B0_COUNT * NB2 + idx)
            tl.store(row + PART_LAST_B0, tl.max(tl.where(b0_cnt > 0, idx, -1)).to(tl.int64))
        if last_to_arrive(counter_ptr, programs):
            _solve2(hist2_ptr, state_ptr, below_max_ptr, part_ptr, n_valid_ptr, cut_i32_ptr, cut_i64_ptr,
                    cut_f32_ptr, n, nf, total, m2_before, tau_hi_bits, tau_lo_bits, tau_bits, tau_eps_bits, eps,
                    mini_lo_bits, mini_hi_bits, OFFICIAL, TAU_INF, HAS_MINI_LO, HAS_MINI_HI, KEEP_ALL, NB2, CHUNK)


@triton.jit
def _official_bounds(tau_c2, constrained, mini_lo_bits, mini_hi_bits, HAS_MINI_LO: tl.constexpr,
                     HAS_MINI_HI: tl.constexpr):
    """The authors' chain from tau_c**2 to float32 clip bounds (see reference.official_bounds).
    tau_c is rounded to float32 before exp, as the authors' float32 tensor holds it (float64
    tl.sqrt compiles to sqrt.rn.f64, correctly rounded: the AOT test checks the PTX)."""
    tc = tl.sqrt(tau_c2).to(tl.float32).to(tl.float64)
    clip_low = exp_f64(-tc).to(tl.float32).to(tl.float64)
    clip_high = exp_f64(tc).to(tl.float32).to(tl.float64)
    clip_low = tl.where(constrained, clip_low, 0.0)
    clip_high = tl.where(constrained, clip_high, OFFICIAL_NO_CONSTRAINT_HIGH)
    eps_lo = 1.0 - clip_low
    eps_hi = clip_high - 1.0
    if HAS_MINI_LO:
        eps_lo = tl.maximum(eps_lo, as_f64(mini_lo_bits))
    if HAS_MINI_HI:
        eps_hi = tl.maximum(eps_hi, as_f64(mini_hi_bits))
    return (1.0 - eps_lo).to(tl.float32), (1.0 + eps_hi).to(tl.float32)


@triton.jit
def _store_cut(cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, value, ties_kept, n, n_valid_ptr, lower, upper, m2, m2_after,
               threshold):
    """Store a solved cut into the call's results (the CUT_* slots)."""
    tl.store(cut_i32_ptr, value)
    tl.store(cut_i64_ptr + CUT_TIES_KEPT, ties_kept)
    tl.store(cut_i64_ptr + CUT_NUM_TRUST_REGION, n)
    tl.store(cut_i64_ptr + CUT_NUM_VALID, tl.load(n_valid_ptr))
    tl.store(cut_f32_ptr + CUT_LOWER, lower)
    tl.store(cut_f32_ptr + CUT_UPPER, upper)
    tl.store(cut_f32_ptr + CUT_M2, m2)
    tl.store(cut_f32_ptr + CUT_M2_AFTER, m2_after)
    tl.store(cut_f32_ptr + CUT_THRESHOLD, threshold)


@triton.jit
def _store_no_cut(cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, n, m2_before, n_valid_ptr, eps, mini_lo_bits, mini_hi_bits,
                  OFFICIAL: tl.constexpr, HAS_MINI_LO: tl.constexpr, HAS_MINI_HI: tl.constexpr,
                  KEEP_ALL: tl.constexpr):
    """The cut when nothing is refined: every token kept (paper), the unconstrained bounds
    (official)."""
    if OFFICIAL:
        lower, upper = _official_bounds(tl.zeros((), tl.float64), tl.full((), 0, tl.int1), mini_lo_bits, mini_hi_bits,
                                        HAS_MINI_LO, HAS_MINI_HI)
    else:
        lower = tl.zeros((), tl.float32)
        upper = tl.full((), float("inf"), tl.float32)
    _store_cut(cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, KEEP_ALL, 0, n, n_valid_ptr, lower, upper, m2_before, m2_before,
               tl.full((), float("inf"), tl.float32))


@triton.jit
def _walk2(part_ptr, b1, k_base, s_base, scale, nf, tau_hi, tau_lo, target, eps, OFFICIAL: tl.constexpr,
           TAU_INF: tl.constexpr, NB2: tl.constexpr, CHUNK: tl.constexpr):
    """Walk select2's chunk rows in order to the first non-empty chunk whose end fails (paper) /
    hits (official). Returns (that chunk, or the chunk count when none; the level-2 count and
    significand sum before it; the last non-empty bucket before it, and overall; the top
    non-empty bucket of slot 1)."""
    programs = NB2 // CHUNK
    k2 = tl.zeros((), tl.int64)
    p2 = tl.zeros((), tl.int64)
    c_star = tl.full((), programs, tl.int64)
    k2_before = tl.zeros((), tl.int64)
    p2_before = tl.zeros((), tl.int64)
    prev_last = tl.full((), -1, tl.int64)
    j_last = tl.full((), -1, tl.int64)
    top_b0 = tl.full((), -1, tl.int64)
    for c in range(programs):
        c_cnt = tl.load(part_ptr + c * _PART_COLS + PART_COUNT, cache_modifier=".cg")
        c_sig = tl.load(part_ptr + c * _PART_COLS + PART_SUM, cache_modifier=".cg")
        c_last = tl.load(part_ptr + c * _PART_COLS + PART_LAST, cache_modifier=".cg")
        k_prev = k2
        p_prev = p2
        k2 = k2 + c_cnt
        p2 = p2 + c_sig
        if OFFICIAL:
            v = bits_to_f64((b1 << L1_SHIFT) | tl.maximum(c_last, 0))
            hit = (c_cnt > 0) & (_f_official(v, k_base + k2 - 1, s_base + _scaled(p2, scale), nf, eps) >= target - eps)
            top_b0 = tl.maximum(top_b0, tl.load(part_ptr + c * _PART_COLS + PART_LAST_B0, cache_modifier=".cg"))
        else:
            hit = (c_cnt > 0) & ~_cond_paper(s_base + _scaled(p2, scale), k_base + k2, tau_hi, tau_lo, TAU_INF)
        first = hit & (c_star == programs)
        k2_before = tl.where(first, k_prev, k2_before)
        p2_before = tl.where(first, p_prev, p2_before)
        c_star = tl.where(first, c, c_star)
        prev_last = tl.where((c_star == programs) & (c_cnt > 0), c_last, prev_last)
        j_last = tl.maximum(j_last, c_last)
    return c_star, k2_before, p2_before, prev_last, j_last, top_b0


@triton.jit
def _solve2(hist2_ptr, state_ptr, below_max_ptr, part_ptr, n_valid_ptr, cut_i32_ptr, cut_i64_ptr, cut_f32_ptr,
            n, nf, total, m2_before, tau_hi_bits, tau_lo_bits, tau_bits, tau_eps_bits, eps, mini_lo_bits, mini_hi_bits,
            OFFICIAL: tl.constexpr, TAU_INF: tl.constexpr, HAS_MINI_LO: tl.constexpr, HAS_MINI_HI: tl.constexpr,
            KEEP_ALL: tl.constexpr, NB2: tl.constexpr, CHUNK: tl.constexpr):
    """The last program of select2: walk the level-2 chunk totals, scan the chunk holding the
    boundary, binary-search inside the run of the boundary value, store the cut."""
    programs = NB2 // CHUNK
    tau_hi = as_f64(tau_hi_bits)
    tau_lo = as_f64(tau_lo_bits)
    b1 = tl.load(state_ptr + B1)
    k_base = tl.load(state_ptr + K_BASE)
    s_base = _f64(tl.load(state_ptr + S_BASE))
    scale = bucket_scale(b1)
    target = as_f64(tau_bits) * nf
    c_star, k2_before, p2_before, prev_last, j_last, top_b0 = _walk2(
        part_ptr, b1, k_base, s_base, scale, nf, tau_hi, tau_lo, target, eps, OFFICIAL, TAU_INF, NB2, CHUNK)
    found = c_star < programs
    c_star = tl.where(found, c_star, 0)
    idx = c_star * CHUNK + tl.arange(0, CHUNK)
    cnt2 = tl.load(hist2_ptr + HIST2_B1_COUNT * NB2 + idx)
    sig2 = tl.load(hist2_ptr + HIST2_B1_SUM * NB2 + idx)
    k2_end = k2_before + tl.cumsum(cnt2, 0)
    p_end = p2_before + tl.cumsum(sig2, 0)
    if OFFICIAL:
        v = bits_to_f64((b1 << L1_SHIFT) | idx)
        pred = (cnt2 > 0) & (_f_official(v, k_base + k2_end - 1, s_base + _scaled(p_end, scale), nf, eps)
                             >= target - eps)
    else:
        pred = (cnt2 > 0) & ~_cond_paper(s_base + _scaled(p_end, scale), k_base + k2_end, tau_hi, tau_lo, TAU_INF)
    j1 = tl.min(tl.where(pred, idx, NB2)).to(tl.int64)
    j1 = tl.where(j1 < NB2, j1, tl.max(tl.where(cnt2 > 0, idx, -1)).to(tl.int64))  # (same numbers as the walk)
    j1 = tl.where(found, j1, 0)
    kj = k_base + _pick(k2_end - cnt2, idx, j1)
    pj = _pick(p_end - sig2, idx, j1)
    m = _pick(cnt2, idx, j1)
    if OFFICIAL:
        # predecessor of j1 inside b1 (-1: none), for the water-filling's value before the run
        j_prev = tl.max(tl.where((cnt2 > 0) & (idx < j1), idx, -1)).to(tl.int64)
        j_prev = tl.where(j_prev >= 0, j_prev, prev_last)
        _official_run(state_ptr, below_max_ptr, n_valid_ptr, cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, n, nf, total,
                      m2_before, b1, j1, j_prev, j_last, top_b0, kj, pj, m, found, s_base, scale, target, eps,
                      tau_eps_bits, mini_lo_bits, mini_hi_bits, HAS_MINI_LO, HAS_MINI_HI, KEEP_ALL)
    else:
        _paper_run(state_ptr, n_valid_ptr, cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, n, m2_before, b1, j1, kj, pj, m,
                   found, s_base, scale, tau_hi, tau_lo, TAU_INF)


@triton.jit
def _paper_run(state_ptr, n_valid_ptr, cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, n, m2_before, b1, j1, kj, pj, m, found,
               s_base, scale, tau_hi, tau_lo, TAU_INF: tl.constexpr):
    """The paper cut inside the run of value (b1, j1), m tokens after kj earlier ones: the
    largest t whose prefix still satisfies S <= tau * k (binary search), stored."""
    bits = (b1 << L1_SHIFT) | j1
    sig_v = significand(bits)
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
    keep_count = tl.where(found, keep_count, tl.load(state_ptr + K_END))
    kept_sum = tl.where(found, kept_sum, _f64(tl.load(state_ptr + S_END)))
    m2_after = kept_sum / tl.maximum(keep_count.to(tl.float64), 1.0)
    _store_cut(cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, bits.to(tl.int32), t, n, n_valid_ptr, 0.0, float("inf"),
               m2_before, m2_after.to(tl.float32), bits_to_f64(bits).to(tl.float32))


@triton.jit
def _official_run(state_ptr, below_max_ptr, n_valid_ptr, cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, n, nf, total,
                  m2_before, b1, j1, j_prev, j_last, top_b0, kj, pj, m, found, s_base, scale, target, eps,
                  tau_eps_bits, mini_lo_bits, mini_hi_bits, HAS_MINI_LO: tl.constexpr, HAS_MINI_HI: tl.constexpr,
                  KEEP_ALL: tl.constexpr):
    """The official cut inside the run of value (b1, j1): the first t with a hit (binary search
    for the last miss), the water-filling's tau_c from the value before it, the clip bounds,
    stored."""
    bits = (b1 << L1_SHIFT) | j1
    sig_v = significand(bits)
    vj = bits_to_f64(bits)
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
    # predecessor of the run: earlier in b1, else the top of the tail bucket before it (b0),
    # else the largest below-threshold value
    b0 = tl.load(state_ptr + B0)
    pred_in_b0 = bits_to_f64((tl.maximum(b0, 0) << L1_SHIFT) | tl.maximum(top_b0, 0))
    pred_below = bits_to_f64(tl.load(below_max_ptr))
    pred_value = tl.where(j_prev >= 0, bits_to_f64((b1 << L1_SHIFT) | tl.maximum(j_prev, 0)),
                          tl.where(b0 >= 0, pred_in_b0, pred_below))
    k_star = tl.where(found, kj + t, tl.load(state_ptr + K_END))
    k_star = tl.where(target <= eps, 0, k_star)  # tiny budget: the authors' tau_c = 0 (k = 0)
    v_last = bits_to_f64((b1 << L1_SHIFT) | tl.maximum(j_last, 0))
    v_prev = tl.where(found, tl.where(t > 0, vj, pred_value), v_last)
    c_prev = tl.where(found, s_base + _scaled(pj + t * sig_v, scale), _f64(tl.load(state_ptr + S_END)))
    constrained = _official_constrained(n, nf, total, tau_eps_bits, target, eps)
    constrained = constrained & (k_star < n)  # no hit at all (an inf m2 makes the test NaN)
    at_zero = (k_star == 0) | (target <= eps)
    tau_c2 = tl.where(at_zero, 0.0, tl.maximum(v_prev - eps, 0.0))
    m2_after = tl.where(at_zero, 0.0, (v_prev * (nf - k_star.to(tl.float64)) + c_prev) / tl.maximum(nf, 1.0))
    lower, upper = _official_bounds(tau_c2, constrained, mini_lo_bits, mini_hi_bits, HAS_MINI_LO, HAS_MINI_HI)
    _store_cut(cut_i32_ptr, cut_i64_ptr, cut_f32_ptr, KEEP_ALL, 0, n, n_valid_ptr, lower, upper, m2_before,
               tl.where(constrained, m2_after.to(tl.float32), m2_before),
               tl.where(constrained, tau_c2, float("inf")).to(tl.float32))
