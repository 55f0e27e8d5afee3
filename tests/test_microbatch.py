"""The micro-batch pre-pass (M2POStats): one cut for an optimizer step split into micro-batches.

Exact at any split: every micro-batch's keep is its slice of the single call's keep on the
concatenation (bit for bit, ties included), and the micro-batch gradients, concatenated, equal
the single call's gradient. The data lives on a dyadic grid, so m2 has many ties and every prefix
sum is exact (the sort-based and the histogram solvers then agree bit for bit as well).

Also used by test_distributed.py: ``make_pieces`` and ``concat``.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import m2po_ops
from m2po_ops import M2POStats, m2po_loss, m2po_mask
from m2po_ops.microbatch import MicroBatchCut

VARIANTS = ("paper", "official")
BACKENDS = ("torch", "triton")


def _dtype(backend):
    return torch.float64 if backend == "torch" else torch.float32


def _big(shape, g):
    """Outliers: +-0.25, +-0.375, +-0.5 (m2 0.0625, 0.140625, 0.25), each value shared by many tokens."""
    sign = torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
    return sign * torch.randint(2, 5, shape, generator=g).to(torch.float64) / 8


def make_pieces(seed: int, seqs_per_piece, layout: str = "packed", dtype=torch.float64, extra_pad=None):
    """Random GRPO-like pieces on a dyadic grid: many m2 ties, an outlier tail, masked holes.

    layout "packed": 1-D tokens with cu_seqlens and per-token advantages.
    layout "padded": (B, T) with per-sequence advantages (B,), NaN in padding, T differs by piece.
    Returns a list of dicts of m2po_loss keyword arguments.
    """
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for p, nseq in enumerate(seqs_per_piece):
        lengths = torch.randint(1, 24, (nseq,), generator=g)
        adv_seq = torch.randint(-4, 5, (nseq,), generator=g).to(torch.float64) * 0.25
        if layout == "packed":
            n = int(lengths.sum())
            olp = -torch.randint(1, 64, (n,), generator=g).to(torch.float64) / 16
            small = torch.randint(-6, 7, (n,), generator=g).to(torch.float64) / 32
            big = _big((n,), g)
            delta = torch.where(torch.rand(n, generator=g) < 0.25, big, small)
            seq = torch.repeat_interleave(torch.arange(nseq), lengths)
            adv = adv_seq[seq] if n else torch.zeros(0, dtype=torch.float64)
            mask = torch.rand(n, generator=g) > 0.1
            cu = [0] + torch.cumsum(lengths, 0).tolist()
            pieces.append(dict(logprobs=(olp + delta).to(dtype), old_logprobs=olp.to(dtype), advantages=adv.to(dtype),
                               mask=mask, cu_seqlens=cu))
        else:
            t = int(lengths.max()) + (p % 3 if extra_pad is None else extra_pad) if nseq else 1
            olp = -torch.randint(1, 64, (nseq, t), generator=g).to(torch.float64) / 16
            small = torch.randint(-6, 7, (nseq, t), generator=g).to(torch.float64) / 32
            big = _big((nseq, t), g)
            delta = torch.where(torch.rand(nseq, t, generator=g) < 0.25, big, small)
            pos = torch.arange(t)[None, :]
            mask = (pos < lengths[:, None]) & (torch.rand(nseq, t, generator=g) > 0.05)
            lp = torch.where(mask, olp + delta, torch.full_like(olp, float("nan")))
            pieces.append(dict(logprobs=lp.to(dtype), old_logprobs=olp.to(dtype), advantages=adv_seq.to(dtype), mask=mask))
    return pieces


def concat(pieces):
    """One packed call on the concatenation of the pieces' flat tokens, in order."""
    lp, olp, adv, mask, cu = [], [], [], [], [0]
    for p in pieces:
        x = p["logprobs"]
        if x.dim() == 2:
            b, t = x.shape
            lp.append(x.reshape(-1))
            olp.append(p["old_logprobs"].reshape(-1))
            adv.append(p["advantages"][:, None].expand(b, t).reshape(-1))
            mask.append(p["mask"].reshape(-1))
            cu += [cu[-1] + t * (i + 1) for i in range(b)]
        else:
            lp.append(x)
            olp.append(p["old_logprobs"])
            adv.append(p["advantages"])
            mask.append(p["mask"])
            cu += [cu[-1] + c for c in p["cu_seqlens"][1:]]
    return dict(logprobs=torch.cat(lp), old_logprobs=torch.cat(olp), advantages=torch.cat(adv),
                mask=torch.cat(mask), cu_seqlens=cu)


