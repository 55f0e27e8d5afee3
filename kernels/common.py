"""Shared Triton helpers and constants of the m2po kernels.

Float64 hyperparameters (tau, its exact split, 1e-12) travel as int64 bit patterns: a Python
float argument would be specialised as fp32 by Triton (and reaches kernels as float64 under
torch.compile), and a float constexpr is materialised as fp32, both of which round tau.
"""

import math
import os
import struct

import triton
import triton.language as tl

from .. import constants as C

# libdevice calls fail under the interpreter; use the plain tl.* forms there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The shared constants (m2po_ops/constants.py) the kernels read, as constexpr globals of this
# module (a kernel may only read constexpr globals; the kernel files import them from here by
# name). Float ones are exact in float32 (a float constexpr is materialised as fp32).
KERNEL_CONSTANTS = (
    "L1_SHIFT", "LIMB_BITS", "LIMB_MASK", "F32_INF_BITS", "F32_MAX_BITS", "DELTA_CLAMP", "OFFICIAL_EPS",
    "OFFICIAL_NO_CONSTRAINT_HIGH", "RATIO_ABOVE_ONE_DELTA", "RATIO_BELOW_ONE_DELTA", "W_NONE", "W_COUNT",
    "W_SCALAR", "W_TENSOR_DENOM", "W_PER_TOKEN", "WRITE_GRAD", "WRITE_KEEP", "WRITE_KEYS", "READ_MASK",
    "READ_ADV_PER_ROW", "READ_FIRST_PER_ROW", "READ_WEIGHTS", "MAX_LIMBS", "SEARCH_STEPS", "BELOW_COUNT",
    "BELOW_LIMBS", "TAIL_COUNT", "TAIL_INF", "TAIL_LIMBS", "REFINE", "B1", "B0", "K_BASE", "S_BASE", "K_END",
    "S_END", "N_TR", "TOTAL", "HIST2_B1_COUNT", "HIST2_B1_SUM", "HIST2_B0_COUNT", "HIST2_B0_SUM",
    "HIST2_ROWS", "PART_COUNT", "PART_SUM", "PART_LAST", "PART_LAST_B0", "RATIO_MIN_FLIPPED", "RATIO_MAX",
    "STATS_VALID", "STATS_TRUST", "STATS_NEG_DELTA", "STATS_RATIO_SUM", "STATS_RATIO_MAX", "STATS_NONFINITE",
    "STATS_LOSS", "STATS_CLIPPED", "STATS_LIST_LOSS", "APPLY_LOSS", "APPLY_MASKED", "APPLY_REDONE",
    "APPLY_WHOLE", "APPLY_LIST", "FINAL_LOSS", "FINAL_MASKED", "CUT_TIES_KEPT", "CUT_NUM_TRUST_REGION",
    "CUT_NUM_VALID", "CUT_LOWER", "CUT_UPPER", "CUT_M2", "CUT_M2_AFTER", "CUT_THRESHOLD",
    "OUT_MASKED_FRACTION", "OUT_TRUST_REGION_FRACTION", "OUT_KL", "OUT_RATIO_MEAN", "OUT_RATIO_MAX",
    "OUT_NONFINITE", "OUT_SCALE",
)
for _name in KERNEL_CONSTANTS:
    globals()[_name] = tl.constexpr(getattr(C, _name))
del _name

if not INTERPRET:  # pragma: no cover - GPU only
    from triton.language.extra import libdevice
else:
    libdevice = None


