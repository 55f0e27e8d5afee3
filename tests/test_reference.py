"""The PyTorch reference backend against oracles written from the spec.

The oracles live in tests/literal.py (Algorithm 1 as a literal loop in exact arithmetic, a port of
the authors' released rule with their torch float32 operations, verl's agg_loss). Every random
case is seeded; a failing case prints its seed and settings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import literal
from cases import DTYPES, MASK_KINDS, STYLES, TAUS, case_grid, make_case  # noqa: F401
from m2po_ops import m2po_loss, m2po_mask

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
METRIC_KEYS = ("m2", "m2_after", "masked_fraction", "trust_region_fraction", "kl", "ratio_mean", "ratio_max", "cut",
               "num_nonfinite", "input_error")


def run_loss(lp, olp, adv, mask=None, **kw):
    """(loss, grad w.r.t. logprobs, metrics, keep) from the torch backend on a fresh leaf."""
    leaf = lp.detach().clone().requires_grad_(True)
    kw.setdefault("backend", "torch")
    loss, metrics = m2po_loss(leaf, olp, adv, mask, **kw)
    loss.backward()
    mkw = {k: v for k, v in kw.items() if k not in ("loss_agg_mode", "num_tokens")}
    keep, _ = m2po_mask(lp, olp, adv, mask, **mkw)
    return loss.detach(), leaf.grad, metrics, keep


def closed_form(case, keep_flat):
    """-(1/N_valid) * sum keep * r * A and its gradient, r = exp(clamp(delta, -20, 20)), in the
    compute dtype (float64 for float64 input, float32 otherwise)."""
    cd = torch.float64 if case.lp.dtype == torch.float64 else torch.float32
    lp, olp = case.lp.reshape(-1).to(cd), case.olp.reshape(-1).to(cd)
    keep = torch.tensor(keep_flat, dtype=torch.bool)
    a = case.adv_flat.to(cd)
    nv = max(int(case.valid_flat.sum()), 1)
    d = torch.where(keep, lp - olp, torch.zeros((), dtype=cd))
    r = torch.exp(d.clamp(-20, 20))
    g = torch.where(keep, -r * a, torch.zeros((), dtype=cd)) / nv
    return g.sum(), g.reshape(case.lp.shape)


def assert_close_rel(actual, expected, rel, what="", scale=None):
    """|actual - expected| <= rel * scale elementwise; scale defaults to max |expected| (pass the
    mean |term| for a sum whose terms may cancel)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    tol = rel * max(float(scale), 1e-30)
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol, f"{what}: max abs err {err:.3e} > {tol:.3e} (rel {rel})"


# --------------------------------------------------------------------------------------------
# 1. keep equals Algorithm 1 (literal loop, exact arithmetic) on 540 random cases


@pytest.mark.parametrize("chunk", range(3))
@pytest.mark.parametrize("layout", ["2d", "packed", "packed_cu"])
def test_keep_matches_algorithm1(layout, chunk):
    stats = dict(masked=0, ties_at_cut=0, no_tr=0, all_masked=0)
    for params in case_grid(layout, chunk):
        c = make_case(**params)
        keep, metrics = m2po_mask(c.lp, c.olp, c.adv, c.mask, tau=params["tau"], backend="torch", **c.kwargs())
        expected, tr = literal.paper_keep(c.lp, c.olp, c.adv_flat, c.valid_flat, params["tau"])
        assert keep.dtype == torch.bool and keep.shape == c.lp.shape, c.desc
        assert keep.reshape(-1).tolist() == expected, c.desc

        # metrics against the oracle
        nv = max(int(c.valid_flat.sum()), 1)
        n_masked = int(c.valid_flat.sum()) - sum(expected)
        n_tr = sum(tr)
        assert float(metrics["masked_fraction"]) == pytest.approx(n_masked / nv, rel=1e-6), c.desc
        assert float(metrics["trust_region_fraction"]) == pytest.approx(n_tr / nv, rel=1e-6), c.desc
        _, m2 = literal.m2_float32(c.lp.reshape(-1), c.olp.reshape(-1))
        m2_tr = [v for v, t in zip(m2.tolist(), tr) if t]
        m2_kept = [v for v, t, k in zip(m2.tolist(), tr, expected) if t and k]
        assert float(metrics["m2"]) == pytest.approx(sum(m2_tr) / max(len(m2_tr), 1), rel=1e-6, abs=1e-30), c.desc
        assert float(metrics["m2_after"]) == pytest.approx(sum(m2_kept) / max(len(m2_kept), 1), rel=1e-6, abs=1e-30), c.desc
        if n_masked:
            # the cut is the m2 value of the first masked token in (m2, index) order
            first_masked = min(v for v, t, k in zip(m2.tolist(), tr, expected) if t and not k)
            assert float(metrics["cut"]) == first_masked, c.desc
        else:
            assert float(metrics["cut"]) == math.inf, c.desc

        # the paper loss on the same case (float32 compute) against the closed form
        loss, grad, _, _ = run_loss(c.lp, c.olp, c.adv, c.mask, tau=params["tau"], **c.kwargs())
        want_loss, want_grad = closed_form(c, expected)
        # (relative to the terms' absolute sum: the loss is a sum whose terms may cancel, and the
        # closed form sums its float32 terms in float32)
        assert_close_rel(loss, want_loss, 1e-5, c.desc, scale=float(want_grad.abs().sum()))
        assert_close_rel(grad.float(), want_grad.to(grad.dtype).float(), 1e-2 if grad.dtype != torch.float32 else 1e-5, c.desc)

        # generator sanity: the special styles do what they claim
        if params["style"] == "no_tr":
            assert n_tr == 0, c.desc
        if params["style"] == "all_above" and params["tau"] < math.inf:
            assert n_masked == n_tr, c.desc
        stats["masked"] += n_masked > 0
        stats["no_tr"] += n_tr == 0
        stats["all_masked"] += n_tr > 0 and n_masked == n_tr
        if n_masked and n_masked < n_tr:
            cut_v = float(metrics["cut"])
            ties = [k for v, t, k in zip(m2.tolist(), tr, expected) if t and v == cut_v]
            stats["ties_at_cut"] += any(ties) and not all(ties)
    # the grid must actually exercise partial masking, ties split by index, and the edge cases
    assert stats["masked"] >= 10 and stats["no_tr"] >= 5 and stats["all_masked"] >= 5, stats
    assert stats["ties_at_cut"] >= 1, stats


