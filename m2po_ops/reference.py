"""The pure-PyTorch backend: the spec's rules written plainly, for any device.

It is the ground truth the Triton kernels are tested against, and the backend used on CPU.

Conventions (docs/math.md has the math in full; section numbers below refer to it):
- delta = logprobs - old_logprobs in float32 after upcasting; m2 = delta * delta in float32.
  The mask is always decided on these float32 values. The loss is computed in float32, or in
  float64 for float64 inputs (so gradcheck works).
- Paper rule: keep_count = max{k : S_k <= tau * k}, S_k the float64 sum of the k smallest m2 of
  the trust region ordered by (m2, flat index), compared as (S_k - k*tau_hi) <= k*tau_lo
  (section 3; the official rule and its departures from the authors' code: section 4).

Solving the cut uses the threshold split (m2po_ops/split.py): trust-region tokens whose key (the
float32 m2 bit pattern) is at or below ``threshold_bits`` can never be cut, so only the tail above
it is ordered; the part below enters through its count, its exact limb sum and (official) its
maximum.
- CPU tensors (``host_reads_free``): reading a value is free, so the solver branches on the host:
  it compacts the trust region's keys, exits early when nothing can be cut, and otherwise sorts
  only the tail. numpy does the compaction, the sort and the per-exponent sums when it is
  installed (its CPU kernels for these are 5-10x faster than torch's); torch otherwise.
- Every other device (CUDA): the histogram solver (m2po_ops/radix_select.py), no host sync.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import radix_select, split
from .config import M2POConfig
from .constants import F32_INF_BITS, KEEP_ALL_BITS, OFFICIAL_EPS
from .cut import Cut
from .inputs import Tokens, count_true, host_reads_free
from .metrics import metrics_dict
from .rules import (clamped_ratio, m2_bits, official_constrained, official_cut, official_test_value,  # noqa: F401
                    ratio_f32, trust_region, within_budget)
from .surrogates import ppo_clip_decision, ppo_clip_surrogate, unclipped_surrogate

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional: torch's CPU kernels give the same results
    np = None

# Python floats are float64: the host solver's scalar arithmetic is the tensors' float64 arithmetic.
_F64 = torch.float64


def compute_dtype(tok: Tokens) -> torch.dtype:
    return torch.float64 if tok.logprobs.dtype == torch.float64 else torch.float32


def log_ratio(tok: Tokens) -> Tensor:
    """delta = logprobs - old_logprobs in float32, zero on invalid tokens (padding may be NaN)."""
    return log_ratio_and_sum(tok)[0]


def log_ratio_and_sum(tok: Tokens) -> Tuple[Tensor, Optional[float]]:
    """(log_ratio(tok), the float32 sum of it as a host number, or None where not computed: on
    the host path only, where the kl metric reads it)."""
    lp, old = tok.logprobs, tok.old_logprobs
    old = old.float() if old.dtype == torch.float64 else old  # (a half type is upcast exactly inside sub)
    # in place into logprobs' float32 copy when .float() made one: one buffer fewer
    delta = lp - old if lp.dtype == torch.float32 else lp.float().sub_(old)
    if not host_reads_free(delta.device):
        return zero_invalid_(delta, tok), None
    base = tok.mask_bool
    if np is not None and base is not None and base.is_contiguous():
        # delta times the 0/1 mask first: a product keeps every NaN and infinity (inf * 0 is NaN),
        # so the one sum below still proves every delta finite, and it is then the kl metric's
        dn = delta.numpy()
        with np.errstate(invalid="ignore"):  # (inf * 0 on padding: NaN, as intended)
            np.multiply(dn, base.numpy(), out=dn)
    else:
        base = None
    total = float(delta.sum())
    if math.isfinite(total):
        # an infinite or NaN logprobs or old_logprobs value makes its delta, and the sum, non-finite:
        # the validity check need not read them again
        tok.record_finite_logprobs()
        if tok.all_finite:  # the advantages too: valid is the mask itself
            if base is None and tok.mask_src is not None:
                delta = zero_invalid_(delta, tok, True)
                total = float(delta.sum())
            return delta, total
        return zero_invalid_(delta, tok, True), None
    return zero_invalid_(delta, tok, False), None


def zero_invalid_(x: Tensor, tok: Tokens, finite: Optional[bool] = None) -> Tensor:
    """x (flat, floating) with 0 on the tokens that are not valid, in place. finite: whether
    every value of x is known finite (None: find out, on the host)."""
    if np is not None and host_reads_free(x.device) and tok.all_finite:
        if finite is None:  # (a finite sum proves every value finite; torch sums faster than numpy)
            finite = bool(torch.isfinite(x.sum()))
        if finite:
            # x times the 0/1 mask is exact for finite x, and numpy's multiply is several times
            # faster than torch.where on CPU
            xn = x.numpy()
            np.multiply(xn, tok.valid.numpy(), out=xn)
            return x
    return torch.where(tok.valid, x, torch.zeros((), dtype=x.dtype, device=x.device), out=x)


def _max_or_zero(x: Tensor) -> Tensor:
    """max(0, max(x)) (0 for an empty x); numel is a shape, so no host read."""
    if not x.numel():
        return x.new_zeros(())
    if np is not None and host_reads_free(x.device) and x.is_contiguous():
        return torch.from_numpy(np.max(x.numpy(), keepdims=True)).reshape(()).clamp_min(0)  # (numpy's max: ~3x)
    return x.max().clamp_min(0)


def _max_or_zero_host(x: Tensor) -> float:
    """_max_or_zero's value as a host number (CPU tensors, numpy installed)."""
    if not x.numel():
        return 0.0
    m = float(np.max(x.numpy()) if x.is_contiguous() else x.max())
    return m if m != m else max(m, 0.0)  # (NaN stays NaN, as clamp_min leaves it)


