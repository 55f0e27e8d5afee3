"""The passes after the cut: the fix-up of what stats wrote, and the final reduction.

stats_kernel already wrote every token's derivative, loss term and keep as if nothing were
masked. So:
fix_paper_kernel: per block, only the compacted tail (the only tokens a paper cut can mask):
the tokens above the cut value, and the tied ones past ties_kept in token order, get a zero
derivative and keep = False; the sum of the other tail tokens' terms (replacing the tail's
sum that stats kept apart) and the masked count go to per-block partials. Exits at once
when nothing is masked (the common case), and reads only the tail's bytes otherwise.
apply_official_kernel: when the solved clip bounds differ from the unconstrained ones stats
used (otherwise it exits at once), a token's outputs change only if its ratio lies outside the
solved bounds. Those are normally all in stats' compacted wide tail (the valid tokens with m2
above the threshold, trust region or not), and stats' ratio extremes of the other tokens say
whether they are: then only the wide tail is gathered and recomputed, the sum of its new loss
terms replacing the one stats kept of the old (never subtracting them: a block's loss stays a
sum of final terms, exact where their sum is) and its clipped count's change added to stats';
else one more read of the inputs recomputes every token.
finalize_kernel: per-block partials to the loss, the backward scale and the metrics, in a fixed
order (deterministic, no float atomics): one program per FINAL_CHUNK blocks, the last to arrive
adding the chunk rows.
"""

import triton
import triton.language as tl

from .. import constants as C
from .common import (APPLY_LIST, APPLY_LOSS, APPLY_MASKED, APPLY_REDONE, APPLY_WHOLE, F32_INF_BITS, FINAL_LOSS,
                     FINAL_MASKED, OUT_KL, OUT_MASKED_FRACTION, OUT_NONFINITE, OUT_RATIO_MAX,
                     OUT_RATIO_MEAN, OUT_SCALE, OUT_TRUST_REGION_FRACTION, RATIO_MAX, RATIO_MIN_FLIPPED,
                     STATS_CLIPPED, STATS_LIST_LOSS, STATS_LOSS, STATS_NEG_DELTA, STATS_NONFINITE, STATS_RATIO_MAX,
                     STATS_RATIO_SUM, STATS_TRUST, STATS_VALID, W_COUNT, W_NONE, W_PER_TOKEN, W_SCALAR,
                     W_TENSOR_DENOM, as_f64, gather_tokens, in_bounds, last_to_arrive, load_tokens, ppo_clip_terms,
                     ratio_f32, reciprocal_f32, weighted_terms)

# per-block partials of the fix-up passes (float64 rows, APPLY_* columns) and finalize's
# per-chunk rows (the first six columns as stats', then FINAL_LOSS and FINAL_MASKED)
_APPLY_COLS = tl.constexpr(C.APPLY_COLS)
_FINAL_COLS = tl.constexpr(C.FINAL_COLS)


