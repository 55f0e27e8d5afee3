"""group=: one M2PO mask across data-parallel ranks (gloo on CPU, torch.multiprocessing).

Each spawned rank builds the same global random batch (dyadic grid: many m2 ties, the cut inside
a run of ties), takes its uneven piece, and checks against a single-process call on the
concatenation in rank order:
- keep (m2po_mask and m2po_loss with group=) equals its slice of the single-process keep;
- the rank's gradient equals its slice of the single-process gradient (the sum over ranks of
  the per-rank gradients is the single-process one), and the summed losses match;
- the micro-batch pre-pass with group= (uneven micro-batches per rank) gives the same;
- the call compiled with torch.compile(fullgraph=True) gives the eager call's loss and gradient;
- (2 ranks) the bytes sent per solve are the same for 1e3 and 1e5 tokens.
torch backend in float64 (1e-6 relative), Triton (interpreter) in float32 (bit-identical masks,
gradients within 1e-5). One spawn per world size runs every check, to keep the test fast.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from m2po_ops import m2po_loss  # noqa: E402
from m2po_ops.split import MAX_LIMBS  # noqa: E402
from test_microbatch import concat, flat, loss_and_grad, make_pieces, mask_of, prepass, run_micro, split_piece  # noqa: E402

VARIANTS = ("paper", "official")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slices(pieces):
    out, start = [], 0
    for p in pieces:
        n = p["logprobs"].numel()
        out.append(slice(start, start + n))
        start += n
    return out


def _tol(backend):
    return dict(rtol=1e-6, atol=1e-12) if backend == "torch" else dict(rtol=1e-5, atol=1e-8)


def _check_compiled(mine, variant, group, loss, grad):
    """torch.compile(fullgraph=True) of the call with group=: the collectives run inside the
    operator (the group travels by name) and give the eager call's loss and gradient."""
    args = {k: v for k, v in mine.items() if k != "logprobs"}

    def f(x):
        return m2po_loss(x * 1.0, **args, variant=variant, backend="torch", group=group)[0]

    torch._dynamo.reset()
    x = mine["logprobs"].clone().requires_grad_()
    loss_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    loss_c.backward()
    assert torch.equal(loss_c.detach(), loss) and torch.equal(x.grad, grad), (variant, dist.get_rank(group))


def _check_case(group, backend, variant, layout, seed, seqs, stats):
    rank = dist.get_rank(group)
    dtype = torch.float64 if backend == "torch" else torch.float32
    pieces = make_pieces(seed, seqs, layout, dtype)
    whole = concat(pieces)
    sl = _slices(pieces)[rank]
    mine = pieces[rank]

    keep0 = flat(mask_of(whole, variant=variant, backend=backend))
    loss0, grad0, _ = loss_and_grad(whole, variant=variant, backend=backend)

    # one call per rank with group=
    keep = flat(mask_of(mine, variant=variant, backend=backend, group=group))
    assert torch.equal(keep, keep0[sl]), (backend, variant, layout, rank)
    loss, grad, metrics = loss_and_grad(mine, variant=variant, backend=backend, group=group)
    torch.testing.assert_close(flat(grad), grad0[sl], **_tol(backend))
    total = loss.clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, loss0, **_tol(backend))

    if backend == "torch" and layout == "padded":
        _check_compiled(mine, variant, group, loss, grad)

    if backend == "torch":  # the local (per-rank) mask is another mask: count where it differs
        local = flat(mask_of(mine, variant=variant, backend=backend))
        stats["local_differs"] += int(not torch.equal(local, keep0[sl]))

    # micro-batch pre-pass across the group: uneven micro-batches per rank (some empty)
    micro = split_piece(mine, 1 + (rank + seed) % 3, torch.Generator().manual_seed(seed + rank))
    _, cuts = prepass(micro, backend, variant, group=group)
    assert int(cuts.num_valid) == int(whole["mask"].sum())
    keep_mb, grad_mb, _ = run_micro(micro, cuts, backend, variant)
    assert torch.equal(keep_mb, keep0[sl]), ("micro", backend, variant, layout, rank)
    torch.testing.assert_close(grad_mb, grad0[sl], **_tol(backend))
    if variant == "paper":
        stats["split_ties"] += int(0 < int(cuts.cut.ties_kept))