# ---------------------------------------------------------------------------------------------
# The cut


@dataclass
class HostTrustRegion:
    """The trust region compacted on the host (CPU): flat indices (int64) and keys (int32), in
    flat order. The solver reads the keys; applying a paper cut reads both (no pass over N).

    The solver records where its tail is (``tail_at``: the positions in ``keys`` of the keys above
    ``tail_thr``, ascending, and ``tail_keys``, those keys): a paper cut's value lies in the tail, so
    applying it then looks at the tail only."""

    index: Tensor
    keys: Tensor
    tail_at: Optional[Tensor] = None
    tail_keys: Optional[Tensor] = None
    tail_thr: Optional[int] = None


def compact_trust_region(delta: Tensor, tr: Tensor) -> HostTrustRegion:
    """From delta (float32, flat): the keys are m2_bits(delta * delta) of the trust region, squared
    only there (the same float32 product, so the same bits)."""
    index = _flatnonzero(tr)
    d = torch.from_numpy(np.take(delta.numpy(), index.numpy())) if np is not None else delta[index]
    return HostTrustRegion(index, m2_bits(d.mul_(d)))


def solve_trust_region(m2: Optional[Tensor], tr: Tensor, num_valid: Tensor, config: M2POConfig,
                       host: Optional[HostTrustRegion] = None) -> Cut:
    """The cut of the trust-region tokens ``tr`` with squared log ratios ``m2`` (flat tensors).
    host: compact_trust_region(delta, tr) when the caller has it (CPU; m2 is then not read)."""
    if host_reads_free(tr.device):
        if host is None:
            index = _flatnonzero(tr)
            host = HostTrustRegion(index, m2_bits(m2)[index])
        return _solve_host(host.keys, num_valid, config, host)
    return solve_keys(torch.where(tr, m2_bits(m2), -1), num_valid, config)


def solve_keys(key: Tensor, num_valid: Tensor, config: M2POConfig) -> Cut:
    """The cut from int32 keys (the m2 bits of trust-region tokens, -1 elsewhere), flat order.
    CPU: the host split solver; other devices: the histogram solver (sync-free)."""
    if host_reads_free(key.device):
        return _solve_host(_compact(key, key >= 0), num_valid, config)
    return radix_select.solve_keys(key, num_valid, config)


def solve(tok: Tokens, config: M2POConfig):
    """Local solve: (cut, delta, m2, trust_region) for this call's own tokens."""
    delta = log_ratio(tok)
    m2 = delta * delta
    tr = trust_region(tok, delta, config)
    return solve_trust_region(m2, tr, tok.num_valid, config), delta, m2, tr


