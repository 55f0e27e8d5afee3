"""One M2PO cut for a whole data-parallel optimizer step, with O(buckets) communication.

Every rank of a ``torch.distributed`` process group gets the mask that one call on the
concatenation of all ranks' tokens, in rank order, would give (flat index = rank offset + local
index, for the paper's tie rule). Only mergeable statistics cross the wire; their size does not
depend on the token count:

1. all-reduce(SUM) of the mergeable sums (int64 [2 * 32768 + 11]: the tail's level-1 histogram,
   the below part's count and limbs, see m2po_ops/radix_select.py) and of the valid-token count;
   official only: all-reduce(MAX) of the below part's largest key (one int64);
2. select1 on every rank (identical inputs give an identical state, no broadcast needed);
3. local level-2 histogram, all-reduce(SUM) of it (paper: slot 0, int64 [2, 65536]; official:
   both slots, int64 [4, 65536]);
4. select2 with the global valid count -> the global cut;
5. paper only: all-gather of one int64 per rank (the rank's tokens sitting exactly at the cut
   value); ``ties_before`` = sum over lower ranks, and the rank applies
   ``cut.for_part(ties_before)``. The official variant's cut (clip bounds) needs no tie step.

The same steps run for both backends; each brings its own implementation of them (``steps``: the
PyTorch one in m2po_ops/torch_backend.py, by m2po_ops/radix_select.py; the Triton one in
m2po_ops/triton_backend.py, whose histograms are views of the launch workspace and are
all-reduced in place between the kernels). This module imports neither backend. Nothing here
reads a device value on the host;
the collectives are the only synchronisation. The group's backend must support the tensors'
device (NCCL for CUDA, gloo for CPU).

Every collective goes through ``_all_reduce`` / ``_all_gather``, which record what they send;
``comm_log()`` exposes the record (the tests check that it does not grow with tokens).

The torch backend's local (no group) solve sorts; the distributed one uses the histogram. The
two agree except where a prefix sum S_k lies within a few float64 ulps of tau * k, where the
spec allows either answer (see m2po_ops/radix_select.py).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .config import M2POConfig
from .constants import L2_BUCKETS
from .cut import Cut

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
# The solve. ``steps`` is a backend's implementation of the histogram steps: ``sums`` (int64
# [SUMS_LEN]) and ``below_max`` (int64 [1]) hold this rank's mergeable sums; ``select1(config)``
# gives the select state, ``level2(keys, state1, config)`` the level-2 histograms, laid out
# slot-major (slot 0 count, slot 0 significand sum, slot 1 count, slot 1 sum) x L2_BUCKETS on both
# backends, so the wire format is the same; ``select2(hist2, state1, config, num_valid)`` the cut.


def _hist2_wire(hist2: Tensor, config: M2POConfig) -> Tensor:
    flat = hist2.reshape(-1)
    # The paper's select2 reads slot 0 only; the official one also reads slot 1 (the bucket
    # below the boundary, for the water-filling predecessor).
    return flat[: 2 * L2_BUCKETS] if config.rule == "paper" else flat


def solve_steps(steps, keys: Sequence[Tensor], num_valid: Tensor, config: M2POConfig, group) -> Tuple[Cut, Tensor]:
    """The global cut (not yet offset for this rank's ties) and the global valid count.

    ``steps.sums`` and ``steps.below_max`` hold this rank's mergeable sums; they are all-reduced
    in place.
    """
    nv = num_valid.to(torch.int64).reshape(()).clone()
    if group is not None:
        _all_reduce(steps.sums, group)
        _all_reduce(nv, group)
        if config.rule == "official":  # (the paper rule never reads it)
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


def part_cuts(keys: Sequence[Tensor], cut: Cut, group) -> list:
    """Each part's view of a global cut (parts: this rank's micro-batches in order, or its one
    call): a paper cut's ``ties_kept`` counts off the tied tokens of the lower ranks and of the
    earlier parts. The official cut (clip bounds) needs no tie step."""
    if cut.rule != "paper":
        return [cut] * len(keys)
    per_part = local_ties(keys, cut)
    if len(keys) == 1:
        return [cut.for_part(rank_ties_before(per_part[0], group))]
    before = rank_ties_before(per_part.sum(), group) + torch.cumsum(per_part, 0) - per_part
    return [cut.for_part(before[i]) for i in range(len(keys))]


__all__ = [
    "comm_log",
    "bytes_sent",
    "solve_steps",
    "part_cuts",
    "local_ties",
    "rank_ties_before",
]
