"""Token passes that build the mergeable statistics (see m2po_ops/radix_select.py for the format).

stats_kernel: the one full read of the inputs. Per token: delta, m2, trust-region membership,
the derivative as if nothing were masked (stored), keep and the key when asked. The threshold split (m2po_ops/split.py): trust-region tokens at or below
the threshold add to the below part (count, exact limb sum, and for the official rule the
maximum key), the tail above it to the level-1 histogram. Every histogram and sum update is an
int64 atomic (any order gives the same bits), pre-aggregated in the block so that an address
gets at most one atomic per block. Per-block metric partials are written, not atomically
added, so their sum is deterministic. The official rule compacts a wider list than the tail
it orders (every valid token above the threshold, its key -1 outside the trust region) and
the extreme ratios of the valid tokens outside it: with those, apply_official_kernel redoes
only that list under the solved clip bounds.
level2_kernel: level-2 histograms of the one or two level-1 buckets select1 chose, from the
tail keys; exits at once when select1 found nothing to refine (the common case).
ties_kernel: per-block counts of tail keys equal to the paper cut's value, for the tie rule;
exits at once when nothing is masked.
tie_scan_kernel: one program per chunk of blocks turns those counts into exclusive offsets (the
last to arrive scans the chunk totals), so the fix-up knows how many tied tokens precede each
block; exits at once likewise.
"""

import triton
import triton.language as tl

from .. import constants as C
from .common import (B0, B1, BELOW_COUNT, BELOW_LIMBS, F32_INF_BITS, HIST2_B0_COUNT, HIST2_B0_SUM, HIST2_B1_COUNT,
                     HIST2_B1_SUM, L1_SHIFT, MAX_LIMBS, RATIO_MAX, RATIO_MIN_FLIPPED, REFINE, STATS_CLIPPED,
                     STATS_LIST_LOSS, STATS_LOSS, STATS_NEG_DELTA, STATS_NONFINITE, STATS_RATIO_MAX, STATS_RATIO_SUM,
                     STATS_TRUST, STATS_VALID, TAIL_COUNT, TAIL_INF, TAIL_LIMBS, W_COUNT, W_PER_TOKEN, WRITE_GRAD,
                     WRITE_KEEP, WRITE_KEYS, READ_ADV_PER_ROW, READ_FIRST_PER_ROW, READ_MASK, READ_WEIGHTS,
                     add_aggregated, add_limbs, in_bounds, is_finite, last_to_arrive, load_tokens,
                     official_trust_region, paper_trust_region, ppo_clip_terms, ratio_f32, row_of, significand,
                     unclipped_terms, weighted_terms)

# per-block partials written by stats_kernel: float64 rows of C.STATS_COLS columns (the
# STATS_* slots of m2po_ops/constants.py). The compacted list's terms are kept apart so that a
# fix-up replaces their sum instead of subtracting from a sum that holds them: where the float64
# sum of the final terms is exact, so is every partial sum of them.
STATS_COLS = C.STATS_COLS
_STATS_COLS = tl.constexpr(STATS_COLS)


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


@triton.jit(do_not_specialize=["adv_div", "first_div", "first_mul", "thr", "lower_u_bits", "upper_u_bits", "n",
                               "layout", "outputs"],
            do_not_specialize_on_alignment=["poison_ptr", "n_valid_ptr", "below_max_ptr", "ratio_range_ptr"])