# --- the host (CPU) split solver --------------------------------------------------------------
# numpy, when installed, does the two steps torch's CPU kernels are slowest at (measured 5-10x):
# compacting by a mask (flatnonzero has no branch per token) and sorting int32 keys.


def _flatnonzero(mask: Tensor) -> Tensor:
    """int64 indices of the True entries of a flat CPU bool tensor."""
    if np is not None:
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().reshape(-1)


def _compact(key: Tensor, inside: Tensor) -> Tensor:
    """int32 keys of the tokens ``inside``, in flat order."""
    if np is not None:
        return torch.from_numpy(np.take(key.numpy(), np.flatnonzero(inside.numpy())))
    return key[_flatnonzero(inside)]


def _above(keys: Tensor, thr: int, host: Optional[HostTrustRegion] = None) -> Tensor:
    """The keys above thr, in flat order (their positions recorded in ``host`` when given)."""
    if np is not None:
        k = keys.numpy()
        if host is not None:
            at = np.flatnonzero(k > thr)
            tail = torch.from_numpy(np.take(k, at))
            host.tail_at, host.tail_keys, host.tail_thr = torch.from_numpy(at), tail, thr
            return tail
        return torch.from_numpy(np.compress(k > thr, k))  # (compress: faster than k[mask] here)
    return keys[keys > thr]


def _sorted(keys: Tensor) -> Tensor:
    """Keys ascending: values ascending, since non-negative floats order like their bits. The
    values are all the solver reads, so ties need no index order (equal keys are equal values)."""
    if np is not None:
        return torch.from_numpy(np.sort(keys.numpy()))
    return torch.sort(keys).values


def _exact_sum(keys: Tensor) -> int:
    """The exact sum of the finite float32 values with these keys, as an integer in units of
    2**-149 (the smallest subnormal). Per exponent field: values sharing one are multiples of
    one ulp, so their float64 sum is exact while it stays below 2**53 ulps (chunks of < 2**29
    tokens: significands are < 2**24). Infinite keys (field 255) are skipped; only the fields
    present are converted (a handful: m2 values span a few binades). A few keys are converted
    one by one instead (each value times 2**149 is an integer, exactly)."""
    if np is not None and keys.numel() <= _FEW_KEYS:
        kn = keys.numpy()
        return sum(int(v * 2.0**149) for v in kn[kn < _INF_KEY].view(np.float32).tolist())
    total = 0
    chunk = 1 << 28
    for start in range(0, keys.numel(), chunk):
        k = keys[start:start + chunk]
        if np is not None:  # (numpy's bincount reads the float32 weights as they are: no float64 copy)
            kn = k.numpy()
            per = np.bincount(kn >> 23, weights=kn.view(np.float32), minlength=256)[:255]
            sums = per[np.flatnonzero(per)].tolist()
        else:
            sums = [v for v in torch.bincount(k >> 23, weights=k.view(torch.float32).double(), minlength=256)
                    .tolist()[:255] if v]
        total += sum(int(v * 2.0**149) for v in sums)  # a power-of-two scaling of an integer multiple of 2**-149: exact
    return total


_FEW_KEYS = 256  # (below this, a Python loop beats bincount's fixed cost)
_INF_KEY = F32_INF_BITS


@functools.lru_cache(maxsize=64)
def _units(key: int) -> int:
    """The value of a finite float32 key as an integer in units of 2**-149."""
    return int(struct.unpack("<f", struct.pack("<i", key))[0] * 2.0**149)


