"""The cut rules, written once in PyTorch: which tokens a rule may mask (its trust region), the
ratio it decides with, and the tests that place the cut.

- paper (Algorithm 1 of the paper): T = {A > 0 and delta > 0} or {A < 0 and delta < 0}; the cut
  keeps the longest prefix of T ordered by (m2, flat index) whose float64 sum S_k stays within
  tau * k (``within_budget``).
- official (the authors' released code): the "harmful" tokens, by the sign of each sequence's
  first advantage and the ratio's side of 1; water-filling to a bound tau_c, turned into PPO-clip
  ratio bounds (``official_test_value``, ``official_cut``, ``official_bounds``).

Every backend and solver decides with these: the torch backend (m2po_ops/reference.py), the
sort-based host solver and the mergeable histogram solver (m2po_ops/radix_select.py). The Triton
twins are kernels/common.py's paper_trust_region / official_trust_region and kernels/select.py's
_cond_paper / _f_official / _official_bounds. docs/math.md has the math.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import M2POConfig
from .constants import DELTA_CLAMP, OFFICIAL_EPS, OFFICIAL_NO_CONSTRAINT_HIGH
from .cut import Cut, make_cut
from .inputs import Tokens, host_reads_free

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None


def ratio_f32(delta: Tensor) -> Tensor:
    """exp(delta) for float32 delta, correctly rounded (evaluated in float64, rounded once).

    Used wherever the official variant compares a ratio (eligibility, the clip decision), so
    every backend and device gets the same bits; float32 exp implementations differ by an ulp
    (torch's CPU and CUDA expf, numpy's, libdevice's), which flips ties like r == exp(tau_c).
    """
    return torch.exp(delta.double()).float()


def clamped_ratio(delta: Tensor) -> Tensor:
    """The paper's r = exp(clamp(delta, -20, 20)) (the overflow guard)."""
    return torch.clamp(delta, -DELTA_CLAMP, DELTA_CLAMP).exp_()


def m2_bits(m2: Tensor) -> Tensor:
    """The int32 bit pattern of non-negative float32 m2; orders exactly like the floats."""
    return m2.view(torch.int32)


def trust_region(tok: Tokens, delta: Tensor, config: M2POConfig, ratio: Optional[Tensor] = None) -> Tensor:
    """The tokens the rule may mask: T (paper) or the authors' "harmful" tokens (official).

    delta: log_ratio(tok), 0 on padding, which puts no padding token in T (delta > 0 or < 0,
    r > 1 or < 1 all fail at delta = 0), so no separate validity test is needed.
    ratio: ratio_f32(delta) when the caller has it (official), so it is computed once."""
    if config.rule == "paper":
        # (A > 0 and delta > 0) or (A < 0 and delta < 0) (a NaN or zero A gives False; A * delta
        # > 0 would not do: the product can underflow to 0)
        adv = tok.advantages_compute if delta.dtype == tok.advantages_compute.dtype else tok.advantages.float()
        if np is not None and host_reads_free(delta.device):
            # numpy's comparisons are several times faster than torch's on CPU (no copy either way)
            a, d = adv.numpy(), delta.numpy()
            return torch.from_numpy(((a > 0) & (d > 0)) | ((a < 0) & (d < 0)))
        return torch.sign(adv).mul_(delta) > 0  # one product that cannot underflow (|sign(A) delta| = |delta|)
    # The authors compare float32 tensors with Python floats, which torch casts to float32:
    # A > 1e-12 keeps its meaning, r > 1 + 1e-12 becomes r > 1.
    ratio = ratio_f32(delta) if ratio is None else ratio
    rows = tok.adv_first_rows
    if rows is not None and np is not None and host_reads_free(delta.device):
        # a (B, T) batch on the host: the advantage tests once per row, broadcast over its tokens
        # (numpy compares against the same float32 constants)
        b, t = tok.shape
        first = rows.float().numpy()
        r = ratio.numpy().reshape(b, t)
        out = (r > np.float32(1.0 + OFFICIAL_EPS)) & (first > np.float32(OFFICIAL_EPS))[:, None]
        out |= (r < np.float32(1.0 - OFFICIAL_EPS)) & (first < np.float32(-OFFICIAL_EPS))[:, None]
        return torch.from_numpy(out.reshape(-1))
    eps = torch.full((), OFFICIAL_EPS, dtype=torch.float32, device=delta.device)  # fills, not host copies
    one_hi = torch.full((), 1.0 + OFFICIAL_EPS, dtype=torch.float32, device=delta.device)
    one_lo = torch.full((), 1.0 - OFFICIAL_EPS, dtype=torch.float32, device=delta.device)
    adv_first = tok.adv_first.float()
    return ((adv_first > eps) & (ratio > one_hi)) | ((adv_first < -eps) & (ratio < one_lo))


def _at(x: Tensor, i: Tensor) -> Tensor:
    """x[i] for a 0-d index tensor without a host sync (``x[i]`` calls ``i.item()``)."""
    return x.index_select(0, i.reshape(1)).reshape(())


def within_budget(s, k, config: M2POConfig):
    """S_k <= tau * k, evaluated as (S - k*tau_hi) <= k*tau_lo in float64 (exact tau * k).
    s, k: float64 and integer tensors (a bool tensor back), or a Python float and int on the
    host (a bool back: the same float64 operations)."""
    host = not isinstance(s, Tensor)
    if config.tau == float("inf"):
        return True if host else torch.ones_like(s, dtype=torch.bool)
    hi, lo = config.tau_split
    kf = k if host else k.double()
    return (s - kf * hi) <= kf * lo


def official_constrained(n, total, config: M2POConfig):
    """The authors' "is the budget binding" test: some eligible token (n > 0), mean m2 above
    tau + 1e-12, and tau * n below the total by more than 1e-12; in float64. n, total: an integer
    and a float64 tensor (a bool tensor back), or a Python int and float (a bool back)."""
    e = OFFICIAL_EPS
    if not isinstance(total, Tensor):
        return n > 0 and total / n > config.tau + e and config.tau * n < total - e
    nf = n.double()
    return (n > 0) & (total / nf.clamp_min(1) > config.tau + e) & (config.tau * nf < total - e)


def official_test_value(v: Tensor, k: Tensor, c: Tensor, n: Tensor) -> Tensor:
    """The authors' water-filling test value (v_k - 1e-12) * (n - k - 1) + c_k in float64."""
    return (v - OFFICIAL_EPS) * (n.double() - k.double() - 1.0) + c


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


def official_cut(v_prev: Tensor, c_prev: Tensor, k_star: Tensor, n: Tensor, total: Tensor, constrained: Tensor,
                 tiny_budget: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """The authors' tau_c, reported M2_after and clip bounds, from the first index k_star whose
    test passes, the value just before it (v_prev) and the sum up to it (c_prev), all float64.
    Shared by the host split solver, the histogram solver and the test oracle."""
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
