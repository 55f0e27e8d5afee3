"""The fused Triton backend against the PyTorch reference.

Every test that runs the Triton backend takes the ``device`` fixture (conftest.py): the GPU when
there is one, else the CPU with the kernels under TRITON_INTERPRET=1. The GPU tests (sync debug
mode, CUDA-graph replay) run their whole harness on the CPU too, with stand-ins for what only a
GPU has, so a harness error shows up without a GPU.
"""

from __future__ import annotations

import ast
import contextlib
import math
import pathlib
import sys
from fractions import Fraction

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import m2po_ops  # noqa: E402
from m2po_ops import radix_select, m2po_loss, m2po_mask, resolve_backend  # noqa: E402
from m2po_ops import triton_backend as tb  # noqa: E402
from m2po_ops import constants as C  # noqa: E402
from m2po_ops.config import M2POConfig  # noqa: E402
from m2po_ops.inputs import prepare  # noqa: E402
from m2po_ops.kernels.common import reciprocal_f32  # noqa: E402
from cases import case_grid, make_case  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORWARD_KERNELS = {
    "paper": ["stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "ties_kernel", "tie_scan_kernel",
              "fix_paper_kernel", "finalize_kernel"],
    "official": ["stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "apply_official_kernel",
                 "finalize_kernel"],
}


def run(backend, case_or_args, device, variant="paper", **kw):
    """(keep, loss, grad, metrics) of one backend: mask from m2po_mask, loss/grad from m2po_loss."""
    if hasattr(case_or_args, "lp"):
        c = case_or_args
        lp, olp, adv, mask, extra = c.lp, c.olp, c.adv, c.mask, c.kwargs()
    else:
        lp, olp, adv, mask = case_or_args
        extra = {}
    kw = {**extra, **kw}
    lp, olp, adv = lp.to(device), olp.to(device), adv.to(device)
    mask = mask.to(device) if mask is not None else None
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    mask_kw = {k: v for k, v in kw.items() if k not in ("loss_agg_mode", "num_tokens")}
    keep, _ = m2po_mask(lp, olp, adv, mask, variant=variant, backend=backend, **mask_kw)
    leaf = lp.detach().clone().requires_grad_(True)
    loss, metrics = m2po_loss(leaf, olp, adv, mask, variant=variant, backend=backend, **kw)
    loss.backward()
    return keep, loss.detach(), leaf.grad, metrics


def assert_backends_agree(case, variant, desc, device, rtol=1e-5, **kw):
    k_ref, l_ref, g_ref, m_ref = run("torch", case, device, variant, **kw)
    k_tri, l_tri, g_tri, m_tri = run("triton", case, device, variant, **kw)
    assert torch.equal(k_ref, k_tri), f"keep differs at {(k_ref != k_tri).nonzero().flatten()[:8].tolist()}: {desc}"
    atol = 1e-7
    half = g_ref.dtype in (torch.bfloat16, torch.float16)
    torch.testing.assert_close(l_tri, l_ref, rtol=rtol, atol=atol, msg=lambda m: f"loss: {m} {desc}")
    # half-precision gradients are rounded to the input dtype by the same torch op on both sides,
    # from float32 values that agree to ~1e-6: allow one ulp of the half type
    torch.testing.assert_close(
        g_tri.float(), g_ref.float(), rtol=1e-2 if half else rtol, atol=atol, msg=lambda m: f"grad: {m} {desc}"
    )
    assert m_ref.keys() == m_tri.keys()
    for name in m_ref:
        assert m_tri[name].shape == () and m_tri[name].device == k_tri.device, name
        torch.testing.assert_close(
            m_tri[name], m_ref[name], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"metric {name}: {m} {desc}"
        )


# --------------------------------------------------------------------------------------------
# The random suite (tests/cases.py)


@pytest.mark.parametrize("chunk", range(2))
@pytest.mark.parametrize("layout", ["2d", "packed", "packed_cu"])
def test_triton_matches_reference_on_the_random_suite(layout, chunk, device):
    for spec in case_grid(layout, chunk, count=40):
        case = make_case(**spec)
        variants = ["paper"] if layout == "packed" else ["paper", "official"]
        for variant in variants:
            extra = dict(tau=spec["tau"])
            if variant == "official" and spec["seed"] % 2:
                extra.update(miniclip_low=0.3, miniclip_high=0.5)
            assert_backends_agree(case, variant, f"{case.desc} variant={variant} {extra}", device, **extra)


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_sequence_modes_and_num_tokens(mode, variant, device):
    for seed in range(6):
        case = make_case(seed=seed + 50, layout=["2d", "packed_cu"][seed % 2], per_seq=bool(seed % 3 == 0),
                         mask_kind="bool", dtype=torch.float32, style=["grid", "fine"][seed % 2], tau=0.04)
        assert_backends_agree(case, variant, case.desc, device, loss_agg_mode=mode)
    case = make_case(seed=77, layout="2d", per_seq=False, mask_kind="int", dtype=torch.float32, style="fine", tau=0.04)
    assert_backends_agree(case, variant, case.desc, device, num_tokens=123.0)
    assert_backends_agree(case, variant, case.desc, device, num_tokens=torch.tensor(321, device=device))


def _official_batch(seed, device):
    """A (B, T) batch whose official cut is constrained: heavy-tailed log-ratios, advantages on
    a 1/64 grid (so every float64 sum of the float32 loss terms is exact, and the loss has one
    right answer whatever the summation order), padding with holes."""
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 257
    olp = -torch.rand(b, t, generator=g) * 4
    delta = torch.randn(b, t, generator=g) * 0.25 * torch.where(torch.rand(b, t, generator=g) < 0.05, 4.0, 1.0)
    adv = torch.randint(-256, 257, (b, t), generator=g).float() / 64
    mask = (torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (b, 1), generator=g)) & (
        torch.rand(b, t, generator=g) < 0.9)
    return tuple(x.to(device) for x in (olp + delta.clamp(-1, 1), olp, adv, mask))