def f64_bits(x: float) -> int:
    """The int64 bit pattern of a Python float (exact transport of float64 into a kernel)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


@triton.jit
def as_f64(bits):
    # Triton types a small Python int as i32: widen (sign-preserving) before the bitcast.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def exp_f32(x, INTERP: tl.constexpr):
    """Accurate float32 exp (libdevice expf on GPU; tl.exp is a fast approximation there)."""
    if INTERP:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def significand(bits):
    """Integer significand (implicit bit included) of non-negative float32 bit patterns, int64."""
    b = bits.to(tl.int64)
    return (b & 0x7FFFFF) | tl.where((b >> 23) > 0, 0x800000, 0)


_RCP_A = tl.constexpr(f64_bits(24.0 / 17.0))
_RCP_B = tl.constexpr(f64_bits(8.0 / 17.0))


@triton.jit
def reciprocal_f32(x):
    """1 / x in float32, correctly rounded, as torch's float32 1 / x, without a divide.

    A plain fp32 "/" compiles to an approximate divide on the GPU, and div.rn has a slow-path
    subroutine call that makes ptxas spill in the token kernels. Instead: x = m * 2**e with m in
    [1, 2), the linear seed 24/17 - 8/17 m (relative error <= 1/17), four Newton steps in
    float64 (error < 2**-60 before the float64 roundings), one rounding to float32. That is
    the correctly rounded result: 1 / x for a float32 x is never within 2**-49 (relative) of a
    float32 rounding midpoint unless it is exact, which the float64 value then is too.
    Zero gives inf, inf gives 0, NaN stays NaN (as torch)."""
    xd = x.to(tl.float32).to(tl.float64)
    neg = xd.to(tl.int64, bitcast=True) < 0  # the sign bit (-0.0 included)
    ax = tl.abs(xd)
    e = ax.to(tl.int64, bitcast=True) >> 52  # biased exponent (float32 values are normal in float64)
    inv_scale = ((2046 - e) << 52).to(tl.float64, bitcast=True)  # 2**-(e - 1023), exact
    m = ax * inv_scale
    r = _c64(_RCP_A) - _c64(_RCP_B) * m
    r = r * (2.0 - m * r)
    r = r * (2.0 - m * r)
    r = r * (2.0 - m * r)
    r = r * (2.0 - m * r)
    y = tl.where(neg, -r, r) * inv_scale
    y = tl.where(ax == 0.0, tl.where(neg, float("-inf"), float("inf")), y)
    y = tl.where(ax == float("inf"), tl.where(neg, -1.0, 1.0) * 0.0, y)  # (a literal -0.0 folds to +0.0)
    return tl.where(xd == xd, y, xd).to(tl.float32)


@triton.jit
def bucket_scale(bucket):
    """2**(exponent - 150) as float64 for level-1 bucket ids (inf for the inf/NaN exponent)."""
    e = tl.maximum(bucket.to(tl.int64) >> 7, 1)
    scale = ((e + (1023 - 150)) << 52).to(tl.float64, bitcast=True)
    return tl.where(e >= 255, float("inf"), scale)


@triton.jit
def bits_to_f64(bits):
    return bits.to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)


# exp in float64 without a libdevice call (a call costs a stack frame and register spills in the
# token kernels): Cody-Waite reduction by ln 2 and a degree-13 Taylor polynomial, within about
# 1.5 float64 ulps. Constants travel as bit patterns so none is rounded to fp32.
_INV_LN2 = tl.constexpr(4609176140021203710)
_LN2_HI = tl.constexpr(4604418534311723008)  # 0x1.62e42fee00000p-1: k * LN2_HI is exact
_LN2_LO = tl.constexpr(4461442080421002358)
_INV_FACTORIAL = [f64_bits(1.0 / math.factorial(i)) for i in range(14)]
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13 = (tl.constexpr(c) for c in _INV_FACTORIAL)


@triton.jit
def _c64(bits: tl.constexpr):
    return tl.full((), bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def exp_f64(x):
    """exp of float64 x, for |x| <= 200 (clamped: enough for float32 overflow and underflow)."""
    x = clamp(x, -200.0, 200.0)  # (NaN stays NaN, as torch.exp)
    k = tl.floor(x * _c64(_INV_LN2) + 0.5)
    r = (x - k * _c64(_LN2_HI)) - k * _c64(_LN2_LO)
    p = _c64(_C13)
    p = p * r + _c64(_C12)
    p = p * r + _c64(_C11)
    p = p * r + _c64(_C10)
    p = p * r + _c64(_C9)
    p = p * r + _c64(_C8)
    p = p * r + _c64(_C7)
    p = p * r + _c64(_C6)
    p = p * r + _c64(_C5)
    p = p * r + _c64(_C4)
    p = p * r + _c64(_C3)
    p = p * r + _c64(_C2)
    p = p * r + _c64(_C1)
    p = p * r + _c64(_C0)
    scale = ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    return p * scale


@triton.jit
def ratio_f32(delta):
    """exp(delta) correctly rounded to float32 (float64 exp, one rounding): the same bits as
    m2po_ops.reference.ratio_f32, except where exp lies within ~1.5 float64 ulps of a float32
    rounding midpoint."""
    return exp_f64(delta.to(tl.float64)).to(tl.float32)


@triton.jit
def is_finite(x):
    """x - x is NaN exactly for inf/NaN. Tested in the loaded dtype when that is float64 (a
    finite float64 can overflow float32), in float32 otherwise (exact for fp16/bf16; the
    interpreter cannot do bf16 arithmetic)."""
    if x.dtype == tl.float64:
        return (x - x) == 0
    else:
        xf = x.to(tl.float32)
        return (xf - xf) == 0


@triton.jit
def row_of(offs, row_len):
    """offs // row_len in int32 (the launcher keeps token counts below 2**31): an int64 division
    is a subroutine call per token on the GPU, an int32 one a few inline instructions."""
    return offs.to(tl.int32) // row_len.to(tl.int32)


@triton.jit
def in_bounds(offs, n, FULL: tl.constexpr):
    """offs < n. FULL (a block wholly inside the tokens): a constant all-true mask, which Triton
    folds away, so the block's loads and stores are vectorised (n is deliberately not
    specialised, so `offs < n` alone would make every access a single-element one)."""
    if FULL:
        return tl.full(offs.shape, 1, tl.int1)
    else:
        return offs < n


@triton.jit
def clamp(x, lo, hi):
    """min(max(x, lo), hi) that keeps NaN, as torch.clamp (the GPU's min/max drop NaN)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def load_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, n, HAS_MASK, ADV_PER_ROW, FULL: tl.constexpr):
    """Load one block of tokens as float32 and decide validity in the kernel: the mask is
    nonzero (any dtype) and log-probs and advantage are finite. Returns
    (lp, olp, adv, valid, nonfinite) where nonfinite marks masked-in tokens with inf/NaN.
    ADV_PER_ROW: advantages hold one value per row of adv_div tokens (else one per token).
    HAS_MASK and ADV_PER_ROW are constexpr in most kernels, runtime flags (a uniform branch) in
    stats_kernel, whose variants they would otherwise multiply."""
    return gather_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, in_bounds(offs, n, FULL), HAS_MASK,
                         ADV_PER_ROW)


