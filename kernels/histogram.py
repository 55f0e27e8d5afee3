"""Token passes that build the mergeable statistics (see m2po_ops/histogram.py for the format).

stats_kernel: one read of the inputs. Per token: delta, m2, trust-region membership and the
key (m2 bits or -1). The threshold split (m2po_ops/split.py): trust-region tokens at or below
the threshold add to the below part (count, exact limb sum, and for the official rule the
maximum key), the tail above it to the level-1 histogram. Every histogram and sum update is an
int64 atomic (any order gives the same bits), pre-aggregated in the block so that an address
gets at most one atomic per block. Per-block metric partials are written, not atomically
added, so their sum is deterministic.
level2_kernel: level-2 histograms of the one or two level-1 buckets select1 chose, from the
tail keys; exits at once when select1 found nothing to refine (the common case).
ties_kernel: per-block counts of keys equal to the paper cut's value, for the tie rule;
exits at once when nothing is masked.
tie_scan_kernel: one program turning those counts into exclusive per-block offsets (in place),
so the apply pass knows how many tied tokens precede each block; exits at once likewise.
"""

import triton
import triton.language as tl

from .common import (L1_SHIFT, add_aggregated, add_limbs, clamp, exp_f32, in_bounds, is_finite, load_tokens, ratio_f32,
                     row_of, significand)

# per-block partials written by stats_kernel (float64 columns): valid tokens, trust-region
# tokens, sum of -delta, sum of ratios, max ratio, masked-in tokens holding inf/NaN
STATS_COLS = 6
_STATS_COLS = tl.constexpr(STATS_COLS)  # kernels may only read constexpr globals


@triton.jit(do_not_specialize=["row_len", "n"], do_not_specialize_on_alignment=["cu_ptr"])
def first_valid_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, cu_ptr, first_ptr, row_len: tl.int64, n: tl.int64,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, CHUNK: tl.constexpr,
):
    """The official rule's advantage of each sequence: the one of its first valid token (mask
    nonzero, values finite), in the advantages' dtype (0 when it has none). One program per sequence (a row
    of a (B, T) batch, or cu_seqlens[i]..cu_seqlens[i+1] of packed input), scanning CHUNK
    tokens at a time from the start and stopping at the first chunk that holds a valid token:
    one chunk for a right-padded row."""
    seq = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq), 0), n)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1), start), n)
    else:
        start = seq * row_len
        end = start + row_len
    first = end
    pos = start
    while pos < first:  # until the chunk holding the first valid token (or the end)
        offs = pos + tl.arange(0, CHUNK)
        _, _, _, valid, _ = load_tokens(lp_ptr, olp_ptr, adv_ptr, 1, mask_ptr, offs, end, HAS_MASK, False, False)
        first = tl.minimum(first, tl.min(tl.where(valid, offs, end)))
        pos += CHUNK
    adv = tl.load(adv_ptr + tl.minimum(first, tl.maximum(end - 1, 0)), mask=first < end, other=0.0)
    tl.store(first_ptr + seq, adv)


@triton.jit(do_not_specialize=["adv_div", "first_div", "first_mul", "thr", "n"],
            do_not_specialize_on_alignment=["n_valid_ptr", "below_max_ptr"])
