"""The PyTorch backend: the backend protocol (m2po_ops/backend.py) over the rules written plainly
in m2po_ops/reference.py, on any device.

statistics: delta, the ratio, the trust region; on CPU tensors the trust region's keys compacted
on the host (the sort-based solver reads only those). solve: the host solver on CPU, the
histogram solver elsewhere (m2po_ops/radix_select.py), its steps over a process group
(m2po_ops/distributed.py). apply: the per-token terms, the metrics and the loss, summed in
float64 and rounded once as the Triton backend sums them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import distributed, radix_select, reference
from .backend import Applied, Parts, Summary, Want
from .config import M2POConfig
from .cut import Cut
from .inputs import Tokens, host_reads_free, sum_f64, sum_f64_host, token_mean_weight_host, token_weights

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


@dataclass
class TorchStatistics:
    """One call's statistics: delta (float32, 0 on padding), the trust region, and what apply
    reads again: the ratio (ratio_of(delta), None for a keys-only pass), the float32 sum of delta
    (a host number, or None), the host-compacted trust region (CPU) or m2 (other devices)."""

    tok: Tokens
    delta: Tensor
    tr: Tensor
    ratio: Optional[Tensor] = None
    delta_sum: Optional[float] = None
    host: Optional[reference.HostTrustRegion] = None
    m2: Optional[Tensor] = None

    @property
    def keys(self) -> Tensor:
        """int32 per token: the m2 bits in the trust region, -1 elsewhere."""
        m2 = self.m2 if self.m2 is not None else self.delta * self.delta
        return torch.where(self.tr, reference.m2_bits(m2), -1)


class TorchSteps:
    """distributed.solve_steps' histogram steps, by m2po_ops/radix_select.py (any device)."""

    def __init__(self, sums: Tensor, below_max: Tensor):
        self.sums = sums
        self.below_max = below_max

    @classmethod
    def from_keys(cls, keys: Sequence[Tensor], config: M2POConfig, device) -> "TorchSteps":
        sums = torch.zeros(radix_select.SUMS_LEN, dtype=torch.int64, device=device)
        below_max = torch.zeros((), dtype=torch.int64, device=device)
        for k in keys:
            sums += radix_select.summarize(k, config)
            below_max = torch.maximum(below_max, radix_select.below_max(k, config))
        return cls(sums, below_max.reshape(1))

    def select1(self, config: M2POConfig) -> Tensor:
        return radix_select.select1(self.sums, config)

    def level2(self, keys: Sequence[Tensor], state1: Tensor, config: M2POConfig) -> Tensor:
        hist2 = torch.zeros(radix_select.L2_SLOTS, 2, radix_select.L2_BUCKETS, dtype=torch.int64,
                            device=self.sums.device)
        for k in keys:
            hist2 += radix_select.level2(k, state1, config)
        return hist2

    def select2(self, hist2: Tensor, state1: Tensor, config: M2POConfig, num_valid: Tensor) -> Cut:
        return radix_select.select2(hist2, state1, self.below_max.reshape(()), config, num_valid)


