"""Benchmark inputs: padded GRPO-like batches in three masking regimes, built by construction.

A batch of ``n_tokens`` positions is ``B = n_tokens / T`` rows of ``T = 2048`` (the response
length cap). Row lengths vary: uniform in [T/16, T], and 15% of rows run to the cap (truncated
responses), so about 60% of the positions are valid. Padding holds finite garbage logprobs
(what a model outputs at pad positions), old_logprobs 0 and advantage 0, as verl pads.

- old_logprobs: -Exponential(0.7) on valid tokens (most sampled tokens are likely).
- delta = logprobs - old_logprobs ~ N(0, 0.1^2): mean m2 over the trust region ~0.01 < tau.
- advantages: one N(0, 1) value per sequence broadcast over its valid tokens (GRPO).
- outliers: a fraction ``p`` of valid tokens gets delta = sign(A) * U(4, 6), so each lands in
  the trust region with m2 in [16, 36]. The paper's rule then masks the largest of them until the
  trust-region mean falls to tau: about ``p - 0.001`` of the valid tokens.

Regimes: "none" (p = 0: nothing to mask, mean m2 <= tau), "typical" (p = 0.0018: ~0.1% masked,
the paper's order of magnitude) and "stressed" (p = 0.051: ~5% masked). The masked fractions
are measured on every input by the reference and recorded, not assumed.

"heavy-tail": a broad tail above tau instead of a few far outliers (the case the threshold split
has the most left to order): p = 0.15 of valid tokens get delta = sign(A) * U(0.2, 0.6), m2 in
[0.04, 0.36], so about 30% of the trust region lies above tau. ``tail_fraction`` measures it.

Inputs are generated on the CPU with a seeded generator (identical on every machine) and then
cast to the benchmark dtype (float32 or bfloat16: both logprob tensors) and moved to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_LEN = 2048
BASE_SIGMA = 0.1
OUTLIER_RANGE = (4.0, 6.0)
REGIMES = {"none": 0.0, "typical": 0.0018, "stressed": 0.051, "heavy-tail": 0.15}
# |delta| of the planted tokens per regime (the original three: far outliers)
REGIME_RANGES = {"heavy-tail": (0.2, 0.6)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Batch:
    logprobs: torch.Tensor  # (B, T), leaf, requires grad
    old_logprobs: torch.Tensor
    advantages: torch.Tensor  # (B, T) per token (constant per sequence)
    mask: torch.Tensor  # (B, T) bool
    n_tokens: int
    regime: str
    dtype: str

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())

    def args(self):
        return self.logprobs, self.old_logprobs, self.advantages, self.mask

    def nbytes_min(self) -> int:
        """Bytes a fused forward+backward must move at least: read logprobs, old_logprobs,
        advantages, mask; write the gradient (logprobs' dtype)."""
        return sum(t.numel() * t.element_size() for t in self.args()) + self.logprobs.numel() * self.logprobs.element_size()


def make_batch(n_tokens: int, regime: str, dtype: str = "float32", device="cpu", seed: int = 0) -> Batch:
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {list(REGIMES)}")
    t = min(ROW_LEN, n_tokens)
    b = max(1, n_tokens // t)
    # One generator for the batch (the same in every regime), one for the planted outliers.
    g = torch.Generator().manual_seed(seed * 1000003 + n_tokens)
    g_out = torch.Generator().manual_seed(seed * 1000003 + n_tokens + 7919 * (1 + list(REGIMES).index(regime)))
    lengths = torch.randint(t // 16, t + 1, (b,), generator=g)
    lengths = torch.where(torch.rand(b, generator=g) < 0.15, torch.full_like(lengths, t), lengths).clamp_min(1)
    mask = torch.arange(t)[None, :] < lengths[:, None]

    old = -torch.empty(b, t).exponential_(1 / 0.7, generator=g)
    delta = torch.randn(b, t, generator=g) * BASE_SIGMA
    adv_seq = torch.randn(b, 1, generator=g)
    p = REGIMES[regime]
    garbage = -torch.empty(b, t).exponential_(1.0, generator=g) * 5
    if p > 0:
        lo, hi = REGIME_RANGES.get(regime, OUTLIER_RANGE)
        planted = (torch.rand(b, t, generator=g_out) < p) & mask
        big = torch.sign(adv_seq) * (lo + (hi - lo) * torch.rand(b, t, generator=g_out))
        delta = torch.where(planted, big.expand(b, t), delta)
    logprobs = old + delta
    logprobs = torch.where(mask, logprobs, garbage)
    old = torch.where(mask, old, torch.zeros_like(old))
    adv = torch.where(mask, adv_seq.expand(b, t), torch.zeros(b, t))

    dt = DTYPES[dtype]
    logprobs = logprobs.to(dt).to(device).requires_grad_(True)
    return Batch(logprobs, old.to(dt).to(device), adv.to(device), mask.to(device), b * t, regime, dtype)


def tail_fraction(batch: Batch, tau: float) -> float:
    """The fraction of the paper rule's trust region whose m2 is above tau (the tail the solver
    orders), measured on the batch."""
    delta = batch.logprobs.detach().float() - batch.old_logprobs.float()
    adv = batch.advantages.float()
    tr = batch.mask & (((adv > 0) & (delta > 0)) | ((adv < 0) & (delta < 0)))
    n = int(tr.sum())
    return int((tr & (delta * delta > tau)).sum()) / n if n else 0.0
