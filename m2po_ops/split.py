"""The threshold split: the trust-region tokens a rule can never cut, and their exact sum
(docs/math.md, sections 5 to 7).

Why: ordering every trust-region token (a sort, or a 2**31-value histogram) is what makes an
exact M2PO cut expensive, yet most tokens can never be cut.

- Paper rule. Sort T ascending, v_1 <= ... <= v_n, S_k = v_1 + ... + v_k. If v_k <= tau then
  S_k <= k v_k <= k tau, so the prefix of length k fits the budget: every token with
  m2 <= tau is kept, and the cut lies among the tokens above tau.
- Official rule. The authors' water-filling test at index k is
  (v_k - 1e-12)(n - k - 1) + c_k >= tau n - 1e-12, with c_k = v_1 + ... + v_{k+1} <= (k+1) v_k
  (0-based k), so the test value is at most n v_k - 1e-12 (n - k - 1): no test passes unless
  v_k >= tau - 1e-12 / n. Every token below tau - 1e-12 (any n >= 1) is before the first hit.

So a token is in the *tail* when its key (the float32 m2 bit pattern) is above
``threshold_bits(config)`` (a float32 at or below those bounds, with a margin for the float64
evaluation of the official test), and *below* otherwise. Only the tail is ordered (the
histograms hold tail tokens only); the below part enters the decision through its count, its
exact sum and, for the official rule, its maximum (the value before the first hit when the hit
is the tail's first token).

The exact sum: a float32 value is ``sig * 2**(p - 149)`` with an integer significand
``sig < 2**24`` and ``p = max(exponent, 1) - 1``. ``sig << (p % 30)`` is split into two 30-bit
limbs, added into limbs ``p // 30`` and ``p // 30 + 1``. Integer limb sums are exact, do not
depend on the order of the additions, and add across blocks, micro-batches and ranks, so every
partition of a step gives the same bits. ``limbs_to_float`` turns them into one float64 by a
fixed sequence of operations, the same in PyTorch and in the kernels.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
from torch import Tensor

from .constants import F32_MAX_BITS
from .constants import LIMB_BITS, LIMB_MASK, MAX_LIMBS, OFFICIAL_EPS
# the official threshold sits this far (relative) below tau - 1e-12: room for the float64
# roundings of the authors' test value (prefix sums and products, each well under 2**-40)
OFFICIAL_MARGIN = 2.0**-30
# The floating-point zone (docs/math.md, section 7): where |S_k - tau k| <= ZONE_EPS * tau * k,
# a decision computed with float64 sums (the tail's prefix sums, the below sum's conversion,
# tau * k) may differ from the exact-arithmetic one. Error chains: the limb conversion (2 ulps), chunked bucket prefix sums
# (under 2**7 float64 additions deep) and, on the PyTorch CPU path, a sequential float64 prefix
# over the sorted tail, k additions deep: within 2**-32 for tails of up to 2**20 tokens per call.
ZONE_EPS = 2.0**-32


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _f32_down(x: float) -> int:
    """Bit pattern of the largest non-negative float32 <= x (x >= 0, finite)."""
    bits = _f32_bits(x) if x <= 3.4028234663852886e38 else F32_MAX_BITS
    if struct.unpack("<f", struct.pack("<i", bits))[0] > x:  # rounded up
        bits -= 1
    return min(bits, F32_MAX_BITS)


@functools.lru_cache(maxsize=None)  # (every call of both backends asks; a pure function of two values)
def threshold_bits(rule: str, tau: float) -> int:
    """The largest key that is never cut under this cut rule and budget; -1 when none is safe.

    Never above FLT_MAX's bits, so an infinite m2 is always in the tail (it makes the sums
    infinite, which the histograms represent and limbs do not)."""
    if rule == "paper":
        bound = tau
    else:
        bound = (tau - OFFICIAL_EPS) * (1.0 - OFFICIAL_MARGIN)
    if math.isnan(bound) or bound < 0:
        return -1
    if math.isinf(bound):
        return F32_MAX_BITS
    return _f32_down(bound)


def limb_count(thr_bits: int) -> int:
    """Limbs that hold the exact sum of keys in [0, thr_bits] (at least 2)."""
    if thr_bits < 0:
        return 2
    p = max(thr_bits >> 23, 1) - 1
    return p // LIMB_BITS + 2


def _significand(key: Tensor) -> Tensor:
    exponent = key >> 23
    return (key & 0x7FFFFF) | torch.where(exponent > 0, 1 << 23, 0)


def limb_sums(key: Tensor, below: Tensor, nlimb: int) -> Tensor:
    """int64 [nlimb]: the limbs of the exact sum of the float32 values whose bit patterns are
    ``key`` where ``below`` (flat tensors)."""
    k = torch.where(below, key.to(torch.int64), 0)
    p = (k >> 23).clamp_min(1) - 1
    x = _significand(k) << (p % LIMB_BITS)
    q = p // LIMB_BITS
    out = torch.zeros(nlimb + 1, dtype=torch.int64, device=key.device)
    out.scatter_add_(0, q, torch.where(below, x & LIMB_MASK, 0))
    out.scatter_add_(0, q + 1, torch.where(below, x >> LIMB_BITS, 0))
    return out[:nlimb]


def limbs_to_float_host(raw: list) -> float:
    """limbs_to_float on Python ints (the host's form of the same sequence of operations)."""
    s, carry = 0.0, 0
    for i, v in enumerate(raw):
        v += carry
        if i < len(raw) - 1:
            carry, v = v >> LIMB_BITS, v & LIMB_MASK
        s = s + float(v) * 2.0 ** (LIMB_BITS * i - 149)
    return s


def limbs_to_float(limbs: Tensor) -> Tensor:
    """float64 0-d from limb sums, by a fixed sequence of operations (the kernels run the same
    one): from the lowest limb up, the carry is taken into the next limb and the remaining
    30-bit digit (the top limb: all of it), converted to float64 (rounded to nearest) and times
    its power of two (exact), is added to the running sum. Within two ulps of the exact sum (the
    small digits first); the same bits for the same limbs on every device."""
    if limbs.device.type == "cpu":  # Python ints and floats: the same IEEE operations, no kernels
        return torch.tensor(limbs_to_float_host(limbs.tolist()), dtype=torch.float64)
    s = torch.zeros((), dtype=torch.float64, device=limbs.device)
    carry = torch.zeros((), dtype=torch.int64, device=limbs.device)
    for i in range(limbs.numel()):
        v = limbs[i] + carry
        if i < limbs.numel() - 1:
            carry, v = v >> LIMB_BITS, v & LIMB_MASK
        s = s + v.double() * 2.0 ** (LIMB_BITS * i - 149)
    return s


__all__ = ["ZONE_EPS", "LIMB_BITS", "MAX_LIMBS", "threshold_bits", "limb_count", "limb_sums", "limbs_to_float",
           "limbs_to_float_host"]
