"""M2PO in a data-parallel trainer: one mask for the whole optimizer step.

    torchrun --nproc_per_node 2 examples/ddp_m2po.py            # CPU, gloo
    torchrun --nproc_per_node 2 examples/ddp_m2po.py --micro 3  # 3 micro-batches per rank

Every rank holds an uneven share of one optimizer mini-batch. It computes the M2PO loss two
ways, each with one mask for the whole step (all ranks, all micro-batches):
1. one call per rank with ``group=`` (the cut is solved across ranks);
2. the micro-batch pre-pass: ``M2POStats.update`` per micro-batch (no grad), ``solve(group=)``
   once, then ``m2po_loss(..., cut=cuts[i], num_tokens=cuts.num_valid)`` per micro-batch.
It then recomputes the single-process call on the concatenation of all ranks' tokens (every
rank can: the data is generated from a shared seed) and prints whether its mask and gradient
agree, next to the mask a per-rank (local) call would have given.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import m2po_ops  # noqa: E402
from m2po_ops import M2POStats, m2po_loss, m2po_mask  # noqa: E402


def make_step(seed: int, world: int, device):
    """One optimizer step's rollouts, split unevenly over the ranks: a list of per-rank batches
    (padded (B, T) with per-sequence advantages; T differs by rank)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for r in range(world):
        b = 10 if r == 0 else 8
        t = 16 + 5 * r
        lengths = torch.randint(4, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        old = -torch.rand(b, t, generator=g) * 3
        # stale data: mostly small log-ratios, some large ones; rank 0 got the stalest rollouts,
        # so a per-rank mask would cut too much there and too little elsewhere
        outliers = 0.25 if r == 0 else 0.08
        drift = torch.randn(b, t, generator=g) * 0.1
        drift = torch.where(torch.rand(b, t, generator=g) < outliers, drift * 6, drift)
        adv = torch.randn(b, generator=g)
        parts.append(dict(logprobs=(old + drift).to(device), old_logprobs=old.to(device), advantages=adv.to(device),
                          mask=mask.to(device)))
    return parts


def flat_concat(parts):
    """The single-process view: all ranks' flat tokens in rank order, packed with cu_seqlens."""
    lp, old, adv, mask, cu = [], [], [], [], [0]
    for p in parts:
        b, t = p["logprobs"].shape
        lp.append(p["logprobs"].reshape(-1))
        old.append(p["old_logprobs"].reshape(-1))
        adv.append(p["advantages"][:, None].expand(b, t).reshape(-1))
        mask.append(p["mask"].reshape(-1))
        cu += [cu[-1] + t * (i + 1) for i in range(b)]
    return torch.cat(lp), torch.cat(old), torch.cat(adv), torch.cat(mask), cu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tau", type=float, default=0.04)
    ap.add_argument("--variant", default="paper", choices=["paper", "official"])
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per rank for the pre-pass")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and os.environ.get("M2PO_EXAMPLE_CPU") != "1"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    group = dist.group.WORLD
    kw = dict(tau=args.tau, variant=args.variant, backend=args.backend)

    parts = make_step(args.seed, world, device)
    mine = parts[rank]
    n_mine = mine["logprobs"].numel()
    offset = sum(p["logprobs"].numel() for p in parts[:rank])

    # 1. one call per rank, cut solved across the group
    lp = mine["logprobs"].clone().requires_grad_()
    loss, metrics = m2po_loss(lp, mine["old_logprobs"], mine["advantages"], mine["mask"], group=group, **kw)
    loss.backward()
    keep_group = m2po_mask(mine["logprobs"], mine["old_logprobs"], mine["advantages"], mine["mask"], group=group, **kw)[0]

    # 2. micro-batch pre-pass: statistics without grad, one solve, then the losses
    rows = torch.arange(mine["logprobs"].shape[0]).tensor_split(args.micro)
    micro = [{k: v[r.to(device)] for k, v in mine.items()} for r in rows]
    stats = M2POStats(tau=args.tau, variant=args.variant, backend=args.backend)
    for mb in micro:
        stats.update(mb["logprobs"], mb["old_logprobs"], mb["advantages"], mb["mask"])  # no grad inside
    cuts = stats.solve(group=group)
    keep_mb, grad_mb = [], []
    for i, mb in enumerate(micro):
        x = mb["logprobs"].clone().requires_grad_()  # in a trainer: the policy forward of micro-batch i
        l, _ = m2po_loss(x, mb["old_logprobs"], mb["advantages"], mb["mask"], cut=cuts[i],
                         num_tokens=cuts.num_valid, **kw)
        l.backward()
        grad_mb.append(x.grad.reshape(-1))
        keep_mb.append(m2po_mask(mb["logprobs"], mb["old_logprobs"], mb["advantages"], mb["mask"], cut=cuts[i],
                                 **kw)[0].reshape(-1))

    # reference: one process, all tokens
    a_lp, a_old, a_adv, a_mask, cu = flat_concat(parts)
    x = a_lp.clone().requires_grad_()
    loss_all, m_all = m2po_loss(x, a_old, a_adv, a_mask, cu_seqlens=cu, **kw)
    loss_all.backward()
    keep_all = m2po_mask(a_lp, a_old, a_adv, a_mask, cu_seqlens=cu, **kw)[0]
    want_keep = keep_all[offset : offset + n_mine]
    want_grad = x.grad[offset : offset + n_mine]
    keep_local = m2po_mask(mine["logprobs"], mine["old_logprobs"], mine["advantages"], mine["mask"], **kw)[0]

    total = loss.detach().clone()
    dist.all_reduce(total)
    valid = mine["mask"].reshape(-1)
    ok_group = torch.equal(keep_group.reshape(-1), want_keep)
    ok_mb = torch.equal(torch.cat(keep_mb), want_keep)
    grad_err = (lp.grad.reshape(-1) - want_grad).abs().max().item() if n_mine else 0.0
    grad_err_mb = (torch.cat(grad_mb) - want_grad).abs().max().item() if n_mine else 0.0
    lines = [
        f"rank {rank}/{world}: {int(valid.sum())} valid tokens (of {int(cuts.num_valid)} in the step), "
        f"masked {int((valid & ~keep_group.reshape(-1)).sum())} with the global cut {float(metrics['cut']):.4g}",
        f"  group= call      mask matches single-process: {ok_group}   max |grad diff| {grad_err:.2e}",
        f"  {args.micro} micro-batches  mask matches single-process: {ok_mb}   max |grad diff| {grad_err_mb:.2e}",
        f"  local-only call mask matches single-process: {torch.equal(keep_local.reshape(-1), want_keep)}"
        f" (per-rank M2PO: masks {int((valid & ~keep_local.reshape(-1)).sum())})",
    ]
    # print in rank order
    for r in range(world):
        if r == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()
    agree = torch.tensor([int(ok_group and ok_mb)], device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    if rank == 0:
        print(f"sum of rank losses {total.item():.8f}, single-process loss {loss_all.item():.8f}")
        print("all ranks match the single-process mask:", bool(agree.item()), f"(m2po_ops {m2po_ops.__version__})")
    if not agree.item():
        sys.exit(1)


if __name__ == "__main__":
    main()