@triton.jit(do_not_specialize_on_alignment=["poison_ptr", "value_ptr", "ties_kept_ptr"])
def fix_paper_kernel(
    tail_key_ptr, tail_pos_ptr, tail_term_ptr, tail_cnt_ptr, value_ptr, ties_kept_ptr, ties_ptr, tie_chunk_ptr,
    poison_ptr, grad_ptr, keep_ptr, part_ptr,
    KEEP_ALL: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_KEEP: tl.constexpr, TIE_CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    value = tl.load(value_ptr)
    if value != KEEP_ALL:
        cnt = tl.load(tail_cnt_ptr + pid)
        if cnt > 0:
            j = tl.arange(0, BLOCK)
            at = pid.to(tl.int64) * BLOCK + j
            inside = j < cnt
            key = tl.load(tail_key_ptr + at, mask=inside, other=-1)
            tie = inside & (key == value)
            tie64 = tie.to(tl.int64)
            # tied tokens before this one in token order: earlier chunks, earlier blocks, this block
            prior = tl.load(tie_chunk_ptr + pid // TIE_CHUNK) + tl.load(ties_ptr + pid)
            rank = prior + tl.cumsum(tie64, 0) - tie64
            masked = inside & ((key > value) | (tie & (rank >= tl.load(ties_kept_ptr))))
            where = pid.to(tl.int64) * BLOCK + tl.load(tail_pos_ptr + at, mask=masked, other=0)
            row = part_ptr + pid.to(tl.int64) * _APPLY_COLS
            if WRITE_GRAD:
                # a masked token's derivative is 0 (NaN when the inputs were found invalid, as every
                # valid token's)
                zero = 0.0 * (1.0 + tl.load(poison_ptr))
                tl.store(grad_ptr + where, tl.full([BLOCK], 0.0, tl.float32) + zero, mask=masked)
                # the kept tail tokens' terms: their sum replaces the whole tail's
                term = tl.load(tail_term_ptr + at, mask=inside & ~masked, other=0.0)
                tl.store(row + APPLY_LOSS, tl.sum(term.to(tl.float64)))
            if WRITE_KEEP:
                tl.store(keep_ptr + where, tl.zeros([BLOCK], tl.int1), mask=masked)
            tl.store(row + APPLY_MASKED, tl.sum(masked.to(tl.int64)).to(tl.float64))
            tl.store(row + APPLY_REDONE, APPLY_LIST)


@triton.jit(do_not_specialize=["adv_div", "lower_u_bits", "upper_u_bits", "n"],
            do_not_specialize_on_alignment=["poison_ptr", "lower_ptr", "upper_ptr", "ratio_range_ptr"])
def apply_official_kernel(
    lp_ptr, olp_ptr, adv_ptr, adv_div: tl.int64, mask_ptr, w_ptr, poison_ptr, lower_ptr, upper_ptr,
    lower_u_bits: tl.int64, upper_u_bits: tl.int64, ratio_range_ptr, tail_pos_ptr, tail_cnt_ptr, grad_ptr, keep_ptr,
    part_ptr, n: tl.int64,
    HAS_MASK: tl.constexpr, ADV_PER_ROW: tl.constexpr, WEIGHTS: tl.constexpr, WRITE_KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """stats wrote every token's outputs under the unconstrained bounds [lower_u, upper_u]; make
    them those of the solved bounds [lower, upper]. A token whose ratio lies inside both
    intervals gets the same outputs from either (the clamp is the identity: not clipped, the
    derivative -A r), and stats recorded the extreme ratios of the tokens outside its compacted
    wide tail. So:
    - the bounds are the unconstrained ones: nothing to do (every program returns at once);
    - those extremes lie inside both intervals (the common case: the solved tau_c is at least
      about sqrt(thr), the wide tail holds every |delta| above that): only the block's wide tail
      is recomputed, its outputs written in place, the sum of its new terms stored to replace
      the sum stats kept of its old ones, and its clipped count's change (APPLY_LIST);
    - else (a first hit at the tail's first token, a tau_c of 0, a process group's or a given
      cut's narrower bounds): every token of the block, its partials replacing stats'
      (APPLY_WHOLE).
    """
    lower = tl.load(lower_ptr)
    upper = tl.load(upper_ptr)
    same = (lower.to(tl.int32, bitcast=True) == lower_u_bits.to(tl.int32)) & (
        upper.to(tl.int32, bitcast=True) == upper_u_bits.to(tl.int32))
    if not same:  # the solved bounds differ from those stats used
        lower_u = lower_u_bits.to(tl.int32).to(tl.float32, bitcast=True)
        upper_u = upper_u_bits.to(tl.int32).to(tl.float32, bitcast=True)
        # (no token: the minimum decodes to inf, the maximum to 0)
        r_min = (-tl.load(ratio_range_ptr + RATIO_MIN_FLIPPED) + F32_INF_BITS).to(tl.int32).to(tl.float32, bitcast=True)
        r_max = tl.load(ratio_range_ptr + RATIO_MAX).to(tl.int32).to(tl.float32, bitcast=True)
        # inside both intervals: the solved bounds lie inside the unconstrained ones except
        # for a tau_c above ln(1e5) (then upper > upper_u), where this still holds exactly
        tail_only = (r_min >= lower) & (r_min >= lower_u) & (r_max <= upper) & (r_max <= upper_u)
        pid = tl.program_id(0)
        if tail_only:
            _official_tail(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, w_ptr, poison_ptr, lower, upper, lower_u,
                           upper_u, tail_pos_ptr, tail_cnt_ptr, grad_ptr, keep_ptr, part_ptr, pid, HAS_MASK,
                           ADV_PER_ROW, WEIGHTS, WRITE_KEEP, BLOCK)
        else:
            if (pid.to(tl.int64) + 1) * BLOCK <= n:
                _official_block(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, w_ptr, poison_ptr, lower, upper,
                                grad_ptr, keep_ptr, part_ptr, n, pid, HAS_MASK, ADV_PER_ROW, WEIGHTS, WRITE_KEEP,
                                BLOCK, True)
            else:
                _official_block(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, w_ptr, poison_ptr, lower, upper,
                                grad_ptr, keep_ptr, part_ptr, n, pid, HAS_MASK, ADV_PER_ROW, WEIGHTS, WRITE_KEEP,
                                BLOCK, False)


@triton.jit
def _official_tail(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, w_ptr, poison_ptr, lower, upper, lower_u, upper_u,
                   tail_pos_ptr, tail_cnt_ptr, grad_ptr, keep_ptr, part_ptr, pid, HAS_MASK: tl.constexpr,
                   ADV_PER_ROW: tl.constexpr, WEIGHTS: tl.constexpr, WRITE_KEEP: tl.constexpr,
                   BLOCK: tl.constexpr):
    """The block's wide tail (stats' compacted list: valid tokens with m2 above the threshold)
    under the solved bounds: the outputs written at their positions; to the partial row, the
    float64 sum of the new terms (replacing the sum stats kept of the old ones: no old term is
    subtracted, so an exact final sum stays exact and an infinite old term leaves no inf - inf)
    and the change in the clipped count (under the unconstrained bounds, as stats counted)."""
    cnt = tl.load(tail_cnt_ptr + pid)
    if cnt > 0:
        j = tl.arange(0, BLOCK)
        at = pid.to(tl.int64) * BLOCK + j
        inside = j < cnt
        offs = pid.to(tl.int64) * BLOCK + tl.load(tail_pos_ptr + at, mask=inside, other=0)
        lp, olp, adv, valid, _ = gather_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, inside, HAS_MASK,
                                               ADV_PER_ROW)
        delta = tl.where(valid, lp - olp, 0.0)
        adv = tl.where(valid, adv, 0.0)
        ratio = ratio_f32(delta)
        _, _, clipped_u = ppo_clip_terms(adv, ratio, valid, lower_u, upper_u)  # what stats counted
        loss, grad, clipped = ppo_clip_terms(adv, ratio, valid, lower, upper)
        if WRITE_KEEP:
            tl.store(keep_ptr + offs, valid & ~clipped, mask=inside)
        row = part_ptr + pid.to(tl.int64) * _APPLY_COLS
        if WEIGHTS != W_NONE:
            term, grad = weighted_terms(loss, grad, valid, w_ptr, offs, inside, tl.load(poison_ptr), WEIGHTS)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)
            tl.store(row + APPLY_LOSS, tl.sum(term.to(tl.float64)))
        tl.store(row + APPLY_MASKED, (tl.sum((valid & clipped).to(tl.int64)) - tl.sum((valid & clipped_u).to(tl.int64)))
                 .to(tl.float64))
        tl.store(row + APPLY_REDONE, APPLY_LIST)


@triton.jit
def _official_block(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, w_ptr, poison_ptr, lower, upper, grad_ptr, keep_ptr,
                    part_ptr, n, pid, HAS_MASK: tl.constexpr, ADV_PER_ROW: tl.constexpr, WEIGHTS: tl.constexpr,
                    WRITE_KEEP: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = in_bounds(offs, n, FULL)
    lp, olp, adv, valid, _ = load_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, n, HAS_MASK, ADV_PER_ROW,
                                         FULL)
    delta = tl.where(valid, lp - olp, 0.0)
    adv = tl.where(valid, adv, 0.0)
    loss, grad, clipped = ppo_clip_terms(adv, ratio_f32(delta), valid, lower, upper)
    if WRITE_KEEP:
        tl.store(keep_ptr + offs, valid & ~clipped, mask=inb)
    row = part_ptr + pid.to(tl.int64) * _APPLY_COLS
    if WEIGHTS != W_NONE:  # (the same weighting as stats_kernel)
        term, grad = weighted_terms(loss, grad, valid, w_ptr, offs, inb, tl.load(poison_ptr), WEIGHTS)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inb)
        tl.store(row + APPLY_LOSS, tl.sum(term.to(tl.float64)))
    tl.store(row + APPLY_MASKED, tl.sum((valid & clipped).to(tl.int64)).to(tl.float64))
    tl.store(row + APPLY_REDONE, APPLY_WHOLE)


