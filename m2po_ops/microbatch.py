"""The micro-batch pre-pass: one M2PO cut for an optimizer step split into micro-batches.

    stats = M2POStats(tau=0.04)
    with torch.no_grad():                       # (update runs under no_grad itself)
        for mb in micro_batches:
            stats.update(policy_logprobs(mb), mb.old_logprobs, mb.advantages, mb.mask)
    cuts = stats.solve(group=dp_group)          # group=None: this process only
    for i, mb in enumerate(micro_batches):
        loss, metrics = m2po_loss(policy_logprobs(mb), mb.old_logprobs, mb.advantages, mb.mask,
                                  cut=cuts[i], num_tokens=cuts.num_valid)
        loss.backward()

The summed gradients equal the gradient of one m2po_loss call on the whole mini-batch (all
ranks' micro-batches concatenated in rank order, then micro-batch order), and every
micro-batch's keep is its slice of that call's keep.

What is kept between update and solve: per micro-batch the int32 keys (4 bytes a token: the m2
bit pattern of trust-region tokens, -1 otherwise), the valid count and a 4-number fingerprint;
no autograd graph. With the Triton backend the mergeable sums (the tail's level-1 histogram, the
below part's count and limbs: 512 KiB) are accumulated as well, so solve does not re-read the
keys for them.

The pre-pass and the training forward must give bit-identical log-probs (no dropout, the same
deterministic kernels and batch shapes); otherwise the cut was solved on other numbers than the
loss sees. ``M2POStats(check_drift=True)`` (or ``m2po_loss(..., check_drift=True)``) compares
each training micro-batch's fingerprint with the pre-pass one and warns on a mismatch. The
check reads the fingerprints on the host (a sync): it is meant for debugging.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import distributed
from .backend import Parts, Summary, Want
from .config import M2POConfig
from .constants import DEFAULT_TAU
from .cut import Cut
from .dispatch import get_backend, resolve_backend
from .inputs import Tokens, check_group, prepare

_FP_PRIME = 65521


@dataclass(frozen=True)
class MicroBatchCut(Cut):
    """The cut of micro-batch ``index`` of an ``M2POStats`` solve (a ``Cut`` with a fingerprint
    of the pre-pass keys, for the drift check)."""

    index: int = -1
    fingerprint: Optional[Tensor] = None  # int64 [4]: valid, trust-region, key sum, weighted key sum
    check_drift: bool = False

    def to(self, device) -> "MicroBatchCut":
        moved = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                moved[f.name] = v.to(device)
        return dataclasses.replace(self, **moved)


class M2POCuts(Sequence):
    """The result of ``M2POStats.solve``: ``cuts[i]`` is micro-batch i's cut (in update order).

    num_valid: int64 0-d tensor, the valid tokens of the whole step (all micro-batches, all ranks
        of the group): pass it as ``num_tokens`` so the micro-batch losses add up to the
        mini-batch's token-mean loss.
    cut: the global cut (ties counted from the step's first token), e.g. for logging
        (``cut.threshold``, ``cut.m2``, ``cut.m2_after``, ``cut.num_trust_region``).
    """

    def __init__(self, cuts: List[MicroBatchCut], cut: Cut, num_valid: Tensor):
        self._cuts = cuts
        self.cut = cut
        self.num_valid = num_valid

    def __getitem__(self, i):
        return self._cuts[i]

    def __len__(self) -> int:
        return len(self._cuts)

    def __repr__(self) -> str:
        return f"M2POCuts({len(self)} micro-batches, variant={self.cut.variant!r})"


def fingerprint(key: Tensor, num_valid: Tensor) -> Tensor:
    """int64 [4]: valid count, trust-region count, sum of keys, position-weighted sum of keys.

    Integer sums (the weighted one may wrap, identically on both passes), so equal keys give
    equal fingerprints bit for bit, whatever the reduction order.
    """
    k = key.to(torch.int64)
    inside = k >= 0
    k = torch.where(inside, k, 0)
    w = torch.arange(k.numel(), device=k.device, dtype=torch.int64) % _FP_PRIME + 1
    return torch.stack([num_valid.to(torch.int64).reshape(()), inside.sum(), k.sum(), (k * w).sum()])


def summarize_call(tok: Tokens, config: M2POConfig, backend: str) -> Summary:
    """A backend's statistics pass over one micro-batch, kept as its Summary (the keys, the valid
    count, and the Triton backend's mergeable sums)."""
    be = get_backend(backend)
    return be.summary(be.statistics(tok, config, Want(keys=True)))


def check_drift(tok: Tokens, config: M2POConfig, backend: str, cut: Cut) -> bool:
    """Compare a training call's keys with the pre-pass fingerprint carried by ``cut``.

    Warns (and returns False) when they differ. Reads the fingerprints on the host (a sync).
    """
    if not isinstance(cut, MicroBatchCut) or cut.fingerprint is None:
        raise ValueError("check_drift needs a cut from M2POStats.solve (it carries the pre-pass fingerprint)")
    with torch.no_grad():
        summary = summarize_call(tok, config, backend)
        now = fingerprint(summary.keys, summary.num_valid)
    before = cut.fingerprint.to(now.device)
    if torch.equal(now, before):
        return True
    (valid_b, trust_b, sum_b, wsum_b), (valid_n, trust_n, sum_n, wsum_n) = before.tolist(), now.tolist()
    warnings.warn(
        f"m2po: micro-batch {cut.index}: the training pass's statistics differ from the pre-pass "
        f"(valid tokens {valid_b} -> {valid_n}, trust-region tokens {trust_b} -> {trust_n}, key sums "
        f"{sum_b} -> {sum_n}, {wsum_b} -> {wsum_n}). The cut was solved on other log-probs than the loss "
        "sees, so the mask is not the single-call mask. The pre-pass and the training forward must "
        "give identical log-probs: disable dropout, use deterministic kernels and the same batch shapes.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


class M2POStats:
    """Accumulates M2PO statistics over the micro-batches of one optimizer step, then solves one
    cut for all of them (optionally across a process group). See the module docstring.

    tau, variant, miniclip_low, miniclip_high, validate: as for ``m2po_loss`` (the cut depends
        on them; loss_agg_mode does not).
    backend: "auto" (Triton for CUDA tensors when available, else torch), "torch" or "triton":
        the stats pass and the solve. The solved cuts apply with either backend.
    check_drift: the cuts carry a fingerprint of their micro-batch's keys, and ``m2po_loss`` /
        ``m2po_mask`` given such a cut compare it with the training pass (a host sync per call)
        and warn on a mismatch. ``m2po_loss(..., check_drift=True/False)`` overrides it per call.
    """

    def __init__(
        self,
        tau: float = DEFAULT_TAU,
        variant: str = "paper",
        *,
        backend: str = "auto",
        miniclip_low: Optional[float] = None,
        miniclip_high: Optional[float] = None,
        validate: bool = True,
        check_drift: bool = False,
    ):
        self.config = M2POConfig(
            tau=tau, variant=variant, miniclip_low=miniclip_low, miniclip_high=miniclip_high, validate=validate
        )
        resolve_backend(backend, torch.device("cpu"))  # checks the name
        if not isinstance(check_drift, bool):
            raise TypeError(f"check_drift must be a bool, got {type(check_drift).__name__}")
        self.backend = backend
        self.check_drift = check_drift
        self.reset()

    def reset(self) -> None:
        """Forget every micro-batch (start the next optimizer step)."""
        self._keys: List[Tensor] = []
        self._num_valid: List[Tensor] = []
        self._fingerprints: List[Tensor] = []
        self._sums: Optional[Tensor] = None
        self._below_max: Optional[Tensor] = None
        self._device: Optional[torch.device] = None
        self._resolved: Optional[str] = None

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def num_valid(self) -> Tensor:
        """This process's valid tokens so far (int64 0-d)."""
        if not self._num_valid:
            return torch.zeros((), dtype=torch.int64, device=self._device)
        return torch.stack(self._num_valid).sum()

    @torch.no_grad()
    def update(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Optional[Tensor] = None,
        *,
        cu_seqlens: Union[Tensor, Sequence[int], None] = None,
    ) -> int:
        """Add one micro-batch (same arguments and layouts as ``m2po_loss``). Returns its index."""
        tok = prepare(logprobs, old_logprobs, advantages, mask, self.config, cu_seqlens)
        if self._device is None:
            self._device = tok.device
            self._resolved = resolve_backend(self.backend, tok.device)
        elif tok.device != self._device:
            raise ValueError(f"micro-batch on {tok.device}, earlier ones on {self._device}")
        summary = summarize_call(tok, self.config, self._resolved)
        key, n_valid = summary.keys, summary.num_valid
        if summary.sums is not None:
            self._sums = summary.sums if self._sums is None else self._sums.add_(summary.sums)
            below_max = summary.below_max
            self._below_max = below_max if self._below_max is None else torch.maximum(self._below_max, below_max)
        self._keys.append(key)
        self._num_valid.append(n_valid.to(torch.int64).reshape(()))
        self._fingerprints.append(fingerprint(key, n_valid))
        return len(self._keys) - 1

    def solve(self, group=None) -> M2POCuts:
        """Solve the cut over every micro-batch added (and, with ``group``, over every rank's).

        With a group, every rank must call solve (the collectives are matched), each with at
        least one micro-batch (an empty one is fine). Issues the group's collectives; no other
        host sync.
        """
        check_group(group)
        if not self._keys:
            raise ValueError("M2POStats.solve: no micro-batch was added (call update first; a rank with no "
                             "tokens can add an empty micro-batch)")
        config, keys = self.config, self._keys
        parts = Parts(keys, torch.stack(self._num_valid).sum(), self._sums, self._below_max)
        cut, nv = get_backend(self._resolved).solve_parts(parts, config, group)
        parts = distributed.part_cuts(keys, cut, group)
        base = {f.name: None for f in dataclasses.fields(Cut)}
        cuts = [
            MicroBatchCut(
                **{name: getattr(p, name) for name in base},
                index=i,
                fingerprint=self._fingerprints[i],
                check_drift=self.check_drift,
            )
            for i, p in enumerate(parts)
        ]
        return M2POCuts(cuts, cut, nv)


__all__ = ["M2POStats", "M2POCuts", "MicroBatchCut", "fingerprint"]
