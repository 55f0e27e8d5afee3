"""The sort-based solvers the PyTorch backend used before the threshold split, kept as a test
oracle: they sort every trust-region token by (m2, flat index) as an int64 key and take float64
prefix sums of all of it, so they share no code with the split solver's ordering, compaction or
below-part sum. The formulas themselves (the budget test, the authors' water-filling test value
and their tau_c / bounds chain) are the library's single implementations, imported from
m2po_ops.reference.

solve_paper / solve_official(m2, tr, num_valid, config) -> Cut, for flat float32 m2 and bool tr.
"""

from __future__ import annotations

import torch
from torch import Tensor

from m2po_ops.config import M2POConfig
from m2po_ops.constants import KEEP_ALL_BITS, OFFICIAL_EPS
from m2po_ops.cut import Cut, make_cut
from m2po_ops.rules import official_cut, official_test_value, within_budget

INT64_MAX = torch.iinfo(torch.int64).max


def _sorted_trust_region(m2: Tensor, tr: Tensor):
    """m2 of T sorted ascending by (m2, flat index), padded with zeros to N, as float64, and the
    sorted int64 keys (bits << 32 | index; INT64_MAX outside T)."""
    n = m2.numel()
    idx = torch.arange(n, device=m2.device, dtype=torch.int64)
    key = torch.where(tr, (m2.view(torch.int32).to(torch.int64) << 32) | idx, torch.full_like(idx, INT64_MAX))
    skey, order = torch.sort(key)
    in_tr = skey != INT64_MAX
    values = torch.where(in_tr, m2[order].double(), torch.zeros((), dtype=torch.float64, device=m2.device))
    return values, skey


def _max_or_zero(x: Tensor) -> Tensor:
    return torch.cat([x.new_zeros(1), x]).max()


def solve_paper(m2: Tensor, tr: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """Algorithm 1 as one cut: the longest (m2, index)-ordered prefix of T whose mean is <= tau."""
    device = m2.device
    n = m2.numel()
    n_tr = tr.sum()
    values, skey = _sorted_trust_region(m2, tr)
    csum = torch.cumsum(values, 0)
    k = torch.arange(1, n + 1, device=device, dtype=torch.int64)
    ok = within_budget(csum, k, config) & (k <= n_tr)
    keep_count = _max_or_zero(torch.where(ok, k, torch.zeros_like(k)))
    masked_any = keep_count < n_tr
    at = int(keep_count.clamp(max=max(n - 1, 0)))
    first_cut_bits = (skey[at] >> 32).to(torch.int32) if n > 0 else torch.zeros((), dtype=torch.int32)
    value = torch.where(masked_any, first_cut_bits, torch.full_like(first_cut_bits, KEEP_ALL_BITS))
    below = (tr & (m2.view(torch.int32) < value)).sum()
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


def solve_official(m2: Tensor, tr: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """The authors' water-filling threshold over every eligible token, sorted."""
    device = m2.device
    n_all = m2.numel()
    e = OFFICIAL_EPS
    n = tr.sum()
    nf = n.double()
    values, _ = _sorted_trust_region(m2, tr)
    csum = torch.cumsum(values, 0)
    total = values.sum()
    target = config.tau * nf
    constrained = (n > 0) & (total / nf.clamp_min(1) > config.tau + e) & (target < total - e)
    kk = torch.arange(n_all, device=device, dtype=torch.int64)
    hit = (official_test_value(values, kk, csum, n) >= target - e) & (kk < n)
    k = torch.where(hit, kk, torch.full_like(kk, n_all)).min() if n_all > 0 else torch.zeros((), dtype=torch.int64)
    constrained = constrained & (k < n)
    prev = int((k - 1).clamp(min=0, max=max(n_all - 1, 0)))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    v_prev = values[prev] if n_all > 0 else zero
    c_prev = csum[prev] if n_all > 0 else zero
    return official_cut(v_prev, c_prev, k, n, total, constrained, target <= e, num_valid, config)


def solve(m2: Tensor, tr: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    return (solve_paper if config.variant == "paper" else solve_official)(m2, tr, num_valid, config)