@pytest.mark.gpu  # the GPU's FMA contraction and libdevice are what this must survive
@pytest.mark.parametrize("miniclip", [False, True], ids=["bounds", "miniclip"])
def test_official_bounds_keep_and_loss_are_bit_identical(miniclip, device):
    """On constrained official cuts the two backends give the same clip bounds (tau_c rounded
    to float32 before exp, as the reference and the authors' float32 tensor), the same keep
    mask, loss and gradient, bit for bit."""
    clip = dict(miniclip_low=0.3, miniclip_high=0.5) if miniclip else {}
    constrained = 0
    for seed in range(12):
        args = _official_batch(seed, device)
        for tau in (0.005, 0.02):
            kw = dict(variant="official", tau=tau, **clip)
            k_ref, l_ref, g_ref, m_ref = run("torch", args, device, **kw)
            k_tri, l_tri, g_tri, m_tri = run("triton", args, device, **kw)
            desc = f"seed={seed} tau={tau} {clip}"
            assert torch.equal(m_tri["clip_low"], m_ref["clip_low"]), desc
            assert torch.equal(m_tri["clip_high"], m_ref["clip_high"]), desc
            assert torch.equal(k_tri, k_ref), desc
            assert torch.equal(l_tri, l_ref), desc
            assert torch.equal(g_tri, g_ref), desc
            constrained += bool(torch.isfinite(m_ref["cut"]))
    assert constrained >= 20  # the cases really cut


def _wide_tail_batch(seed, fallback, device, b=4, t=300):
    """A (B, T) batch whose official bounds are constrained, right-padded with holes, with
    per-token advantages on a 1/256 grid (exact float64 sums) whose sign differs from the
    row's first token's on a quarter of the tokens (the trust region follows the first token:
    those are outside it, and the wide tail holds such tokens too). ``fallback``: trust-side
    |delta| <= 0.1, the other side 0.12 to 0.19 (m2 below the threshold, but outside the trust
    region) and a few trust-side outliers near 1: the first hit is the tail's first token, the
    solved tau_c is about 0.1, and ratios outside the wide tail fall outside the solved bounds.
    Else |delta| ~ |N(0, 0.15)| with 6% outliers: tau_c comes from inside the tail."""
    g = torch.Generator().manual_seed(seed)
    olp = -torch.rand(b, t, generator=g) * 3
    adv_row = torch.randint(1, 257, (b, 1), generator=g).float() / 64 * torch.where(
        torch.rand(b, 1, generator=g) < 0.5, -1.0, 1.0)
    scale = torch.randint(1, 5, (b, t), generator=g).float() / 4
    adv = torch.where(torch.rand(b, t, generator=g) < 0.25, -adv_row, adv_row) * scale
    adv[:, :1] = adv_row
    mask = (torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (b, 1), generator=g)) & (
        torch.rand(b, t, generator=g) < 0.9)
    mask[:, 0] = True
    trust_side = torch.rand(b, t, generator=g) < 0.5
    outlier = torch.rand(b, t, generator=g) < (0.1 if fallback else 0.06)
    if fallback:
        mag = torch.where(trust_side, torch.rand(b, t, generator=g) * 0.1, 0.12 + torch.rand(b, t, generator=g) * 0.07)
        mag = torch.where(outlier & trust_side, 0.8 + torch.rand(b, t, generator=g) * 0.4, mag)
    else:
        mag = (torch.randn(b, t, generator=g) * 0.15).abs()
        mag = torch.where(outlier, 0.5 + torch.rand(b, t, generator=g), mag)
    delta = torch.where(trust_side, 1.0, -1.0) * adv_row.sign() * mag
    return tuple(x.to(device) for x in (olp + delta, olp, adv, mask))


@contextlib.contextmanager
def _apply_modes():
    """Records, per official fix-up, how apply_official treated the blocks: "unconstrained"
    (nothing to do), "tail" (only the wide tails recomputed: some block's, none whole) or
    "whole" (every block recomputed); anything else is recorded as a list of flags."""
    modes = []
    fix_pass = tb.fix_pass

    def recording(tok, config, cut, ws, *args):
        fix_pass(tok, config, cut, ws, *args)
        if config.variant != "official":
            return
        flags = ws.apply_part.view(-1, C.APPLY_COLS)[:ws.nblocks, C.APPLY_REDONE].tolist()
        lower_u, upper_u = tb.unconstrained_bounds(config.miniclip_low, config.miniclip_high)
        if int(cut.lower.view(torch.int32)) == lower_u and int(cut.upper.view(torch.int32)) == upper_u:
            modes.append("unconstrained")
        elif all(f in (0.0, C.APPLY_LIST) for f in flags) and C.APPLY_LIST in flags:
            modes.append("tail")
        elif all(f == C.APPLY_WHOLE for f in flags):
            modes.append("whole")
        else:
            modes.append(flags)

    tb.fix_pass = recording
    try:
        yield modes
    finally:
        tb.fix_pass = fix_pass


def _assert_identical(ref, tri, desc, exact_loss=True):
    """keep, loss, gradient and metrics of the two backends, bit for bit (NaN where NaN)."""
    (k_ref, l_ref, g_ref, m_ref), (k_tri, l_tri, g_tri, m_tri) = ref, tri
    assert torch.equal(k_tri, k_ref), desc
    torch.testing.assert_close(g_tri, g_ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"grad: {m} {desc}")
    if exact_loss:
        torch.testing.assert_close(l_tri, l_ref, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"loss: {m} {desc}")
    else:
        torch.testing.assert_close(l_tri, l_ref, rtol=1e-6, atol=1e-7, equal_nan=True, msg=lambda m: f"loss: {m} {desc}")
    for name in ("masked_fraction", "clip_low", "clip_high"):
        assert torch.equal(m_tri[name], m_ref[name]), (name, desc)


