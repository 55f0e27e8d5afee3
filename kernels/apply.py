"""The apply pass and the final reduction.

apply_kernel: one read of the inputs with the solved cut. Per token: keep, the surrogate l_i
and its gradient w_i * dl_i/dlogprobs_i, stored in forward so backward only scales it; per-block
loss and masked-count partials.
finalize_kernel: one program that sums the per-block partials in a fixed order (deterministic,
no float atomics) into the loss and the metrics.
"""

import triton
import triton.language as tl

from .common import as_f64, clamp, exp_f32, in_bounds, load_tokens, ratio_f32, reciprocal_f32

# weights
W_NONE, W_COUNT, W_SCALAR, W_TENSOR_DENOM, W_PER_TOKEN = 0, 1, 2, 3, 4
APPLY_COLS = 2  # per-block partials of apply_kernel (float64): loss sum, masked tokens
_APPLY_COLS = tl.constexpr(APPLY_COLS)


@triton.jit(do_not_specialize=["adv_div", "denom_bits", "n"],
            do_not_specialize_on_alignment=["denom_ptr", "poison_ptr", "value_ptr", "ties_kept_ptr", "lower_ptr",
                                            "upper_ptr", "ties_ptr"])
def apply_kernel(
    lp_ptr, olp_ptr, adv_ptr, adv_div: tl.int64, mask_ptr, key_ptr, w_ptr, denom_ptr, denom_bits: tl.int64,
    poison_ptr, value_ptr, ties_kept_ptr, lower_ptr, upper_ptr, ties_ptr,
    keep_ptr, grad_ptr, part_ptr, n: tl.int64,
    OFFICIAL: tl.constexpr, HAS_MASK: tl.constexpr, ADV_PER_ROW: tl.constexpr, WEIGHTS: tl.constexpr,
    KEEP_ALL: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
):
    """w_ptr: per-token weights (W_PER_TOKEN); denom_ptr: the 0-d count or denominator
    (W_COUNT, W_TENSOR_DENOM); denom_bits: a Python-number denominator (W_SCALAR); poison_ptr:
    float32 0-d added to every weight (0, or NaN when the API found the inputs invalid)."""
    # the token-mean weight, once per program and outside the blocks (its correctly rounded divide
    # has a slow-path call; in each block copy it made ptxas spill): the same float32 value as the
    # torch backend's valid / denom
    if WEIGHTS == 1:  # a valid-token count (int64 at denom_ptr)
        w_mean = reciprocal_f32(tl.maximum(tl.load(denom_ptr).to(tl.float32), 1.0))
    elif WEIGHTS == 2:  # a Python-number denominator (rounded to float32 first)
        w_mean = reciprocal_f32(as_f64(denom_bits).to(tl.float32))
    elif WEIGHTS == 3:  # a tensor denominator
        w_mean = reciprocal_f32(tl.load(denom_ptr))
    else:
        w_mean = tl.zeros((), tl.float32)
    poison = tl.load(poison_ptr)
    # every block but the last is full: its accesses need no bounds mask (see common.in_bounds)
    pid = tl.program_id(0)
    if (pid.to(tl.int64) + 1) * BLOCK <= n:
        _apply_block(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, key_ptr, w_ptr, w_mean, poison, value_ptr,
                     ties_kept_ptr, lower_ptr, upper_ptr, ties_ptr, keep_ptr, grad_ptr, part_ptr, n, pid, OFFICIAL,
                     HAS_MASK, ADV_PER_ROW, WEIGHTS, KEEP_ALL, BLOCK, INTERP, True)
    else:
        _apply_block(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, key_ptr, w_ptr, w_mean, poison, value_ptr,
                     ties_kept_ptr, lower_ptr, upper_ptr, ties_ptr, keep_ptr, grad_ptr, part_ptr, n, pid, OFFICIAL,
                     HAS_MASK, ADV_PER_ROW, WEIGHTS, KEEP_ALL, BLOCK, INTERP, False)