@triton.jit
def gather_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, inb, HAS_MASK, ADV_PER_ROW):
    """load_tokens at any token positions ``offs`` (lanes where ``inb`` is false load nothing
    and are not valid): apply_official's gather of the compacted tail."""
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0)
    olp = tl.load(olp_ptr + offs, mask=inb, other=0.0)
    if ADV_PER_ROW:
        adv = tl.load(adv_ptr + row_of(offs, adv_div), mask=inb, other=0.0)
    else:
        adv = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    base = inb
    if HAS_MASK:  # nonzero and not NaN (a NaN mask entry is padding, as in m2po_ops.inputs)
        m = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32)
        base = base & (m != 0) & (m == m)
    finite = is_finite(lp) & is_finite(olp) & is_finite(adv)
    return lp.to(tl.float32), olp.to(tl.float32), adv.to(tl.float32), base & finite, base & ~finite


# ---------------------------------------------------------------------------------------------
# Histogram updates without contention, the threshold split's exact sums, and the
# last-program-to-arrive pattern of the parallel select kernels.

INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
# up to this many entries in a block are added one bucket at a time (a min-reduction each);
# beyond, the block sorts its entries and adds one run per bucket
FEW_BUCKETS = tl.constexpr(16)
# Under the interpreter tl.sort's bitonic network runs op by op (about a second per block), so
# there the block is aggregated with one [N, N] comparison instead (numpy does it at once; a GPU
# could not hold it). tests/test_kernel_properties.py switches this off to run the GPU's paths.
INTERP_AGGREGATE = tl.constexpr(INTERPRET)


@triton.jit
def _runs(k1, c1, s1, k2, c2, s2):
    """Scan step over a sorted sequence: counts and sums restart where the bucket changes."""
    same = k1 == k2
    return k2, tl.where(same, c1 + c2, c2), tl.where(same, s1 + s2, s2)