def stats_kernel(
    lp_ptr, olp_ptr, adv_ptr, adv_div: tl.int64, first_ptr, first_div: tl.int64, first_mul: tl.int64, mask_ptr,
    w_ptr, poison_ptr, grad_ptr, keep_ptr, key_ptr, tail_key_ptr, tail_pos_ptr, tail_term_ptr, tail_cnt_ptr,
    sums_ptr, below_max_ptr, ratio_range_ptr, thr: tl.int64, lower_u_bits: tl.int64, upper_u_bits: tl.int64,
    part_ptr, n_valid_ptr, n: tl.int64, layout: tl.int32, outputs: tl.int32,
    OFFICIAL: tl.constexpr, NB1: tl.constexpr, NLIMB: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
):
    """The one full read of the inputs. Writes, per token, the derivative as if nothing were
    masked (grad_ptr, the input dtype; paper: the straight-through -A r; official: the clipped
    surrogate's under the unconstrained bounds lower_u / upper_u) and, when asked, keep and the
    keys; per block, the tail compacted in token order (tail_key / tail_pos / tail_term at the
    block's offset, tail_cnt) for the passes that only look at the tail, the split's sums
    (sums_ptr: m2po_ops.radix_select's SUMS layout) and the metric partials. Official: the
    compacted list is the wide tail (tail_key -1 for its tokens outside the trust region, no
    tail_term), and ratio_range_ptr gets max(inf bits - ratio bits) and max(ratio bits)
    over the valid tokens outside it (0: none), for apply_official_kernel.

    layout: how to read (READ_* bits): a mask at mask_ptr, one advantage per row of adv_div
    tokens, the official rule's first advantage per row, per-token weights at w_ptr (else
    token-mean: the 1 / denominator scale is applied by finalize and in backward). outputs: which
    of the derivative, keep and the keys to write (WRITE_* bits). Both are runtime bit sets (each
    a uniform branch): one compiled variant serves every layout and kind of call of a dtype.
    poison_ptr: float32 0-d, 0 or NaN (invalid inputs found on the device), carried into every
    valid token's term."""
    # every block but the last is full: its accesses need no bounds mask (see common.in_bounds)
    pid = tl.program_id(0)
    has_mask = (layout & READ_MASK) != 0
    adv_per_row = (layout & READ_ADV_PER_ROW) != 0
    first_per_row = (layout & READ_FIRST_PER_ROW) != 0
    weights = tl.where((layout & READ_WEIGHTS) != 0, W_PER_TOKEN, W_COUNT)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        bits, tail = _stats_block(lp_ptr, olp_ptr, adv_ptr, adv_div, first_ptr, first_div, first_mul, mask_ptr, w_ptr,
                                  poison_ptr, grad_ptr, keep_ptr, key_ptr, tail_key_ptr, tail_pos_ptr, tail_term_ptr,
                                  tail_cnt_ptr, sums_ptr, below_max_ptr, ratio_range_ptr, thr, lower_u_bits,
                                  upper_u_bits, part_ptr, n_valid_ptr, n, outputs, pid, has_mask, adv_per_row,
                                  first_per_row, weights, OFFICIAL, NB1, NLIMB, BLOCK, INTERP, True)
    else:
        bits, tail = _stats_block(lp_ptr, olp_ptr, adv_ptr, adv_div, first_ptr, first_div, first_mul, mask_ptr, w_ptr,
                                  poison_ptr, grad_ptr, keep_ptr, key_ptr, tail_key_ptr, tail_pos_ptr, tail_term_ptr,
                                  tail_cnt_ptr, sums_ptr, below_max_ptr, ratio_range_ptr, thr, lower_u_bits,
                                  upper_u_bits, part_ptr, n_valid_ptr, n, outputs, pid, has_mask, adv_per_row,
                                  first_per_row, weights, OFFICIAL, NB1, NLIMB, BLOCK, INTERP, False)
    # the tail's level-1 histogram, once for both block kinds (the in-block sort is large code)
    add_aggregated(sums_ptr, sums_ptr + NB1, bits >> L1_SHIFT, significand(bits), tail, BLOCK)