def on(device, batch):
    """The batch's tensors moved to ``device`` (cu_seqlens lists stay lists)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def split_piece(piece, parts: int, gen: torch.Generator):
    """Split one piece into ``parts`` micro-batches on sequence boundaries (some may be empty)."""
    x = piece["logprobs"]
    if x.dim() == 2:
        b = x.shape[0]
        cuts = sorted(torch.randint(0, b + 1, (parts - 1,), generator=gen).tolist())
        bounds = [0] + cuts + [b]
        return [{k: v[a:e] for k, v in piece.items()} for a, e in zip(bounds[:-1], bounds[1:])]
    cu = piece["cu_seqlens"]
    nseq = len(cu) - 1
    cuts = sorted(torch.randint(0, nseq + 1, (parts - 1,), generator=gen).tolist())
    bounds = [0] + cuts + [nseq]
    out = []
    for a, e in zip(bounds[:-1], bounds[1:]):
        lo, hi = cu[a], cu[e]
        mb = {k: piece[k][lo:hi] for k in ("logprobs", "old_logprobs", "advantages", "mask")}
        mb["cu_seqlens"] = [c - lo for c in cu[a : e + 1]]
        out.append(mb)
    return out


def loss_and_grad(batch, **kw):
    x = batch["logprobs"].clone().requires_grad_()
    args = {k: v for k, v in batch.items() if k != "logprobs"}
    loss, metrics = m2po_loss(x, **args, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def mask_of(batch, **kw):
    args = {k: v for k, v in batch.items() if k != "logprobs"}
    return m2po_mask(batch["logprobs"], **args, **kw)[0]


def flat(x):
    return x.reshape(-1)


def prepass(micro, backend, variant, group=None, **stats_kw):
    stats = M2POStats(tau=0.04, variant=variant, backend=backend, **stats_kw)
    for mb in micro:
        args = {k: v for k, v in mb.items() if k not in ("logprobs", "cu_seqlens")}
        stats.update(mb["logprobs"], **args, cu_seqlens=mb.get("cu_seqlens"))
    return stats, stats.solve(group=group)


def run_micro(micro, cuts, backend, variant, **kw):
    """(concatenated keep, concatenated grad, summed loss) of the micro-batch losses."""
    keeps, grads, loss = [], [], 0.0
    for i, mb in enumerate(micro):
        keeps.append(flat(mask_of(mb, variant=variant, backend=backend, cut=cuts[i], **kw)))
        l, gr, _ = loss_and_grad(mb, variant=variant, backend=backend, cut=cuts[i], num_tokens=cuts.num_valid, **kw)
        grads.append(flat(gr))
        loss = loss + l
    return torch.cat(keeps), torch.cat(grads), loss


def single(batch, backend, variant):
    keep = mask_of(batch, variant=variant, backend=backend)
    loss, grad, metrics = loss_and_grad(batch, variant=variant, backend=backend)
    return keep, grad, loss, metrics


@contextlib.contextmanager
def no_drift_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    drift = [w for w in seen if "m2po" in str(w.message)]
    assert not drift, drift[0].message


def _tol(backend):
    return dict(rtol=1e-6, atol=1e-12) if backend == "torch" else dict(rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prepass_matches_single_call(backend, variant, device):
    """1 to 8 micro-batches (uneven, some empty), packed and padded: exact keep, matching grads."""
    gen = torch.Generator().manual_seed(1)
    counts = range(1, 9) if backend == "torch" else (2, 5)  # the interpreter is slow
    layouts = ("packed", "padded")
    saw_partial_tie = False
    for layout in layouts:
        (piece,) = make_pieces(10 + len(layout), [16], layout, _dtype(backend), extra_pad=2)
        piece = on(device, piece)
        batch = concat([piece])
        keep0, grad0, loss0, m0 = single(batch, backend, variant)
        assert (~keep0 & batch["mask"]).any(), "the data should make M2PO mask something"
        for parts in counts:
            micro = split_piece(piece, parts, gen)
            stats, cuts = prepass(micro, backend, variant)
            assert len(cuts) == parts
            assert int(cuts.num_valid) == int(batch["mask"].sum())
            keep, grad, loss = run_micro(micro, cuts, backend, variant)
            assert torch.equal(keep, keep0), (layout, parts)
            torch.testing.assert_close(grad, grad0, **_tol(backend))
            torch.testing.assert_close(loss, loss0, **_tol(backend))
            assert torch.equal(cuts.cut.threshold, m0["cut"])
            if variant == "paper":
                # the cut splits a run of ties, and the run spans micro-batches
                ties = [int(c.ties_kept) for c in cuts]
                saw_partial_tie |= 0 < ties[0] < int((torch.cat(stats._keys) == cuts.cut.value).sum()) and len(set(ties)) > 1
    if variant == "paper":
        assert saw_partial_tie, "the data should put the cut inside a run of ties"


@pytest.mark.parametrize("variant", VARIANTS)
def test_cut_applies_across_backends(variant, device):
    """A cut solved by one backend's pre-pass gives the same keep when applied by the other."""
    gen = torch.Generator().manual_seed(2)
    (piece,) = (on(device, p) for p in make_pieces(3, [14], "packed", torch.float32))
    micro = split_piece(piece, 3, gen)
    keep0 = flat(mask_of(concat([piece]), variant=variant, backend="torch"))
    for solve_be, apply_be in (("torch", "triton"), ("triton", "torch")):
        _, cuts = prepass(micro, solve_be, variant)
        keep, grad, _ = run_micro(micro, cuts, apply_be, variant)
        assert torch.equal(keep, keep0), (solve_be, apply_be)
        _, grad0, _, _ = single(concat([piece]), apply_be, variant)
        torch.testing.assert_close(grad, grad0, rtol=1e-5, atol=1e-8)