SIZES = (("torch", (1000, 100_000)), ("triton", (1000, 5000)))  # the interpreter is slow


def _check_bytes(group):
    rank = dist.get_rank(group)
    from m2po_ops.distributed import bytes_sent, comm_log

    sent = {}
    for backend, sizes in SIZES:
        for variant in VARIANTS if backend == "torch" else ("paper",):
            for n in sizes:
                g = torch.Generator().manual_seed(n + rank)
                lp = torch.randn(n, generator=g) * 0.3
                olp = torch.randn(n, generator=g) * 0.3
                adv = torch.randn(n, generator=g)
                with comm_log() as log:
                    mask_of(dict(logprobs=lp, old_logprobs=olp, advantages=adv, mask=None, cu_seqlens=[0, n]),
                            variant=variant, backend=backend, group=group)
                with comm_log() as log_mb:
                    prepass([dict(logprobs=lp, old_logprobs=olp, advantages=adv, mask=None, cu_seqlens=[0, n])],
                            backend, variant, group=group)
                sent[(backend, variant, n)] = (bytes_sent(log), bytes_sent(log_mb), len(log))
    for backend, sizes in SIZES:
        for variant in VARIANTS if backend == "torch" else ("paper",):
            small, large = (sent[(backend, variant, n)] for n in sizes)
            assert small == large, (backend, variant, small, large)
            assert small[0] == small[1] and 0 < small[0] < 4 << 20
    # paper: the sums (tail hist1, below count and limbs, tail count, infinities and limbs) +
    # valid count + slot-0 hist2 + one int64 per rank for ties; official: + the below maximum,
    # both hist2 slots, no ties
    sums = 2 * 32768 + 1 + MAX_LIMBS + 2 + MAX_LIMBS
    assert sent[("torch", "paper", 1000)][0] == 8 * (sums + 1 + 2 * 65536 + 1)
    assert sent[("torch", "official", 1000)][0] == 8 * (sums + 1 + 1 + 4 * 65536)


def _run_checks(group, stats):
    world = dist.get_world_size(group)
    # uneven pieces (sequences per rank); with 3 ranks one rank has no tokens at all
    seqs = {2: [9, 4], 3: [7, 0, 5]}[world]
    for backend in ("torch", "triton"):
        for variant in VARIANTS:
            if backend == "torch":
                layouts = ("packed", "padded")
            else:  # the interpreter is slow: one layout per group, all four pairs over the two groups
                layouts = (("packed", "padded")[(world + (variant == "official")) % 2],)
            for layout in layouts:
                seed = 100 * world + 10 * len(layout) + (variant == "paper")
                _check_case(group, backend, variant, layout, seed, seqs, stats)
    if world == 2:
        _check_bytes(group)


def _worker(rank, world, port):
    """3 ranks: every check on the world group, then on a 2-rank subgroup of global ranks 1 and
    2 (group ranks 0 and 1: group rank, not global rank, decides the order). One spawn only."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # ranks share two cores: intra-op threads would oversubscribe them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        stats = dict(local_differs=0, split_ties=0)
        _run_checks(dist.group.WORLD, stats)
        pair = dist.new_group([1, 2])
        if rank in (1, 2):
            _run_checks(pair, stats)
        counts = torch.tensor([stats["local_differs"], stats["split_ties"]])
        dist.all_reduce(counts)
        assert counts[0] > 0, "the test data should make per-rank masks differ from the global one"
        assert counts[1] > 0, "the test data should put the global cut inside a run of ties"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_group_matches_single_process():
    """2 and 3 ranks, both backends, both variants (one spawn of 3 processes)."""
    mp.spawn(_worker, args=(3, _free_port()), nprocs=3, join=True)
