"""What the ops accept, refuse and ignore.

- Argument errors: the exception type and the argument's name (shapes, dtypes, devices,
  hyperparameters, loss-only arguments, cu_seqlens, num_tokens, a cut applied with another tau,
  miniclip with the paper rule, a wrong group, mask values other than 0 / 1).
- validate=True raises on a non-finite valid token; validate=False treats it as padding and
  counts it, makes a bad cu_seqlens or num_tokens tensor give a NaN loss and say why in
  metrics["input_error"], and never reads a value on the host.
- Padding: garbage (NaN, inf) there changes nothing, a NaN mask entry is padding, empty and
  all-padding batches give 0 with finite zero gradients, a strided cu_seqlens reads alike.

Tests of an op both backends implement take ``backend`` (torch, triton) and the ``device`` fixture.
"""

from __future__ import annotations

import math

import pytest
import torch

from calls import assert_backends_agree, run_loss
from cases import (BACKENDS, DTYPES, MASK_KINDS, MODES, STYLES, VARIANTS, batch_2d, case_param, make_case, needs_triton,
                   regime_batch)
from m2po_ops import M2POStats, m2po_loss, m2po_mask


def _ok(b=2, t=3):
    return torch.zeros(b, t), torch.zeros(b, t), torch.zeros(b, t), torch.ones(b, t, dtype=torch.bool)


def _packed(device, n=60):
    g = torch.Generator().manual_seed(9)
    olp = -torch.rand(n, generator=g)
    lp, adv = olp + torch.randn(n, generator=g) * 0.3, torch.randn(n, generator=g)
    return [x.to(device) for x in (lp, olp, adv)]


# --------------------------------------------------------------------------------------------
# Argument errors: the exception type and the argument's name


@pytest.mark.parametrize("fn", [m2po_loss, m2po_mask], ids=["m2po_loss", "m2po_mask"])
def test_errors_shapes_dtypes_devices(fn):
    """Mismatched shapes, integer log-probs / advantages, a list, and a second device (simulated
    with 'meta') raise naming the argument."""
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


@pytest.mark.parametrize("fn", [m2po_loss, m2po_mask], ids=["m2po_loss", "m2po_mask"])
def test_errors_hyperparameters(fn):
    """A negative, NaN or tensor tau, an unknown variant or backend, a negative floor and a
    non-bool validate raise naming the argument."""
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
    """An unknown loss_agg_mode and a num_tokens that is not a positive finite count raise naming it."""
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


def test_num_tokens_tensor_on_another_device_is_named():
    """A num_tokens tensor on another device than the inputs raises naming num_tokens."""
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        m2po_loss(lp, lp, torch.ones(2), None, num_tokens=torch.tensor(6.0, device="meta"))


def test_errors_1d_without_cu_seqlens():
    """The sequence-level modes and the official rule need sequences: on 1-D input without
    cu_seqlens they raise naming cu_seqlens and the mode or rule; with cu_seqlens they run."""
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
    """A decreasing, out-of-range or float cu_seqlens, or one with 2-D input, raises naming it."""
    x = torch.zeros(6)
    for cu in ([0, 4, 2], [0, 7], [-1, 6]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            m2po_loss(x, x, x, cu_seqlens=cu, backend="torch")
    with pytest.raises(TypeError, match="cu_seqlens"):
        m2po_loss(x, x, x, cu_seqlens=torch.tensor([0.0, 6.0]), backend="torch")
    with pytest.raises(ValueError, match="cu_seqlens"):
        m2po_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), cu_seqlens=[0, 6], backend="torch")


@pytest.mark.parametrize("name", ["miniclip_low", "miniclip_high"])
def test_miniclip_with_the_paper_rule_raises(name):
    """The paper's rule has no clip: a floor passed with it would do nothing, so it raises (also
    in M2POStats); with the official rule it is fine."""
    lp, olp, adv, mask = batch_2d("cpu")
    for fn in (m2po_loss, m2po_mask):
        with pytest.raises(ValueError, match=name):
            fn(lp, olp, adv, mask, variant="paper", backend="torch", **{name: 0.3})
    with pytest.raises(ValueError, match=name):
        M2POStats(variant="paper", backend="torch", **{name: 0.3})
    m2po_loss(lp, olp, adv, mask, variant="official", backend="torch", **{name: 0.3})  # fine there