def test_drift_warning_names_the_micro_batch():
    (piece,) = make_pieces(4, [10], "packed", torch.float64)
    micro = split_piece(piece, 3, torch.Generator().manual_seed(5))
    micro = [mb for mb in micro if mb["logprobs"].numel()] or micro
    stats, cuts = prepass(micro, "torch", "paper", check_drift=True)
    assert isinstance(cuts[0], MicroBatchCut) and isinstance(cuts[0], m2po_ops.Cut)
    with no_drift_warning():
        run_micro(micro, cuts, "torch", "paper")  # same log-probs: silent
    i = len(micro) - 1
    drifted = dict(micro[i], logprobs=micro[i]["logprobs"] + 1e-3)  # e.g. dropout in the training pass
    with pytest.warns(RuntimeWarning, match=f"micro-batch {i}"):
        loss_and_grad(drifted, variant="paper", backend="torch", cut=cuts[i], num_tokens=cuts.num_valid)
    with no_drift_warning():  # per-call override turns it off
        loss_and_grad(drifted, variant="paper", backend="torch", cut=cuts[i], check_drift=False)
    # off by default; on per call
    _, plain = prepass(micro, "torch", "paper")
    with no_drift_warning():
        mask_of(drifted, variant="paper", backend="torch", cut=plain[i])
    with pytest.warns(RuntimeWarning, match=f"micro-batch {i}"):
        mask_of(drifted, variant="paper", backend="torch", cut=plain[i], check_drift=True)
    with pytest.raises(ValueError, match="check_drift"):
        mask_of(drifted, variant="paper", backend="torch", cut=cuts.cut, check_drift=True)


def test_drift_check_triton(device):
    (piece,) = (on(device, p) for p in make_pieces(6, [6], "packed", torch.float32))
    micro = split_piece(piece, 2, torch.Generator().manual_seed(0))
    _, cuts = prepass(micro, "triton", "official", check_drift=True)
    with no_drift_warning():
        run_micro(micro, cuts, "triton", "official")
    drifted = dict(micro[1], logprobs=micro[1]["logprobs"] * 1.01)
    with pytest.warns(RuntimeWarning, match="micro-batch 1"):
        mask_of(drifted, variant="official", backend="triton", cut=cuts[1])


def test_stats_errors_and_reuse():
    stats = M2POStats(backend="torch")
    with pytest.raises(ValueError, match="no micro-batch"):
        stats.solve()
    with pytest.raises(ValueError, match="backend"):
        M2POStats(backend="cuda")
    (piece,) = make_pieces(7, [5], "packed", torch.float64)
    micro = split_piece(piece, 2, torch.Generator().manual_seed(0))
    stats, cuts = prepass(micro, "torch", "paper")
    again = stats.solve()  # solve does not consume the statistics
    assert all(torch.equal(a.ties_kept, b.ties_kept) and torch.equal(a.value, b.value) for a, b in zip(cuts, again))
    stats.reset()
    assert len(stats) == 0
    with pytest.raises(ValueError, match="variant"):
        mask_of(micro[0], variant="official", backend="torch", cut=cuts[0])


def test_default_path_unchanged():
    """No group, no cut: the same numbers as the reference solve the API always used."""
    from m2po_ops import reference
    from m2po_ops.config import M2POConfig
    from m2po_ops.inputs import prepare

    (piece,) = make_pieces(8, [12], "packed", torch.float64)
    batch = concat([piece])
    for variant in VARIANTS:
        config = M2POConfig(variant=variant)
        tok = prepare(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], config,
                      batch["cu_seqlens"])
        cut, delta, m2, tr = reference.solve(tok, config)
        keep_ref, _, _ = reference.per_token(tok, cut, delta, m2, tr)
        keep, _, loss, metrics = single(batch, "torch", variant)
        assert torch.equal(keep, keep_ref)
        assert torch.equal(metrics["cut"], cut.threshold)
