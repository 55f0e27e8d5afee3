"""Shared pieces of the verl integration tests: verl's real ActorConfig, random M2PO batches,
and the expected per-token M2PO terms computed independently of the plugin (from the
library's single-call mask, in float64), for verl's own ``agg_loss`` to aggregate."""

from __future__ import annotations

import torch

from m2po_ops import m2po_mask


def actor_config(loss_mode="m2po", loss_agg_mode="token-mean", loss_scale_factor=None, **info):
    """verl 0.9.1's ActorConfig (not a stand-in), with global_batch_info as ppo_loss fills it."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=loss_agg_mode,
                      loss_scale_factor=loss_scale_factor, policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    cfg.global_batch_info.update(info)
    cfg.global_batch_info.setdefault("loss_scale_factor", loss_scale_factor)
    return cfg


def random_batch(seed, b=6, t=9, dtype=torch.float64, empty_row=True, scale=0.3):
    """(old, logprobs leaf, per-token advantages, bool mask): right padding, varied lengths, one
    all-padding row (verl's seq modes treat it specially), GRPO-style per-sequence advantages."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 2
    lp = old + scale * torch.randn(b, t, generator=g, dtype=dtype)
    adv = torch.randn(b, 1, generator=g, dtype=dtype).expand(b, t).contiguous()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    if empty_row:
        lengths[b // 2] = 0
    mask = torch.arange(t) < lengths[:, None]
    return old, lp.requires_grad_(), adv, mask


def expected_terms(old, lp, adv, mask, variant="paper", tau=0.04, weights=None, **kw):
    """The M2PO per-token surrogate of one call on this batch, from the paper's formula (float64):
    paper: -keep * exp(delta) * A; official: max(-A r, -A clamp(r, lo, hi)) with the library's
    solved bounds, its gradient flowing where the library keeps the token. Differentiable in
    ``lp``; times ``weights`` as verl's vanilla loss does."""
    keep, metrics = m2po_mask(lp.detach(), old, adv, mask, tau=tau, variant=variant, **kw)
    delta = lp.double() - old.double()
    r = torch.exp(delta.clamp(-20, 20))
    a = adv.double()
    if variant == "paper":
        terms = torch.where(keep & mask, -r * a, torch.zeros_like(r))
    else:
        # the value: PPO's clipped surrogate with the solved bounds; the gradient: -A r where
        # the library keeps the token (a token whose ratio sits on a bound is decided by the
        # library's float32 rule, which a float64 clamp here cannot reproduce)
        lo, hi = float(metrics["clip_low"]), float(metrics["clip_high"])
        clipped = torch.maximum(-a * r, -a * r.clamp(lo, hi)).detach()
        terms = torch.where(keep, -a * r, clipped)
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    if weights is not None:
        terms = terms * weights.double()
    return terms, keep
