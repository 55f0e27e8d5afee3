"""The floating-point zone of split.ZONE_EPS, checked in exact arithmetic (for any backend).

A solver that decides with float64 sums may answer differently from exact arithmetic only where
the decision is within rounding of its threshold: for the paper rule, where
|S_k - tau k| <= ZONE_EPS * tau * k (S_k the exact sum of the k smallest m2 of the trust region).
These helpers take plain Python floats (the trust region's float32 m2 values, any order) and
compute with fractions.Fraction, so they share nothing with the backends they judge.

- ``assert_paper_cuts_agree(m2, tau, keep_a, keep_b)``: two keep counts of the paper rule may
  differ only if every k between them lies in the zone.
- ``official_zone(m2, tau)``: the indices k whose water-filling test (or the no-constraint test)
  is within the zone of its threshold; two official answers may differ only if it is non-empty.
"""

from __future__ import annotations

from fractions import Fraction
from typing import List, Sequence

from m2po_ops.split import ZONE_EPS

OFFICIAL_EPS = 1e-12


def exact_prefix_sums(m2: Sequence[float]) -> List[Fraction]:
    """[S_0, S_1, ..., S_n]: exact sums of the k smallest values."""
    out = [Fraction(0)]
    for v in sorted(m2):
        out.append(out[-1] + Fraction(v))
    return out


def paper_zone_ks(m2: Sequence[float], tau: float, lo: int, hi: int) -> List[int]:
    """The k in (lo, hi] that lie outside the zone (|S_k - tau k| > ZONE_EPS tau k)."""
    s = exact_prefix_sums(m2)
    t, eps = Fraction(tau), Fraction(ZONE_EPS)
    return [k for k in range(lo + 1, hi + 1) if abs(s[k] - t * k) > eps * t * k]


def assert_paper_cuts_agree(m2: Sequence[float], tau: float, keep_a: int, keep_b: int, what: str = "") -> None:
    """Keep counts keep_a and keep_b (trust-region tokens kept) of the paper rule on the trust
    region ``m2`` agree, or every prefix between them is in the zone. The prefix means of a sorted
    sequence do not decrease, so a float decision that errs at k errs by less than the zone at
    every k between the two answers."""
    if keep_a == keep_b:
        return
    assert tau == tau and tau != float("inf"), f"{what}: keep counts {keep_a} != {keep_b} at tau={tau}"
    lo, hi = sorted((keep_a, keep_b))
    outside = paper_zone_ks(m2, tau, lo, hi)
    assert not outside, (f"{what}: keep counts {keep_a} != {keep_b}, and prefixes {outside[:5]} lie outside the "
                         f"float zone (|S_k - tau k| > {ZONE_EPS} tau k) at tau={tau}")


def official_zone(m2: Sequence[float], tau: float) -> List[int]:
    """Indices k (0-based, ascending order) whose exact water-filling test value
    (v_k - 1e-12)(n - k - 1) + c_k is within ZONE_EPS * tau * n of tau n - 1e-12; -1 stands for
    the no-constraint tests (mean vs tau + 1e-12, tau n vs total - 1e-12) when one of them is."""
    n = len(m2)
    if n == 0 or tau != tau or tau == float("inf"):
        return []
    v = sorted(m2)
    s = exact_prefix_sums(m2)
    t, e, eps = Fraction(tau), Fraction(OFFICIAL_EPS), Fraction(ZONE_EPS)
    width = eps * t * n
    target = t * n - e
    out = []
    if abs(s[n] - (t + e) * n) <= width or abs(s[n] - e - t * n) <= width:
        out.append(-1)
    for k in range(n):
        f = (Fraction(v[k]) - e) * (n - k - 1) + s[k + 1]
        if abs(f - target) <= width:
            out.append(k)
    return out