@triton.jit(do_not_specialize=["denom_bits", "nblocks"],
            do_not_specialize_on_alignment=["denom_ptr", "out_ptr", "loss_ptr", "counter_ptr"])
def finalize_kernel(stats_ptr, apply_ptr, chunk_ptr, counter_ptr, denom_ptr, denom_bits: tl.int64, out_ptr,
                    loss_ptr, nblocks: tl.int64, WEIGHTS: tl.constexpr, STATS_COLS: tl.constexpr,
                    CHUNK: tl.constexpr):
    """out (float32): masked_fraction, trust_region_fraction, kl, ratio_mean, ratio_max,
    num_nonfinite, and the backward scale (token-mean: the float32 1 / denominator, as torch's
    division rounds it; else 1); loss (float32 0-d, its own allocation: an op's outputs share
    no memory). The loss: token-mean, the float64 sum of the float32 terms times
    that scale, rounded once; per-token weights, the float64 sum of the weighted terms.

    Per block, by what the fix-up redid (apply column APPLY_REDONE): nothing, stats' two sums (outside and
    inside the compacted list); the list, stats' outside sum plus the list's new sum; the whole
    block, its new sum. So every block's loss is a sum of final terms only. The masked count:
    stats' clipped count (0 for the paper rule) plus the fix-up's, or the fix-up's alone."""
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    inb = b < nblocks
    row = stats_ptr + b * STATS_COLS
    arow = apply_ptr + b * _APPLY_COLS
    redone = tl.load(arow + APPLY_REDONE, mask=inb, other=0.0)
    a_loss = tl.load(arow + APPLY_LOSS, mask=inb, other=0.0)
    a_masked = tl.load(arow + APPLY_MASKED, mask=inb, other=0.0)
    listed = tl.where(redone == APPLY_LIST, a_loss, tl.load(row + STATS_LIST_LOSS, mask=inb, other=0.0))
    loss = tl.where(redone == APPLY_WHOLE, a_loss, tl.load(row + STATS_LOSS, mask=inb, other=0.0) + listed)
    masked = tl.where(redone == APPLY_WHOLE, a_masked, tl.load(row + STATS_CLIPPED, mask=inb, other=0.0) + a_masked)
    out = chunk_ptr + pid.to(tl.int64) * _FINAL_COLS
    # (the first six columns are stats': each chunk row keeps their slots)
    tl.store(out + STATS_VALID, tl.sum(tl.load(row + STATS_VALID, mask=inb, other=0.0)))
    tl.store(out + STATS_TRUST, tl.sum(tl.load(row + STATS_TRUST, mask=inb, other=0.0)))
    tl.store(out + STATS_NEG_DELTA, tl.sum(tl.load(row + STATS_NEG_DELTA, mask=inb, other=0.0)))
    tl.store(out + STATS_RATIO_SUM, tl.sum(tl.load(row + STATS_RATIO_SUM, mask=inb, other=0.0)))
    tl.store(out + STATS_RATIO_MAX, tl.max(tl.load(row + STATS_RATIO_MAX, mask=inb, other=0.0)))
    tl.store(out + STATS_NONFINITE, tl.sum(tl.load(row + STATS_NONFINITE, mask=inb, other=0.0)))
    tl.store(out + FINAL_LOSS, tl.sum(loss))
    tl.store(out + FINAL_MASKED, tl.sum(masked))
    programs = tl.num_programs(0)
    if last_to_arrive(counter_ptr, programs):
        _finish(chunk_ptr, denom_ptr, denom_bits, out_ptr, loss_ptr, programs, WEIGHTS, CHUNK)


