"""The solved M2PO decision of an optimizer mini-batch, shared by every backend.

A ``Cut`` is what the expensive, global part of M2PO produces and what the cheap, per-token
part consumes. It holds only 0-d device tensors, so building and applying it never syncs.

variant="paper": trust-region token i (m2 bit pattern ``b_i``, a non-negative float32 read as
int32, which orders like the float) is kept iff ``b_i < value``, or ``b_i == value`` and fewer
than ``ties_kept`` earlier trust-region tokens (in flat order) have ``b_i == value``.
Nothing masked: ``value = 0x7FFFFFFF``, which no finite or infinite m2 reaches.

variant="official": a token's gradient is cut by the PPO clip with ratio bounds
``[lower, upper]`` (float32, as the authors' torch code casts them).

A cut solved for many parts (data-parallel ranks, micro-batches) is applied to one part with
``cut.for_part(ties_before)``, where ``ties_before`` counts the tied tokens in earlier parts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .config import PRESETS
from .constants import DEFAULT_TAU, KEEP_ALL_BITS


@dataclass(frozen=True)
class Cut:
    variant: str
    value: Tensor  # int32: m2 bit pattern at the cut (paper)
    ties_kept: Tensor  # int64: tied tokens kept, counted from the first in flat order (paper)
    lower: Tensor  # float32: ratio clip bounds (official)
    upper: Tensor
    num_valid: Tensor  # int64: valid tokens of the whole mini-batch
    num_trust_region: Tensor  # int64: |T| (paper) or eligible tokens (official)
    m2: Tensor  # float32: mean m2 over T before masking
    m2_after: Tensor  # float32: mean m2 over the kept part of T (official: the authors' formula)
    threshold: Tensor  # float32: m2 at the cut (paper) or tau_c**2 (official); inf if none
    # the budget it was solved for (applied with another tau the cut would be silently wrong);
    # last and defaulted so that existing keyword or positional constructions keep working
    tau: float = DEFAULT_TAU

    # the tensor fields, in the order the operators take them (m2po_ops/ops.py)
    TENSORS = ("value", "ties_kept", "lower", "upper", "num_valid", "num_trust_region", "m2", "m2_after", "threshold")

    def tensors(self) -> list:
        """The tensor fields in ``TENSORS`` order (the operators' ``cut`` argument)."""
        return [getattr(self, name) for name in self.TENSORS]

    @classmethod
    def from_tensors(cls, tensors, config, device: torch.device) -> Optional["Cut"]:
        """The Cut of an operator's ``cut`` argument (None for []), solved under ``config``."""
        if not tensors:
            return None
        if len(tensors) != len(cls.TENSORS):
            raise ValueError(f"cut must hold the {len(cls.TENSORS)} tensors of a Cut {cls.TENSORS}, got "
                             f"{len(tensors)}")
        if tensors[0].device != device:
            raise ValueError(f"cut is on {tensors[0].device} but logprobs is on {device}")
        return cls(config.variant, *tensors, tau=config.tau)

    def for_part(self, ties_before: Tensor) -> "Cut":
        """The cut as seen by one part whose earlier parts hold ``ties_before`` tied tokens."""
        ties_before = torch.as_tensor(ties_before, dtype=torch.int64, device=self.ties_kept.device)
        return dataclasses.replace(self, ties_kept=(self.ties_kept - ties_before).clamp_min(0))

    def to(self, device) -> "Cut":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})

    @property
    def rule(self) -> str:
        """The cut rule that solved it (config.PRESETS)."""
        return PRESETS[self.variant][0]

    @property
    def surrogate(self) -> str:
        """The surrogate that applies it (config.PRESETS)."""
        return PRESETS[self.variant][1]

    @property
    def device(self) -> torch.device:
        return self.value.device


# The neutral value of every field (nothing masked): (dtype, fill).
_NEUTRAL = dict(
    value=(torch.int32, KEEP_ALL_BITS),
    ties_kept=(torch.int64, 0),
    lower=(torch.float32, 0.0),
    upper=(torch.float32, float("inf")),
    num_valid=(torch.int64, 0),
    num_trust_region=(torch.int64, 0),
    m2=(torch.float32, 0.0),
    m2_after=(torch.float32, 0.0),
    threshold=(torch.float32, float("inf")),
)


def make_cut(config, device, **fields) -> Cut:
    """A Cut solved under ``config`` (an M2POConfig), every field not given set to its neutral
    value (nothing masked)."""
    for name, (dtype, fill) in _NEUTRAL.items():
        if name not in fields:  # (only the missing ones: a tensor each, on the host path too)
            fields[name] = torch.full((), fill, dtype=dtype, device=device)  # a fill, not a host copy
    return Cut(variant=config.variant, tau=config.tau, **fields)