@pytest.mark.parametrize("fallback", [False, True], ids=["tail", "fallback"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_official_constrained_bounds_recompute_the_wide_tail_or_the_block(fallback, layout, device):
    """With constrained bounds apply_official recomputes only each block's wide tail when every
    other token's ratio lies inside the solved bounds (typical batches), and every token
    otherwise; both give the torch backend's keep, gradient and loss bit for bit, with
    per-token advantages whose sign differs from the first token's, padded and packed, token
    and sequence weights, and inputs poisoned by validate=False."""
    for seed in range(2):
        lp, olp, adv, mask = _wide_tail_batch(seed, fallback, device)
        kw = dict(variant="official", tau=0.04, validate=False)
        if layout == "packed":  # the valid tokens of each row, back to back
            lens = mask.sum(1)
            cu = [0] + torch.cumsum(lens, 0).tolist()
            lp, olp, adv = lp[mask], olp[mask], adv[mask]
            mask = torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed)).to(device) < 0.95
            kw["cu_seqlens"] = cu
        calls = [({}, True), (dict(loss_agg_mode="seq-mean-token-mean"), False),
                 (dict(loss_agg_mode="seq-mean-token-sum-norm"), False),
                 (dict(num_tokens=torch.tensor(-1.0, device=device)), True)]  # poisoned: NaN loss and gradient
        if layout == "packed":
            bad = dict(cu_seqlens=torch.tensor([0, 50] + cu[2:-1] + [cu[1]], device=device))  # decreasing
            calls.append((bad, True))
        for extra, exact_loss in calls:
            args = dict(kw, **extra)
            desc = f"seed={seed} {layout} {extra}"
            ref = run("torch", (lp, olp, adv, mask), device, **args)
            with _apply_modes() as modes:
                tri = run("triton", (lp, olp, adv, mask), device, **args)
            assert modes == ["whole" if fallback else "tail"] * 2, (modes, desc)
            _assert_identical(ref, tri, desc, exact_loss)
            if "num_tokens" in extra or "cu_seqlens" in extra:
                assert torch.isnan(tri[1]) and torch.isnan(tri[2]).any(), desc


def test_official_wide_tail_with_an_overflowing_ratio_gives_the_torch_loss(device):
    """A token whose ratio overflows float32 has an infinite loss term under the unconstrained
    bounds: the wide-tail pass replaces the tails' sums instead of correcting them (no inf - inf),
    so every block is redone through its wide tail and the loss is the torch backend's (inf)."""
    lp, olp, adv, mask = (x.reshape(1, -1) for x in _wide_tail_batch(0, False, device, b=1, t=3000))
    lp = lp.clone()
    adv = adv.clone()
    lp[0, 2500], adv[0, 2500], mask[0, 2500] = olp[0, 2500] + 100.0, -0.5, True  # -A r = +inf, not clipped
    for extra in ({}, dict(loss_agg_mode="seq-mean-token-mean")):
        kw = dict(variant="official", tau=0.04, **extra)
        ref = run("torch", (lp, olp, adv, mask), device, **kw)
        with _apply_modes() as modes:
            tri = run("triton", (lp, olp, adv, mask), device, **kw)
        assert modes == ["tail"] * 2, modes
        _assert_identical(ref, tri, str(extra), exact_loss=not extra)
        assert tri[1] == float("inf")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("tiny", [-1.5, 2.0**-24])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_fixed_up_block_sums_only_final_terms(variant, tiny, mode, device):
    """A block whose compacted list a fix-up redoes holds a masked (paper: r = e**20) or clipped
    (official: r = e**12, 1e5 under the unconstrained bounds) outlier with a huge old term, next
    to kept terms whose float64 sum is exact: the loss is the exact value, as the torch backend
    gives it, not the small terms rounded through the old term's magnitude. The final terms are
    -1.5 (paper: token 7, A = 1.5 at r = 1; official: token 0 clipped at the solved 1.5), -tiny
    and -2**-40 (tokens 5 and 6 at r = 1); the outlier's is 0 (paper, masked). Weighted per token
    (one sequence: each weight 1) as well as by the count."""
    official = variant == "official"
    delta = torch.tensor([12.0 if official else 20.0, 0.05, 0.04, 0.03, 0.02, 0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, tiny, 2.0**-40, 0.0 if official else 1.5])
    olp = torch.full((8,), -1.0)
    args = ((olp + delta).reshape(1, -1), olp.reshape(1, -1), adv.reshape(1, -1), torch.ones(1, 8, dtype=torch.bool))
    kw = dict(miniclip_low=0.3, miniclip_high=0.5) if official else {}
    kw["loss_agg_mode"] = mode
    exact = (Fraction(-1.5) - Fraction(tiny) - Fraction(2.0**-40)) / (8 if mode == "token-mean" else 1)
    want = torch.tensor(float(exact), dtype=torch.float64).float()  # (exact, or exact / 8, fits a float64)
    ref = run("torch", args, device, variant, **kw)
    tri = run("triton", args, device, variant, **kw)
    assert not ref[0][0, 0] and not tri[0][0, 0]  # the outlier is masked, or its gradient clipped
    for name, (_, loss, _, _) in (("torch", ref), ("triton", tri)):
        assert loss.cpu().view(torch.int32) == want.view(torch.int32), (name, float(loss), float(want))
    assert torch.equal(tri[2].cpu(), ref[2].cpu())


def _tied_batch(n, seed, outliers=0.2):
    """Inputs on a grid whose cut falls inside a tie class spread over many blocks."""
    g = torch.Generator().manual_seed(seed)
    olp = -torch.randint(0, 64, (n,), generator=g).double() / 16
    steps = torch.randint(-2, 3, (n,), generator=g).double()
    big = torch.rand(n, generator=g) < outliers
    delta = torch.where(big, steps.sign() * 1.0, steps / 8)
    adv = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    mask = torch.rand(n, generator=g) < 0.9
    return (olp + delta).float(), olp.float(), adv.float(), mask


@pytest.mark.parametrize("offset", [-1, 0, 1])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_sizes_straddling_block_boundaries(blocks, offset, device):
    n = blocks * tb.BLOCK + offset
    lp, olp, adv, mask = _tied_batch(n, seed=n)
    for tau in (0.04, 0.1):
        keep, metrics = m2po_mask(lp, olp, adv, mask, tau=tau, backend="torch")
        assert 0 < metrics["masked_fraction"] < 1  # the cut is inside the batch, ties included
        assert_backends_agree((lp, olp, adv, mask), "paper", f"n={n} tau={tau}", device, tau=tau)
        # 2-D layout of the same tokens, with a row length that does not divide the block
        t = 63
        rows = n // t
        args2d = tuple(x[: rows * t].reshape(rows, t) for x in (lp, olp, adv, mask))
        for variant in ("paper", "official"):
            assert_backends_agree(args2d, variant, f"2d rows={rows} tau={tau}", device, tau=tau)