class TorchBackend:
    name = "torch"

    def statistics(self, tok: Tokens, config: M2POConfig, want: Want, poison: Optional[Tensor] = None):
        """delta, the ratio and the trust region, once (poison is applied by apply)."""
        if not (want.loss or want.keep):  # keys only (a pre-pass, a drift check)
            delta = reference.log_ratio(tok)
            return TorchStatistics(tok, delta, reference.trust_region(tok, delta, config), m2=delta * delta)
        delta, delta_sum = reference.log_ratio_and_sum(tok)
        ratio = reference.ratio_of(delta, config.variant)  # once: the trust region, the loss, the metrics
        tr = reference.trust_region(tok, delta, config, ratio)
        if host_reads_free(tok.device):  # compacted once, for the solver and for applying its cut
            return TorchStatistics(tok, delta, tr, ratio, delta_sum, host=reference.compact_trust_region(delta, tr))
        return TorchStatistics(tok, delta, tr, ratio, delta_sum, m2=delta * delta)

    def summary(self, st: TorchStatistics) -> Summary:
        return Summary(st.keys, st.tok.num_valid)

    def solve(self, st: TorchStatistics, config: M2POConfig, group) -> Cut:
        if group is None:
            return reference.solve_trust_region(st.m2, st.tr, st.tok.num_valid, config, st.host)
        key = st.keys
        cut, _ = distributed.solve_steps(TorchSteps.from_keys([key], config, key.device), [key], st.tok.valid.sum(),
                                         config, group)
        return distributed.part_cuts([key], cut, group)[0]

    def solve_parts(self, parts: Parts, config: M2POConfig, group) -> Tuple[Cut, Tensor]:
        if group is None:
            # exactly the single call's solver on the concatenation of the keys (in update order, so
            # the flat indices, and with them the ties, are the single call's)
            return reference.solve_keys(torch.cat(parts.keys), parts.num_valid, config), parts.num_valid
        steps = TorchSteps.from_keys(parts.keys, config, parts.num_valid.device)
        return distributed.solve_steps(steps, parts.keys, parts.num_valid, config, group)

    def apply(self, st: TorchStatistics, config: M2POConfig, cut: Cut, want: Want, *, local_solve: bool,
              num_tokens=None, num_valid: Optional[Tensor] = None, poison: Optional[Tensor] = None) -> Applied:
        """local_solve: the cut was solved from these tokens alone (its trust-region count is theirs).
        num_valid: the group's valid count (the token-mean denominator of a process group)."""
        tok = st.tok
        ratio_v = reference.valid_ratio(tok, st.delta, config.variant, st.ratio)  # (in place: not read again)
        # token-mean paper loss: the terms' sign goes into the sum and the backward scale (a pass fewer)
        negated = want.loss and config.surrogate == "unclipped" and config.loss_agg_mode == "token-mean"
        masked = None
        if want.loss and st.host is not None and config.rule == "paper":  # the list alone: no keep tensor
            masked = reference.masked_paper_host(None, st.tr, cut, st.host)
        keep, loss, grad = reference.per_token(tok, cut, st.delta, st.m2, st.tr, ratio_v, st.host, negated=negated,
                                               masked=masked)
        metrics = reference.metrics(tok, cut, st.delta, st.tr, keep, config.variant, ratio_v,
                                    cut.num_trust_region if local_solve else None, st.delta_sum,
                                    None if masked is None else masked.numel())
        if not want.loss:
            return Applied(keep, metrics, None, None, None)
        if config.loss_agg_mode == "token-mean":
            value, grad, scale = _token_mean_loss(tok, config, loss, grad, negated, num_tokens, num_valid, poison)
            return Applied(keep, metrics, value, grad, scale)
        w = token_weights(tok, config, num_tokens, loss.dtype, num_valid)
        if poison is not None:  # NaN on every valid token (padding keeps a zero gradient), as the kernels
            w = torch.where(tok.valid, w + poison.to(w.dtype), torch.zeros_like(w))
        # (in place: loss and grad are this call's own buffers; the same one for the paper rule)
        term = loss.mul_(w)
        grad = term if grad is loss else grad.mul_(w)
        # summed in float64 and rounded once, as the Triton backend's partials: where the float64
        # sum of the float32 terms is exact, both backends give the same bits (README, "Float details")
        return Applied(keep, metrics, sum_f64(term).to(loss.dtype), grad.to(tok.logprobs.dtype), None)


def _token_mean_loss(tok: Tokens, config: M2POConfig, loss: Tensor, grad: Tensor, negated: bool, num_tokens, num_valid,
                     poison):
    """(loss, stored derivative, backward scale) of token-mean, as the kernels make them: the
    unweighted terms summed in float64, times the 1 / denominator once; the derivative stored
    unweighted, the 1 / denominator applied in backward (the scale)."""
    on_host = host_reads_free(tok.device)
    if on_host and np is not None and num_tokens is None and num_valid is None:
        wf = token_mean_weight_host(tok, loss.dtype)  # (token_weights' value, no tensors)
    else:
        w = token_weights(tok, config, num_tokens, loss.dtype, num_valid, scalar=True)
        wf = float(w) if on_host else None
    if poison is not None:  # NaN on every valid token (padding keeps a zero gradient), as the kernels
        factor = torch.where(tok.valid, 1.0 + poison.to(loss.dtype), torch.zeros((), dtype=loss.dtype,
                                                                               device=tok.device))
        loss = loss * factor
        grad = loss if grad is loss else grad * factor
    sign = -1.0 if negated else 1.0  # (the sum of the negated terms is the negated sum: exact)
    if on_host:  # the same float64 operations on host numbers, one tensor each
        t = sign * sum_f64_host(loss)
        value = torch.tensor(t if t == 0 else t * wf, dtype=loss.dtype)
        scale = torch.tensor(sign * (wf if math.isfinite(wf) else 0.0), dtype=loss.dtype)
        return value, grad.to(tok.logprobs.dtype), scale
    total = sum_f64(loss) * sign
    value = torch.where(total == 0, total, total * w.double()).to(loss.dtype)
    # a zero or non-finite denominator scales no derivative (padding keeps its zero)
    scale = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    if negated:  # the stored derivative is A r: the scale carries the sign
        scale = -scale
    return value, grad.to(tok.logprobs.dtype), scale


TORCH = TorchBackend()
