"""One M2PO cut for a whole data-parallel optimizer step, with O(buckets) communication.

Every rank of a ``torch.distributed`` process group gets the mask that one call on the
concatenation of all ranks' tokens, in rank order, would give (flat index = rank offset + local
index, for the paper's tie rule). Only mergeable statistics cross the wire; their size does not
depend on the token count:

1. all-reduce(SUM) of the mergeable sums (int64 [2 * 32768 + 11]: the tail's level-1 histogram,
   the below part's count and limbs, see m2po_ops/histogram.py) and of the valid-token count;
   official only: all-reduce(MAX) of the below part's largest key (one int64);
2. select1 on every rank (identical inputs give an identical state, no broadcast needed);
3. local level-2 histogram, all-reduce(SUM) of it (paper: slot 0, int64 [2, 65536]; official:
   both slots, int64 [4, 65536]);
4. select2 with the global valid count -> the global cut;
5. paper only: all-gather of one int64 per rank (the rank's tokens sitting exactly at the cut
   value); ``ties_before`` = sum over lower ranks, and the rank applies
   ``cut.for_part(ties_before)``. The official variant's cut (clip bounds) needs no tie step.

The same steps run for both backends: the PyTorch reference (m2po_ops.histogram) and the
Triton passes (m2po_ops.triton_backend, whose histograms are views of the launch workspace and
are all-reduced in place between the kernels). Nothing here reads a device value on the host;
the collectives are the only synchronisation. The group's backend must support the tensors'
device (NCCL for CUDA, gloo for CPU).

Every collective goes through ``_all_reduce`` / ``_all_gather``, which record what they send;
``comm_log()`` exposes the record (the tests check that it does not grow with tokens).

The torch backend's local (no group) solve sorts; the distributed one uses the histogram. The
two agree except where a prefix sum S_k lies within a few float64 ulps of tau * k, where the
spec allows either answer (see m2po_ops/histogram.py).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import histogram as H
from . import reference
from .config import M2POConfig
from .cut import Cut
from .inputs import Tokens

_comm: Optional[list] = None


@contextlib.contextmanager
def comm_log():
    """Record the collectives issued inside the block as ``(op, bytes sent by this rank)``."""
    global _comm
    previous, _comm = _comm, []
    try:
        yield _comm
    finally:
        _comm = previous


def bytes_sent(log: Sequence[tuple]) -> int:
    return sum(b for _, b in log)


def _record(op: str, nbytes: int) -> None:
    if _comm is not None:
        _comm.append((op, nbytes))


def _all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce (SUM unless ``op``) of a contiguous tensor."""
    assert t.is_contiguous()
    _record("all_reduce", t.numel() * t.element_size())
    dist.all_reduce(t, op=op, group=group)
    return t


def _all_gather_scalar(x: Tensor, group) -> Tensor:
    """All ranks' values of a 0-d tensor, as a 1-D tensor in rank order."""
    x = x.reshape(1).contiguous()
    world = dist.get_world_size(group)
    out = [torch.empty_like(x) for _ in range(world)]
    _record("all_gather", x.numel() * x.element_size())
    dist.all_gather(out, x, group=group)
    return torch.cat(out)


def _group_rank(group) -> int:
    return dist.get_rank(group)


# ---------------------------------------------------------------------------------------------
# Backend-specific histogram steps. Both lay a level-2 histogram out as slot-major
# (slot 0 count, slot 0 significand sum, slot 1 count, slot 1 sum) x 65536, so the wire format
# and the part that is reduced are the same.


def _hist2_wire(hist2: Tensor, config: M2POConfig) -> Tensor:
    flat = hist2.reshape(-1)
    # The paper's select2 reads slot 0 only; the official one also reads slot 1 (the bucket
    # below the boundary, for the water-filling predecessor).
    return flat[: 2 * H.L2_BUCKETS] if config.variant == "paper" else flat


class TorchSteps:
    """The histogram steps of m2po_ops.histogram (any device)."""

    def __init__(self, sums: Tensor, below_max: Tensor):
        self.sums = sums
        self.below_max = below_max

    @classmethod
    def from_keys(cls, keys: Sequence[Tensor], config: M2POConfig, device) -> "TorchSteps":
        sums = torch.zeros(H.SUMS_LEN, dtype=torch.int64, device=device)
        below_max = torch.zeros((), dtype=torch.int64, device=device)
        for k in keys:
            sums += H.summarize(k, config)
            below_max = torch.maximum(below_max, H.below_max(k, config))
        return cls(sums, below_max.reshape(1))

    def select1(self, config: M2POConfig) -> Tensor:
        return H.select1(self.sums, config)

    def level2(self, keys: Sequence[Tensor], state1: Tensor, config: M2POConfig) -> Tensor:
        hist2 = torch.zeros(H.L2_SLOTS, 2, H.L2_BUCKETS, dtype=torch.int64, device=self.sums.device)
        for k in keys:
            hist2 += H.level2(k, state1, config)
        return hist2

    def select2(self, hist2: Tensor, state1: Tensor, config: M2POConfig, num_valid: Tensor) -> Cut:
        return H.select2(hist2, state1, self.below_max.reshape(()), config, num_valid)