def _below_exact(tr_keys: Tensor, thr: int, n_above: Optional[int] = None) -> int:
    """The exact sum of the trust-region keys at or below thr, in units of 2**-149.
    n_above: how many keys lie above thr, when the caller knows.

    Most of them lie in the few binades under thr. The values of the top ``width`` exponent
    fields up to thr's (width = 29 - bit_length(n) for n keys) are multiples of the lowest such
    field's ulp, and n of them sum to less than 2**53 of those ulps: their float64 sum is exact
    in any order. So every key is clipped into that window [low, thr] and the clipped values take
    one plain sum; the clipping added exactly ``low``'s value (a power of two) per key under the
    window and thr's value per key above it, which come off as integers. Only the keys under the
    window (usually a few percent) go through the per-exponent sums."""
    if thr < 0:
        return 0
    n = tr_keys.numel()
    width = 29 - n.bit_length()
    if np is None or width < 1 or n >= 1 << 28:
        return _exact_sum(_compact(tr_keys, tr_keys <= thr))
    k = tr_keys.numpy()
    low = max((thr >> 23) - width, 0) << 23  # the window: keys in [low, thr]
    clipped = torch.from_numpy(np.clip(k, low, thr).view(np.float32))
    total = float(clipped.sum(dtype=torch.float64))  # (torch's float64 sum of float32: ~2x numpy's)
    if n_above is None:
        n_above = int(np.count_nonzero(k > thr))
    exact = int(total * 2.0**149) - n_above * _units(thr)  # a power-of-two scaling of a multiple of 2**-149: exact
    if low > 0:
        under = k < low
        n_under = int(np.count_nonzero(under))
        if n_under:
            exact += _exact_sum(torch.from_numpy(np.compress(under, k))) - n_under * _units(low)
    return exact


def _below_sum(tr_keys, thr: int, n_above: Optional[int] = None) -> float:
    """The sum of the trust-region keys at or below thr with the bits of
    split.limbs_to_float(split.limb_sums(...)): the exact integer, written as canonical limbs,
    which is the form limbs_to_float reduces any limbs to."""
    exact = _below_exact(tr_keys, thr, n_above)
    nlimb = split.limb_count(thr)
    limbs = [(exact >> (split.LIMB_BITS * i)) & split.LIMB_MASK for i in range(nlimb - 1)]
    limbs.append(exact >> (split.LIMB_BITS * (nlimb - 1)))
    return split.limbs_to_float_host(limbs)


def _solve_host(tr_keys, num_valid: Tensor, config: M2POConfig, host: Optional[HostTrustRegion] = None) -> Cut:
    """The split solve on the host (CPU tensors only): tr_keys are the trust region's int32 keys
    in flat order (host: their HostTrustRegion, which records where the tail is)."""
    device = num_valid.device
    thr = split.threshold_bits(config.rule, config.tau)
    n = tr_keys.numel()
    tail = _above(tr_keys, thr, host)
    n_below = n - tail.numel()
    s_below = _below_sum(tr_keys, thr, tail.numel())
    total = s_below + float(tail.view(torch.float32).double().sum())  # (any order: the early exits and Cut.m2 read it)
    if config.rule == "paper":
        if tail.numel() == 0 or within_budget(total, n, config):  # nothing can be cut: early exit
            return _host_paper_cut(config, num_valid, n, total / max(n, 1))
        return _paper_cut(_sorted(tail), n_below, s_below, n, total, num_valid, config)
    n_t = torch.tensor(n, dtype=torch.int64)
    total_t = torch.tensor(total, dtype=_F64)
    e = OFFICIAL_EPS
    target = config.tau * n
    constrained = official_constrained(n, total, config)
    zero = torch.zeros((), dtype=_F64)
    if not constrained or tail.numel() == 0:  # early exit: unconstrained (no tail: no test can pass)
        return official_cut(zero, zero, n_t, n_t, total_t, torch.tensor(False), torch.tensor(target <= e),
                            num_valid, config)
    return _official_cut(_sorted(tail), tr_keys, thr, n_below, s_below, n, total, num_valid, config)


def _tail_prefix(tail_sorted, s_below: float):
    """(tail values, S_k for k = n_below + 1 .. n): S_below plus the float64 prefix sums of the
    sorted tail (sequential, so S_k carries at most k roundings: split.ZONE_EPS)."""
    if np is not None:  # (numpy's cumsum is sequential as torch's: the same bits)
        values = tail_sorted.numpy().view(np.float32).astype(np.float64)
        return torch.from_numpy(values), torch.from_numpy(s_below + np.cumsum(values))
    values = tail_sorted.view(torch.float32).double()
    return values, s_below + torch.cumsum(values, 0)