@triton.jit
def _stats_block(
    lp_ptr, olp_ptr, adv_ptr, adv_div, first_ptr, first_div, first_mul, mask_ptr, w_ptr, poison_ptr,
    grad_ptr, keep_ptr, key_ptr, tail_key_ptr, tail_pos_ptr, tail_term_ptr, tail_cnt_ptr, sums_ptr,
    below_max_ptr, ratio_range_ptr, thr, lower_u_bits, upper_u_bits, part_ptr, n_valid_ptr, n, outputs, pid,
    has_mask, adv_per_row, first_per_row, weights, OFFICIAL: tl.constexpr, NB1: tl.constexpr, NLIMB: tl.constexpr,
    BLOCK: tl.constexpr, INTERP: tl.constexpr, FULL: tl.constexpr,
):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = in_bounds(offs, n, FULL)
    lp, olp, adv, valid, nonfinite = load_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, n, has_mask,
                                                 adv_per_row, FULL)
    delta = tl.where(valid, lp - olp, 0.0)
    adv = tl.where(valid, adv, 0.0)
    m2 = delta * delta
    # the rule's trust region, and the surrogate under the bounds nothing has cut yet
    if OFFICIAL:
        if first_per_row:
            first_idx = row_of(offs, first_div).to(tl.int64) * first_mul
        else:
            first_idx = offs
        adv_first = tl.load(first_ptr + first_idx, mask=inb, other=0.0)
        adv_first = tl.where(is_finite(adv_first), adv_first.to(tl.float32), 0.0)  # garbage first position reads 0
        trust = official_trust_region(adv_first, delta, valid)
        ratio = ratio_f32(delta)
        lower_u = lower_u_bits.to(tl.int32).to(tl.float32, bitcast=True)
        upper_u = upper_u_bits.to(tl.int32).to(tl.float32, bitcast=True)
        loss, grad, clipped = ppo_clip_terms(adv, ratio, valid, lower_u, upper_u)
        keep = valid & ~clipped
    else:
        trust = paper_trust_region(adv, delta, valid)
        ratio, loss, grad = unclipped_terms(adv, delta, valid, INTERP)
        keep = valid
    bits = m2.to(tl.int32, bitcast=True)
    # (uniform branches on a runtime bit set: one compiled variant serves every kind of call)
    if (outputs & WRITE_KEYS) != 0:
        tl.store(key_ptr + offs, tl.where(trust, bits, -1), mask=inb)
    if (outputs & WRITE_KEEP) != 0:
        tl.store(keep_ptr + offs, keep, mask=inb)
    term, grad = weighted_terms(loss, grad, valid, w_ptr, offs, inb, tl.load(poison_ptr), weights)
    if (outputs & WRITE_GRAD) != 0:
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inb)
    # the threshold split: the tail, compacted in token order, and its histogram; the sums
    tail = trust & (bits > thr)
    if OFFICIAL:
        listed = _compact_wide_tail(bits, trust, valid, ratio, thr, tail_key_ptr, tail_pos_ptr, tail_cnt_ptr,
                                    ratio_range_ptr, pid, BLOCK)
    else:
        listed = _compact_tail(bits, tail, term, tail_key_ptr, tail_pos_ptr, tail_term_ptr, tail_cnt_ptr, pid, BLOCK)
    _add_split_sums(bits, trust, tail, thr, sums_ptr, below_max_ptr, OFFICIAL, NLIMB, INTERP)
    n_valid = tl.sum(valid.to(tl.int64))
    tl.atomic_add(n_valid_ptr, n_valid, sem="relaxed")
    _store_partials(part_ptr + pid.to(tl.int64) * _STATS_COLS, n_valid, trust, delta, tl.where(valid, ratio, 0.0),
                    nonfinite, term, listed, valid & ~keep)
    return bits, tail


@triton.jit
def _compact_tail(bits, tail, term, tail_key_ptr, tail_pos_ptr, tail_term_ptr, tail_cnt_ptr, pid, BLOCK: tl.constexpr):
    """The paper rule: the block's tail (trust-region keys above the threshold) in token order,
    with its terms. Returns the listed tokens."""
    n_tail = tl.sum(tail.to(tl.int32))
    tl.store(tail_cnt_ptr + pid, n_tail)
    if n_tail > 0:
        at = pid.to(tl.int64) * BLOCK + tl.cumsum(tail.to(tl.int32), 0) - 1
        tl.store(tail_key_ptr + at, bits, mask=tail)
        tl.store(tail_pos_ptr + at, tl.arange(0, BLOCK), mask=tail)
        tl.store(tail_term_ptr + at, term, mask=tail)
    return tail