@triton.jit
def add_aggregated(count_ptr, sig_ptr, bucket, sig, sel, N: tl.constexpr):
    """count_ptr[b] += the selected entries in bucket b, sig_ptr[b] += their sum of ``sig``
    (< 2**32), with at most one atomic per address per block: entries are pre-aggregated in the
    block first, so equal values (quantised data, every token the same m2) do not serialise
    atomics on one address."""
    cnt = tl.sum(sel.to(tl.int64))
    if INTERP_AGGREGATE:
        b = tl.where(sel, bucket.to(tl.int64), -1)
        same = (b[:, None] == b[None, :]) & sel[None, :]
        earlier = tl.arange(0, N)[None, :] < tl.arange(0, N)[:, None]
        head = sel & (tl.sum((same & earlier).to(tl.int32), axis=1) == 0)
        run_cnt = tl.sum(same.to(tl.int64), axis=1)
        run_sig = tl.sum(tl.where(same, sig.to(tl.int64)[None, :], 0), axis=1)
        tl.atomic_add(count_ptr + b, run_cnt, mask=head, sem="relaxed")
        tl.atomic_add(sig_ptr + b, run_sig, mask=head, sem="relaxed")
    elif cnt > 0:
        sel_bucket = tl.where(sel, bucket.to(tl.int64), INT64_MAX)
        lo = tl.min(sel_bucket)
        hi = tl.max(tl.where(sel, bucket.to(tl.int64), -1))
        if lo == hi:  # one bucket, e.g. every entry the same value
            tl.atomic_add(count_ptr + lo, cnt, sem="relaxed")
            tl.atomic_add(sig_ptr + lo, tl.sum(tl.where(sel, sig.to(tl.int64), 0)), sem="relaxed")
        elif cnt <= FEW_BUCKETS:  # a few entries (the common case): one bucket at a time
            b = lo
            while b < INT64_MAX:
                this = sel_bucket == b
                tl.atomic_add(count_ptr + b, tl.sum(this.to(tl.int64)), sem="relaxed")
                tl.atomic_add(sig_ptr + b, tl.sum(tl.where(this, sig.to(tl.int64), 0)), sem="relaxed")
                b = tl.min(tl.where(sel_bucket > b, sel_bucket, INT64_MAX))
        else:  # sort (bucket, sig) pairs; each run of a bucket is added once, by its first entry
            packed = tl.sort(tl.where(sel, (bucket.to(tl.int64) << 32) | sig.to(tl.int64), INT64_MAX))
            run_bucket = packed >> 32
            one = tl.full([N], 1, tl.int64)
            v = packed & 0xFFFFFFFF
            _, run_pos, _ = tl.associative_scan((run_bucket, one, v), 0, _runs)
            _, run_cnt, run_sig = tl.associative_scan((run_bucket, one, v), 0, _runs, reverse=True)
            head = (packed != INT64_MAX) & (run_pos == 1)
            # (`+ 0` costs nothing compiled; the interpreter's atomics read a reverse scan's
            # strided result as if it were dense, and the add makes a dense copy)
            tl.atomic_add(count_ptr + run_bucket, run_cnt + 0, mask=head, sem="relaxed")
            tl.atomic_add(sig_ptr + run_bucket, run_sig + 0, mask=head, sem="relaxed")


@triton.jit
def add_limbs(limb_ptr, bits, sel, NLIMB: tl.constexpr, INTERP: tl.constexpr):
    """limb_ptr[0:NLIMB] += the exact sum of the selected float32 values (bit patterns ``bits``)
    as 30-bit limbs (m2po_ops/split.py): one atomic per limb per block."""
    e = bits.to(tl.int32) >> 23
    p = tl.maximum(e, 1) - 1
    q = p // LIMB_BITS
    r = p - q * LIMB_BITS
    x = significand(bits) << r.to(tl.int64)
    lo = tl.where(sel, x & LIMB_MASK, 0)
    hi = tl.where(sel, x >> LIMB_BITS, 0)
    if INTERP:  # one [block, 16] reduction instead of 16 Python-level steps (too many registers on a GPU)
        i16 = tl.arange(0, 16)
        part = tl.sum(tl.where(q[:, None] == i16[None, :], lo[:, None], 0)
                      + tl.where(q[:, None] == i16[None, :] - 1, hi[:, None], 0), axis=0)
        tl.atomic_add(limb_ptr + i16, part, mask=(i16 < NLIMB) & (part != 0), sem="relaxed")
    else:
        for i in tl.static_range(NLIMB):
            part = tl.sum(tl.where(q == i, lo, 0) + tl.where(q == i - 1, hi, 0))
            if part != 0:
                tl.atomic_add(limb_ptr + i, part, sem="relaxed")