def _kept_in_tail(s, n_below: int, config: M2POConfig) -> int:
    """How many sorted tail values the budget keeps: the largest j with S_{n_below+j} <=
    tau (n_below + j), tested as within_budget tests it (the same float64 operations, on Python
    floats; s: the tail's S_k, indexable).
    S_k - tau k grows along the tail (every tail value exceeds tau), so the test passes
    on a prefix of the tail and a binary search finds its end in log2(tail) tests. (Exactly so in
    exact arithmetic; where float64 rounding could make the computed test flip back, S_k lies in
    the float zone, where a decision may differ anyway: split.ZONE_EPS.)"""
    if config.tau == float("inf"):
        return len(s)
    hi, lo = config.tau_split
    a, b = 0, len(s)  # prefixes of length <= a pass (0: the threshold lemma), those longer than b fail
    while a < b:
        m = (a + b + 1) // 2
        k = float(n_below + m)
        if float(s[m - 1]) - k * hi <= k * lo:
            a = m
        else:
            b = m - 1
    return a


def _paper_cut(tail_sorted, n_below: int, s_below: float, n: int, total: float, num_valid: Tensor,
               config: M2POConfig) -> Cut:
    """keep_count = max{k : S_k <= tau k}: at least n_below (the threshold lemma), so only the
    tail's prefixes are tested."""
    _, s = _tail_prefix(tail_sorted, s_below)
    # (elements read through numpy when there: no tensor per read)
    s, keys = (s.numpy(), tail_sorted.numpy()) if np is not None else (s, tail_sorted)
    kept_tail = _kept_in_tail(s, n_below, config)
    keep_count = n_below + kept_tail
    kept_sum = float(s[kept_tail - 1]) if kept_tail > 0 else s_below
    if kept_tail == tail_sorted.numel():  # the full prefix passed after all (it lies in the float zone)
        return _host_paper_cut(config, num_valid, n, total / max(n, 1))
    value = int(keys[kept_tail])
    # tokens strictly below the cut value: the below part and the tail's smaller keys
    first_tie = int(np.searchsorted(keys, value, side="left") if np is not None else
                    torch.searchsorted(keys, value, side="left"))
    return _host_paper_cut(config, num_valid, n, total / max(n, 1), kept_sum / max(keep_count, 1), value,
                           keep_count - n_below - first_tie)


def _host_paper_cut(config: M2POConfig, num_valid: Tensor, n: int, m2: float, m2_after: Optional[float] = None,
                    value: int = KEEP_ALL_BITS, ties_kept: int = 0) -> Cut:
    """A paper Cut from host numbers (the means in float64, rounded once to float32), its fields
    views of three small tensors (a tensor per field costs more than the rest of a small call)."""
    m2_after = m2 if m2_after is None else m2_after
    m2_t, m2_after_t, lower, upper = torch.tensor([m2, m2_after, 0.0, float("inf")], dtype=torch.float32).unbind()
    ties_kept_t, n_t = torch.tensor([ties_kept, n], dtype=torch.int64).unbind()
    v = torch.tensor([value], dtype=torch.int32)
    threshold = v.view(torch.float32).view(()) if value != KEEP_ALL_BITS else upper  # (inf: nothing masked)
    return Cut(variant=config.variant, tau=config.tau, value=v.view(()), ties_kept=ties_kept_t, lower=lower,
               upper=upper, num_valid=num_valid, num_trust_region=n_t, m2=m2_t, m2_after=m2_after_t,
               threshold=threshold)


def _official_cut(tail_sorted, tr_keys, thr: int, n_below: int, s_below: float, n: int, total: float,
                  num_valid: Tensor, config: M2POConfig) -> Cut:
    """The first k with (v_k - 1e-12)(n - k - 1) + c_k >= tau n - 1e-12 (c_k = S_{k+1}): none
    before the tail (the threshold lemma), so only the tail is tested."""
    e = OFFICIAL_EPS
    values, s = _tail_prefix(tail_sorted, s_below)
    n_t = torch.tensor(n, dtype=torch.int64)
    k = torch.arange(n_below, n, dtype=torch.int64)
    hit = official_test_value(values, k, s, n_t) >= config.tau * n - e
    j = int(hit.to(torch.uint8).argmax()) if bool(hit.any()) else tail_sorted.numel()
    k_star = n_below + j
    if j > 0:
        v_prev, c_prev = float(values[j - 1]), float(s[j - 1])
    elif n_below > 0:  # the hit is the tail's first token: the value before it is the below part's largest
        top = torch.where(tr_keys <= thr, tr_keys, -1).max().reshape(1)
        v_prev = float(top.view(torch.float32))
        c_prev = s_below
    else:
        v_prev = c_prev = 0.0
    return official_cut(torch.tensor(v_prev, dtype=_F64), torch.tensor(c_prev, dtype=_F64),
                        torch.tensor(k_star), n_t, torch.tensor(total, dtype=_F64),
                        torch.tensor(k_star < n), torch.tensor(config.tau * n <= e), num_valid, config)