def test_ties_removed_from_the_largest_flat_index():
    # Five trust-region tokens with the same m2 = 0.25: mean 0.25 > tau until all but... tau = 0.1
    # and three tiny ones: the tie class is split and the LAST ties (flat order) are masked.
    delta = torch.tensor([0.5, 0.5, 0.0625, 0.5, 0.0625, 0.5, 0.0625, 0.5])
    olp = torch.zeros(8)
    adv = torch.ones(8)
    keep, _ = m2po_mask(olp + delta, olp, adv, tau=0.1, backend="torch")
    expected, _ = literal.paper_keep(olp + delta, olp, adv, torch.ones(8, dtype=torch.bool), 0.1)
    assert keep.tolist() == expected
    # (3 * 0.00390625 + k * 0.25) / (3 + k) <= 0.1  <=>  k <= 1: keep one tie, the first.
    assert keep.tolist() == [True, False, True, False, True, False, True, False]


@pytest.mark.parametrize("offset, masked", [(-(2.0**-40), True), (0.0, False), (2.0**-40, False)])
def test_cut_compares_exactly_against_tau(offset, masked):
    # m2 = [1/16, 1/16 + 2**-20] exactly in float32 (delta = 1/4 and 1/4 + 2**-19), mean
    # 1/16 + 2**-21. A tau a hair below the mean rounds UP to it in float32: only an exact (or
    # float64) comparison masks the larger token.
    a, b = 0.0625, 0.0625 + 2.0**-20
    delta = torch.tensor([0.25, 0.25 + 2.0**-19])
    assert (delta * delta).tolist() == [a, b]
    olp = torch.zeros(2)
    tau = (a + b) / 2 + offset
    assert (np.float32(tau) == np.float32((a + b) / 2)) and (tau != (a + b) / 2 or offset == 0)
    keep, metrics = m2po_mask(olp + delta, olp, torch.ones(2), tau=tau, backend="torch")
    expected, _ = literal.paper_keep(olp + delta, olp, torch.ones(2), torch.ones(2, dtype=torch.bool), tau)
    assert keep.tolist() == expected == [True, not masked]


# --------------------------------------------------------------------------------------------
# 2. loss and gradient: closed form in float64, gradcheck, verl's aggregation modes, num_tokens


@pytest.mark.parametrize("layout", ["2d", "packed", "packed_cu"])
def test_loss_and_grad_closed_form_float64(layout):
    count = 0
    for j in range(40):
        params = dict(
            seed=7000 + j, layout=layout, per_seq=layout != "packed" and j % 2 == 1, mask_kind=MASK_KINDS[j % 4],
            dtype=torch.float64, style=STYLES[j % 4], tau=TAUS[j % 5],
        )
        c = make_case(**params)
        expected, _ = literal.paper_keep(c.lp, c.olp, c.adv_flat, c.valid_flat, params["tau"])
        loss, grad, _, _ = run_loss(c.lp, c.olp, c.adv, c.mask, tau=params["tau"], **c.kwargs())
        want_loss, want_grad = closed_form(c, expected)
        assert loss.dtype == torch.float64 and grad.dtype == torch.float64
        assert_close_rel(loss, want_loss, 1e-6, c.desc)
        assert_close_rel(grad, want_grad, 1e-6, c.desc)
        count += 1
    assert count == 40


def test_overflow_guard_clamps_delta_at_20():
    lp = torch.tensor([[30.0, -30.0, 0.5, 0.0]], dtype=torch.float64)
    olp = torch.zeros_like(lp)
    adv = torch.tensor([[1.0, -1.0, 1.0, 2.0]], dtype=torch.float64)
    loss, grad, metrics, keep = run_loss(lp, olp, adv, tau=math.inf)
    r = torch.exp(torch.tensor([20.0, -20.0, 0.5, 0.0], dtype=torch.float64))
    want = -(r * adv[0]) / 4
    assert keep.all()
    assert_close_rel(loss, want.sum(), 1e-12, "loss")
    assert_close_rel(grad[0], want, 1e-12, "grad")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(metrics["ratio_max"]) == pytest.approx(math.exp(20.0), rel=1e-6)


def _gradcheck_data(seed, b=3, t=6):
    """float64 data whose mask cannot flip under finite differences: |delta| >= 0.05, distinct
    m2 spaced apart, tau between two prefix means far from both."""
    g = torch.Generator().manual_seed(seed)
    n = b * t
    mags = 0.05 + 0.03 * torch.randperm(n, generator=g).double()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    delta = (mags * sign).reshape(b, t)
    olp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.85
    mask[:, 0] = True
    return olp + delta, olp, adv, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_gradcheck(variant, mode):
    lp, olp, adv, mask = _gradcheck_data(11)
    tau = 0.04 if variant == "paper" else 0.02
    # official: the token at the water-filling cut always sits on a clip bound (a kink), so the
    # floors (0.7, 1.5) set the bounds here, away from every ratio
    clip = dict(miniclip_low=0.3, miniclip_high=0.5) if variant == "official" else {}
    kw = dict(tau=tau, variant=variant, loss_agg_mode=mode, backend="torch", **clip)
    keep, m = m2po_mask(lp, olp, adv, mask, tau=tau, variant=variant, backend="torch", **clip)
    assert (~keep & mask).any(), "the data must mask something"
    assert keep[mask].any()
    if variant == "official":
        # no ratio within 1e-4 of a clip bound (the loss has kinks there)
        assert float(m["clip_low"]) == np.float32(0.7) and float(m["clip_high"]) == np.float32(1.5)
        r = torch.exp(lp - olp)
        for bound in (m["clip_low"], m["clip_high"]):
            assert ((r - float(bound)).abs() > 1e-4).all()
    else:
        # the prefix means of T around the cut are away from tau
        delta, m2 = literal.m2_float32(lp, olp)
        tr = torch.tensor(literal.trust_region_paper(delta.reshape(-1), adv.reshape(-1), mask.reshape(-1)))
        v = torch.sort(m2.reshape(-1)[tr].double()).values
        means = torch.cumsum(v, 0) / torch.arange(1, v.numel() + 1)
        assert ((means - tau).abs() > 1e-4).all()

    def f(x):
        return m2po_loss(x, olp, adv, mask, **kw)[0]

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)