@triton.jit
def _apply_block(
    lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, key_ptr, w_ptr, w_mean, poison,
    value_ptr, ties_kept_ptr, lower_ptr, upper_ptr, ties_ptr,
    keep_ptr, grad_ptr, part_ptr, n, pid,
    OFFICIAL: tl.constexpr, HAS_MASK: tl.constexpr, ADV_PER_ROW: tl.constexpr, WEIGHTS: tl.constexpr,
    KEEP_ALL: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr, FULL: tl.constexpr,
):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = in_bounds(offs, n, FULL)
    lp, olp, adv, valid, _ = load_tokens(lp_ptr, olp_ptr, adv_ptr, adv_div, mask_ptr, offs, n, HAS_MASK,
                                         ADV_PER_ROW, FULL)
    delta = tl.where(valid, lp - olp, 0.0)
    adv = tl.where(valid, adv, 0.0)
    if OFFICIAL:
        # the reference's torch.where form (not max/min, which drop NaN on the GPU): a NaN term,
        # e.g. an inf ratio times a zero advantage, stays NaN as in torch
        lower = tl.load(lower_ptr)
        upper = tl.load(upper_ptr)
        ratio = ratio_f32(delta)
        pg1 = -adv * ratio
        pg2 = -adv * clamp(ratio, lower, upper)
        clipped = pg2 > pg1
        keep = valid & ~clipped
        loss = tl.where(valid, tl.where(clipped, pg2, pg1), 0.0)
        # torch.maximum splits the gradient on ties; clamp passes it inside [lower, upper]
        inside = (ratio >= lower) & (ratio <= upper)
        grad = tl.where(clipped, 0.0, tl.where(pg1 == pg2, pg1 * tl.where(inside, 1.0, 0.5), pg1))
        grad = tl.where(valid, grad, 0.0)
    else:
        value = tl.load(value_ptr)
        key = tl.load(key_ptr + offs, mask=inb, other=-1)
        keep_trust = key < value
        if value != KEEP_ALL:
            ties_kept = tl.load(ties_kept_ptr)
            tie = key == value
            prior = tl.load(ties_ptr + pid)  # tied tokens in earlier blocks (tie_scan_kernel)
            tie64 = tie.to(tl.int64)
            rank = prior + tl.cumsum(tie64, 0) - tie64
            keep_trust = keep_trust | (tie & (rank < ties_kept))
        keep = valid & ((key < 0) | keep_trust)
        adv = tl.where(keep, adv, 0.0)
        ratio = exp_f32(clamp(tl.where(keep, delta, 0.0), -20.0, 20.0), INTERP)
        loss = -adv * ratio
        grad = loss  # straight-through: d(-A r)/d logprobs = -A r
    tl.store(keep_ptr + offs, keep, mask=inb)
    masked = tl.sum((valid & ~keep).to(tl.int64)).to(tl.float64)
    tl.store(part_ptr + pid.to(tl.int64) * _APPLY_COLS + 1, masked)
    if WEIGHTS != 0:
        if WEIGHTS == 4:  # per-token weights (sequence-level modes)
            w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        else:  # token-mean
            w = w_mean
        w = tl.where(valid, w + poison, 0.0)
        tl.store(grad_ptr + offs, w * grad, mask=inb)
        # float64 partial sums of the float32 terms, as the torch backend sums them: where that
        # sum is exact the loss has the same bits whatever the order (README, "Float details")
        tl.store(part_ptr + pid.to(tl.int64) * _APPLY_COLS, tl.sum((w * loss).to(tl.float64)))


@triton.jit(do_not_specialize=["nblocks"], do_not_specialize_on_alignment=["out_ptr"])
def finalize_kernel(stats_ptr, apply_ptr, out_ptr, nblocks: tl.int64, STATS_COLS: tl.constexpr, CHUNK: tl.constexpr):
    """out: loss, masked_fraction, trust_region_fraction, kl, ratio_mean, ratio_max,
    num_nonfinite (float32)."""
    n_valid = tl.zeros((), tl.float64)
    n_trust = tl.zeros((), tl.float64)
    neg_delta = tl.zeros((), tl.float64)
    ratio_sum = tl.zeros((), tl.float64)
    ratio_max = tl.zeros((), tl.float64)
    loss = tl.zeros((), tl.float64)
    masked = tl.zeros((), tl.float64)
    nonfinite = tl.zeros((), tl.float64)
    for c in range(0, nblocks, CHUNK):
        b = c + tl.arange(0, CHUNK)
        inb = b < nblocks
        row = stats_ptr + b.to(tl.int64) * STATS_COLS
        n_valid += tl.sum(tl.load(row + 0, mask=inb, other=0.0))
        n_trust += tl.sum(tl.load(row + 1, mask=inb, other=0.0))
        neg_delta += tl.sum(tl.load(row + 2, mask=inb, other=0.0))
        ratio_sum += tl.sum(tl.load(row + 3, mask=inb, other=0.0))
        ratio_max = tl.maximum(ratio_max, tl.max(tl.load(row + 4, mask=inb, other=0.0)))
        nonfinite += tl.sum(tl.load(row + 5, mask=inb, other=0.0))
        arow = apply_ptr + b.to(tl.int64) * _APPLY_COLS
        loss += tl.sum(tl.load(arow + 0, mask=inb, other=0.0))
        masked += tl.sum(tl.load(arow + 1, mask=inb, other=0.0))
    denom = tl.maximum(n_valid, 1.0)
    tl.store(out_ptr + 0, loss.to(tl.float32))
    tl.store(out_ptr + 1, (masked / denom).to(tl.float32))
    tl.store(out_ptr + 2, (n_trust / denom).to(tl.float32))
    tl.store(out_ptr + 3, (neg_delta / denom).to(tl.float32))
    tl.store(out_ptr + 4, (ratio_sum / denom).to(tl.float32))
    tl.store(out_ptr + 5, ratio_max.to(tl.float32))
    tl.store(out_ptr + 6, nonfinite.to(tl.float32))