# ---------------------------------------------------------------------------------------------
# Applying a cut


def keep_paper(m2: Tensor, tr: Tensor, valid: Tensor, cut: Cut) -> Tensor:
    """Apply a paper cut: ties at the cut value are kept in flat order up to ties_kept."""
    return _keep_paper(m2, tr, valid, cut)[0]


def _keep_paper(m2: Optional[Tensor], tr: Tensor, valid: Tensor, cut: Cut, host: Optional[HostTrustRegion] = None):
    """(keep, the flat indices of the masked tokens, or None when not listed). m2 is not read
    when host is given."""
    if host_reads_free(tr.device):
        return _keep_paper_host(None if host is not None else m2_bits(m2), tr, valid, cut, host)
    bits = m2_bits(m2)
    tie = tr & (bits == cut.value)
    tie_rank = torch.cumsum(tie.to(torch.int64), 0) - tie.to(torch.int64)
    keep_tr = (bits < cut.value) | (tie & (tie_rank < cut.ties_kept))
    return valid & (~tr | keep_tr), None


def _keep_paper_host(bits: Optional[Tensor], tr: Tensor, valid: Tensor, cut: Cut, host: Optional[HostTrustRegion]):
    """_keep_paper on the host: ``valid`` without the tokens of masked_paper_host. Nothing
    masked: keep is ``valid`` itself."""
    masked = masked_paper_host(bits, tr, cut, host)
    if not masked.numel():
        return valid, masked
    keep = valid.clone()
    if np is not None:
        keep.numpy()[masked.numpy()] = False
    else:
        keep[masked] = False
    return keep, masked


def masked_paper_host(bits: Optional[Tensor], tr: Tensor, cut: Cut, host: Optional[HostTrustRegion]) -> Tensor:
    """The flat indices (int64, ascending) of the tokens a paper cut masks, on the host: only the
    trust-region tokens at or above the cut value (the tail's top, usually a few) are looked at
    one by one. bits: m2_bits of every token, read when host (compact_trust_region) is None."""
    value = int(cut.value)
    if value == KEEP_ALL_BITS:
        return torch.zeros(0, dtype=torch.int64)
    if np is not None:  # the same steps in numpy, whose gathers and scatters are several times faster
        if host is not None:
            if host.tail_at is not None and value > host.tail_thr:  # the solver's tail holds every candidate
                keys, at = host.tail_keys.numpy(), host.tail_at.numpy()
            else:
                keys, at = host.keys.numpy(), None
            sel = np.flatnonzero(keys >= value)
            cand_bits = keys[sel]
            cand = host.index.numpy()[sel if at is None else at[sel]]
        else:
            b = bits.numpy()
            cand = np.flatnonzero((b >= value) & tr.numpy())  # the trust region's, in flat order
            cand_bits = b[cand]
        tie = cand_bits == value
        rank = np.cumsum(tie) - tie  # earlier tied tokens, in flat order
        return torch.from_numpy(cand[(cand_bits > value) | (rank >= int(cut.ties_kept))])
    if host is not None:
        at = _flatnonzero(host.keys >= value)
        cand, cand_bits = host.index[at], host.keys[at]
    else:
        cand = _flatnonzero(bits >= value)
        cand = cand[tr[cand]]  # the trust region's, in flat order
        cand_bits = bits[cand]
    tie = cand_bits == value
    rank = torch.cumsum(tie, 0) - tie.to(torch.int64)  # earlier tied tokens, in flat order
    return cand[(cand_bits > value) | (rank >= int(cut.ties_kept))]