@triton.jit
def _finish(chunk_ptr, denom_ptr, denom_bits, out_ptr, loss_ptr, programs, WEIGHTS: tl.constexpr,
            CHUNK: tl.constexpr):
    n_valid = tl.zeros((), tl.float64)
    n_trust = tl.zeros((), tl.float64)
    neg_delta = tl.zeros((), tl.float64)
    ratio_sum = tl.zeros((), tl.float64)
    ratio_max = tl.zeros((), tl.float64)
    nonfinite = tl.zeros((), tl.float64)
    loss = tl.zeros((), tl.float64)
    masked = tl.zeros((), tl.float64)
    for c in range(0, programs, CHUNK):
        r = c + tl.arange(0, CHUNK)
        inr = r < programs
        row = chunk_ptr + r.to(tl.int64) * _FINAL_COLS
        n_valid += tl.sum(tl.load(row + STATS_VALID, mask=inr, other=0.0, cache_modifier=".cg"))
        n_trust += tl.sum(tl.load(row + STATS_TRUST, mask=inr, other=0.0, cache_modifier=".cg"))
        neg_delta += tl.sum(tl.load(row + STATS_NEG_DELTA, mask=inr, other=0.0, cache_modifier=".cg"))
        ratio_sum += tl.sum(tl.load(row + STATS_RATIO_SUM, mask=inr, other=0.0, cache_modifier=".cg"))
        ratio_max = tl.maximum(ratio_max, tl.max(tl.load(row + STATS_RATIO_MAX, mask=inr, other=0.0,
                                                         cache_modifier=".cg")))
        nonfinite += tl.sum(tl.load(row + STATS_NONFINITE, mask=inr, other=0.0, cache_modifier=".cg"))
        loss += tl.sum(tl.load(row + FINAL_LOSS, mask=inr, other=0.0, cache_modifier=".cg"))
        masked += tl.sum(tl.load(row + FINAL_MASKED, mask=inr, other=0.0, cache_modifier=".cg"))
    # the token-mean scale: the same float32 value as the torch backend's 1 / denominator
    if WEIGHTS == W_COUNT:  # a valid-token count (int64 at denom_ptr)
        scale = reciprocal_f32(tl.maximum(tl.load(denom_ptr).to(tl.float32), 1.0))
    elif WEIGHTS == W_SCALAR:  # a Python-number denominator (rounded to float32 first)
        scale = reciprocal_f32(as_f64(denom_bits).to(tl.float32))
    elif WEIGHTS == W_TENSOR_DENOM:  # a tensor denominator
        scale = reciprocal_f32(tl.load(denom_ptr).to(tl.float32))
    else:
        scale = tl.full((), 1.0, tl.float32)
    if WEIGHTS == W_PER_TOKEN:
        loss32 = loss.to(tl.float32)
    else:
        # (a zero sum stays 0 under a zero denominator's inf scale; and a non-finite scale scales
        # no derivative, so padding keeps its zero)
        loss32 = tl.where(loss == 0.0, loss, loss * scale.to(tl.float64)).to(tl.float32)
        scale = tl.where((scale - scale) == 0.0, scale, 0.0)
    denom = tl.maximum(n_valid, 1.0)
    tl.store(loss_ptr, loss32)
    tl.store(out_ptr + OUT_MASKED_FRACTION, (masked / denom).to(tl.float32))
    tl.store(out_ptr + OUT_TRUST_REGION_FRACTION, (n_trust / denom).to(tl.float32))
    tl.store(out_ptr + OUT_KL, (neg_delta / denom).to(tl.float32))
    tl.store(out_ptr + OUT_RATIO_MEAN, (ratio_sum / denom).to(tl.float32))
    tl.store(out_ptr + OUT_RATIO_MAX, ratio_max.to(tl.float32))
    tl.store(out_ptr + OUT_NONFINITE, nonfinite.to(tl.float32))
    tl.store(out_ptr + OUT_SCALE, scale)
