"""The fused backend's masks against exact arithmetic: every disagreement with Algorithm 1 in
fractions (tests/literal.py) lies inside the floating-point zone of split.ZONE_EPS
(tests/zone.py), for single calls, for 1 to 8 micro-batches and for 2 and 3 data-parallel
ranks; and since the split's sums and the histograms are integers, every partition of a step
gives the single call's mask bit for bit.

Batches: continuous m2 around tau, m2 on a coarse grid with a run of ties at the cut, every
trust-region m2 below tau, every one above it, m2 equal to tau, and batches built so that some
prefix sum S_k lies within 1e-13 relative of tau * k (inside the zone, where either answer is
allowed).
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
from literal import algorithm1_keep  # noqa: E402
from zone import assert_paper_cuts_agree  # noqa: E402

from m2po_ops import M2POStats, m2po_mask  # noqa: E402

TAU = 0.04
TAU32 = float(torch.tensor(0.04).float())  # a tau that float32 m2 values can equal
STYLES = ("continuous", "grid_ties", "all_below", "all_above", "equal_tau", "near_zone")


def make_batch(style: str, seed: int, n: int = 600):
    """(logprobs, old_logprobs, advantages, mask, tau): flat float32, per-token advantages."""
    g = torch.Generator().manual_seed(seed)
    adv = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(n, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.8, torch.sign(adv), -torch.sign(adv))  # 80% in T
    tau = TAU
    if style == "continuous":
        m2 = torch.rand(n, generator=g) ** 3 * 0.3
    elif style == "grid_ties":
        m2 = torch.randint(0, 12, (n,), generator=g).double() / 64  # exact sums, long runs of ties
    elif style == "all_below":
        m2 = torch.rand(n, generator=g) * 0.039
    elif style == "all_above":
        m2 = 0.041 + torch.rand(n, generator=g) * 0.5
    elif style == "equal_tau":
        m2 = torch.where(torch.rand(n, generator=g) < 0.5, torch.full((n,), TAU32), torch.rand(n, generator=g) * 0.2)
        tau = TAU32
    else:  # near_zone: a prefix of equal values whose mean is tau to ~1e-13, then larger values
        m2 = torch.full((n,), TAU32).double()
        m2[n // 2:] = 0.2 + torch.rand(n - n // 2, generator=g)
        tau = TAU32 * (1 + 1e-13) if seed % 2 else TAU32 * (1 - 1e-13)
    delta = (m2.double().sqrt() * sign).float()
    old = -torch.rand(n, generator=g) * 3
    lp = old + delta
    mask = torch.rand(n, generator=g) < 0.9
    return lp, old, adv, mask, tau


def literal_keep(lp, old, adv, mask, tau):
    delta = (lp.float() - old.float())
    m2 = (delta * delta).tolist()
    tr = [bool(v) and ((a > 0 and d > 0) or (a < 0 and d < 0)) for d, a, v in zip(delta.tolist(), adv.tolist(),
                                                                                mask.tolist())]
    keep = algorithm1_keep(m2, tr, mask.tolist(), tau)
    return keep, [m for m, t in zip(m2, tr) if t], tr


def check_against_exact(keep, lp, old, adv, mask, tau, what):
    want, m2_tr, tr = literal_keep(lp, old, adv, mask, tau)
    got = keep.reshape(-1).tolist()
    kept_got = sum(g for g, t in zip(got, tr) if t)
    kept_want = sum(w for w, t in zip(want, tr) if t)
    assert_paper_cuts_agree(m2_tr, tau, kept_got, kept_want, what)
    if kept_got == kept_want:  # the same count keeps the same tokens: the (m2, index) prefix
        assert got == want, what


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_single_calls_agree_with_exact_arithmetic_outside_the_zone(style, backend, device):
    for seed in range(2):
        lp, old, adv, mask, tau = make_batch(style, seed)
        args = [t.to(device) for t in (lp, old, adv, mask)]
        keep, _ = m2po_mask(*args, tau=tau, backend=backend, validate=False)
        check_against_exact(keep.cpu(), lp, old, adv, mask, tau, f"{style} seed={seed} {backend}")


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_micro_batches_give_the_single_call_mask(parts, device):
    """M2POStats over `parts` uneven micro-batches: each micro-batch's keep is its slice of the
    single call's, bit for bit, and that mask agrees with exact arithmetic outside the zone."""
    for style in ("continuous", "near_zone", "grid_ties"):
        lp, old, adv, mask, tau = make_batch(style, 11 + parts)
        args = [t.to(device) for t in (lp, old, adv, mask)]
        whole, _ = m2po_mask(*args, tau=tau, backend="triton", validate=False)
        cuts = torch.linspace(0, lp.numel(), parts + 1).long().tolist()
        cuts[1:-1] = [c + 37 * (i % 2) for i, c in enumerate(cuts[1:-1])]  # uneven
        stats = M2POStats(tau=tau, backend="triton", validate=False)
        for a, b in zip(cuts[:-1], cuts[1:]):
            stats.update(*(t[a:b] for t in args))
        solved = stats.solve()
        got = torch.cat([m2po_mask(*(t[a:b] for t in args), cut=solved[i], backend="triton", validate=False)[0]
                         for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))])
        assert torch.equal(got, whole), (style, parts)
        check_against_exact(whole.cpu(), lp, old, adv, mask, tau, f"{style} parts={parts}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for style in ("continuous", "near_zone", "grid_ties"):
            lp, old, adv, mask, tau = make_batch(style, 5 + world)
            edges = [0] + [lp.numel() * (r + 1) // world + (13 if r % 2 == 0 else 0) for r in range(world - 1)] \
                + [lp.numel()]
            a, b = edges[rank], edges[rank + 1]
            whole, _ = m2po_mask(lp, old, adv, mask, tau=tau, backend="triton", validate=False)
            mine, _ = m2po_mask(lp[a:b], old[a:b], adv[a:b], mask[a:b], tau=tau, backend="triton", validate=False,
                                group=dist.group.WORLD)
            assert torch.equal(mine, whole[a:b]), (style, rank)
            if rank == 0:
                check_against_exact(whole, lp, old, adv, mask, tau, f"{style} world={world}")
        results.put((rank, "ok"))
    except BaseException as exc:  # report, not hang: the parent checks every rank's answer
        results.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_single_call_mask(world, device):
    """group= over 2 and 3 gloo ranks (uneven pieces): each rank's keep is its slice of the
    single call's, bit for bit, and that mask agrees with exact arithmetic outside the zone."""
    if device.type != "cpu":
        pytest.skip("the ranks run the interpreter on CPU tensors (gloo)")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    answers = dict(results.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    assert answers == {r: "ok" for r in range(world)}, answers