def per_token(tok: Tokens, cut: Cut, delta: Tensor, m2: Tensor, tr: Tensor, ratio_v: Optional[Tensor] = None,
              host: Optional[HostTrustRegion] = None, negated: bool = False, masked: Optional[Tensor] = None):
    """keep, per-token loss l_i and its derivative g_i = dl_i/dlogprobs_i (compute dtype); l_i and
    g_i are 0 on padding.

    ratio_v: ``valid_ratio(tok, delta, variant)`` when the caller has it (the metrics read it too).
    host: compact_trust_region(delta, tr) when the caller has it (CPU; m2 may then be None).
    negated: paper rule, return -l_i = -g_i = A r (a pass fewer than -A r) to a caller that
    negates their sum and the backward scale instead (exact: rounding is symmetric in sign).
    masked: paper rule on the host, masked_paper_host(...) from a caller that wants no keep
    tensor (a loss): keep is then None."""
    cd = compute_dtype(tok)
    valid = tok.valid
    ratio = valid_ratio(tok, delta, cut.variant) if ratio_v is None else ratio_v
    if cut.surrogate == "unclipped":
        want_keep, keep = masked is None, None
        if want_keep:
            keep, masked = _keep_paper(m2, tr, valid, cut, host)
        # -A r on kept tokens, r = exp(clamp(delta)): the metrics' ratio, or float64 for float64 input
        r = ratio if cd == torch.float32 else clamped_ratio(tok.logprobs.double() - tok.old_logprobs.double())
        loss = unclipped_surrogate(tok.advantages_compute, r, negated)
        if masked is not None and cd == torch.float32 and tok.all_finite:
            # r is 0 on padding, where A is finite: only the masked tokens are left
            if np is not None:
                loss.numpy()[masked.numpy()] = 0
            else:
                loss[masked] = 0
        else:
            kept = keep
            if kept is None:
                kept = valid.clone()
                kept[masked] = False
            loss = torch.where(kept, loss, torch.zeros((), dtype=cd, device=tok.device), out=loss)
        return keep, loss, loss  # straight-through: d(-a r)/d logprobs = -a r
    if cd == torch.float32 and np is not None and host_reads_free(tok.device) and tok.all_finite:
        return _per_token_official_host(tok, cut, ratio)
    zero = torch.zeros((), dtype=cd, device=tok.device)
    # official: PPO clipped surrogate with the solved bounds. The clip decision is made as the
    # authors' torch code makes it, in float32 (ratio, float32 bounds, strict comparisons), for
    # every input dtype; the loss values use the compute dtype.
    if cd == torch.float64:
        d = torch.where(valid, tok.logprobs.double() - tok.old_logprobs.double(), zero)
    adv = torch.where(valid, tok.advantages.to(cd), zero)
    lower32, upper32 = cut.lower, cut.upper
    adv32 = adv if cd == torch.float32 else adv.float()
    pg1, pg2, clipped, tie, inside = ppo_clip_decision(adv32, ratio, lower32, upper32)
    keep = valid & ~clipped
    if cd == torch.float64:
        r = torch.exp(d)
        lower, upper = lower32.to(cd), upper32.to(cd)
        pg1 = -adv * r
        pg2 = -adv * torch.clamp(r, lower, upper)
    loss, grad = ppo_clip_surrogate(pg1, pg2, clipped, tie, inside)
    return keep, torch.where(valid, loss, zero), torch.where(valid, grad, zero)


