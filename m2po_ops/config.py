"""Settings of one M2PO call, bundled so they travel as one frozen value.

Every backend (the PyTorch reference, the Triton kernels, the distributed solver) takes an
``M2POConfig`` instead of a long list of keyword arguments.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

from .constants import DEFAULT_TAU

VARIANTS = ("paper", "official")
# A variant is a preset of two separate pieces: the cut rule that solves the Cut (which tokens
# may be masked, and where the budget cuts them), and the surrogate that applies it (the
# per-token loss). docs/math.md has both; README, "How it is built", says how to add either.
RULES = ("paper", "official")
SURROGATES = ("unclipped", "ppo_clip")
PRESETS = {"paper": ("paper", "unclipped"), "official": ("official", "ppo_clip")}
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
BACKENDS = ("auto", "torch", "triton")



def _check_float(name: str, value, *, allow_inf: bool, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # A tensor here would need a host sync to read; hyperparameters are Python numbers.
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class M2POConfig:
    """Hyperparameters and conventions of one call.

    tau: the second-moment budget (the paper's tau, 0.04 by default). ``inf`` masks nothing.
    variant: "paper" (Algorithm 1 of the paper) or "official" (the authors' released code).
    loss_agg_mode: verl's aggregation modes.
    miniclip_low / miniclip_high: the official variant's optional clip floors (off = None).
    validate: check that valid tokens hold finite values (a host sync; off for graph capture).
    """

    tau: float = DEFAULT_TAU
    variant: str = "paper"
    loss_agg_mode: str = "token-mean"
    miniclip_low: Optional[float] = None
    miniclip_high: Optional[float] = None
    validate: bool = True
    # the variant's cut rule ("paper": Algorithm 1, "official": water-filling) and the surrogate
    # that applies its cut ("unclipped": -A r on kept tokens, "ppo_clip"): PRESETS[variant]
    rule: str = field(init=False, repr=False, compare=False)
    surrogate: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "tau", _check_float("tau", self.tau, allow_inf=True))
        if not isinstance(self.variant, str) or self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        rule, surrogate = PRESETS[self.variant]
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "surrogate", surrogate)
        if not isinstance(self.loss_agg_mode, str) or self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        object.__setattr__(
            self, "miniclip_low", _check_float("miniclip_low", self.miniclip_low, allow_inf=False, allow_none=True)
        )
        object.__setattr__(
            self, "miniclip_high", _check_float("miniclip_high", self.miniclip_high, allow_inf=True, allow_none=True)
        )
        if not isinstance(self.validate, bool):
            raise TypeError(f"validate must be a bool, got {type(self.validate).__name__}")
        if self.surrogate != "ppo_clip":
            for name in ("miniclip_low", "miniclip_high"):
                if getattr(self, name) is not None:
                    # the paper's rule has no clip: a floor there would be silently ignored
                    raise ValueError(f"{name} applies to variant='official' only (the paper's rule has no clip)")

    @property
    def tau_split(self) -> tuple[float, float]:
        """tau = hi + lo exactly, hi with 21 significant bits, so k * hi is exact for k < 2**32.

        The cut compares S_k <= tau * k. Computing (S_k - k*hi) <= k*lo in float64 is exact up
        to about 2**-74 relative, on every backend, with the same operations.
        """
        return _tau_split(self.tau)


@functools.lru_cache(maxsize=64)  # (every budget test of a call reads it)
def _tau_split(tau: float) -> tuple[float, float]:
    if math.isinf(tau) or tau == 0.0:
        return tau, 0.0
    m, e = math.frexp(tau)
    hi = math.ldexp(math.floor(math.ldexp(m, 21)), e - 21)
    return hi, tau - hi
