"""Test-side oracles, written from the math (docs/math.md) and independent of m2po_ops.

- ``algorithm1_keep``: Algorithm 1 of the paper as a literal loop, in exact rational arithmetic.
- ``official_port``: the authors' released rule (Infini-AI-Lab/M2PO, verl/trainer/ppo/core_algos.py:
  ``_get_trust_region_tokens_delta_sq``, ``kpo_clip_harmful_tokens``, ``_solve_tau_from_sorted_delta2``,
  ``compute_m2po_policy_loss``) with the same torch float32 operations they use.
- ``agg_loss``: verl 0.4's ``agg_loss`` formulas.

None of this imports the library, so a bug there cannot leak into the expected values.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


# --------------------------------------------------------------------------------------------
# Flat per-token quantities as the spec defines them.


def m2_float32(logprobs: torch.Tensor, old_logprobs: torch.Tensor):
    """delta = lp.float() - olp.float(); m2 = delta * delta, both float32 (spec, Notation)."""
    delta = logprobs.detach().float() - old_logprobs.detach().float()
    return delta, delta * delta


def trust_region_paper(delta, adv, valid):
    """T = valid and ((A > 0 and delta > 0) or (A < 0 and delta < 0)), strict."""
    return [
        bool(v) and ((a > 0 and d > 0) or (a < 0 and d < 0))
        for d, a, v in zip(delta.tolist(), adv.tolist(), valid.tolist())
    ]


def algorithm1_keep(m2, tr, valid, tau: float):
    """Algorithm 1, literally: keep = valid; while mean over T of m2 > tau, remove the argmax of
    m2 over T (ties: the larger flat index first). Exact arithmetic on the float32 m2 values.

    m2: Python floats (float32 values), tr / valid: bools, all in flat order.
    """
    keep = [bool(v) for v in valid]
    T = [i for i, t in enumerate(tr) if t]
    if math.isinf(tau):
        return keep  # mean over T (finite values) is never > inf
    ftau = Fraction(tau)
    total = sum((Fraction(m2[i]) for i in T), Fraction(0))
    while T and total / len(T) > ftau:
        j = max(T, key=lambda i: (m2[i], i))
        T.remove(j)
        keep[j] = False
        total -= Fraction(m2[j])
    return keep


def paper_keep(logprobs, old_logprobs, adv_per_token, valid, tau):
    """Flat keep of the paper rule from flat tensors (adv_per_token and valid are flat)."""
    delta, m2 = m2_float32(logprobs.reshape(-1), old_logprobs.reshape(-1))
    adv = adv_per_token.reshape(-1).detach().float()
    valid = valid.reshape(-1)
    tr = trust_region_paper(delta, adv, valid)
    return algorithm1_keep(m2.tolist(), tr, valid.tolist(), tau), tr


# --------------------------------------------------------------------------------------------
# verl 0.4 agg_loss (core_algos.py), written out.


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    loss_mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()  # verl_F.masked_mean
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        return torch.mean(seq_losses)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)
        return torch.mean(seq_losses)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        return torch.sum(seq_losses) / loss_mask.shape[-1]
    raise ValueError(loss_agg_mode)


# --------------------------------------------------------------------------------------------
# The authors' released rule ("official"), 2-D (B, T) inputs.

EPS = 1e-12


def _harmful_delta_sq(old_log_prob, log_prob, advantages, response_mask):
    # _get_trust_region_tokens_delta_sq, verbatim in substance.
    mask = response_mask.bool()
    adv_example = advantages[:, 0]
    pos_adv_mask = adv_example > 1e-12
    neg_adv_mask = adv_example < -1e-12
    delta = old_log_prob - log_prob
    ratio = torch.exp(-delta)
    pos_adv_response_mask = mask[pos_adv_mask]
    neg_adv_response_mask = mask[neg_adv_mask]
    pos_adv_ratio = ratio[pos_adv_mask]
    neg_adv_ratio = ratio[neg_adv_mask]
    pos_adv_r_gt_1_mask = pos_adv_ratio > 1.0 + 1e-12
    neg_adv_r_lt_1_mask = neg_adv_ratio < 1.0 - 1e-12
    delta_sq = delta.pow(2)
    pos = delta_sq[pos_adv_mask][pos_adv_r_gt_1_mask & pos_adv_response_mask]
    neg = delta_sq[neg_adv_mask][neg_adv_r_lt_1_mask & neg_adv_response_mask]
    return torch.cat([pos, neg])


def _solve_tau(sorted_delta2: torch.Tensor, target_sum: float, csum_dtype=None):
    """_solve_tau_from_sorted_delta2. Returns (tau_c, M2_after, k) or None for "no constraint".

    The released code returns bare numbers (not tuples) in its degenerate branches, which would
    crash its caller; here target_sum <= 1e-12 gives tau_c = 0 (its documented intent).
    csum_dtype: None for the authors' float32 prefix sums; float64 to probe fragility.
    """
    total = float(sorted_delta2.sum().item()) if csum_dtype is None else float(sorted_delta2.double().sum().item())
    if target_sum >= total - 1e-12:
        return None
    if target_sum <= 1e-12:
        return 0.0, 0.0, 0
    src = sorted_delta2 if csum_dtype is None else sorted_delta2.to(csum_dtype)
    csum = torch.cumsum(src, dim=0)
    n = sorted_delta2.numel()
    for k in range(0, n):
        left_sum = float(csum[k].item())
        rest = n - k - 1
        m2 = sorted_delta2[k].item() - 1e-12
        if m2 * rest + left_sum >= target_sum - 1e-12:
            if k == 0:
                return 0.0, float(csum[-1].item()) / n, k
            m2_after = (sorted_delta2[k - 1].item() * (rest + 1) + float(csum[k - 1].item())) / n
            return max(sorted_delta2[k - 1].item() - 1e-12, 0.0) ** 0.5, m2_after, k
    return None


def official_port(log_prob, old_log_prob, advantages, response_mask, budget, miniclip_low=None, miniclip_high=None):
    """The authors' compute_m2po_policy_loss (token-mean) on float32 (B, T) tensors.

    Returns a dict: loss (0-d, differentiable w.r.t. log_prob), clipped (bool (B, T)),
    lower / upper (the Python-float clamp bounds), tau_c, n (eligible tokens), and
    ``fragile``: True when a decision of the solve would change if the float32 sums were done in
    float64 (the library's choice), so such cases can be avoided by a generator; ``exp_ulp``: True
    when exp(+-tau_c) in float32 differs from exp in float64 rounded to float32 (the library's);
    ``bounds_f64exp``: (lower, upper) from that float64 exp (what the library documents).
    """
    assert log_prob.dtype == torch.float32 and log_prob.dim() == 2
    tr = _harmful_delta_sq(old_log_prob.detach(), log_prob.detach(), advantages, response_mask)
    n = tr.numel()
    fragile = False
    tau_c = None
    if n > 0:
        target_total = budget * float(n)
        m2_now = float(tr.sum().detach().item() / n)
        m2_now64 = float(tr.double().sum().item() / n)
        if (m2_now <= budget + 1e-12) != (m2_now64 <= budget + 1e-12):
            fragile = True
        if not (m2_now <= budget + 1e-12):
            sorted_delta2, _ = torch.sort(tr)
            sol = _solve_tau(sorted_delta2, target_total)
            sol64 = _solve_tau(sorted_delta2, target_total, csum_dtype=torch.float64)
            if (sol is None) != (sol64 is None) or (sol is not None and sol[2] != sol64[2]):
                fragile = True
            if sol is not None:
                tau_c = sol[0]
    if tau_c is None:
        clip_low, clip_high = 0.0, 100000
        clip_low64, clip_high64 = clip_low, clip_high
    else:
        clip_low = float(torch.exp(torch.tensor(-tau_c)).item())
        clip_high = float(torch.exp(torch.tensor(+tau_c)).item())
        # The library rounds exp evaluated in float64; the authors evaluate exp in float32, whose
        # last bit depends on the CPU's vector unit (torch's expf is not correctly rounded).
        t64 = torch.tensor(tau_c).double()
        clip_low64, clip_high64 = float(torch.exp(-t64).float()), float(torch.exp(t64).float())
    exp_ulp = (clip_low64, clip_high64) != (clip_low, clip_high)

    def clamp_bounds(clip_low, clip_high):
        # compute_m2po_policy_loss: eps from the bounds, then the optional floors (released code:
        # ``if clip_low < miniclip_low: clip_low = miniclip_low``, the same for clip_high).
        eps_low = 1 - clip_low
        eps_high = clip_high - 1
        if miniclip_low is not None and eps_low < miniclip_low:
            eps_low = miniclip_low
        if miniclip_high is not None and eps_high < miniclip_high:
            eps_high = miniclip_high
        return 1 - eps_low, 1 + eps_high

    lower, upper = clamp_bounds(clip_low, clip_high)
    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, lower, upper)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    mask_f = response_mask.to(clip_pg_losses1.dtype)
    loss = (clip_pg_losses1 * mask_f).sum() / mask_f.sum()
    return dict(
        loss=loss,
        clipped=torch.gt(pg_losses2, pg_losses1).detach(),
        lower=lower,
        upper=upper,
        bounds_f64exp=clamp_bounds(clip_low64, clip_high64),
        tau_c=tau_c,
        n=n,
        fragile=fragile,
        exp_ulp=exp_ulp,
    )