def _packed_from_2d(lp, olp, adv, mask, lengths):
    """Pack row b's first lengths[b] tokens (mask beyond them must be 0)."""
    parts = lambda x: torch.cat([x[b, : lengths[b]] for b in range(x.shape[0])]) if x.shape[0] else x.reshape(-1)
    cu = [0] + list(np.cumsum(lengths))
    return parts(lp), parts(olp), parts(adv), parts(mask), [int(v) for v in cu]


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("mode", MODES)
def test_loss_agg_modes_match_verl(mode, variant):
    for j in range(12):
        g = torch.Generator().manual_seed(300 + j)
        b, t = 2 + j % 4, 3 + (7 * j) % 13
        olp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
        lp = olp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
        adv = torch.randn(b, t, generator=g, dtype=torch.float64)
        # right padding, every row non-empty (verl's seq-mean-token-mean is 0/0 on an empty row)
        lengths = torch.randint(1, t + 1, (b,), generator=g).tolist()
        lengths[0] = t
        mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
        tau = [0.01, 0.04, math.inf][j % 3]
        loss, grad, _, keep = run_loss(lp, olp, adv, mask, tau=tau, variant=variant, loss_agg_mode=mode)

        x = lp.clone().requires_grad_(True)
        if variant == "paper":
            expected, _ = literal.paper_keep(lp, olp, adv, mask, tau)
            k = torch.tensor(expected).reshape(b, t)
            assert torch.equal(keep, k)
            loss_mat = torch.where(k, -adv * torch.exp(x - olp), torch.zeros((), dtype=torch.float64))
        else:
            port = literal.official_port(lp.float(), olp.float(), adv.float(), mask, tau)
            assert torch.equal(keep, mask & ~port["clipped"])
            # float64 values, the clip decision in float32 (spec: "ratios in float32")
            r = torch.exp(x - olp)
            loss_mat = torch.where(port["clipped"], -adv * torch.clamp(r, port["lower"], port["upper"]), -adv * r)
        want = literal.agg_loss(loss_mat, mask, mode)
        want.backward()
        assert_close_rel(loss, want.detach(), 1e-6, f"{mode} {variant} j={j}")
        assert_close_rel(grad, x.grad, 1e-6, f"{mode} {variant} j={j}")

        # the same batch packed (with cu_seqlens) gives the same loss when T == longest sequence
        p_lp, p_olp, p_adv, p_mask, cu = _packed_from_2d(lp, olp, adv, mask, lengths)
        p_loss, p_grad, _, p_keep = run_loss(p_lp, p_olp, p_adv, p_mask, tau=tau, variant=variant, loss_agg_mode=mode, cu_seqlens=cu)
        assert torch.equal(p_keep, keep[mask])
        assert_close_rel(p_loss, loss, 1e-12, "packed")
        assert_close_rel(p_grad, grad[mask], 1e-12, "packed grad")


def test_seq_mean_token_mean_empty_sequence_counts_as_zero():
    # verl would give 0/0 = NaN for an empty row; the library's documented choice: it adds 0 but
    # still counts in the number of sequences.
    lp = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    olp = torch.zeros_like(lp)
    adv = torch.ones_like(lp)
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, _, _, _ = run_loss(lp, olp, adv, mask, tau=math.inf, loss_agg_mode="seq-mean-token-mean")
    want = -(math.exp(0.1) + math.exp(0.2)) / 2 / 2
    assert float(loss) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("tau", [0.0, math.inf])
def test_num_tokens_micro_batches_add_up(tau, variant):
    # tau = inf masks nothing and tau = 0 masks all of T in every micro-batch: the same cut.
    g = torch.Generator().manual_seed(5)
    b, t = 6, 9
    olp = -torch.rand(b, t, generator=g, dtype=torch.float64)
    lp = olp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.7
    n_total = int(mask.sum())
    full_loss, full_grad, _, full_keep = run_loss(lp, olp, adv, mask, tau=tau, variant=variant)
    parts, grads, keeps = [], [], []
    for rows, nt in ((slice(0, 2), n_total), (slice(2, 5), torch.tensor(n_total)), (slice(5, 6), float(n_total))):
        loss, grad, _, keep = run_loss(lp[rows], olp[rows], adv[rows], mask[rows], tau=tau, variant=variant, num_tokens=nt)
        parts.append(loss)
        grads.append(grad)
        keeps.append(keep)
    assert torch.equal(torch.cat(keeps), full_keep)
    if tau == 0.0 and variant == "paper":
        assert (mask & ~full_keep).any()
    assert_close_rel(sum(parts), full_loss, 1e-12, "sum of micro-batch losses")
    assert_close_rel(torch.cat(grads), full_grad, 1e-12, "micro-batch grads")
    # and num_tokens is a plain override of the denominator
    loss, grad, _, _ = run_loss(lp, olp, adv, mask, tau=tau, variant=variant, num_tokens=3 * n_total)
    assert_close_rel(loss, full_loss / 3, 1e-12, "num_tokens override")
    assert_close_rel(grad, full_grad / 3, 1e-12, "num_tokens override grad")


# --------------------------------------------------------------------------------------------
# 3. variant="official": the spec's worked example and the authors' released rule


def _worked_example(extra_padding=0):
    m2 = torch.tensor([0.01, 0.02, 0.03, 0.09, 0.12])
    delta = torch.sqrt(m2)
    olp = torch.tensor([-1.0, -0.5, -2.0, -0.25, -1.5])
    lp = olp + delta
    adv = torch.ones(5)
    pad = torch.zeros(extra_padding)
    mask = torch.cat([torch.ones(5, dtype=torch.bool), torch.zeros(extra_padding, dtype=torch.bool)])
    return (torch.cat([lp, pad])[None], torch.cat([olp, pad])[None], torch.cat([adv, pad])[None], mask[None])