def test_ties_split_across_blocks_follow_flat_order(device):
    """Every trust-region token has the same m2: exactly the first keep_count (flat order) stay."""
    n = 2 * tb.BLOCK + 5
    lp = torch.full((n,), 0.5, device=device)
    olp = torch.zeros(n, device=device)
    adv = torch.ones(n, device=device)
    adv[::3] = -1.0  # not in the trust region (A < 0, delta > 0)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[7::11] = False
    keep, metrics = m2po_mask(lp, olp, adv, mask, tau=0.0, backend="triton")
    trust = mask & (adv > 0)
    assert not keep[trust].any()  # tau = 0: every token with m2 > 0 goes
    keep_ref, _ = m2po_mask(lp, olp, adv, mask, tau=0.3, backend="torch")
    keep_tri, _ = m2po_mask(lp, olp, adv, mask, tau=0.3, backend="triton")
    assert torch.equal(keep_ref, keep_tri)
    # 0.25 * k + 0 <= 0.3 * k is always true: nothing masked; now plant large values to force a cut
    lp2 = lp.clone()
    lp2[trust.nonzero().flatten()[-50:]] = 3.0
    keep_ref, m = m2po_mask(lp2, olp, adv, mask, tau=0.3, backend="torch")
    keep_tri, _ = m2po_mask(lp2, olp, adv, mask, tau=0.3, backend="triton")
    assert m["masked_fraction"] > 0
    assert torch.equal(keep_ref, keep_tri)


# --------------------------------------------------------------------------------------------
# Structure: launches, mergeable statistics, early exit