def _per_token_official_host(tok: Tokens, cut: Cut, ratio: Tensor):
    """per_token's official rule on the host (float32, every input finite). Inside the bounds,
    clamp(r) is r, so the two surrogate terms are equal: nothing is clipped, the tie passes the
    whole gradient, and loss = gradient = -A r. Only the valid tokens outside [lower, upper]
    (usually few) take the general formula, on their own; ratio is 0 on padding."""
    valid = tok.valid
    lower, upper = cut.lower, cut.upper
    r = ratio.numpy()
    up = np.float32(float(upper))
    # (an infinite ratio always takes the general formula: with an infinite upper bound it is
    # inside, but -(0 inf) and (-0) inf are NaNs of different signs)
    outside = (r < np.float32(float(lower))) | ((r >= up) if np.isinf(up) else (r > up))
    outside &= valid.numpy()
    at = torch.from_numpy(np.flatnonzero(outside))
    adv = tok.advantages_compute  # (finite everywhere, so A * 0 is 0 on padding)
    loss = unclipped_surrogate(adv, ratio)  # -(A r) = (-A) r exactly: inside the bounds, ppo_clip is unclipped
    if not at.numel():
        return valid, loss, loss
    pg1, pg2, clipped, tie, inside = ppo_clip_decision(adv[at], ratio[at], lower, upper)
    grad = loss.clone()
    loss[at], grad[at] = ppo_clip_surrogate(pg1, pg2, clipped, tie, inside)
    keep = valid.clone()
    keep[at[clipped]] = False
    return keep, loss, grad


def ratio_of(delta: Tensor, variant: str) -> Tensor:
    """The float32 ratio a variant reports and decides with: exp(clamp(delta)) (paper), or the
    correctly rounded exp(delta) (official). 1 on padding (delta = 0 there)."""
    return clamped_ratio(delta) if variant == "paper" else ratio_f32(delta)


def valid_ratio(tok: Tokens, delta: Tensor, variant: str, ratio: Optional[Tensor] = None) -> Tensor:
    """ratio_of(delta) on valid tokens, 0 on padding; written into ``ratio`` when given."""
    ratio = ratio_of(delta, variant) if ratio is None else ratio
    # the paper's ratio is finite (delta clamped; NaN only where delta is, on no token)
    return zero_invalid_(ratio, tok, True if variant == "paper" else None)


def metrics(tok: Tokens, cut: Cut, delta: Tensor, tr: Tensor, keep: Optional[Tensor], variant: str,
            ratio_v: Optional[Tensor] = None, num_trust_region: Optional[Tensor] = None,
            delta_sum: Optional[float] = None, num_masked: Optional[int] = None) -> dict:
    """The spec's metrics as float32 0-d tensors on the input's device (delta is 0 on padding).

    ratio_v: valid_ratio(...) when the caller has it; num_trust_region: the count of tr when the
    caller has it (a local cut's). On the host, from a caller that has them: delta_sum, the
    float32 sum of delta (log_ratio_and_sum), and num_masked, the masked count (keep is then not
    read and may be None)."""
    count = tok.num_valid
    ratio_v = valid_ratio(tok, delta, variant) if ratio_v is None else ratio_v
    n_tr = count_true(tr) if num_trust_region is None else num_trust_region
    if num_masked is not None:
        masked = torch.tensor(num_masked, dtype=torch.int64)
    else:  # keep is a subset of valid: the masked count is their difference (0 when keep is valid itself)
        masked = torch.zeros_like(count) if keep is tok.valid else count - count_true(keep)
    if np is not None and host_reads_free(tok.device):
        # the same float32 values from host numbers, made in one tensor: each quotient of two
        # float32 values is formed in float64 and rounded once to float32, which is the float32
        # division's correctly rounded result (a float64 quotient never double-rounds wrongly)
        f32 = np.float32
        nv = float(f32(max(int(count), 1)))
        d_sum = float(delta.sum()) if delta_sum is None else delta_sum
        r_max = _max_or_zero_host(ratio_v)
        values = [float(f32(int(masked))) / nv, float(f32(int(n_tr))) / nv, -d_sum / nv,
                  float(ratio_v.sum()) / nv, float(f32(int(tok.nonfinite))), 0.0, r_max]
        (masked_fraction, tr_fraction, kl, ratio_mean, nonfinite, zero,
         ratio_max) = torch.tensor(values, dtype=torch.float32).unbind()
    else:
        ratio_max = _max_or_zero(ratio_v)
        nv = count.clamp_min(1).float()
        zero = torch.zeros((), dtype=torch.float32, device=tok.device)
        masked_fraction, tr_fraction = masked.float() / nv, n_tr.float() / nv
        kl, ratio_mean, nonfinite = -delta.sum() / nv, ratio_v.sum() / nv, tok.nonfinite.float()
    return metrics_dict(cut, masked_fraction, tr_fraction, kl, ratio_mean, ratio_max, nonfinite, zero)