def stats_kernel(
    lp_ptr, olp_ptr, adv_ptr, adv_div: tl.int64, first_ptr, first_div: tl.int64, first_mul: tl.int64, mask_ptr,
    key_ptr, hist1_ptr, below_ptr, below_max_ptr, thr: tl.int64, part_ptr, n_valid_ptr, n: tl.int64,
    OFFICIAL: tl.constexpr, HAS_MASK: tl.constexpr, ADV_PER_ROW: tl.constexpr, FIRST_PER_ROW: tl.constexpr,
    NB1: tl.constexpr, NLIMB: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
):
    """hist1_ptr: int64 [2, NB1] tail histogram; below_ptr: int64 [1 + NLIMB], the below part's
    count and limbs; below_max_ptr: int64, the largest below key (official); thr: the split's
    threshold key (m2po_ops.split.threshold_bits)."""
    # every block but the last is full: its accesses need no bounds mask (see common.in_bounds)
    pid = tl.program_id(0)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _stats_block(lp_ptr, olp_ptr, adv_ptr, adv_div, first_ptr, first_div, first_mul, mask_ptr, key_ptr,
                     hist1_ptr, below_ptr, below_max_ptr, thr, part_ptr, n_valid_ptr, n, pid, OFFICIAL, HAS_MASK,
                     ADV_PER_ROW, FIRST_PER_ROW, NB1, NLIMB, BLOCK, INTERP, True)
    else:
        _stats_block(lp_ptr, olp_ptr, adv_ptr, adv_div, first_ptr, first_div, first_mul, mask_ptr, key_ptr,
                     hist1_ptr, below_ptr, below_max_ptr, thr, part_ptr, n_valid_ptr, n, pid, OFFICIAL, HAS_MASK,
                     ADV_PER_ROW, FIRST_PER_ROW, NB1, NLIMB, BLOCK, INTERP, False)


@triton.jit
def _stats_block(
    lp_ptr, olp_ptr, adv_ptr, adv_div, first_ptr, first_div, first_mul, mask_ptr,
    key_ptr, hist1_ptr, below_ptr, below_max_ptr, thr, part_ptr, n_valid_ptr, n, pid,
    OFFICIAL: tl.constexpr, HAS_MASK: tl.constexpr, ADV_PER_ROW: tl.constexpr, FIRST_PER_ROW: tl.constexpr,
    NB1: tl.constexpr, NLIMB: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr, FULL: tl.constexpr,
):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = in_bounds(offs, n, FULL)
    lp, olp, adv, valid, nonfinite = load_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, n, HAS_MASK,
                                                 ADV_PER_ROW, FULL)
    delta = tl.where(valid, lp - olp, 0.0)
    m2 = delta * delta
    if OFFICIAL:
        # the authors' "harmful" tokens: first-token advantage sign and ratio side, in float32.
        # With r = exp(delta) correctly rounded to float32: r > 1 iff delta >= 2**-24 and
        # r < 1 iff delta < -2**-25 (exp rounds to 1 in between), so no exp is needed here.
        if FIRST_PER_ROW:
            first_idx = row_of(offs, first_div).to(tl.int64) * first_mul
        else:
            first_idx = offs
        adv_first = tl.load(first_ptr + first_idx, mask=inb, other=0.0)
        adv_first = tl.where(is_finite(adv_first), adv_first.to(tl.float32), 0.0)  # garbage first position reads 0
        trust = valid & (((adv_first > 1e-12) & (delta >= 5.9604644775390625e-08))
                         | ((adv_first < -1e-12) & (delta < -2.9802322387695312e-08)))
        ratio = ratio_f32(delta)
    else:
        trust = valid & (((adv > 0) & (delta > 0)) | ((adv < 0) & (delta < 0)))
        ratio = exp_f32(clamp(delta, -20.0, 20.0), INTERP)
    bits = m2.to(tl.int32, bitcast=True)
    key = tl.where(trust, bits, -1)
    tl.store(key_ptr + offs, key, mask=inb)

    tail = trust & (bits > thr)
    add_aggregated(hist1_ptr, hist1_ptr + NB1, bits >> L1_SHIFT, significand(bits), tail, BLOCK)
    below = trust & (bits <= thr)
    n_below = tl.sum(below.to(tl.int64))
    if n_below > 0:
        tl.atomic_add(below_ptr, n_below, sem="relaxed")
        add_limbs(below_ptr + 1, bits, below, NLIMB)
        if OFFICIAL:  # the value before the first hit when that hit is the tail's first token
            tl.atomic_max(below_max_ptr, tl.max(tl.where(below, bits, -1)).to(tl.int64), sem="relaxed")

    ratio = tl.where(valid, ratio, 0.0)
    n_valid = tl.sum(valid.to(tl.int64))
    tl.atomic_add(n_valid_ptr, n_valid, sem="relaxed")
    row = part_ptr + pid.to(tl.int64) * _STATS_COLS
    tl.store(row + 0, n_valid.to(tl.float64))
    tl.store(row + 1, tl.sum(trust.to(tl.int64)).to(tl.float64))
    tl.store(row + 2, tl.sum(-delta).to(tl.float64))
    tl.store(row + 3, tl.sum(ratio).to(tl.float64))
    tl.store(row + 4, tl.max(ratio).to(tl.float64))
    tl.store(row + 5, tl.sum(nonfinite.to(tl.int64)).to(tl.float64))