@triton.jit
def _pow2(e: tl.constexpr):
    return tl.full((), (e + 1023) << 52, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def limbs_to_f64(limb_ptr, other_ptr, NLIMB: tl.constexpr, TWO: tl.constexpr):
    """The float64 of limb sums (TWO: of the limb-wise sums at limb_ptr and other_ptr), by the
    sequence of m2po_ops.split.limbs_to_float: from the lowest limb up, the carry taken into
    the next and the 30-bit digit, times its power of two, added (the top limb keeps its high
    bits). Other programs' atomics wrote the limbs: read past the L1 cache (.cg)."""
    carry = tl.zeros((), tl.int64)
    s = tl.zeros((), tl.float64)
    for i in tl.static_range(NLIMB):
        v = tl.load(limb_ptr + i, cache_modifier=".cg") + carry
        if TWO:
            v += tl.load(other_ptr + i, cache_modifier=".cg")
        if i < NLIMB - 1:
            carry = v >> LIMB_BITS
            v = v & LIMB_MASK
        s = s + v.to(tl.float64) * _pow2(LIMB_BITS * i - 149)
    return s


@triton.jit
def last_to_arrive(counter_ptr, programs):
    """True in exactly one program of the launch: the last to finish its partial results, which
    are then visible to it (a barrier orders the program's stores before the acq_rel ticket;
    the reader loads partials with .cg, bypassing the non-coherent L1). The counter lives in
    the zeroed workspace, so each call (and each graph replay) starts from 0."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == programs - 1


# ---------------------------------------------------------------------------------------------
# The cut rules' trust regions and the surrogates, one helper each (their torch twins:
# m2po_ops/rules.py trust_region, m2po_ops/surrogates.py unclipped_surrogate / ppo_clip_surrogate).


@triton.jit
def paper_trust_region(adv, delta, valid):
    """The paper rule's trust region T: (A > 0 and delta > 0) or (A < 0 and delta < 0)."""
    return valid & (((adv > 0) & (delta > 0)) | ((adv < 0) & (delta < 0)))


@triton.jit
def official_trust_region(adv_first, delta, valid):
    """The authors' "harmful" tokens: the sequence's first advantage's sign and the ratio's side
    of 1, in float32. The ratio is exp(delta) correctly rounded to float32, so r > 1 and r < 1
    are tests of delta (constants.RATIO_ABOVE_ONE_DELTA / RATIO_BELOW_ONE_DELTA): no exp here."""
    return valid & (((adv_first > OFFICIAL_EPS) & (delta >= RATIO_ABOVE_ONE_DELTA))
                    | ((adv_first < -OFFICIAL_EPS) & (delta < RATIO_BELOW_ONE_DELTA)))


@triton.jit
def unclipped_terms(adv, delta, valid, INTERP: tl.constexpr):
    """The unclipped surrogate -A r, r = exp(clamp(delta, +-DELTA_CLAMP)), of a kept token: (ratio,
    loss term, derivative). The derivative is straight-through: d(-A r)/d logprobs = -A r. A
    cut drops masked tokens afterwards (fix_paper_kernel)."""
    ratio = exp_f32(clamp(delta, -DELTA_CLAMP, DELTA_CLAMP), INTERP)
    loss = tl.where(valid, -adv * ratio, 0.0)
    return ratio, loss, loss


@triton.jit
def ppo_clip_terms(adv, ratio, valid, lower, upper):
    """The PPO-clip surrogate with ratio bounds [lower, upper] (the official rule's cut): per
    token the loss, the derivative and the clip flag, as the torch backend computes them. The
    torch.where form, not max/min, which drop NaN on the GPU: a NaN term (an inf ratio times a
    zero advantage) stays NaN."""
    pg1 = -adv * ratio
    pg2 = -adv * clamp(ratio, lower, upper)
    clipped = pg2 > pg1
    loss = tl.where(valid, tl.where(clipped, pg2, pg1), 0.0)
    # torch.maximum splits the gradient on ties; clamp passes it inside [lower, upper]
    inside = (ratio >= lower) & (ratio <= upper)
    grad = tl.where(clipped, 0.0, tl.where(pg1 == pg2, pg1 * tl.where(inside, 1.0, 0.5), pg1))
    return loss, tl.where(valid, grad, 0.0), clipped


@triton.jit
def weighted_terms(loss, grad, valid, w_ptr, offs, inb, poison, WEIGHTS):
    """(term, derivative) of tokens as every pass weights them: W_PER_TOKEN, per-token weights
    plus the poison; else (token-mean: the scale comes in finalize) times 1 + poison, which is
    exactly 1, or NaN."""
    if WEIGHTS == W_PER_TOKEN:
        w = tl.where(valid, tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32) + poison, 0.0)
        term = w * loss
        grad = w * grad
    else:
        term = tl.where(valid, loss * (1.0 + poison), 0.0)
        grad = tl.where(valid, grad * (1.0 + poison), 0.0)
    return term, grad
