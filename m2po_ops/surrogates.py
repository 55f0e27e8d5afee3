"""The surrogates, written once in PyTorch: what a token's loss term and derivative are once a
cut is known.

- unclipped (the paper rule's): -A r on kept tokens, with the straight-through derivative
  d(-A r)/d logprobs = -A r; a paper cut drops the masked tokens.
- ppo_clip (the official rule's): max(-A r, -A clamp(r, lower, upper)) with the cut's solved
  ratio bounds, decided in float32 as the authors' torch code decides it.

The Triton twins are kernels/common.py's unclipped_terms and ppo_clip_terms.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unclipped_surrogate(adv: Tensor, ratio: Tensor, negated: bool = False) -> Tensor:
    """-A r per token (a new tensor; the derivative is the same values). negated: A r instead,
    for a caller that negates the sum and the backward scale (exact: rounding is symmetric in
    sign)."""
    out = torch.mul(adv, ratio)
    return out if negated else out.neg_()


def ppo_clip_decision(adv32: Tensor, r32: Tensor, lower32: Tensor, upper32: Tensor):
    """The official rule's clip decision as the authors' torch code makes it, in float32 (ratio,
    float32 bounds, strict comparisons): (pg1, pg2, clipped, tie, inside), pg1 = -A r and
    pg2 = -A clamp(r, lower, upper) in float32."""
    pg1 = -adv32 * r32
    pg2 = -adv32 * torch.clamp(r32, lower32, upper32)
    return pg1, pg2, pg2 > pg1, pg1 == pg2, (r32 >= lower32) & (r32 <= upper32)


def ppo_clip_surrogate(pg1: Tensor, pg2: Tensor, clipped: Tensor, tie: Tensor, inside: Tensor):
    """(loss, derivative) of max(pg1, pg2) with the decision of ppo_clip_decision, as autograd gives
    them: torch.maximum splits the gradient evenly on ties; clamp passes it inside [lower, upper]."""
    half = torch.where(inside, torch.ones((), dtype=pg1.dtype, device=pg1.device),
                       torch.full((), 0.5, dtype=pg1.dtype, device=pg1.device))
    zero = torch.zeros((), dtype=pg1.dtype, device=pg1.device)
    return torch.where(clipped, pg2, pg1), torch.where(clipped, zero, torch.where(tie, pg1 * half, pg1))
