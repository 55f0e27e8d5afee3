"""The loss and its gradient (m2po_loss), and the metrics it returns.

- The paper loss in float64 against its closed form, the overflow guard, gradcheck of both rules
  and every loss_agg_mode, verl's agg_loss formulas (tests/literal.py) for every mode, packed
  input equal to the 2-D batch, the empty sequence of seq-mean-token-mean, num_tokens and
  micro-batches that add up.
- The official rule's CPU host path against the general formula; the CPU path without numpy.
- The Triton backend's loss, gradient and metrics against the torch backend's in the
  sequence-level modes and with num_tokens; a fixed-up block's exact sum on both backends.
- The metrics: 0-d float32 tensors on the input device, brought to the host in one transfer.
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import literal
from calls import assert_backends_agree, assert_close_rel, closed_form, packed_from_2d, run, run_loss
from cases import (BACKENDS, LAYOUTS, MASK_KINDS, MODES, STYLES, TAUS, VARIANTS, batch_2d, case_param, make_case,
                   needs_triton)
from m2po_ops import m2po_loss, m2po_mask, metrics_to_host

METRIC_KEYS = ("m2", "m2_after", "masked_fraction", "trust_region_fraction", "kl", "ratio_mean", "ratio_max", "cut",
               "num_nonfinite", "input_error")


# --------------------------------------------------------------------------------------------
# Values and gradients against formulas written out


def _closed_form_cases():
    out = []
    for layout in LAYOUTS:
        for j in range(40):
            out.append(case_param(dict(
                seed=7000 + j, layout=layout, per_seq=layout != "packed" and j % 2 == 1, mask_kind=MASK_KINDS[j % 4],
                dtype=torch.float64, style=STYLES[j % 4], tau=TAUS[j % 5],
            )))
    return out


@pytest.mark.parametrize("spec", _closed_form_cases())
def test_loss_and_grad_closed_form_float64(spec):
    """float64 input: the loss and gradient are float64 and equal -(1/N_valid) sum keep r A and
    its derivative, on Algorithm 1's keep, within 1e-6."""
    c = make_case(**spec)
    expected, _ = literal.paper_keep(c.lp, c.olp, c.adv_flat, c.valid_flat, spec["tau"])
    loss, grad, _, _ = run_loss(c.lp, c.olp, c.adv, c.mask, tau=spec["tau"], **c.kwargs())
    want_loss, want_grad = closed_form(c, expected)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_close_rel(loss, want_loss, 1e-6, c.desc)
    assert_close_rel(grad, want_grad, 1e-6, c.desc)


def test_overflow_guard_clamps_delta_at_20():
    """delta beyond +-20 is clamped in the ratio: the loss, gradient and ratio_max stay finite."""
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
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant, mode):
    """torch.autograd.gradcheck of the loss, on data that masks something and whose mask (and
    clip decisions) finite differences cannot flip."""
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


def _agg_mode_params():
    out = []
    for variant in VARIANTS:
        for mode in MODES:
            for j in range(12):
                b, t = 2 + j % 4, 3 + (7 * j) % 13
                tau = [0.01, 0.04, math.inf][j % 3]
                out.append(pytest.param(mode, variant, j, id=f"{mode}-{variant}-seed{300 + j}-B{b}xT{t}-tau{tau:g}"))
    return out


@pytest.mark.parametrize("mode, variant, j", _agg_mode_params())
def test_loss_agg_modes_match_verl(mode, variant, j):
    """Each loss_agg_mode is verl's agg_loss of the rule's per-token losses (the paper rule on
    Algorithm 1's keep, the official rule on the authors' clip decisions), loss and gradient
    within 1e-6; the same rows packed with cu_seqlens give the same keep, loss and gradient."""
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
    p_lp, p_olp, p_adv, p_mask, cu = packed_from_2d(lp, olp, adv, mask, lengths)
    p_loss, p_grad, _, p_keep = run_loss(p_lp, p_olp, p_adv, p_mask, tau=tau, variant=variant, loss_agg_mode=mode, cu_seqlens=cu)
    assert torch.equal(p_keep, keep[mask])
    assert_close_rel(p_loss, loss, 1e-12, "packed")
    assert_close_rel(p_grad, grad[mask], 1e-12, "packed grad")


def test_seq_mean_token_mean_empty_sequence_counts_as_zero():
    """verl would give 0/0 = NaN for an empty row; the library's documented choice: it adds 0 but
    still counts in the number of sequences."""
    lp = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    olp = torch.zeros_like(lp)
    adv = torch.ones_like(lp)
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, _, _, _ = run_loss(lp, olp, adv, mask, tau=math.inf, loss_agg_mode="seq-mean-token-mean")
    want = -(math.exp(0.1) + math.exp(0.2)) / 2 / 2
    assert float(loss) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", [0.0, math.inf], ids=["tau0", "tauinf"])
def test_num_tokens_micro_batches_add_up(tau, variant):
    """With num_tokens = the whole batch's valid count (int, tensor, float), the micro-batches'
    losses add up to the single call's and their gradients concatenate to its gradient (tau = inf
    masks nothing and tau = 0 all of T in every micro-batch: the same cut); num_tokens is a plain
    override of the denominator."""
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