def _inputs(regime, n=3000, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    olp = -torch.rand(n, generator=g) * 3
    noise = {"none": 0.01, "some": 0.2, "ties": 0.0}[regime]
    delta = torch.randn(n, generator=g) * noise
    if regime == "ties":
        delta = torch.randint(-2, 3, (n,), generator=g).float() * 0.5
    adv = torch.randn(n, generator=g)
    return tuple(x.to(device) for x in ((olp + delta), olp, adv, torch.rand(n, generator=g) < 0.9))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_launch_count_is_fixed(variant, device):
    seen = []
    for regime in ("none", "some", "ties"):
        lp, olp, adv, mask = _inputs(regime, device=device)
        lp2 = lp.reshape(30, 100).requires_grad_(True)
        with tb.launch_log() as log:
            loss, metrics = m2po_loss(lp2, olp.reshape(30, 100), adv.reshape(30, 100), mask.reshape(30, 100),
                                      variant=variant, backend="triton", validate=False)
            loss.backward()
        seen.append((regime, float(metrics["masked_fraction"]), [launch.name for launch in log]))
    # the official rule with per-token advantages and a mask first finds each row's first valid
    # token (one program per row): one launch more
    expected = (["first_valid_kernel"] if variant == "official" else []) + FORWARD_KERNELS[variant]
    for regime, masked, log in seen:
        assert log == expected, (regime, log)
    # the regimes really differ (nothing masked vs masked), yet the launches are the same
    assert seen[0][1] == 0.0 and seen[2][1] > 0.0


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_histograms_merge_and_match_the_torch_description(variant, device):
    """The stats kernel's mergeable sums (tail histogram, below count and limbs, tail count and
    limbs) equal the PyTorch description's bit for bit, and add up across parts of a batch."""
    lp, olp, adv, mask = _inputs("some", n=5000, device=device)
    config = M2POConfig(tau=0.04, variant=variant)

    def stats(sl, cu=None):
        # (the official rule reads each sequence's first advantage: the parts are sequences)
        n = lp[sl].numel()
        tok = prepare(lp[sl], olp[sl], adv[sl], mask[sl], config, (cu or [0, n]) if variant == "official" else None)
        ws = tb.Workspace.allocate(tok.numel, tok.device)
        tb.stats_pass(tok, config, ws, write_keys=True)
        return ws.key.clone(), ws

    key_all, ws_all = stats(slice(None), [0, 1234, lp.numel()])
    key_a, ws_a = stats(slice(0, 1234))
    key_b, ws_b = stats(slice(1234, None))
    assert torch.equal(ws_a.sums + ws_b.sums, ws_all.sums)
    assert torch.equal(torch.cat([key_a, key_b]), key_all)
    assert torch.equal(radix_select.summarize(key_all, config), ws_all.sums)
    assert int(ws_all.sums[radix_select.TAIL_COUNT]) > 0 and int(ws_all.sums[radix_select.BELOW_COUNT]) > 0
    # the float64 total select1 derives from the exact limbs has the description's bits
    tb.select1(ws_all, config)
    n, total, _, _ = radix_select.totals(ws_all.sums, config)
    assert int(ws_all.state1[radix_select.N_TR]) == int(n)
    assert int(ws_all.state1[radix_select.TOTAL]) == int(total.double().reshape(1).view(torch.int64))
    if variant == "official":
        assert torch.equal(radix_select.below_max(key_all, config), ws_all.below_max)
        assert torch.equal(torch.maximum(ws_a.below_max, ws_b.below_max), ws_all.below_max)
    assert int(ws_a.n_valid + ws_b.n_valid) == int(mask.sum())


def test_nothing_to_mask_skips_the_refinement_passes(device):
    """Mean m2 under tau: select1 decides from the exact totals that nothing is refined, the
    cut keeps everything, and the tie passes write nothing (bench/kernel_trace.py counts the
    early exits of every pass: tests/test_kernel_properties.py)."""
    lp, olp, adv, mask = _inputs("none", device=device)
    config = M2POConfig(tau=0.04)
    tok = prepare(lp, olp, adv, mask, config)
    keep, metrics, loss, grad, scale = tb.triton_forward(tok, config, None, want_loss=True)
    assert float(metrics["m2"]) <= 0.04 and float(metrics["masked_fraction"]) == 0.0
    ws = tb.Workspace.allocate(tok.numel, tok.device)
    tb.stats_pass(tok, config, ws)
    tb.select1(ws, config)
    tb.level2(ws, config)
    assert int(ws.state1[radix_select.REFINE]) == 0
    cut = tb.select2(ws, config, ws.n_valid)
    assert int(cut.value) == tb.KEEP_ALL_BITS
    tb.ties_pass(cut, ws)
    assert not ws.ties.any()  # ties and tie_scan returned at once


def test_auto_backend_picks_triton_for_cuda_and_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    lp, olp, adv, mask = _inputs("some", n=300)
    with tb.launch_log() as log:
        m2po_loss(lp, olp, adv, mask)
    assert log == []  # CPU tensors: the reference ran
    with pytest.raises(ValueError, match="backend"):
        m2po_loss(lp, olp, adv, mask, backend="cuda")


# --------------------------------------------------------------------------------------------
# No host synchronisation in the Triton path

SYNC_ATTRS = ("item", "tolist", "cpu", "numpy", "nonzero", "argwhere")
PACKAGE_DIR = str(ROOT / "m2po_ops")
KERNEL_DIR = str(ROOT / "kernels")


@contextlib.contextmanager
def forbid_host_syncs():
    """Make every host-synchronising tensor call raise when made from the package's own code."""
    patched = {}

    def ours() -> bool:
        frame = sys._getframe(2)
        name = frame.f_code.co_filename
        return name.startswith(PACKAGE_DIR) or name.startswith(KERNEL_DIR)

    def guard(name, original):
        def wrapper(*args, **kwargs):
            if ours():
                raise AssertionError(f"host sync: {name} called from m2po_ops")
            return original(*args, **kwargs)

        return wrapper

    def guard_getitem(original):
        def wrapper(self, index):
            if ours():
                idx = index if isinstance(index, tuple) else (index,)
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                    raise AssertionError("host sync: boolean-mask indexing in m2po_ops")
            return original(self, index)

        return wrapper

    for name in SYNC_ATTRS + ("__bool__", "__int__", "__float__"):
        patched[(torch.Tensor, name)] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    patched[(torch, "nonzero")] = torch.nonzero
    torch.nonzero = guard("torch.nonzero", torch.nonzero)
    patched[(torch.Tensor, "__getitem__")] = torch.Tensor.__getitem__
    torch.Tensor.__getitem__ = guard_getitem(torch.Tensor.__getitem__)
    try:
        yield
    finally:
        for (owner, name), original in patched.items():
            setattr(owner, name, original)


def test_the_sync_guard_catches_syncs():
    x = torch.ones(3)
    with forbid_host_syncs():
        assert x.sum().item() == 3.0  # from a test file: allowed
        with pytest.raises(AssertionError, match="host sync"):
            m2po_loss(x, x, x, None, backend="torch", validate=True)  # validate=True syncs on purpose


@contextlib.contextmanager
def device_syncs_forbidden(device):
    """Any host synchronisation inside the block fails the test. CUDA: torch's sync debug mode
    "error" (what the device really does) and the Python-level guard. CPU: the guard alone, with
    the library on the path CUDA tensors take (on CPU tensors it may read values on the host,
    which is free there)."""
    from m2po_ops.inputs import device_path

    with forbid_host_syncs():
        if device.type != "cuda":
            with device_path():
                yield
            return
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("layout", ["2d", "packed_cu"])
def test_triton_path_is_sync_free_with_validate_false(variant, layout, device):
    """Forward, backward, the mask and a sequence-level mode run without a host sync (after a
    warm-up call that compiles the kernels)."""
    n = 60_000 if device.type == "cuda" else 600
    lp, olp, adv, mask = _inputs("ties", n=n, device=device)
    if layout == "2d":
        args = [x.reshape(6, n // 6) for x in (lp, olp, adv, mask)]
        kw = {}
    else:
        args = [lp, olp, adv, mask]
        kw = dict(cu_seqlens=torch.tensor([0, n // 4, n // 2 + 20, n], device=device))
    leaf = args[0].clone().requires_grad_(True)
    modes = ("seq-mean-token-mean", "token-mean")
    for mode in modes:  # warm-up: compiling and loading modules may sync
        m2po_loss(leaf, *args[1:], variant=variant, backend="triton", validate=False, loss_agg_mode=mode, **kw)
    m2po_mask(*args, variant=variant, backend="triton", validate=False, **kw)
    with device_syncs_forbidden(device):
        loss, metrics = m2po_loss(leaf, *args[1:], variant=variant, backend="triton", validate=False, **kw)
        loss.backward()
        keep, _ = m2po_mask(*args, variant=variant, backend="triton", validate=False, **kw)
        for mode in modes:
            m2po_loss(leaf, *args[1:], variant=variant, backend="triton", validate=False, loss_agg_mode=mode, **kw)
    assert math.isfinite(float(loss.detach())) and all(torch.isfinite(v) or k == "cut" for k, v in metrics.items())
    assert float(metrics["masked_fraction"]) > 0  # the data cuts inside the batch


def test_triton_path_source_has_no_sync_calls():
    """A static check of the Triton path's Python code (launcher and kernel modules)."""
    files = [ROOT / "m2po_ops" / "triton_backend.py", *sorted((ROOT / "kernels").glob("*.py"))]
    files = [f for f in files if f.name != "aot.py"]  # offline tool, never on the call path
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in SYNC_ATTRS:
                pytest.fail(f"{path.name}:{node.lineno} uses .{node.attr}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("bool", "float", "int")
                and not all(isinstance(a, ast.Constant) for a in node.args)  # float("inf") is fine
            ):
                pytest.fail(f"{path.name}:{node.lineno} calls {node.func.id}() on a value (a sync on a tensor)")


# --------------------------------------------------------------------------------------------
# CUDA graphs: a real capture on a GPU, a stand-in on the CPU (the same harness runs in CI)


class Captured:
    """A step captured once and replayed on whatever its static input tensors then hold.

    CUDA: a torch.cuda.CUDAGraph, after warm-up calls on a side stream (as torch documents).
    CPU: a stand-in that runs the step again on replay and copies its outputs into the tensors
    the capture returned, so the static buffers, in-place updates and comparisons run in CI.
    """

    def __init__(self, step, device, warmup: int = 2):
        self.step, self.graph = step, None
        if device.type != "cuda":
            self.outputs = tuple(out.detach().clone() for out in step())
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step()

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
            return
        for static, fresh in zip(self.outputs, self.step()):
            static.copy_(fresh)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_cuda_graph_replay_matches_eager(variant, device):
    """One captured forward+backward, replayed after new log-probs, advantages, mask and
    num_tokens (a 0-d device tensor) are copied into its inputs, equals eager calls on the new
    data, in regimes that mask nothing, some tokens, and inside a run of ties."""
    rows, t = (40, 1000) if device.type == "cuda" else (4, 500)
    n = rows * t

    def batch(regime, seed):
        return [x.reshape(rows, t) for x in _inputs(regime, n=n, seed=seed, device=device)]

    static = batch("ties", 1)
    denom = torch.tensor(float(n), device=device)
    leaf = static[0].clone().requires_grad_(True)

    def step():
        leaf.grad = None
        loss, metrics = m2po_loss(leaf, *static[1:], variant=variant, backend="triton", validate=False,
                                  num_tokens=denom)
        loss.backward()
        return loss, metrics["masked_fraction"], leaf.grad

    graph = Captured(step, device)
    masked = []
    for seed, regime in ((2, "none"), (3, "some"), (4, "ties")):
        fresh = batch(regime, seed)
        with torch.no_grad():
            leaf.copy_(fresh[0])
            for dst, src in zip(static[1:], fresh[1:]):
                dst.copy_(src)
            denom.fill_(float(n + 1000 * seed))
        graph.replay()
        eager_leaf = fresh[0].clone().requires_grad_(True)
        e_loss, e_metrics = m2po_loss(eager_leaf, *fresh[1:], variant=variant, backend="triton", validate=False,
                                      num_tokens=float(n + 1000 * seed))
        e_loss.backward()
        g_loss, g_masked, g_grad = graph.outputs
        assert torch.equal(g_loss, e_loss.detach()), regime
        assert torch.equal(g_masked, e_metrics["masked_fraction"]), regime
        assert torch.equal(g_grad, eager_leaf.grad), regime
        masked.append(float(g_masked))
    assert masked[0] == 0.0 and masked[2] > 0.0  # the regimes really differ


@pytest.fixture
def capturing(device, monkeypatch):
    """A context in which the library sees a CUDA-graph capture in progress: a real capture on
    a GPU, the library's capture probe patched on the CPU."""
    if device.type == "cuda":
        @contextlib.contextmanager
        def capture():
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                yield
    else:
        @contextlib.contextmanager
        def capture():
            with monkeypatch.context() as m:
                m.setattr(m2po_ops.inputs, "graph_capturing", lambda dev: True)
                yield
    return capture


@pytest.mark.gpu
def test_what_a_graph_would_bake_in_raises_during_capture(device, capturing):
    """A Python-number num_tokens, a list cu_seqlens and validate=True would be baked into a
    captured graph (or sync): during capture each raises, naming the argument."""
    lp, olp, adv, mask = (x.reshape(4, 250) for x in _inputs("some", n=1000, device=device))
    cu = torch.tensor([0, 400, 1000], device=device)
    for variant in ("paper", "official"):  # warm-up outside the capture
        m2po_loss(lp, olp, adv, mask, variant=variant, backend="triton", validate=False,
                  num_tokens=torch.tensor(500.0, device=device))
        m2po_mask(lp.reshape(-1), olp.reshape(-1), adv.reshape(-1), mask.reshape(-1), variant=variant,
                  backend="triton", validate=False, cu_seqlens=cu)
    denom = torch.tensor(500.0, device=device)  # (a tensor made from a host value copies: before capture)
    with capturing():
        with pytest.raises(ValueError, match="num_tokens"):
            m2po_loss(lp, olp, adv, mask, backend="triton", validate=False, num_tokens=500.0)
        with pytest.raises(ValueError, match="cu_seqlens"):
            m2po_mask(lp.reshape(-1), olp.reshape(-1), adv.reshape(-1), mask.reshape(-1), variant="official",
                      backend="triton", validate=False, cu_seqlens=[0, 400, 1000])
        with pytest.raises(ValueError, match="validate"):
            m2po_mask(lp, olp, adv, mask, backend="triton")
        # what a graph may hold: tensors for everything that changes between replays
        m2po_loss(lp, olp, adv, mask, backend="triton", validate=False, num_tokens=denom)
        m2po_mask(lp.reshape(-1), olp.reshape(-1), adv.reshape(-1), mask.reshape(-1), variant="official",
                  backend="triton", validate=False, cu_seqlens=cu)


def test_official_eligibility_at_the_ratio_rounding_edges(device):
    """The kernels decide r > 1 / r < 1 from delta (r = exp(delta) rounded to float32 is 1 for
    -2**-25 <= delta < 2**-24); the reference evaluates exp. Probe the float32 neighbours."""
    edges = torch.tensor([2.0**-24, -(2.0**-25), 0.0, 2.0**-23, -(2.0**-24)])
    near = [edges]
    for direction in (1.0, -1.0):
        x = edges.clone()
        for _ in range(3):
            x = torch.nextafter(x, torch.full_like(x, direction))
            near.append(x)
    delta = torch.cat(near)
    n = delta.numel()
    olp = torch.zeros(n)
    lp = olp + delta
    assert torch.equal(lp - olp, delta)
    ratio = m2po_ops.reference.ratio_f32(delta)
    assert ((ratio > 1) == (delta >= 2.0**-24)).all() and ((ratio < 1) == (delta < -(2.0**-25))).all()
    for sign in (1.0, -1.0):
        adv = torch.full((1, n), sign)
        args = tuple(x.to(device) for x in (lp.reshape(1, n), olp.reshape(1, n), adv, torch.ones(1, n, dtype=torch.bool)))
        _, m_ref = m2po_mask(*args, variant="official", tau=0.0, backend="torch")
        _, m_tri = m2po_mask(*args, variant="official", tau=0.0, backend="triton")
        expected = float(((delta >= 2.0**-24) if sign > 0 else (delta < -(2.0**-25))).float().mean())
        assert float(m_ref["trust_region_fraction"]) == pytest.approx(expected)
        assert float(m_tri["trust_region_fraction"]) == pytest.approx(expected)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.bfloat16, None])
def test_garbage_padding_and_nonfinite_valid_tokens(variant, mask_dtype, device):
    """The kernels decide validity themselves (mask of any dtype, finiteness with validate=False):
    NaN/inf in padding changes nothing; in valid tokens they act as padding and are counted."""
    lp, olp, adv, mask = (x.reshape(20, 150) for x in _inputs("some", n=3000, seed=5))
    lp, olp, adv = lp.clone(), olp.clone(), adv.clone()
    pad = ~mask
    lp[pad], olp[pad] = float("nan"), float("inf")
    adv[pad & (torch.arange(150) % 2 == 0)] = float("-inf")
    bad = torch.zeros_like(mask)
    bad[3, 7] = bad[11, 0] = bad[19, 149] = True
    bad &= mask
    lp[bad] = float("inf")
    m = None if mask_dtype is None else mask.to(mask_dtype)
    if m is None:  # no mask: every padding token is a non-finite valid token
        lp, olp, adv = (torch.where(mask, x, torch.zeros_like(x)) for x in (lp, olp, adv))
        lp[bad] = float("nan")
    assert_backends_agree((lp, olp, adv, m), variant, f"mask={mask_dtype}", device, validate=False)
    args = tuple(x if x is None else x.to(device) for x in (lp, olp, adv, m))
    _, metrics = m2po_mask(*args, variant=variant, backend="triton", validate=False)
    assert float(metrics["num_nonfinite"]) == int(bad.sum())


def test_no_pytorch_compute_ops_beside_the_kernels(device):
    """Besides the Triton kernels, forward+backward with validate=False runs exactly four PyTorch
    ops of its own that launch work on a GPU: the scratch and results memsets and backward's two
    multiplies (paper: 12 launches in all). Views and allocations of uninitialised memory launch
    nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launch = tb._launch
    state = {"in_kernel": False}

    def quiet_launch(*args, **kwargs):  # the interpreter's own tensor traffic is not ours
        state["in_kernel"] = True
        try:
            return launch(*args, **kwargs)
        finally:
            state["in_kernel"] = False

    free = {"view", "_unsafe_view", "reshape", "alias", "split", "split_with_sizes", "slice", "select",
            "empty", "empty_like", "empty_strided", "detach", "as_strided", "expand", "t", "unsqueeze",
            "squeeze", "lift_fresh", "_to_copy_noop", "unbind"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not state["in_kernel"]:
                name = func.overloadpacket.__name__
                if name not in free:
                    self.ops.append(name)
            return func(*args, **(kwargs or {}))

    lp, olp, adv, mask = (x.reshape(30, 100) for x in _inputs("ties", device=device))
    leaf = lp.clone().requires_grad_(True)
    tb._launch = quiet_launch
    try:
        for variant in ("paper", "official"):
            leaf.grad = None  # (accumulating into an existing .grad would add an add_)
            with Record() as rec:
                loss, _ = m2po_loss(leaf, olp, adv, mask, variant=variant, backend="triton", validate=False)
                loss.backward()
            # zero_, zero_: the scratch and results memsets (Workspace); ones_like: autograd's
            # seed of loss.backward() (any loss has it); mul, mul: AttachGrad's backward
            # (grad_output x the 1 / denominator scale, then x the stored derivative)
            assert sorted(rec.ops) == ["mul", "mul", "ones_like", "zero_", "zero_"], rec.ops
    finally:
        tb._launch = launch


# --------------------------------------------------------------------------------------------
# The GPU's select chunking, and edge values (regressions found in review)


def test_a_last_ulp_disagreement_between_levels_keeps_the_bucket(device):
    """Level 1's chunked prefix sum fails the test at the end of a bucket while level 2's exact
    sums pass every value in it: the cut must then sit at the bucket's end (not at its start,
    which would mask the whole bucket)."""
    import random

    def chunked_ends(key, chunk=radix_select.SELECT_CHUNK):
        # level 1 as select1 walks it: the below part's sum, then chunk by chunk (0.032 splits
        # these values as the tau found below does: 0.02..0.03 below, those near 0.049 and 0.05 above)
        sums_all = radix_select.summarize(key, M2POConfig(tau=0.032))
        _, _, n_below, s_below = radix_select.totals(sums_all, M2POConfig(tau=0.032))
        hist1 = sums_all[:2 * radix_select.L1_BUCKETS].view(2, -1)
        cnt = hist1[0].numpy()
        sums = hist1[1].double().numpy() * torch.where(hist1[0] > 0, radix_select.bucket_scale(
            torch.arange(radix_select.L1_BUCKETS)), torch.zeros(())).numpy()
        out, carry = sums.copy(), float(s_below)
        for c in range(0, len(sums), chunk):
            out[c:c + chunk] = carry + np.cumsum(sums[c:c + chunk])
            carry = out[c + chunk - 1]
        return hist1, out, sums, int(n_below) + np.cumsum(cnt)

    def cond(s, k, tau):
        hi, lo = M2POConfig(tau=tau).tau_split
        return (s - k * hi) <= k * lo

    import numpy as np

    rng = random.Random(1)
    lo_b = 0.03125 + 77 * 0.03125 / 128
    for _ in range(3000):
        d = [10 ** rng.uniform(-12.5, -6) for _ in range(rng.randint(1, 5))]
        d += [math.sqrt(rng.uniform(0.02, 0.03)) for _ in range(rng.randint(1, 30))]
        d += [math.sqrt(rng.uniform(0.0485, 0.049)) for _ in range(rng.randint(1, 5))]  # a tail bucket before b1
        d += [math.sqrt(lo_b + rng.uniform(1e-6, 2.4e-4)) for _ in range(200)]
        delta = torch.tensor(d, dtype=torch.float32)
        key = (delta * delta).view(torch.int32)
        if len(set((key.long() >> 16)[-200:].tolist())) != 1:
            continue
        hist1, s_end, sums, k_end = chunked_ends(key)
        nz = np.nonzero(hist1[0].numpy())[0]
        b1, bprev = nz[-1], nz[-2]
        a, b = float(s_end[b1]), float(np.float64(s_end[bprev]) + sums[b1])
        if not a > b:
            continue
        k = int(k_end[b1])
        tau = b / k
        for _ in range(10):
            if cond(b, k, tau) and not cond(a, k, tau):
                break
            tau = math.nextafter(tau, math.inf) if not cond(b, k, tau) else math.nextafter(tau, -math.inf)
        if cond(b, k, tau) and not cond(a, k, tau):
            break
    else:
        pytest.fail("no case constructed")
    lp = delta[torch.randperm(len(d), generator=torch.Generator().manual_seed(0))].reshape(1, -1).to(device)
    olp, adv = torch.zeros_like(lp), torch.ones_like(lp)
    keep_ref, m_ref = m2po_mask(lp, olp, adv, tau=tau, backend="torch")
    keep_tri, m_tri = m2po_mask(lp, olp, adv, tau=tau, backend="triton")
    # the two answers may differ by the one token the spec leaves open, never by a bucket
    assert abs(int(keep_ref.sum()) - int(keep_tri.sum())) <= 1
    assert abs(float(m_tri["m2_after"]) - float(m_ref["m2_after"])) < 1e-3


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_an_infinite_m2_in_the_trust_region(variant, device):
    """|delta| > 1.8e19 makes m2 = inf (the authors' test value is then NaN): both backends
    still agree, and nothing becomes NaN in the mask."""
    lp = torch.tensor([[0.1, 0.0]], device=device)
    olp = torch.tensor([[0.0, -2e19]], device=device)
    adv = torch.ones(1, device=device)
    k_ref, m_ref = m2po_mask(lp, olp, adv, variant=variant, backend="torch")
    k_tri, m_tri = m2po_mask(lp, olp, adv, variant=variant, backend="triton")
    assert k_ref.tolist() == k_tri.tolist() == [[True, False]]
    for name in ("clip_low", "clip_high") if variant == "official" else ("m2_after",):
        torch.testing.assert_close(m_tri[name], m_ref[name])


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_float64_values_beyond_float32_range_are_finite(variant, device):
    """Finiteness is decided on the float64 value, not after the cast to float32."""
    lp = torch.tensor([[-1.0, -1e39, -2.0]], dtype=torch.float64, device=device)
    olp = torch.tensor([[-1.5, -1e39, -2.5]], dtype=torch.float64, device=device)
    adv = torch.ones(1, 3, dtype=torch.float64, device=device)
    k_ref, m_ref = m2po_mask(lp, olp, adv, variant=variant, backend="torch")
    k_tri, m_tri = m2po_mask(lp, olp, adv, variant=variant, backend="triton")
    assert torch.equal(k_ref, k_tri)
    assert float(m_ref["num_nonfinite"]) == float(m_tri["num_nonfinite"]) == 0.0


@triton.jit
def _reciprocal_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    tl.store(y_ptr + offs, reciprocal_f32(x), mask=offs < n)


def test_the_kernels_reciprocal_is_torchs_float32_division(device):
    """The token-mean weight 1 / count (or 1 / num_tokens) is computed without a divide; it must
    be the correctly rounded float32 reciprocal, as torch's 1 / x, for every float32: counts up
    to 2**17, random magnitudes, random bit patterns (subnormals, huge values) and the specials."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.arange(1, 1 << 17).float(),
        torch.rand(100_000, generator=g) * 1e7,
        torch.randint(-2**31, 2**31 - 1, (100_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32),
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 2.0**-149, 2.0**127, 16777215.0]),
    ]).to(device)
    y = torch.empty_like(x)
    block = 65536 if device.type == "cpu" else 1024  # few interpreter steps; a GPU-sized block on a GPU
    _reciprocal_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    expected = 1.0 / x
    same = (y.view(torch.int32) == expected.view(torch.int32)) | (torch.isnan(y) & torch.isnan(expected))
    assert bool(same.all()), x[~same][:8].tolist()


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_calls_of_one_size_share_scratch_but_each_keeps_its_results(variant, device):
    """Small calls reuse the previous call's scratch (Workspace.for_call), never its results:
    the loss, metrics and gradient of a first call are unchanged by a second call of the same
    size on other data, and both equal the PyTorch backend's."""
    shape = (30, 100)
    first = [x.reshape(shape) for x in _inputs("some", seed=1, device=device)]
    second = [x.reshape(shape) for x in _inputs("ties", seed=2, device=device)]
    ws = tb.Workspace.for_call(first[0].numel(), first[0].device)
    assert tb.Workspace.for_call(first[0].numel(), first[0].device) is ws  # the scratch is reused
    big = tb.SCRATCH_CACHE_TOKENS + 1
    assert tb.Workspace.for_call(big, first[0].device) is not tb.Workspace.for_call(big, first[0].device)
    with pytest.MonkeyPatch.context() as m:  # other chunk sizes: other partial rows, not the cached scratch
        m.setattr(tb, "SELECT2_CHUNK", tb.SELECT2_CHUNK // 2)
        other = tb.Workspace.for_call(first[0].numel(), first[0].device)
        assert other is not ws and other.part2.shape[0] == 2 * ws.part2.shape[0]

    def call(lp, olp, adv, mask, backend):
        leaf = lp.detach().clone().requires_grad_(True)
        loss, metrics = m2po_loss(leaf, olp, adv, mask, variant=variant, backend=backend, validate=False)
        return leaf, loss, metrics

    leaf1, loss1, metrics1 = call(*first, "triton")
    held = loss1.detach().clone(), {k: v.clone() for k, v in metrics1.items()}
    leaf2, loss2, metrics2 = call(*second, "triton")
    (loss1 + loss2).backward()
    assert torch.equal(loss1.detach(), held[0])
    for name, value in metrics1.items():
        assert torch.equal(value, held[1][name]) or (value.isnan() & held[1][name].isnan()).all(), name
    for (leaf, loss, metrics), args in (((leaf1, loss1, metrics1), first), ((leaf2, loss2, metrics2), second)):
        ref_leaf, ref_loss, ref_metrics = call(*args, "torch")
        ref_loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-6, atol=1e-7)
        assert float(metrics["masked_fraction"]) == float(ref_metrics["masked_fraction"])
    assert float(metrics1["masked_fraction"]) != float(metrics2["masked_fraction"])  # the data differ