@triton.jit(do_not_specialize=["thr", "n"], do_not_specialize_on_alignment=["state_ptr"])
def level2_kernel(key_ptr, state_ptr, hist2_ptr, thr: tl.int64, n: tl.int64, NB2: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _level2_block(key_ptr, state_ptr, hist2_ptr, thr, n, pid, NB2, BLOCK, True)
    else:
        _level2_block(key_ptr, state_ptr, hist2_ptr, thr, n, pid, NB2, BLOCK, False)


@triton.jit
def _level2_block(key_ptr, state_ptr, hist2_ptr, thr, n, pid, NB2: tl.constexpr, BLOCK: tl.constexpr,
                  FULL: tl.constexpr):
    refine = tl.load(state_ptr + 0)
    if refine != 0:
        b1 = tl.load(state_ptr + 1)
        b0 = tl.load(state_ptr + 2)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(key_ptr + offs, mask=in_bounds(offs, n, FULL), other=-1)
        bucket = (key >> L1_SHIFT).to(tl.int64)
        low = key & (NB2 - 1)
        sig = significand(key)
        tail = key > thr  # (keys of T at or below the threshold are not in the histograms)
        add_aggregated(hist2_ptr, hist2_ptr + NB2, low, sig, tail & (bucket == b1), BLOCK)
        add_aggregated(hist2_ptr + 2 * NB2, hist2_ptr + 3 * NB2, low, sig, tail & (bucket == b0), BLOCK)


@triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["value_ptr"])
def ties_kernel(key_ptr, value_ptr, ties_ptr, n: tl.int64, KEEP_ALL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _ties_block(key_ptr, value_ptr, ties_ptr, n, pid, KEEP_ALL, BLOCK, True)
    else:
        _ties_block(key_ptr, value_ptr, ties_ptr, n, pid, KEEP_ALL, BLOCK, False)


@triton.jit
def _ties_block(key_ptr, value_ptr, ties_ptr, n, pid, KEEP_ALL: tl.constexpr, BLOCK: tl.constexpr,
                FULL: tl.constexpr):
    value = tl.load(value_ptr)
    if value != KEEP_ALL:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(key_ptr + offs, mask=in_bounds(offs, n, FULL), other=-1)
        tl.store(ties_ptr + pid, tl.sum((key == value).to(tl.int64)))


@triton.jit(do_not_specialize=["nblocks"], do_not_specialize_on_alignment=["value_ptr"])
def tie_scan_kernel(value_ptr, ties_ptr, nblocks: tl.int64, KEEP_ALL: tl.constexpr, CHUNK: tl.constexpr):
    value = tl.load(value_ptr)
    if value != KEEP_ALL:
        carry = tl.zeros((), tl.int64)
        for c in range(0, nblocks, CHUNK):
            idx = c + tl.arange(0, CHUNK)
            inb = idx < nblocks
            counts = tl.load(ties_ptr + idx, mask=inb, other=0)
            tl.store(ties_ptr + idx, carry + tl.cumsum(counts, 0) - counts, mask=inb)
            carry += tl.sum(counts)