@triton.jit
def _compact_wide_tail(bits, trust, valid, ratio, thr, tail_key_ptr, tail_pos_ptr, tail_cnt_ptr, ratio_range_ptr,
                       pid, BLOCK: tl.constexpr):
    """The official rule: the compacted list is the *wide* tail, every valid token above the
    threshold, in the trust region or not. A token outside it has m2 <= thr, so its ratio is
    near 1 and the solved clip bounds normally leave it inside [lower, upper], where its
    outputs are those stats wrote; apply_official then redoes only this list (and checks the
    "normally" with the ratio extremes recorded here). Keys -1 mark the wide tail's tokens
    outside the trust region, which level2 skips like any key <= thr. Returns the listed
    tokens."""
    wide = valid & (bits > thr)
    n_wide = tl.sum(wide.to(tl.int32))
    tl.store(tail_cnt_ptr + pid, n_wide)
    if n_wide > 0:
        at = pid.to(tl.int64) * BLOCK + tl.cumsum(wide.to(tl.int32), 0) - 1
        tl.store(tail_key_ptr + at, tl.where(trust, bits, -1), mask=wide)
        tl.store(tail_pos_ptr + at, tl.arange(0, BLOCK), mask=wide)
    # the smallest and largest ratio outside the wide tail, as two int64 maxima that the
    # scratch memset's 0 leaves at "no token" (ratios are >= 0: their bits order as ints)
    narrow = valid & (bits <= thr)
    if tl.sum(narrow.to(tl.int32)) > 0:
        rbits = ratio.to(tl.int32, bitcast=True)
        tl.atomic_max(ratio_range_ptr + RATIO_MIN_FLIPPED,
                      tl.max(tl.where(narrow, -rbits + F32_INF_BITS, 0)).to(tl.int64), sem="relaxed")
        tl.atomic_max(ratio_range_ptr + RATIO_MAX, tl.max(tl.where(narrow, rbits, 0)).to(tl.int64), sem="relaxed")
    return wide


@triton.jit
def _add_split_sums(bits, trust, tail, thr, sums_ptr, below_max_ptr, OFFICIAL: tl.constexpr, NLIMB: tl.constexpr,
                    INTERP: tl.constexpr):
    """The mergeable sums of the threshold split but the level-1 histogram: the tail's count,
    infinite keys and exact limbs; the below part's count, exact limbs and (official) largest
    key."""
    n_tail = tl.sum(tail.to(tl.int32))
    if n_tail > 0:
        finite = tail & (bits < F32_INF_BITS)
        tl.atomic_add(sums_ptr + TAIL_COUNT, n_tail.to(tl.int64), sem="relaxed")
        n_inf = tl.sum((tail & ~finite).to(tl.int64))
        if n_inf > 0:
            tl.atomic_add(sums_ptr + TAIL_INF, n_inf, sem="relaxed")
        add_limbs(sums_ptr + TAIL_LIMBS, bits, finite, MAX_LIMBS, INTERP)
    below = trust & (bits <= thr)
    n_below = tl.sum(below.to(tl.int64))
    if n_below > 0:
        tl.atomic_add(sums_ptr + BELOW_COUNT, n_below, sem="relaxed")
        add_limbs(sums_ptr + BELOW_LIMBS, bits, below, NLIMB, INTERP)
        if OFFICIAL:  # the value before the first hit when that hit is the tail's first token
            tl.atomic_max(below_max_ptr, tl.max(tl.where(below, bits, -1)).to(tl.int64), sem="relaxed")


@triton.jit
def _store_partials(row, n_valid, trust, delta, ratio, nonfinite, term, listed, clipped):
    """The block's metric and loss partials (float64 row, STATS_* columns). The terms are summed
    in float64 as the torch backend sums them: where that sum is exact the loss has the same
    bits whatever the order (README, "Float details"); the compacted list's apart, for the
    fix-up passes to replace."""
    tl.store(row + STATS_VALID, n_valid.to(tl.float64))
    tl.store(row + STATS_TRUST, tl.sum(trust.to(tl.int64)).to(tl.float64))
    tl.store(row + STATS_NEG_DELTA, tl.sum(-delta).to(tl.float64))
    tl.store(row + STATS_RATIO_SUM, tl.sum(ratio).to(tl.float64))
    tl.store(row + STATS_RATIO_MAX, tl.max(ratio).to(tl.float64))
    tl.store(row + STATS_NONFINITE, tl.sum(nonfinite.to(tl.int64)).to(tl.float64))
    term64 = term.to(tl.float64)
    tl.store(row + STATS_LOSS, tl.sum(tl.where(listed, 0.0, term64)))
    tl.store(row + STATS_CLIPPED, tl.sum(clipped.to(tl.int64)).to(tl.float64))
    tl.store(row + STATS_LIST_LOSS, tl.sum(tl.where(listed, term64, 0.0)))