def test_worked_example_both_variants():
    lp, olp, adv, mask = _worked_example(extra_padding=2)
    # the float32 m2 values are the spec's, up to rounding
    _, m2 = literal.m2_float32(lp, olp)
    assert torch.allclose(m2[0, :5], torch.tensor([0.01, 0.02, 0.03, 0.09, 0.12]), rtol=1e-5)

    keep, metrics = m2po_mask(lp, olp, adv, mask, tau=0.04, backend="torch")
    assert keep[0].tolist() == [True, True, True, True, False, False, False]  # only 0.12 masked
    assert float(metrics["m2_after"]) == pytest.approx(0.0375, rel=1e-5)
    assert float(metrics["cut"]) == pytest.approx(0.12, rel=1e-5)

    keep, metrics = m2po_mask(lp, olp, adv, mask, tau=0.04, variant="official", backend="torch")
    port = literal.official_port(lp, olp, adv, mask, 0.04)
    assert port["tau_c"] == pytest.approx(math.sqrt(0.03), rel=1e-5)
    # 0.09 and 0.12 are clipped; the 0.03 token sits on the cut and falls as the authors' code says
    assert keep[0, [0, 1, 3, 4]].tolist() == [True, True, False, False]
    assert torch.equal(keep, mask & ~port["clipped"])
    loss, _, _, _ = run_loss(lp, olp, adv, mask, tau=0.04, variant="official")
    assert_close_rel(loss, port["loss"], 1e-6, "worked example loss")
    assert float(metrics["clip_high"]) == pytest.approx(math.exp(math.sqrt(0.03)), rel=1e-6)
    assert float(metrics["clip_low"]) == pytest.approx(math.exp(-math.sqrt(0.03)), rel=1e-6)


