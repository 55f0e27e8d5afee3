"""The pure-PyTorch reference backend: the spec's rules written plainly, for any device.

It is the ground truth the Triton kernels are tested against, and the backend used on CPU.
Nothing here synchronises with the host: the cut is found with a sort and a float64 prefix sum,
all on the device. (It is not fast: a full sort of the tokens is exactly what the Triton backend
avoids.)

Conventions (see ../shared/docs/m2po-spec.md and the README):
- delta = logprobs - old_logprobs in float32 after upcasting; m2 = delta * delta in float32.
  The mask is always decided on these float32 values. The loss is computed in float32, or in
  float64 for float64 inputs (so gradcheck works).
- Paper rule: keep_count = max{k : S_k <= tau * k}, S_k the float64 sum of the k smallest m2 of
  the trust region ordered by (m2, flat index), compared as (S_k - k*tau_hi) <= k*tau_lo.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import DELTA_CLAMP, OFFICIAL_EPS, OFFICIAL_NO_CONSTRAINT_HIGH, M2POConfig
from .cut import KEEP_ALL_BITS, Cut, make_cut
from .inputs import Tokens

INT64_MAX = torch.iinfo(torch.int64).max


def compute_dtype(tok: Tokens) -> torch.dtype:
    return torch.float64 if tok.logprobs.dtype == torch.float64 else torch.float32


def log_ratio(tok: Tokens) -> Tensor:
    """delta = logprobs - old_logprobs in float32, zero on invalid tokens (padding may be NaN)."""
    delta = tok.logprobs.float() - tok.old_logprobs.float()
    return torch.where(tok.valid, delta, torch.zeros_like(delta))


def trust_region(tok: Tokens, delta: Tensor, config: M2POConfig) -> Tensor:
    """The tokens the rule may mask: T (paper) or the authors' "harmful" tokens (official)."""
    if config.variant == "paper":
        adv = tok.advantages.float()
        return tok.valid & (((adv > 0) & (delta > 0)) | ((adv < 0) & (delta < 0)))
    # The authors compare float32 tensors with Python floats, which torch casts to float32:
    # A > 1e-12 keeps its meaning, r > 1 + 1e-12 becomes r > 1.
    eps = torch.full((), OFFICIAL_EPS, dtype=torch.float32, device=delta.device)  # fills, not host copies
    one_hi = torch.full((), 1.0 + OFFICIAL_EPS, dtype=torch.float32, device=delta.device)
    one_lo = torch.full((), 1.0 - OFFICIAL_EPS, dtype=torch.float32, device=delta.device)
    ratio = ratio_f32(delta)
    adv_first = tok.adv_first.float()
    return tok.valid & (((adv_first > eps) & (ratio > one_hi)) | ((adv_first < -eps) & (ratio < one_lo)))


def ratio_f32(delta: Tensor) -> Tensor:
    """exp(delta) for float32 delta, correctly rounded (evaluated in float64, rounded once).

    Used wherever the official variant compares a ratio (eligibility, the clip decision), so
    every backend and device gets the same bits; float32 exp implementations differ by an ulp
    (torch's CPU and CUDA expf, numpy's, libdevice's), which flips ties like r == exp(tau_c).
    """
    return torch.exp(delta.double()).float()


def m2_bits(m2: Tensor) -> Tensor:
    """The int32 bit pattern of non-negative float32 m2; orders exactly like the floats."""
    return m2.view(torch.int32)


def _sorted_trust_region(m2: Tensor, tr: Tensor):
    """m2 of T sorted ascending by (m2, flat index), padded with zeros to N, as float64."""
    n = m2.numel()
    idx = torch.arange(n, device=m2.device, dtype=torch.int64)
    key = torch.where(tr, (m2_bits(m2).to(torch.int64) << 32) | idx, torch.full_like(idx, INT64_MAX))
    skey, order = torch.sort(key)
    in_tr = skey != INT64_MAX
    values = torch.where(in_tr, m2[order].double(), torch.zeros((), dtype=torch.float64, device=m2.device))
    return values, skey