@needs_triton
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("tiny", [-1.5, 2.0**-24], ids=["tiny-1.5", "tiny-2e-24"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_fixed_up_block_sums_only_final_terms(variant, tiny, mode, device):
    """A block whose compacted list a fix-up redoes holds a masked (paper: r = e**20) or clipped
    (official: r = e**12, 1e5 under the unconstrained bounds) outlier with a huge old term, next
    to kept terms whose float64 sum is exact: the loss is the exact value, on both backends, not
    the small terms rounded through the old term's magnitude. The final terms are -1.5 (paper:
    token 7, A = 1.5 at r = 1; official: token 0 clipped at the solved 1.5), -tiny and -2**-40
    (tokens 5 and 6 at r = 1); the outlier's is 0 (paper, masked). Weighted per token (one
    sequence: each weight 1) as well as by the count."""
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


def _sequence_mode_cases():
    out = []
    for seed in range(50, 56):
        spec = dict(seed=seed, layout=["2d", "packed_cu"][seed % 2], per_seq=bool(seed % 3 == 0), mask_kind="bool",
                    dtype=torch.float32, style=["grid", "fine"][seed % 2], tau=0.04)
        out.append(case_param(spec))
    return out


@needs_triton
@pytest.mark.parametrize("spec", _sequence_mode_cases())
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_loss_equals_torch_in_the_sequence_modes(variant, spec, device):
    """seq-mean-token-sum, seq-mean-token-mean and seq-mean-token-sum-norm: the Triton backend's
    keep, loss, gradient and metrics are the torch backend's (rtol 1e-5), 2-D and packed, per-token
    and per-sequence advantages."""
    case = make_case(**spec)
    modes = ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
    assert_backends_agree(case, variant, case.desc, device, loss_extras=[dict(loss_agg_mode=m) for m in modes])


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_loss_equals_torch_with_num_tokens(variant, device):
    """num_tokens as a Python number and as a device tensor: the Triton backend's loss, gradient
    and metrics are the torch backend's (rtol 1e-5)."""
    case = make_case(seed=77, layout="2d", per_seq=False, mask_kind="int", dtype=torch.float32, style="fine", tau=0.04)
    assert_backends_agree(case, variant, case.desc, device,
                          loss_extras=[dict(num_tokens=123.0), dict(num_tokens=torch.tensor(321, device=device))])


# --------------------------------------------------------------------------------------------
# The CPU paths: the official host path, and no numpy


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


@pytest.mark.parametrize("variant", VARIANTS)
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


# --------------------------------------------------------------------------------------------
# Metrics: 0-d tensors on the input device, one transfer to the host


@pytest.mark.parametrize("variant", VARIANTS)
def test_metrics_are_0d_float32_on_the_input_device(variant):
    """The metric keys of each rule, each a 0-d float32 tensor on the input's device; the
    gradient has the input's dtype and shape, keep is a bool tensor of the input's shape."""
    c = make_case(seed=77, layout="2d", per_seq=False, mask_kind="bool", dtype=torch.bfloat16, style="grid", tau=0.04)
    loss, grad, metrics, keep = run_loss(c.lp, c.olp, c.adv, c.mask, tau=0.04, variant=variant)
    expected = set(METRIC_KEYS) | ({"clip_low", "clip_high"} if variant == "official" else set())
    assert set(metrics) == expected
    for key, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.shape == () and v.dtype == torch.float32 and v.device == c.lp.device, key
    assert grad.dtype == torch.bfloat16 and grad.shape == c.lp.shape
    assert keep.dtype == torch.bool and keep.shape == c.lp.shape


@contextlib.contextmanager
def count_host_reads():
    """Counts the tensor calls that bring device values to the host, from any caller."""
    names = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
    originals = {n: getattr(torch.Tensor, n) for n in names}
    calls = []

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for n, f in originals.items():
        setattr(torch.Tensor, n, counted(n, f))
    try:
        yield calls
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_come_to_the_host_in_one_transfer(backend, variant, device):
    """metrics_to_host makes one tolist() call (on CUDA: exactly one synchronising copy) and
    gives every metric as a Python float, in order; an empty dict gives an empty dict."""
    lp, olp, adv, mask = batch_2d(device)
    _, metrics = m2po_loss(lp, olp, adv, mask, variant=variant, backend=backend, validate=False)
    with count_host_reads() as calls:
        host = metrics_to_host(metrics)
    assert calls == ["tolist"]
    assert list(host) == list(metrics) and all(isinstance(v, float) for v in host.values())
    for k, v in metrics.items():
        assert host[k] == float(v) or (v != v and host[k] != host[k]), k
    if device.type == "cuda":  # the device agrees: exactly one synchronising copy
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with pytest.warns(UserWarning) as seen:
                metrics_to_host(metrics)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len([w for w in seen if "synchroniz" in str(w.message)]) == 1
    assert metrics_to_host({}) == {}