@pytest.mark.parametrize("bad", [42, "world", object()], ids=["int", "str", "object"])
def test_group_of_the_wrong_type_raises_naming_it(bad):
    """A group that is not a process group raises TypeError naming group (ops and M2POStats.solve)."""
    lp, olp, adv, mask = batch_2d("cpu")
    for fn in (m2po_loss, m2po_mask):
        with pytest.raises(TypeError, match="group"):
            fn(lp, olp, adv, mask, group=bad, backend="torch")
    stats = M2POStats(backend="torch")
    stats.update(lp, olp, adv, mask)
    with pytest.raises(TypeError, match="group"):
        stats.solve(group=bad)


@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_a_mask_value_other_than_0_or_1_raises(bad):
    """The mask says which tokens are valid; a fraction, a negative or a NaN is a mistake (a
    weight passed as a mask), not a validity."""
    lp, olp, adv, mask = batch_2d("cpu")
    fmask = mask.float()
    fmask[1, 3] = bad
    for fn in (m2po_loss, m2po_mask):
        with pytest.raises(ValueError, match="mask"):
            fn(lp, olp, adv, fmask, backend="torch")
    imask = mask.to(torch.int64)
    imask[0, 0] = 2
    with pytest.raises(ValueError, match="mask"):
        m2po_mask(lp, olp, adv, imask, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cut_carries_its_tau(backend, device):
    """A cut solved at one tau and applied with another would mask by the wrong budget: the call
    raises; leaving tau unset takes the cut's."""
    lp, olp, adv, mask = batch_2d(device)
    for variant in ("paper", "official"):
        stats = M2POStats(tau=0.01, variant=variant, backend=backend)
        stats.update(lp, olp, adv, mask)
        (cut,) = stats.solve()
        assert cut.tau == 0.01 and cut.variant == variant
        with pytest.raises(ValueError, match="tau"):
            m2po_mask(lp, olp, adv, mask, variant=variant, cut=cut, tau=0.04, backend=backend)
        keep_cut, _ = m2po_mask(lp, olp, adv, mask, variant=variant, cut=cut, tau=None, backend=backend)
        keep_one, _ = m2po_mask(lp, olp, adv, mask, variant=variant, tau=0.01, backend=backend)
        assert torch.equal(keep_cut, keep_one)
        with pytest.raises(ValueError, match="tau"):
            m2po_loss(lp, olp, adv, mask, variant=variant, cut=cut, tau=0.04, backend=backend)
        m2po_loss(lp, olp, adv, mask, variant=variant, cut=cut, tau=0.01, backend=backend)  # the same tau is fine
    # no cut: tau=None is the paper's 0.04
    _, m_none = m2po_mask(lp, olp, adv, mask, backend=backend)
    _, m_004 = m2po_mask(lp, olp, adv, mask, tau=0.04, backend=backend)
    assert torch.equal(m_none["cut"], m_004["cut"])


# --------------------------------------------------------------------------------------------
# Non-finite valid tokens: validate=True raises, validate=False makes them padding


@pytest.mark.parametrize("name", ["logprobs", "old_logprobs", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_valid_tokens_raise_by_default(name, bad):
    """A NaN or infinite valid token raises ValueError naming the argument, on both ops and rules."""
    lp, olp, adv, mask = _ok(3, 4)
    args = dict(logprobs=lp, old_logprobs=olp, advantages=adv)
    args[name] = args[name].clone()
    args[name][1, 2] = bad
    for fn in (m2po_loss, m2po_mask):
        for variant in ("paper", "official"):
            with pytest.raises(ValueError, match=f"^{name}"):
                fn(args["logprobs"], args["old_logprobs"], args["advantages"], mask, variant=variant, backend="torch")


def _nonfinite_cases():
    """Seeded cases (2-D and packed with cu_seqlens) with at least 3 valid tokens to poison."""
    out = []
    for layout in ("2d", "packed_cu"):
        for j in range(8):
            spec = dict(seed=4200 + j, layout=layout, per_seq=False, mask_kind="bool", dtype=torch.float32,
                        style=STYLES[j % 4], tau=[0.01, 0.04][j % 2], max_tokens=80)
            if int(make_case(**spec).valid_flat.sum()) >= 3:
                out.append(case_param(spec, j))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spec, j", _nonfinite_cases())
def test_nonfinite_valid_tokens_with_validate_false_are_padding(spec, j, variant):
    """With validate=False, a NaN / inf / -inf in three valid tokens (one per argument) gives the
    keep, loss, gradient and metrics of the same call with those tokens masked out, in every
    loss_agg_mode, and num_nonfinite counts them."""
    c = make_case(**spec)
    valid = c.valid_flat.reshape(c.lp.shape)
    idx = torch.nonzero(valid.reshape(-1)).reshape(-1)[:3]
    bad_vals = [float("nan"), float("inf"), -float("inf")]
    dirty = [x.clone().reshape(-1) for x in (c.lp, c.olp, c.adv)]
    for k, i in enumerate(idx.tolist()):
        dirty[k][i] = bad_vals[(j + k) % 3]  # one bad value per argument
    dirty = [x.reshape(c.lp.shape) for x in dirty]
    mask0 = valid.clone().reshape(-1)
    mask0[idx] = False
    mask0 = mask0.reshape(c.lp.shape)
    for mode in MODES:
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


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.bfloat16, None],
                         ids=["mask-bool", "mask-int32", "mask-bf16", "no-mask"])
def test_garbage_padding_and_nonfinite_valid_tokens(variant, mask_dtype, device):
    """The kernels decide validity themselves (mask of any dtype, finiteness with validate=False):
    NaN/inf in padding changes nothing; in valid tokens they act as padding and are counted, as
    on the torch backend."""
    lp, olp, adv, mask = (x.reshape(20, 150) for x in regime_batch("some", n=3000, seed=5))
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
    # (the Triton backend's m2po_mask call, with validate=False, is the one the comparison made)
    _, metrics, _ = assert_backends_agree((lp, olp, adv, m), variant, f"mask={mask_dtype}", device, validate=False)
    assert float(metrics["num_nonfinite"]) == int(bad.sum())


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_values_beyond_float32_range_are_finite(variant, device):
    """Finiteness is decided on the float64 value, not after the cast to float32 (both backends)."""
    lp = torch.tensor([[-1.0, -1e39, -2.0]], dtype=torch.float64, device=device)
    olp = torch.tensor([[-1.5, -1e39, -2.5]], dtype=torch.float64, device=device)
    adv = torch.ones(1, 3, dtype=torch.float64, device=device)
    k_ref, m_ref = m2po_mask(lp, olp, adv, variant=variant, backend="torch")
    k_tri, m_tri = m2po_mask(lp, olp, adv, variant=variant, backend="triton")
    assert torch.equal(k_ref, k_tri)
    assert float(m_ref["num_nonfinite"]) == float(m_tri["num_nonfinite"]) == 0.0


# --------------------------------------------------------------------------------------------
# validate=False: bad tensors give NaN and say why; nothing is read on the host

BAD_INPUTS = [
    pytest.param(dict(cu_seqlens=[0, 30, 20, 60]), 1.0, id="cu-decreasing"),
    pytest.param(dict(cu_seqlens=[0, 30, 61]), 1.0, id="cu-past-the-end"),
    pytest.param(dict(cu_seqlens=[-1, 30, 60]), 1.0, id="cu-negative"),
    pytest.param(dict(cu_seqlens=[-65, 30, 60]), 1.0, id="cu-below-minus-N"),  # must not index out of range
    pytest.param(dict(cu_seqlens=[70, 80]), 1.0, id="cu-past-the-end-no-valid-token"),
    pytest.param(dict(cu_seqlens=[0, 30, 60], num_tokens=float("inf")), 2.0, id="num_tokens-inf"),
    pytest.param(dict(cu_seqlens=[0, 30, 60], num_tokens=-5.0), 2.0, id="num_tokens-negative"),
    pytest.param(dict(cu_seqlens=[0, 30, 60], num_tokens=float("nan")), 2.0, id="num_tokens-nan"),
    pytest.param(dict(cu_seqlens=[0, 30, 61], num_tokens=-1), 3.0, id="cu-and-num_tokens"),
    pytest.param(dict(cu_seqlens=[0, 30, 60], num_tokens=45.0), 0.0, id="good"),
]
# the cu_seqlens of the cases above, each once: what m2po_mask (no num_tokens) reports for it
BAD_CU_SEQLENS = [
    pytest.param([0, 30, 20, 60], 1.0, id="cu-decreasing"),
    pytest.param([0, 30, 61], 1.0, id="cu-past-the-end"),
    pytest.param([-1, 30, 60], 1.0, id="cu-negative"),
    pytest.param([-65, 30, 60], 1.0, id="cu-below-minus-N"),
    pytest.param([70, 80], 1.0, id="cu-past-the-end-no-valid-token"),
    pytest.param([0, 30, 60], 0.0, id="good"),
]


@pytest.mark.parametrize("bad, code", BAD_INPUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_with_validate_false_bad_inputs_give_nan_and_say_why(backend, variant, bad, code, device):
    """validate=False cannot raise without a host read: a decreasing or out-of-range cu_seqlens
    tensor, or a tensor num_tokens <= 0, make loss and gradient NaN, and metrics["input_error"]
    says which (1: cu_seqlens, 2: num_tokens, 3: both). Good inputs report 0."""
    lp, olp, adv = _packed(device)
    kw = {k: torch.tensor(v).to(device) for k, v in bad.items()}
    leaf = lp.clone().requires_grad_(True)
    loss, metrics = m2po_loss(leaf, olp, adv, variant=variant, backend=backend, validate=False, **kw)
    loss.backward()
    assert float(metrics["input_error"]) == code, kw
    no_valid_token = int(kw["cu_seqlens"][0]) >= lp.numel()
    if code:
        assert torch.isnan(loss), kw  # even with no valid token to carry it
        assert torch.isnan(leaf.grad).any() or no_valid_token, kw
    else:
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all(), kw


@pytest.mark.parametrize("cu, code", BAD_CU_SEQLENS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_with_validate_false_a_bad_cu_seqlens_is_reported_by_the_mask(backend, variant, cu, code, device):
    """m2po_mask with validate=False reports a decreasing or out-of-range cu_seqlens tensor in
    metrics["input_error"] (1), a good one as 0."""
    lp, olp, adv = _packed(device)
    _, m = m2po_mask(lp, olp, adv, variant=variant, backend=backend, validate=False,
                     cu_seqlens=torch.tensor(cu).to(device))
    assert float(m["input_error"]) == code, cu


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_cu_seqlens_and_num_tokens_raise_with_validate_or_as_host_values(backend, device):
    """With validate=True a bad cu_seqlens or num_tokens tensor raises naming it, and host lists
    are checked whatever validate says."""
    lp, olp, adv = _packed(device)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m2po_loss(lp, olp, adv, cu_seqlens=torch.tensor([0, 30, 20, 60]).to(device), backend=backend)
    with pytest.raises(ValueError, match="num_tokens"):
        m2po_loss(lp, olp, adv, cu_seqlens=[0, 60], num_tokens=torch.tensor(-5.0).to(device), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m2po_loss(lp, olp, adv, cu_seqlens=[0, 30, 20, 60], backend=backend, validate=False)
    with pytest.raises(ValueError, match="num_tokens"):
        m2po_loss(lp, olp, adv, cu_seqlens=[0, 60], num_tokens=torch.tensor(float("inf")).to(device), backend=backend)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_runs_on_meta_device_without_host_sync(variant, mode):
    """Any .item() / bool() on a meta tensor raises: with validate=False the whole reference path,
    forward and backward, 2-D and packed, must stay on the device."""
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


# --------------------------------------------------------------------------------------------
# Padding: garbage there changes nothing; NaN mask entries; empty and all-padding batches


def _fill_padding(x, pad, values, seed):
    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, len(values), x.shape, generator=g)
    garbage = torch.tensor(values, dtype=x.dtype)[choice]
    return torch.where(pad, garbage, x)


def _padding_cases():
    """Seeded cases with some padding; the official rule needs sequences (not plain packed input)."""
    out = []
    for layout in ("2d", "packed", "packed_cu"):
        for j in range(24):
            spec = dict(seed=9000 + j, layout=layout, per_seq=False, mask_kind=MASK_KINDS[j % 3], dtype=DTYPES[j % 3],
                        style=STYLES[j % 4], tau=[0.0, 0.01, 0.04, 1.0][j % 4], max_tokens=120)
            if not (~make_case(**spec).valid_flat).any():
                continue
            for variant in ("paper",) if layout == "packed" else VARIANTS:
                out.append(case_param(spec, j, variant, suffix=f"-{variant}"))
    return out


PADDING_CASES = _padding_cases()


def test_the_padding_cases_have_enough_padded_batches():
    """At least 10 padded batches per layout and rule (what the garbage test below runs on)."""
    per = {}
    for p in PADDING_CASES:
        spec, _, variant = p.values
        per[(spec["layout"], variant)] = per.get((spec["layout"], variant), 0) + 1
    assert set(per) == {("2d", "paper"), ("2d", "official"), ("packed", "paper"), ("packed_cu", "paper"),
                        ("packed_cu", "official")}, per
    assert all(n >= 10 for n in per.values()), per


@pytest.mark.parametrize("spec, j, variant", PADDING_CASES)
def test_padding_garbage_is_ignored(spec, j, variant):
    """NaN / inf / -inf in every padding token of log-probs, old log-probs and advantages give the
    keep, loss, gradient and metrics of zeros there (token-mean; seq-mean-token-mean where there are
    sequences), all finite."""
    garbage = [float("nan"), float("inf"), float("-inf")]
    c = make_case(**spec)
    pad = ~c.valid_flat.reshape(c.lp.shape)
    zeros = [torch.where(pad, torch.zeros((), dtype=x.dtype), x) for x in (c.lp, c.olp, c.adv)]
    dirty = [_fill_padding(x, pad, garbage, 10 * j + k) for k, x in enumerate((c.lp, c.olp, c.adv))]
    for mode in ("token-mean", "seq-mean-token-mean") if c.cu is not None or spec["layout"] == "2d" else ("token-mean",):
        kw = dict(tau=spec["tau"], variant=variant, loss_agg_mode=mode, **c.kwargs())
        l0, g0, m0, k0 = run_loss(*zeros, c.mask, **kw)
        l1, g1, m1, k1 = run_loss(*dirty, c.mask, **kw)
        assert torch.equal(k0, k1), c.desc
        assert torch.equal(l0, l1), c.desc
        assert torch.equal(g0, g1), c.desc
        assert set(m0) == set(m1)
        for key in m0:
            assert torch.equal(m0[key], m1[key]), (key, c.desc)
        assert torch.isfinite(l1) and torch.isfinite(g1).all(), c.desc


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_garbage_in_the_first_position_of_a_row(variant, bad):
    """Left padding: position 0 of row 1 is padding holding NaN or inf. The official rule reads the
    advantage of the row's first valid token (position 1 here), so garbage in the padding
    changes nothing. The paper rule does not read it at all."""
    lp = torch.tensor([[0.3, 0.2, 0.1, 0.5], [0.0, 0.4, 0.3, 0.2]])
    olp = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    dirty = [x.clone() for x in (lp, olp, adv)]
    for x in dirty:
        x[1, 0] = bad
    l0, g0, m0, k0 = run_loss(lp, olp, adv, mask, tau=0.01, variant=variant)
    l1, g1, m1, k1 = run_loss(*dirty, mask, tau=0.01, variant=variant)
    assert torch.equal(k0, k1) and torch.equal(l0, l1) and torch.equal(g0, g1), (variant, bad)
    for key in m0:
        assert torch.equal(m0[key], m1[key]), (variant, bad, key)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_mask_entry_is_padding(backend, variant, device):
    """With validate=False a NaN in a float mask is padding (not a valid token), exactly as a 0."""
    lp, olp, adv, mask = batch_2d(device)
    fmask = mask.float()
    nan_at = torch.zeros_like(mask)
    nan_at[0, :7] = True
    nan_at[2, 10:30] = True
    fmask = torch.where(nan_at, torch.full_like(fmask, float("nan")), fmask)
    zero = torch.where(nan_at, torch.zeros_like(fmask), fmask)
    kw = dict(variant=variant, backend=backend, validate=False, tau=0.01)
    k_nan, m_nan = m2po_mask(lp, olp, adv, fmask, **kw)
    k_zero, m_zero = m2po_mask(lp, olp, adv, zero, **kw)
    assert torch.equal(k_nan, k_zero) and not k_nan[nan_at].any()
    for name in m_zero:
        assert torch.equal(m_nan[name], m_zero[name]), name
    assert float(m_zero["masked_fraction"]) > 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_cu_seqlens_tensor_reads_like_a_contiguous_one(backend, variant, device):
    """A cu_seqlens tensor that is a strided view gives the keep and trust region of its contiguous copy."""
    lp, olp, adv = _packed(device)
    mask = torch.rand(60, generator=torch.Generator().manual_seed(1)) < 0.8
    strided = torch.tensor([0, 7, 30, 7, 60], device=device)[::2]
    kw = dict(variant=variant, validate=False, tau=0.01)
    k_s, m_s = m2po_mask(lp, olp, adv, mask.to(device), cu_seqlens=strided, backend=backend, **kw)
    k_c, m_c = m2po_mask(lp, olp, adv, mask.to(device), cu_seqlens=strided.contiguous(), backend=backend, **kw)
    assert torch.equal(k_s, k_c) and torch.equal(m_s["trust_region_fraction"], m_c["trust_region_fraction"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_padding_step_with_a_zero_count_is_not_an_error(backend, device):
    """A micro-batch with no valid token, given num_tokens = the step's valid count 0 (an empty
    step): loss 0, zero gradient, no input_error, on both backends."""
    lp, olp, adv = _packed(device)
    leaf = lp.clone().requires_grad_(True)
    mask = torch.zeros(60, dtype=torch.bool, device=device)
    loss, m = m2po_loss(leaf, olp, adv, mask, cu_seqlens=torch.tensor([0, 60], device=device), backend=backend,
                        validate=False, num_tokens=torch.tensor(0, device=device))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(m["input_error"]) == 0.0 and not leaf.grad.any()


EMPTY_INPUTS = {
    "N0-cu": (torch.zeros(0), dict(cu_seqlens=[0])),
    "N0": (torch.zeros(0), {}),
    "B3xT0": (torch.zeros(3, 0), {}),
    "B0xT4": (torch.zeros(0, 4), {}),
    "all-padding-B2xT5": (torch.full((2, 5), float("nan")), {}),
    "all-padding-N7-S2": (torch.full((7,), float("nan")), dict(cu_seqlens=[0, 3, 7])),
    "no-sequence-covers-a-token-N4": (torch.full((4,), float("nan")), dict(cu_seqlens=[2, 2])),
}


@pytest.mark.parametrize("name", list(EMPTY_INPUTS))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("per_seq", [False, True], ids=["per-token", "per-seq"])
def test_empty_and_all_padding(name, variant, per_seq):
    """No token, or no valid one: loss 0, a finite zero gradient, nothing kept, every metric 0
    (cut inf, the official no-constraint bounds 0 and 100000), in every mode and at tau 0, 0.04, inf."""
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