def _max_or_zero(x: Tensor) -> Tensor:
    return torch.cat([x.new_zeros(1), x]).max()


def _at(x: Tensor, i: Tensor) -> Tensor:
    """x[i] for a 0-d index tensor without a host sync (``x[i]`` calls ``i.item()``)."""
    return x.index_select(0, i.reshape(1)).reshape(())


def within_budget(s: Tensor, k: Tensor, config: M2POConfig) -> Tensor:
    """S_k <= tau * k, evaluated as (S - k*tau_hi) <= k*tau_lo in float64 (exact tau * k)."""
    if config.tau == float("inf"):
        return torch.ones_like(s, dtype=torch.bool)
    hi, lo = config.tau_split
    kf = k.double()
    return (s - kf * hi) <= kf * lo


def official_test_value(v: Tensor, k: Tensor, c: Tensor, n: Tensor) -> Tensor:
    """The authors' water-filling test value (v_k - 1e-12) * (n - k - 1) + c_k in float64."""
    return (v - OFFICIAL_EPS) * (n.double() - k.double() - 1.0) + c


def solve_paper(m2: Tensor, tr: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """Algorithm 1 of the paper as one cut: keep the longest (m2, index)-ordered prefix of T whose
    mean is <= tau."""
    device = m2.device
    n = m2.numel()
    n_tr = tr.sum()
    values, skey = _sorted_trust_region(m2, tr)
    csum = torch.cumsum(values, 0)
    k = torch.arange(1, n + 1, device=device, dtype=torch.int64)
    ok = within_budget(csum, k, config) & (k <= n_tr)
    keep_count = _max_or_zero(torch.where(ok, k, torch.zeros_like(k)))
    masked_any = keep_count < n_tr
    at = keep_count.clamp(max=max(n - 1, 0))
    first_cut_bits = (_at(skey, at) >> 32).to(torch.int32) if n > 0 else torch.zeros((), dtype=torch.int32, device=device)
    value = torch.where(masked_any, first_cut_bits, torch.full_like(first_cut_bits, KEEP_ALL_BITS))
    below = (tr & (m2_bits(m2) < value)).sum()
    ties_kept = torch.where(masked_any, keep_count - below, torch.zeros_like(keep_count))
    total = _max_or_zero(torch.where(k == n_tr, csum, torch.zeros_like(csum)))
    kept_sum = _max_or_zero(torch.where(k == keep_count, csum, torch.zeros_like(csum)))
    return make_cut(
        config,
        device,
        value=value,
        ties_kept=ties_kept,
        num_valid=num_valid,
        num_trust_region=n_tr,
        m2=(total / n_tr.clamp_min(1)).float(),
        m2_after=(kept_sum / keep_count.clamp_min(1)).float(),
        threshold=torch.where(masked_any, value.view(torch.float32), torch.full((), float("inf"), device=device)),
    )


def official_bounds(tau_c: Tensor, constrained: Tensor, config: M2POConfig):
    """The authors' chain from tau_c to float32 clip bounds, in float64 tensor arithmetic.

    Authors: clip_low = exp(-tau_c), clip_high = exp(tau_c) (0.0 and 100000 when unconstrained);
    eps_lo = 1 - clip_low, floored at miniclip_low; eps_hi = clip_high - 1, floored at
    miniclip_high (released code: ``if clip_high < miniclip_high: clip_high = miniclip_high``, on
    eps); the clamp bounds 1 - eps_lo and 1 + eps_hi are cast to float32 by torch.
    exp is evaluated in float64 and rounded to float32 (the authors evaluate it in float32; the
    two agree up to one float32 ulp of the bound).
    """
    t = tau_c.float().double()
    clip_low = torch.exp(-t).float().double()
    clip_high = torch.exp(t).float().double()
    clip_low = torch.where(constrained, clip_low, torch.zeros_like(clip_low))
    clip_high = torch.where(constrained, clip_high, torch.full_like(clip_high, OFFICIAL_NO_CONSTRAINT_HIGH))
    eps_lo = 1.0 - clip_low
    eps_hi = clip_high - 1.0
    if config.miniclip_low is not None:
        eps_lo = torch.clamp(eps_lo, min=config.miniclip_low)
    if config.miniclip_high is not None:
        eps_hi = torch.clamp(eps_hi, min=config.miniclip_high)
    return (1.0 - eps_lo).float(), (1.0 + eps_hi).float()


def solve_official(m2: Tensor, tr: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """The authors' water-filling threshold (kpo_clip_harmful_tokens), without host syncs."""
    device = m2.device
    n_all = m2.numel()
    e = OFFICIAL_EPS
    n = tr.sum()
    nf = n.double()
    values, _ = _sorted_trust_region(m2, tr)
    csum = torch.cumsum(values, 0)
    total = values.sum()
    tau = config.tau
    target = tau * nf
    constrained = (n > 0) & (total / nf.clamp_min(1) > tau + e) & (target < total - e)
    kk = torch.arange(n_all, device=device, dtype=torch.int64)
    f = official_test_value(values, kk, csum, n)
    hit = (f >= target - e) & (kk < n)
    k = torch.where(hit, kk, torch.full_like(kk, n_all)).min() if n_all > 0 else torch.zeros((), dtype=torch.int64, device=device)
    constrained = constrained & (k < n)
    tiny_budget = target <= e
    prev = (k - 1).clamp(min=0, max=max(n_all - 1, 0))
    v_prev = _at(values, prev) if n_all > 0 else torch.zeros((), dtype=torch.float64, device=device)
    c_prev = _at(csum, prev) if n_all > 0 else torch.zeros((), dtype=torch.float64, device=device)
    return official_cut(v_prev, c_prev, k, n, total, constrained, tiny_budget, num_valid, config)


def official_cut(v_prev: Tensor, c_prev: Tensor, k_star: Tensor, n: Tensor, total: Tensor, constrained: Tensor,
                 tiny_budget: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """The authors' tau_c, reported M2_after and clip bounds, from the first index k_star whose
    test passes, the value just before it (v_prev) and the sum up to it (c_prev), all float64.
    Shared by the sort-based and the histogram solvers."""
    e = OFFICIAL_EPS
    nf = n.double()
    at_zero = (k_star == 0) | tiny_budget  # the authors return tau_c = 0 here
    tau_c2 = torch.where(at_zero, torch.zeros_like(v_prev), (v_prev - e).clamp_min(0))
    m2_after = torch.where(at_zero, torch.zeros_like(v_prev),
                           (v_prev * (nf - k_star.double()) + c_prev) / nf.clamp_min(1))
    m2_before = total / nf.clamp_min(1)
    lower, upper = official_bounds(torch.sqrt(tau_c2), constrained, config)
    inf = torch.full((), float("inf"), dtype=torch.float64, device=v_prev.device)
    return make_cut(
        config,
        v_prev.device,
        lower=lower,
        upper=upper,
        num_valid=num_valid,
        num_trust_region=n,
        m2=m2_before.float(),
        m2_after=torch.where(constrained, m2_after, m2_before).float(),
        threshold=torch.where(constrained, tau_c2, inf).float(),
    )


def solve(tok: Tokens, config: M2POConfig):
    """Local solve: (cut, delta, m2, trust_region) for this call's own tokens."""
    delta = log_ratio(tok)
    m2 = delta * delta
    tr = trust_region(tok, delta, config)
    num_valid = tok.valid.sum()
    solver = solve_paper if config.variant == "paper" else solve_official
    return solver(m2, tr, num_valid, config), delta, m2, tr


def keep_paper(m2: Tensor, tr: Tensor, valid: Tensor, cut: Cut) -> Tensor:
    """Apply a paper cut: ties at the cut value are kept in flat order up to ties_kept."""
    bits = m2_bits(m2)
    tie = tr & (bits == cut.value)
    tie_rank = torch.cumsum(tie.to(torch.int64), 0) - tie.to(torch.int64)
    keep_tr = (bits < cut.value) | (tie & (tie_rank < cut.ties_kept))
    return valid & (~tr | keep_tr)


def per_token(tok: Tokens, cut: Cut, delta: Tensor, m2: Tensor, tr: Tensor):
    """keep, per-token loss l_i and its derivative g_i = dl_i/dlogprobs_i (compute dtype)."""
    cd = compute_dtype(tok)
    valid = tok.valid
    zero = torch.zeros((), dtype=cd, device=tok.device)
    if cd == torch.float64:
        d = torch.where(valid, tok.logprobs.double() - tok.old_logprobs.double(), zero)
    else:
        d = delta
    adv = torch.where(valid, tok.advantages.to(cd), zero)
    if cut.variant == "paper":
        keep = keep_paper(m2, tr, valid, cut)
        a = torch.where(keep, adv, zero)
        r = torch.exp(torch.clamp(torch.where(keep, d, zero), -DELTA_CLAMP, DELTA_CLAMP))
        loss = -a * r
        return keep, loss, loss  # straight-through: d(-a r)/d logprobs = -a r
    # official: PPO clipped surrogate with the solved bounds. The clip decision is made as the
    # authors' torch code makes it, in float32 (ratio, float32 bounds, strict comparisons), for
    # every input dtype; the loss values use the compute dtype.
    lower32, upper32 = cut.lower, cut.upper
    adv32 = torch.where(valid, tok.advantages.float(), torch.zeros((), dtype=torch.float32, device=tok.device))
    r32 = ratio_f32(delta)
    pg1_32 = -adv32 * r32
    pg2_32 = -adv32 * torch.clamp(r32, lower32, upper32)
    clipped = pg2_32 > pg1_32
    tie = pg1_32 == pg2_32
    keep = valid & ~clipped
    r = torch.exp(d) if cd == torch.float64 else r32
    lower, upper = lower32.to(cd), upper32.to(cd)
    pg1 = -adv * r
    pg2 = -adv * torch.clamp(r, lower, upper)
    loss = torch.where(valid, torch.where(clipped, pg2, pg1), zero)
    # torch.maximum splits the gradient evenly on ties; clamp passes it inside [lower, upper].
    inside = (r32 >= lower32) & (r32 <= upper32)
    half = torch.where(inside, torch.ones_like(r), torch.full_like(r, 0.5))
    grad = torch.where(clipped, zero, torch.where(tie, pg1 * half, pg1))
    grad = torch.where(valid, grad, zero)
    return keep, loss, grad


def metrics(tok: Tokens, cut: Cut, delta: Tensor, tr: Tensor, keep: Tensor, variant: str) -> dict:
    """The spec's metrics as float32 0-d tensors on the input's device."""
    valid = tok.valid
    nv = valid.sum().clamp_min(1).float()
    zero = torch.zeros((), dtype=torch.float32, device=tok.device)
    if variant == "paper":
        ratio = torch.exp(torch.clamp(delta, -DELTA_CLAMP, DELTA_CLAMP))
    else:
        ratio = ratio_f32(delta)
    ratio_v = torch.where(valid, ratio, zero)
    out = {
        "m2": cut.m2,
        "m2_after": cut.m2_after,
        "masked_fraction": (valid & ~keep).sum().float() / nv,
        "trust_region_fraction": tr.sum().float() / nv,
        "kl": torch.where(valid, -delta, zero).sum() / nv,
        "ratio_mean": ratio_v.sum() / nv,
        "ratio_max": _max_or_zero(ratio_v),
        "cut": cut.threshold,
        "num_nonfinite": tok.nonfinite.float(),
        "input_error": zero,
    }
    if variant == "official":
        out["clip_low"] = cut.lower
        out["clip_high"] = cut.upper
    return out