class TritonSteps:
    """The Triton passes, on a workspace whose mergeable sums (ws.sums, ws.below_max) the stats
    pass has filled."""

    def __init__(self, ws):
        self.ws = ws
        self.sums = ws.sums
        self.below_max = ws.below_max.reshape(1)

    @classmethod
    def from_sums(cls, sums: Tensor, below_max: Tensor, max_tokens: int) -> "TritonSteps":
        from .triton_backend import Workspace

        ws = Workspace.allocate(max(max_tokens, 1), sums.device)
        ws.sums.copy_(sums)
        ws.below_max.copy_(below_max)
        return cls(ws)

    def select1(self, config: M2POConfig) -> Tensor:
        from . import triton_backend as TB

        TB.select1(self.ws, config)
        return self.ws.state1

    def level2(self, keys: Sequence[Tensor], state1: Tensor, config: M2POConfig) -> Tensor:
        from . import triton_backend as TB

        for k in keys:  # the kernel adds into ws.hist2, so micro-batches accumulate
            TB.level2(self.ws, config, key=k)
        return self.ws.hist2

    def select2(self, hist2: Tensor, state1: Tensor, config: M2POConfig, num_valid: Tensor) -> Cut:
        from . import triton_backend as TB

        return TB.select2(self.ws, config, num_valid)


def solve_steps(steps, keys: Sequence[Tensor], num_valid: Tensor, config: M2POConfig, group) -> Tuple[Cut, Tensor]:
    """The global cut (not yet offset for this rank's ties) and the global valid count.

    ``steps.sums`` and ``steps.below_max`` hold this rank's mergeable sums; they are all-reduced
    in place.
    """
    nv = num_valid.to(torch.int64).reshape(()).clone()
    if group is not None:
        _all_reduce(steps.sums, group)
        _all_reduce(nv, group)
        if config.variant == "official":  # (the paper rule never reads it)
            _all_reduce(steps.below_max, group, op=dist.ReduceOp.MAX)
    state1 = steps.select1(config)
    hist2 = steps.level2(keys, state1, config)
    if group is not None:
        _all_reduce(_hist2_wire(hist2, config), group)
    cut = steps.select2(hist2, state1, config, nv)
    return cut, nv


def local_ties(keys: Sequence[Tensor], cut: Cut) -> Tensor:
    """int64 [len(keys)]: per part, the keys sitting exactly at a paper cut's value."""
    if len(keys) == 0:
        return torch.zeros(0, dtype=torch.int64, device=cut.device)
    return torch.stack([(k == cut.value).sum() for k in keys])


def rank_ties_before(my_ties: Tensor, group) -> Tensor:
    """Tied tokens on the lower ranks of the group (one all-gathered int64 per rank)."""
    if group is None:
        return torch.zeros((), dtype=torch.int64, device=my_ties.device)
    everyone = _all_gather_scalar(my_ties.to(torch.int64), group)
    return everyone[: _group_rank(group)].sum()


def _keys(tok: Tokens, config: M2POConfig):
    delta = reference.log_ratio(tok)
    m2 = delta * delta
    tr = reference.trust_region(tok, delta, config)
    key = torch.where(tr, reference.m2_bits(m2), torch.full_like(reference.m2_bits(m2), -1))
    return key, delta, m2, tr


def solve_group_torch(tok: Tokens, config: M2POConfig, group):
    """Torch backend, one call per rank: (this rank's cut, delta, m2, trust_region)."""
    key, delta, m2, tr = _keys(tok, config)
    steps = TorchSteps.from_keys([key], config, tok.device)
    cut, _ = solve_steps(steps, [key], tok.valid.sum(), config, group)
    if config.variant == "paper":
        cut = cut.for_part(rank_ties_before(local_ties([key], cut)[0], group))
    return cut, delta, m2, tr


def triton_group_solver(config: M2POConfig, group):
    """The ``solver(key, ws) -> (cut, num_valid)`` hook of triton_forward for a process group.

    The stats pass has filled ws.sums, ws.below_max and ws.n_valid with this rank's statistics.
    """

    def solver(key: Tensor, ws) -> Tuple[Cut, Tensor]:
        cut, nv = solve_steps(TritonSteps(ws), [key], ws.n_valid, config, group)
        if config.variant == "paper":
            cut = cut.for_part(rank_ties_before(local_ties([key], cut)[0], group))
        return cut, nv

    return solver


__all__ = [
    "comm_log",
    "bytes_sent",
    "solve_group_torch",
    "triton_group_solver",
    "solve_steps",
    "local_ties",
    "rank_ties_before",
    "TorchSteps",
    "TritonSteps",
]