def _official_case(seed, per_seq, dtype):
    rng = np.random.default_rng(seed)
    b = int(rng.integers(1, 7))
    t = int(rng.integers(1, 300 // b + 1))
    olp = -rng.exponential(1.0, size=(b, t))
    scale = rng.choice([0.1, 0.2, 0.4])
    delta = rng.normal(size=(b, t)) * scale
    heavy = rng.random((b, t)) < 0.05
    delta[heavy] *= 6  # some tokens beyond the miniclip floors (ratio > 1.5 or < 0.7)
    delta[rng.random((b, t)) < 0.03] = 0.0
    if per_seq:
        adv = rng.choice([-1.0, 0.0, 1.0], size=b) * rng.random(b)
        adv_full = np.repeat(adv[:, None], t, axis=1)
    else:
        adv = rng.normal(size=(b, t))
        adv_full = adv
    # right padding, sometimes an empty row; sometimes random holes (position 0 may be padding)
    lengths = rng.integers(0, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    if rng.random() < 0.3:
        mask &= rng.random((b, t)) < 0.8
    lp_t = torch.tensor(olp + delta).to(dtype)
    olp_t = torch.tensor(olp).to(dtype)
    return lp_t, olp_t, torch.tensor(adv).to(dtype), torch.tensor(adv_full).to(dtype), torch.tensor(mask), [int(v) for v in lengths]


def first_valid_in_column_0(adv, mask):
    """The authors read each row's advantage at column 0 (verl right-pads); the library reads
    the row's first valid token. Put that token's advantage in column 0 (padding there, or the
    token itself) so the port reads what the library reads; the loss terms are unchanged."""
    col = mask.to(torch.uint8).argmax(dim=1)
    out = adv.clone()
    out[:, 0] = adv[torch.arange(adv.shape[0]), col]
    return out


@pytest.mark.parametrize("miniclip", [False, True])
@pytest.mark.parametrize("per_seq", [False, True])
def test_official_matches_authors_port(per_seq, miniclip):
    clip = dict(miniclip_low=0.3, miniclip_high=0.5) if miniclip else {}
    counts = dict(constrained=0, clipped=0, fragile=0, exp_ulp=0, floor_bites=0)
    done = 0
    seed = 50_000 + 1000 * per_seq + 500 * miniclip
    while done < 30:
        seed += 1
        dtype = [torch.float32, torch.bfloat16, torch.float16][seed % 3]
        tau = [0.01, 0.04, 0.2][seed % 3 if seed % 7 else 1]
        lp, olp, adv, adv_full, mask, lengths = _official_case(seed, per_seq, dtype)
        port = literal.official_port(lp.float(), olp.float(), first_valid_in_column_0(adv_full, mask).float(), mask,
                                     tau, **clip)
        if port["fragile"]:
            counts["fragile"] += 1  # float32 vs float64 sums decide differently: not a fair case
            continue
        counts["exp_ulp"] += port["exp_ulp"]
        done += 1
        desc = f"seed={seed} dtype={dtype} tau={tau} per_seq={per_seq} miniclip={miniclip}"
        loss, grad, metrics, keep = run_loss(lp, olp, adv, mask, tau=tau, variant="official", **clip)
        differ = keep != (mask & ~port["clipped"])
        if port["exp_ulp"]:  # only a ratio between the two versions of a bound may decide differently
            r = torch.exp(lp.float() - olp.float()).double()
            (lo64, hi64), lo, hi = port["bounds_f64exp"], port["lower"], port["upper"]
            between = ((r - lo64) * (r - lo) <= 0) | ((r - hi64) * (r - hi) <= 0)
            differ &= ~between
        assert not differ.any(), desc
        if int(mask.sum()):
            terms = (adv_full.float() * torch.exp(lp.float() - olp.float())).abs()[mask]
            assert_close_rel(loss, port["loss"].detach(), 1e-5, desc, scale=terms.mean())
            port_lp = lp.float().detach().requires_grad_(True)
            literal.official_port(port_lp, olp.float(), first_valid_in_column_0(adv_full, mask).float(), mask, tau,
                                  **clip)["loss"].backward()
            assert_close_rel(grad.float(), port_lp.grad, 1e-5 if dtype == torch.float32 else 1e-2, desc)
        # the bounds follow the documented float64-exp chain; the authors' float32 exp may be one
        # float32 ulp away (torch's expf is not correctly rounded, and differs between CPUs)
        lower64, upper64 = port["bounds_f64exp"]
        assert float(metrics["clip_low"]) == np.float32(lower64), desc
        assert float(metrics["clip_high"]) == np.float32(upper64), desc
        for ours, theirs in ((lower64, port["lower"]), (upper64, port["upper"])):
            assert abs(np.float32(ours) - np.float32(theirs)) <= np.spacing(np.float32(theirs)), desc
        counts["constrained"] += port["tau_c"] is not None
        counts["clipped"] += bool((mask & port["clipped"]).any())
        if miniclip and port["tau_c"] is not None:
            counts["floor_bites"] += math.exp(port["tau_c"]) - 1 < 0.5

        # the same tokens packed with cu_seqlens decide and weigh alike
        p_lp, p_olp, p_adv, p_mask, cu = _packed_from_2d(lp, olp, adv_full, mask, lengths)
        if per_seq and p_lp.numel() != adv.numel():  # (N,) for N tokens and N sequences is per-token
            p_adv = adv
        p_loss, p_grad, _, p_keep = run_loss(p_lp, p_olp, p_adv, p_mask, tau=tau, variant="official", cu_seqlens=cu, **clip)
        row_mask = torch.arange(lp.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        assert torch.equal(p_keep, keep[row_mask]), desc
        if int(mask.sum()):
            assert_close_rel(p_loss, loss, 1e-6, desc, scale=terms.mean())
    assert counts["constrained"] >= 10 and counts["clipped"] >= 10, counts
    assert counts["fragile"] <= 5, counts
    if miniclip:
        assert counts["floor_bites"] >= 5, counts


@pytest.mark.parametrize("upper", ["a-ratio", "inf"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_official_host_path_gives_what_the_general_formula_gives(dtype, upper):
    """On CPU tensors the official rule takes -A r for every token inside the clip bounds and the
    general clipped-surrogate formula only for the tokens outside; that must give what the
    general formula (the path CUDA tensors take) gives: the loss's bits, and equal gradients,
    keep and metrics (a zero gradient on padding may carry either sign), with ratios exactly at
    both bounds, an infinite ratio (with a zero advantage too: a NaN term, of one sign), an
    infinite upper bound, zero advantages and padding holding garbage."""
    from m2po_ops import M2POConfig
    from m2po_ops.cut import make_cut
    from m2po_ops.inputs import device_path

    g = torch.Generator().manual_seed(11)
    b, t = 7, 40
    olp = -torch.rand(b, t, generator=g) * 3
    delta = torch.randn(b, t, generator=g) * 0.3
    delta[0, 3], delta[1, 7], delta[2, 5] = -0.25, 0.25, 90.0  # the bounds themselves, and exp overflow
    delta[3, :4] = 0.25
    delta[5, 9] = 90.0
    lp = (olp + delta).to(dtype)
    olp = olp.to(dtype)
    adv = torch.randn(b, t, generator=g)
    adv[4, ::3] = 0.0
    adv[2, 5], adv[5, 9] = 1.0, 0.0
    mask = torch.rand(b, t, generator=g) < 0.85
    mask[0, 3] = mask[1, 7] = mask[2, 5] = mask[5, 9] = True
    lp = torch.where(mask, lp, torch.full_like(lp, -7.0))  # garbage on padding
    r = torch.exp((lp.float() - olp.float()).double()).float()
    config = M2POConfig(variant="official")
    top = r[1, 7].clone() if upper == "a-ratio" else torch.tensor(float("inf"))
    cut = make_cut(config, "cpu", lower=r[0, 3].clone(), upper=top,
                   num_valid=mask.sum(), num_trust_region=mask.sum())
    assert float(r[0, 3]) < 1.0 < float(r[1, 7])

    def call():
        x = lp.clone().requires_grad_(True)
        loss, metrics = m2po_loss(x, olp, adv, mask, variant="official", cut=cut, backend="torch")
        loss.backward()
        keep, _ = m2po_mask(x.detach(), olp, adv, mask, variant="official", cut=cut, backend="torch")
        return loss.detach(), x.grad, keep, metrics

    host = call()
    with device_path():
        dev = call()
    assert host[0].view(torch.int32 if host[0].dtype == torch.float32 else torch.int64).item() == \
        dev[0].view(torch.int32 if dev[0].dtype == torch.float32 else torch.int64).item()
    assert bool(torch.isnan(dev[0]))  # the zero advantage at an infinite ratio: a NaN, its sign compared above
    torch.testing.assert_close(host[1], dev[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(host[2], dev[2])
    assert int((~dev[2] & mask).sum()) >= 3  # some tokens are clipped: the outside path ran
    for name in dev[3]:
        assert torch.equal(host[3][name], dev[3][name]), name


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_loss_without_numpy_equals_the_loss_with_it(variant, monkeypatch):
    """numpy is optional: with it missing, the CPU path takes torch's kernels for every host
    step and must give the same loss, gradient and metrics, bit for bit (below 2**16 tokens,
    where both sum the loss with torch)."""
    from m2po_ops import inputs, reference, rules, torch_backend

    g = torch.Generator().manual_seed(5)
    lp = torch.randn(6, 300, generator=g) * 0.3
    olp = lp + torch.randn(6, 300, generator=g) * 0.3
    adv = torch.randn(6, 300, generator=g)
    mask = torch.rand(6, 300, generator=g) < 0.8

    def call():
        x = lp.clone().requires_grad_(True)
        loss, metrics = m2po_loss(x, olp, adv, mask, tau=0.01, variant=variant, backend="torch")
        loss.backward()
        return loss.detach(), x.grad, metrics

    with_np = call()
    for module, name in ((reference, "np"), (rules, "np"), (inputs, "_np"), (torch_backend, "np")):
        monkeypatch.setattr(module, name, None)
    without = call()
    assert torch.equal(with_np[0], without[0]) and torch.equal(with_np[1], without[1])
    assert float(with_np[2]["masked_fraction"]) > 0  # something is masked: the masked list was used
    for name in with_np[2]:
        assert torch.equal(with_np[2][name], without[2][name]), name


def test_official_epsilon_offsets_on_an_exact_boundary():
    # Dyadic data: m2 = [1/16, 1/4, 1, 1] (delta = 0.25, 0.5, 1, 1), tau = 13/64, target = 13/16.
    # At k = 1, (v_1 - 1e-12) * 2 + c_1 = 13/16 - 2e-12 misses target - 1e-12, so the authors' search
    # moves on to k = 2: tau_c = sqrt(1/4 - 1e-12), and the 0.5 token sits exactly on the bound
    # (float32 tau_c rounds to 0.5): not clipped. Without the offsets k = 1 and it would be.
    delta = torch.tensor([[0.25, 0.5, 1.0, 1.0]])
    olp = torch.zeros(1, 4)
    lp, adv, mask = olp + delta, torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool)
    tau = 13 / 64
    port = literal.official_port(lp, olp, adv, mask, tau)
    assert not port["exp_ulp"] and not port["fragile"]
    assert port["tau_c"] == pytest.approx(0.5, abs=1e-9)
    assert port["clipped"][0].tolist() == [False, False, True, True]
    keep, m = m2po_mask(lp, olp, adv, mask, tau=tau, variant="official", backend="torch")
    assert torch.equal(keep, mask & ~port["clipped"])
    assert float(m["clip_high"]) == float(torch.exp(torch.tensor(0.5)))
    # M2 exactly at the budget: no constraint (M2_now <= budget + 1e-12), nothing clipped
    same = torch.full((1, 4), 0.5)
    keep, m = m2po_mask(olp + same, olp, adv, mask, tau=0.25, variant="official", backend="torch")
    assert keep.all() and float(m["clip_high"]) == 100000.0 and float(m["clip_low"]) == 0.0
    keep, m = m2po_mask(olp + same, olp, adv, mask, tau=0.25, backend="torch")
    assert keep.all() and float(m["cut"]) == math.inf


def test_official_floors_loosen_the_bounds():
    # The released code floors eps (``if clip_high < miniclip_high: clip_high = miniclip_high``):
    # with no constraint the bounds stay (0, 100000); a tight constraint opens up to (0.7, 1.5).
    lp, olp, adv, mask = _worked_example()
    _, m = m2po_mask(lp, olp, adv, mask, tau=1.0, variant="official", backend="torch", miniclip_low=0.3, miniclip_high=0.5)
    assert float(m["clip_low"]) == 0.0 and float(m["clip_high"]) == 100000.0
    keep, m = m2po_mask(lp, olp, adv, mask, tau=0.04, variant="official", backend="torch", miniclip_low=0.3, miniclip_high=0.5)
    assert float(m["clip_low"]) == np.float32(0.7) and float(m["clip_high"]) == np.float32(1.5)
    assert keep.all()  # every ratio of the example is below 1.5


# --------------------------------------------------------------------------------------------
# 4. padding garbage (NaN, inf) never changes anything


def _fill_padding(x, pad, values, seed):
    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, len(values), x.shape, generator=g)
    garbage = torch.tensor(values, dtype=x.dtype)[choice]
    return torch.where(pad, garbage, x)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("layout", ["2d", "packed", "packed_cu"])
def test_padding_garbage_is_ignored(layout, variant):
    garbage = [float("nan"), float("inf"), float("-inf")]
    n_cases = 0
    for j in range(24):
        if layout == "packed" and variant == "official":
            pytest.skip("official needs cu_seqlens on 1-D input (tested in the errors section)")
        params = dict(
            seed=9000 + j, layout=layout, per_seq=False, mask_kind=MASK_KINDS[j % 3], dtype=DTYPES[j % 3],
            style=STYLES[j % 4], tau=[0.0, 0.01, 0.04, 1.0][j % 4], max_tokens=120,
        )
        c = make_case(**params)
        pad = ~c.valid_flat.reshape(c.lp.shape)
        if not pad.any():
            continue
        zeros = [torch.where(pad, torch.zeros((), dtype=x.dtype), x) for x in (c.lp, c.olp, c.adv)]
        dirty = [_fill_padding(x, pad, garbage, 10 * j + k) for k, x in enumerate((c.lp, c.olp, c.adv))]
        for mode in ("token-mean", "seq-mean-token-mean") if c.cu is not None or layout == "2d" else ("token-mean",):
            kw = dict(tau=params["tau"], variant=variant, loss_agg_mode=mode, **c.kwargs())
            l0, g0, m0, k0 = run_loss(*zeros, c.mask, **kw)
            l1, g1, m1, k1 = run_loss(*dirty, c.mask, **kw)
            assert torch.equal(k0, k1), c.desc
            assert torch.equal(l0, l1), c.desc
            assert torch.equal(g0, g1), c.desc
            assert set(m0) == set(m1)
            for key in m0:
                assert torch.equal(m0[key], m1[key]), (key, c.desc)
            assert torch.isfinite(l1) and torch.isfinite(g1).all(), c.desc
            n_cases += 1
    assert n_cases >= 10


def test_padding_garbage_in_the_first_position_of_a_row():
    # Left padding: position 0 of row 1 is padding holding NaN. The official rule reads the
    # advantage of the row's first valid token (position 1 here), so garbage in the padding
    # changes nothing. The paper rule does not read it at all.
    lp = torch.tensor([[0.3, 0.2, 0.1, 0.5], [0.0, 0.4, 0.3, 0.2]])
    olp = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    for variant in ("paper", "official"):
        for bad in (float("nan"), float("inf")):
            dirty = [x.clone() for x in (lp, olp, adv)]
            for x in dirty:
                x[1, 0] = bad
            l0, g0, m0, k0 = run_loss(lp, olp, adv, mask, tau=0.01, variant=variant)
            l1, g1, m1, k1 = run_loss(*dirty, mask, tau=0.01, variant=variant)
            assert torch.equal(k0, k1) and torch.equal(l0, l1) and torch.equal(g0, g1), (variant, bad)
            for key in m0:
                assert torch.equal(m0[key], m1[key]), (variant, bad, key)


# --------------------------------------------------------------------------------------------
# 5. bad inputs: the exception type and the argument's name


def _ok(b=2, t=3):
    return torch.zeros(b, t), torch.zeros(b, t), torch.zeros(b, t), torch.ones(b, t, dtype=torch.bool)


@pytest.mark.parametrize("fn", [m2po_loss, m2po_mask])
def test_errors_shapes_dtypes_devices(fn):
    lp, olp, adv, mask = _ok()
    with pytest.raises(ValueError, match="old_logprobs"):
        fn(lp, torch.zeros(2, 4), adv, mask, backend="torch")
    for bad_adv in (torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, 3, 1)):
        with pytest.raises(ValueError, match="advantages"):
            fn(lp, olp, bad_adv, mask, backend="torch")
    with pytest.raises(ValueError, match="advantages"):
        fn(torch.zeros(6), torch.zeros(6), torch.zeros(5), backend="torch")
    with pytest.raises(ValueError, match="advantages"):
        fn(torch.zeros(6), torch.zeros(6), torch.zeros(3), cu_seqlens=[0, 2, 6], backend="torch")
    with pytest.raises(ValueError, match="mask"):
        fn(lp, olp, adv, torch.ones(3, 2), backend="torch")
    with pytest.raises(ValueError, match="logprobs"):
        fn(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), backend="torch")
    # integer log-probs / advantages
    with pytest.raises(TypeError, match="^logprobs"):
        fn(torch.zeros(2, 3, dtype=torch.int64), olp, adv, mask, backend="torch")
    with pytest.raises(TypeError, match="^old_logprobs"):
        fn(lp, torch.zeros(2, 3, dtype=torch.int32), adv, mask, backend="torch")
    with pytest.raises(TypeError, match="^advantages"):
        fn(lp, olp, torch.zeros(2, 3, dtype=torch.int64), mask, backend="torch")
    with pytest.raises(TypeError, match="^logprobs"):
        fn([[0.0]], olp, adv, mask, backend="torch")
    # a second device, simulated with 'meta'
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="old_logprobs"):
        fn(lp, olp.to(meta), adv, mask, backend="torch")
    with pytest.raises(ValueError, match="advantages"):
        fn(lp, olp, adv.to(meta), mask, backend="torch")
    with pytest.raises(ValueError, match="^mask"):
        fn(lp, olp, adv, mask.to(meta), backend="torch")
    with pytest.raises(ValueError, match="old_logprobs"):
        fn(lp.to(meta), olp, adv, mask, backend="torch")
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(torch.zeros(6), torch.zeros(6), torch.zeros(6), cu_seqlens=torch.tensor([0, 6], device=meta), backend="torch")


@pytest.mark.parametrize("fn", [m2po_loss, m2po_mask])
def test_errors_hyperparameters(fn):
    lp, olp, adv, mask = _ok()
    for tau in (-0.01, -math.inf):
        with pytest.raises(ValueError, match="tau"):
            fn(lp, olp, adv, mask, tau=tau, backend="torch")
    with pytest.raises(ValueError, match="tau"):
        fn(lp, olp, adv, mask, tau=float("nan"), backend="torch")
    with pytest.raises(TypeError, match="tau"):
        fn(lp, olp, adv, mask, tau=torch.tensor(0.04), backend="torch")
    with pytest.raises(ValueError, match="variant"):
        fn(lp, olp, adv, mask, variant="Paper", backend="torch")
    with pytest.raises(ValueError, match="backend"):
        fn(lp, olp, adv, mask, backend="cuda")
    with pytest.raises(ValueError, match="miniclip_low"):
        fn(lp, olp, adv, mask, variant="official", miniclip_low=-0.3, backend="torch")
    with pytest.raises(TypeError, match="validate"):
        fn(lp, olp, adv, mask, validate=1, backend="torch")


def test_errors_loss_only_arguments():
    lp, olp, adv, mask = _ok()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        m2po_loss(lp, olp, adv, mask, loss_agg_mode="token_mean", backend="torch")
    for bad in (0, -1, 0.0, float("nan"), float("inf"), torch.tensor(0), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="num_tokens"):
            m2po_loss(lp, olp, adv, mask, num_tokens=bad, backend="torch")
    with pytest.raises(TypeError, match="num_tokens"):
        m2po_loss(lp, olp, adv, mask, num_tokens="10", backend="torch")
    with pytest.raises(ValueError, match="num_tokens"):
        m2po_loss(lp, olp, adv, mask, num_tokens=torch.tensor([1, 2]), backend="torch")


def test_errors_1d_without_cu_seqlens():
    x = torch.zeros(6)
    for mode in MODES[1:]:
        with pytest.raises(ValueError, match="cu_seqlens") as e:
            m2po_loss(x, x, x, loss_agg_mode=mode, backend="torch")
        assert mode in str(e.value)
    for fn in (m2po_loss, m2po_mask):
        with pytest.raises(ValueError, match="cu_seqlens") as e:
            fn(x, x, x, variant="official", backend="torch")
        assert "official" in str(e.value)
    # with cu_seqlens they work
    m2po_loss(x, x, x, loss_agg_mode="seq-mean-token-mean", cu_seqlens=[0, 2, 6], backend="torch")
    m2po_mask(x, x, x, variant="official", cu_seqlens=[0, 2, 6], backend="torch")


def test_errors_bad_cu_seqlens():
    x = torch.zeros(6)
    for cu in ([0, 4, 2], [0, 7], [-1, 6]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            m2po_loss(x, x, x, cu_seqlens=cu, backend="torch")
    with pytest.raises(TypeError, match="cu_seqlens"):
        m2po_loss(x, x, x, cu_seqlens=torch.tensor([0.0, 6.0]), backend="torch")
    with pytest.raises(ValueError, match="cu_seqlens"):
        m2po_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), cu_seqlens=[0, 6], backend="torch")


@pytest.mark.parametrize("name", ["logprobs", "old_logprobs", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_valid_tokens_raise_by_default(name, bad):
    lp, olp, adv, mask = _ok(3, 4)
    args = dict(logprobs=lp, old_logprobs=olp, advantages=adv)
    args[name] = args[name].clone()
    args[name][1, 2] = bad
    for fn in (m2po_loss, m2po_mask):
        for variant in ("paper", "official"):
            with pytest.raises(ValueError, match=f"^{name}"):
                fn(args["logprobs"], args["old_logprobs"], args["advantages"], mask, variant=variant, backend="torch")


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("layout", ["2d", "packed_cu"])
def test_nonfinite_valid_tokens_with_validate_false_are_padding(layout, variant):
    for j in range(8):
        c = make_case(seed=4200 + j, layout=layout, per_seq=False, mask_kind="bool", dtype=torch.float32,
                      style=STYLES[j % 4], tau=[0.01, 0.04][j % 2], max_tokens=80)
        valid = c.valid_flat.reshape(c.lp.shape)
        if int(valid.sum()) < 3:
            continue
        idx = torch.nonzero(valid.reshape(-1)).reshape(-1)[:3]
        bad_vals = [float("nan"), float("inf"), -float("inf")]
        dirty = [x.clone().reshape(-1) for x in (c.lp, c.olp, c.adv)]
        for k, i in enumerate(idx.tolist()):
            dirty[k][i] = bad_vals[(j + k) % 3]  # one bad value per argument
        dirty = [x.reshape(c.lp.shape) for x in dirty]
        mask0 = valid.clone().reshape(-1)
        mask0[idx] = False
        mask0 = mask0.reshape(c.lp.shape)
        for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            kw = dict(tau=0.04, variant=variant, loss_agg_mode=mode, **c.kwargs())
            l1, g1, m1, k1 = run_loss(*dirty, valid, validate=False, **kw)
            l0, g0, m0, k0 = run_loss(*dirty, mask0, validate=True, **kw)
            assert torch.equal(k0, k1) and not k1.reshape(-1)[idx].any(), c.desc
            assert torch.equal(l0, l1), c.desc
            assert torch.equal(g0, g1), c.desc
            assert float(m1["num_nonfinite"]) == 3 and float(m0["num_nonfinite"]) == 0
            for key in m0:
                if key != "num_nonfinite":
                    assert torch.equal(m0[key], m1[key]), (key, c.desc)


# --------------------------------------------------------------------------------------------
# 6. empty and all-padding batches


EMPTY_INPUTS = {
    "0 tokens": (torch.zeros(0), dict(cu_seqlens=[0])),
    "0 tokens, no cu": (torch.zeros(0), {}),
    "(3,0)": (torch.zeros(3, 0), {}),
    "(0,4)": (torch.zeros(0, 4), {}),
    "all padding (2,5)": (torch.full((2, 5), float("nan")), {}),
    "all padding packed": (torch.full((7,), float("nan")), dict(cu_seqlens=[0, 3, 7])),
    "no sequence covers a token": (torch.full((4,), float("nan")), dict(cu_seqlens=[2, 2])),
}


@pytest.mark.parametrize("name", list(EMPTY_INPUTS))
@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("per_seq", [False, True])
def test_empty_and_all_padding(name, variant, per_seq):
    x, kw = EMPTY_INPUTS[name]
    if variant == "official" and x.dim() == 1 and "cu_seqlens" not in kw:
        pytest.skip("official needs cu_seqlens on 1-D input")
    mask = torch.zeros(x.shape, dtype=torch.bool)
    if per_seq:
        if x.dim() == 2:
            adv = torch.full((x.shape[0],), float("nan"))
        elif "cu_seqlens" in kw:
            adv = torch.full((len(kw["cu_seqlens"]) - 1,), float("nan"))
        else:
            pytest.skip("per-sequence advantages need sequences")
    else:
        adv = x.clone()
    modes = MODES if (x.dim() == 2 or "cu_seqlens" in kw) else ("token-mean",)
    for mode in modes:
        for tau in (0.0, 0.04, math.inf):
            loss, grad, metrics, keep = run_loss(x, x, adv, mask, tau=tau, variant=variant, loss_agg_mode=mode, **kw)
            assert loss.shape == () and float(loss) == 0.0, (mode, tau)
            assert grad.shape == x.shape and not grad.any() and torch.isfinite(grad).all()
            assert keep.shape == x.shape and keep.dtype == torch.bool and not keep.any()
            for key, v in metrics.items():
                assert v.shape == () and not torch.isnan(v), key
                if key == "cut":
                    assert float(v) == math.inf
                elif key == "clip_low":
                    assert float(v) == 0.0  # the authors' no-constraint bounds (0, 100000)
                elif key == "clip_high":
                    assert float(v) == 100000.0
                else:
                    assert float(v) == 0.0, key


# --------------------------------------------------------------------------------------------
# metrics: 0-d tensors on the input device, no host sync


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_metrics_are_0d_float32_on_the_input_device(variant):
    c = make_case(seed=77, layout="2d", per_seq=False, mask_kind="bool", dtype=torch.bfloat16, style="grid", tau=0.04)
    loss, grad, metrics, keep = run_loss(c.lp, c.olp, c.adv, c.mask, tau=0.04, variant=variant)
    expected = set(METRIC_KEYS) | ({"clip_low", "clip_high"} if variant == "official" else set())
    assert set(metrics) == expected
    for key, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.shape == () and v.dtype == torch.float32 and v.device == c.lp.device, key
    assert grad.dtype == torch.bfloat16 and grad.shape == c.lp.shape
    assert keep.dtype == torch.bool and keep.shape == c.lp.shape


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("mode", MODES)
def test_runs_on_meta_device_without_host_sync(variant, mode):
    # Any .item() / bool() on a meta tensor raises: with validate=False the whole reference path,
    # forward and backward, must stay on the device.
    meta = torch.device("meta")
    lp = torch.zeros(3, 5, device=meta, requires_grad=True)
    loss, metrics = m2po_loss(lp, torch.zeros(3, 5, device=meta), torch.zeros(3, device=meta), torch.ones(3, 5, device=meta),
                              tau=0.04, variant=variant, loss_agg_mode=mode, validate=False, backend="torch")
    loss.backward()
    assert loss.device == meta and lp.grad.device == meta
    assert all(v.device == meta and v.shape == () for v in metrics.values())
    p = torch.zeros(8, device=meta, requires_grad=True)
    loss, metrics = m2po_loss(p, torch.zeros(8, device=meta), torch.zeros(8, device=meta), cu_seqlens=torch.tensor([0, 3, 8], device=meta),
                              tau=0.04, variant=variant, loss_agg_mode=mode, validate=False, backend="torch")
    loss.backward()
    assert all(v.device == meta for v in metrics.values())


def test_num_tokens_tensor_on_another_device_is_named():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        m2po_loss(lp, lp, torch.ones(2), None, num_tokens=torch.tensor(6.0, device="meta"))
