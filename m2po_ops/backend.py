"""The backend protocol: the three steps every backend implements, and which backend runs.

A call is three steps, whatever the backend and whatever the path (one call, a process group,
the micro-batches of an optimizer step):

1. ``statistics(tok, config, want)``: the one full read of the tokens. It finds the trust region
   and its keys (the float32 m2 bits), the mergeable sums of the cut's solver, and, where the
   backend fuses it (Triton), every token's output as if nothing were cut.
2. ``solve(statistics, config, group)``: the cut of this call's tokens, over the group's ranks
   when a group is given (m2po_ops/distributed.py's steps; the collectives are the only
   synchronisation). ``solve_parts(parts, config, group)`` solves one cut for micro-batches
   kept as ``Summary`` (m2po_ops/microbatch.py).
3. ``apply(statistics, config, cut, want, ...)``: the cut applied; the keep mask, the metrics,
   the loss, its per-token derivative and the backward scale (an ``Applied``).

m2po_ops/torch_backend.py and m2po_ops/triton_backend.py implement it (this module holds only
the protocol's types, so both import it); m2po_ops/dispatch.py picks one; api.py and
microbatch.py only call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Protocol, Tuple

from torch import Tensor

from .config import M2POConfig
from .cut import Cut
from .inputs import Tokens


class Want(NamedTuple):
    """What a call needs from the passes: the loss (and its derivative), the keep mask, and the
    keys of every token (for a solve over a group, or a micro-batch pre-pass)."""

    loss: bool = False
    keep: bool = False
    keys: bool = False


@dataclass(frozen=True)
class Summary:
    """What a micro-batch pre-pass keeps of a call's statistics: the int32 keys (m2 bits of
    trust-region tokens, -1 elsewhere), the valid count (int64 0-d) and, where the backend
    accumulates them (Triton), the mergeable sums and the below part's largest key."""

    keys: Tensor
    num_valid: Tensor
    sums: Optional[Tensor] = None
    below_max: Optional[Tensor] = None


class Parts(NamedTuple):
    """Micro-batches to solve as one: their keys in update order, their total valid count, and
    the mergeable sums added over them (None for a backend that builds them from the keys)."""

    keys: List[Tensor]
    num_valid: Tensor
    sums: Optional[Tensor]
    below_max: Optional[Tensor]


class Applied(NamedTuple):
    """apply's outputs: keep (bool, flat; None unless asked), the metrics (0-d tensors; None where
    ``values`` holds them), the loss
    (0-d; None for a mask), the stored derivative (flat; logprobs' dtype, or float32 for a half
    type under the Triton interpreter) and the backward scale (0-d, or None for 1): d loss /
    d logprobs = scale * derivative. values: the metrics and the scale as the ops' float32
    values vector (the V_* slots of m2po_ops/constants.py), where the backend already holds
    them so (the Triton backend's Results); None: m2po_ops/ops.py stacks them."""

    keep: Optional[Tensor]
    metrics: dict
    loss: Optional[Tensor]
    grad: Optional[Tensor]
    scale: Optional[Tensor]
    values: Optional[Tensor] = None


class Backend(Protocol):
    name: str

    def statistics(self, tok: Tokens, config: M2POConfig, want: Want, poison: Optional[Tensor] = None): ...

    def summary(self, statistics) -> Summary: ...

    def solve(self, statistics, config: M2POConfig, group) -> Cut: ...

    def solve_parts(self, parts: Parts, config: M2POConfig, group) -> Tuple[Cut, Tensor]: ...

    def apply(self, statistics, config: M2POConfig, cut: Cut, want: Want, *, local_solve: bool,
              num_tokens=None, num_valid: Optional[Tensor] = None, poison: Optional[Tensor] = None) -> Applied: ...