@triton.jit
def _tail_block(tail_key_ptr, tail_cnt_ptr, pid, BLOCK: tl.constexpr):
    """One block's compacted tail keys (-1 past its count) and the count; masked loads, so
    only the tail's bytes move."""
    cnt = tl.load(tail_cnt_ptr + pid)
    j = tl.arange(0, BLOCK)
    key = tl.load(tail_key_ptr + pid.to(tl.int64) * BLOCK + j, mask=j < cnt, other=-1)
    return key, cnt


@triton.jit(do_not_specialize=["thr", "n"], do_not_specialize_on_alignment=["state_ptr"])
def level2_kernel(key_ptr, cnt_ptr, state_ptr, hist2_ptr, thr: tl.int64, n: tl.int64, OFFICIAL: tl.constexpr,
                  DENSE: tl.constexpr, NB2: tl.constexpr, BLOCK: tl.constexpr):
    """Level-2 histograms of the tail keys in buckets b1 (slot 0) and, official, b0 (slot 1).
    key_ptr: the compacted tail with its counts at cnt_ptr, or (DENSE) every token's key (the
    micro-batch and process-group paths keep those), of which the tail is key > thr (so the
    official wide tail's -1 keys, tokens outside the trust region, never count; thr >= -1)."""
    pid = tl.program_id(0)
    if tl.load(state_ptr + REFINE) != 0:
        j = tl.arange(0, BLOCK)
        if DENSE:
            cnt = tl.minimum(n - pid.to(tl.int64) * BLOCK, BLOCK)
        else:
            cnt = tl.load(cnt_ptr + pid).to(tl.int64)
        if cnt > 0:
            key = tl.load(key_ptr + pid.to(tl.int64) * BLOCK + j, mask=j < cnt, other=-1)
            tail = key > thr
            bucket = (key >> L1_SHIFT).to(tl.int64)
            low = key & (NB2 - 1)
            sig = significand(key)
            add_aggregated(hist2_ptr + HIST2_B1_COUNT * NB2, hist2_ptr + HIST2_B1_SUM * NB2, low, sig,
                           tail & (bucket == tl.load(state_ptr + B1)), BLOCK)
            if OFFICIAL:
                add_aggregated(hist2_ptr + HIST2_B0_COUNT * NB2, hist2_ptr + HIST2_B0_SUM * NB2, low, sig,
                               tail & (bucket == tl.load(state_ptr + B0)), BLOCK)


@triton.jit(do_not_specialize_on_alignment=["value_ptr"])
def ties_kernel(tail_key_ptr, tail_cnt_ptr, value_ptr, ties_ptr, KEEP_ALL: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: the tail tokens sitting exactly at the paper cut's value."""
    pid = tl.program_id(0)
    value = tl.load(value_ptr)
    if value != KEEP_ALL:
        key, cnt = _tail_block(tail_key_ptr, tail_cnt_ptr, pid, BLOCK)
        tl.store(ties_ptr + pid, tl.sum((key == value).to(tl.int64)))


@triton.jit(do_not_specialize=["nblocks"], do_not_specialize_on_alignment=["value_ptr", "counter_ptr"])
def tie_scan_kernel(value_ptr, ties_ptr, chunk_ptr, counter_ptr, nblocks: tl.int64, KEEP_ALL: tl.constexpr,
                    CHUNK: tl.constexpr):
    """Exclusive offsets of the per-block tie counts: in place within each chunk of CHUNK blocks
    (one program each), and chunk_ptr[c] = the ties of the chunks before c (the last program to
    arrive scans the chunk totals). Tied tokens before block b: ties[b] + chunk[b // CHUNK]."""
    value = tl.load(value_ptr)
    if value != KEEP_ALL:
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        idx = pid.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        inb = idx < nblocks
        counts = tl.load(ties_ptr + idx, mask=inb, other=0)
        tl.store(ties_ptr + idx, tl.cumsum(counts, 0) - counts, mask=inb)
        tl.store(chunk_ptr + pid, tl.sum(counts))
        if last_to_arrive(counter_ptr, programs):
            carry = tl.zeros((), tl.int64)
            for c in range(0, programs, CHUNK):
                cidx = c + tl.arange(0, CHUNK)
                cin = cidx < programs
                totals = tl.load(chunk_ptr + cidx, mask=cin, other=0, cache_modifier=".cg")
                tl.store(chunk_ptr + cidx, carry + tl.cumsum(totals, 0) - totals, mask=cin)
                carry += tl.sum(totals)
