"""The M2PO code users run today, written from the spec's descriptions (no code copied).

Every competitor has the same signature and returns ``(loss, keep)``:

    fn(logprobs, old_logprobs, advantages, mask, tau=0.04) -> (0-d loss, bool keep mask)

``logprobs`` is a leaf that requires grad; the benchmark times ``fn(...)`` plus
``loss.backward()``. ``advantages`` is per token (GRPO broadcasts one value per sequence),
``mask`` is the padded batch's validity mask. Inputs are (B, T) padded batches.

- ``official_eager``: the authors' released rule (spec, "The authors' released code"): harmful
  tokens selected by boolean indexing, ``torch.sort``, then the water-filling threshold found by
  a Python loop over the candidates with one ``.item()`` per candidate, then the PPO clipped
  surrogate with the resulting bounds, token-mean over valid tokens. Compare its mask with
  ``m2po_mask(variant="official")``.
- ``sorted_eager``: the paper's Algorithm 1 as careful ports write it: ``nonzero`` to gather the
  trust region, a stable sort, a float64 prefix-sum cut found with ``.item()``, the mask built by
  index assignment, then ``-(1/N_valid) * sum keep * r * A`` in eager PyTorch. Compare its mask
  with ``m2po_mask(variant="paper")``.
- ``compiled_sorted_eager()``: ``torch.compile`` of ``sorted_eager``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor

OFFICIAL_EPS = 1e-12
NO_CONSTRAINT_HIGH = 100000.0
DELTA_CLAMP = 20.0


class BudgetExceeded(RuntimeError):
    """The official rule's Python loop ran past its per-call time budget."""

    def __init__(self, iterations: int, candidates: int, seconds: float):
        super().__init__(
            f"Python threshold loop still running after {seconds:.2f} s "
            f"({iterations} of {candidates} candidates visited)"
        )
        self.iterations = iterations
        self.candidates = candidates
        self.seconds = seconds


def _f32(x: float) -> float:
    """A Python float rounded to float32, as torch casts Python scalars against float32 tensors."""
    return float(np.float32(x))


def official_threshold(m2: Tensor, harmful: Tensor, tau: float, budget_s: float | None = None):
    """The authors' water-filling threshold tau_c, or None when there is no constraint.

    Harmful tokens are gathered by boolean indexing (a host sync: the output size depends on the
    data), sorted with torch.sort, and the first k with
    ``(v_k - eps) * (n - k - 1) + c_k >= tau * n - eps`` is found by a Python loop that reads one
    candidate per iteration with ``.item()``. Prefix sums are float64 (as the library keeps them),
    so the cut is the same number on every competitor.
    """
    e = OFFICIAL_EPS
    vals = m2[harmful]  # boolean indexing: sync
    n = vals.numel()
    if n == 0:
        return None
    total = vals.double().sum().item()
    if total / n <= tau + e:
        return None
    target = tau * n
    if target <= e:
        return 0.0
    if not target < total - e:
        return None
    sorted_vals, _ = torch.sort(vals)
    v = sorted_vals.double()
    csum = torch.cumsum(v, 0)
    start = time.perf_counter()
    k_hit = None
    for k in range(n):
        if (((v[k] - e) * (n - k - 1) + csum[k]).item()) >= target - e:
            k_hit = k
            break
        if budget_s is not None and (k & 1023) == 1023:
            spent = time.perf_counter() - start
            if spent > budget_s:
                raise BudgetExceeded(k + 1, n, spent)
    if k_hit is None:
        return None
    if k_hit == 0:
        return 0.0
    return math.sqrt(max(v[k_hit - 1].item() - e, 0.0))


def official_bounds(tau_c):
    """clip_low = exp(-tau_c), clip_high = exp(tau_c) (0 and 1e5 unconstrained); eps_lo = 1 -
    clip_low, eps_hi = clip_high - 1; the clamp bounds 1 - eps_lo, 1 + eps_hi as Python floats.
    exp is rounded to float32 as the authors' float32 tensor code rounds it."""
    if tau_c is None:
        clip_low, clip_high = 0.0, NO_CONSTRAINT_HIGH
    else:
        t = _f32(tau_c)
        clip_low, clip_high = _f32(math.exp(-t)), _f32(math.exp(t))
    eps_lo, eps_hi = 1.0 - clip_low, clip_high - 1.0
    return 1.0 - eps_lo, 1.0 + eps_hi


def official_eager(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, tau: float = 0.04,
                   budget_s: float | None = None):
    valid = mask.bool()
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    with torch.no_grad():
        r = ratio.detach()
        m2 = log_ratio.detach() * log_ratio.detach()
        adv_first = adv[:, :1].expand_as(adv)  # the authors read each sequence's first advantage
        harmful = ((adv_first > OFFICIAL_EPS) & (r > 1 + OFFICIAL_EPS)) | (
            (adv_first < -OFFICIAL_EPS) & (r < 1 - OFFICIAL_EPS)
        )
        harmful = harmful & valid
        tau_c = official_threshold(m2, harmful, tau, budget_s)
    low, high = official_bounds(tau_c)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, low, high)
    pg = torch.maximum(pg1, pg2)
    vf = valid.float()
    loss = (pg * vf).sum() / vf.sum()
    keep = valid & ~(pg2.detach() > pg1.detach())
    return loss, keep


def sorted_eager(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, tau: float = 0.04):
    valid = mask.bool()
    delta = logprobs.float() - old_logprobs.float()
    delta = torch.where(valid, delta, torch.zeros_like(delta))
    adv = torch.where(valid, advantages.float(), torch.zeros_like(delta))
    with torch.no_grad():
        d = delta.detach()
        m2 = (d * d).reshape(-1)
        tr = (valid & (((adv > 0) & (d > 0)) | ((adv < 0) & (d < 0)))).reshape(-1)
        idx = torch.nonzero(tr).squeeze(1)  # sync: trust-region size
        vals = m2[idx]
        sorted_vals, order = torch.sort(vals, stable=True)  # ties: lower flat index first
        csum = torch.cumsum(sorted_vals.double(), 0)
        k = torch.arange(1, vals.numel() + 1, dtype=torch.float64, device=vals.device)
        ok = torch.nonzero(csum <= tau * k)  # prefix mean <= tau (sync)
        keep_count = int(ok[-1].item()) + 1 if ok.numel() > 0 else 0
        keep = valid.clone()
        keep.view(-1)[idx[order[keep_count:]]] = False
    kept_delta = torch.where(keep, delta, torch.zeros_like(delta))
    ratio = torch.exp(torch.clamp(kept_delta, -DELTA_CLAMP, DELTA_CLAMP))
    kept_adv = torch.where(keep, adv, torch.zeros_like(adv))
    loss = -(kept_adv * ratio).sum() / valid.sum().clamp_min(1)
    return loss, keep


def compiled_sorted_eager(dynamic: bool = True):
    """torch.compile of sorted_eager (a fresh compiled callable; compile happens on first call)."""
    return torch.compile(sorted_eager, dynamic=dynamic)
