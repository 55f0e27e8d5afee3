"""Calls a trainer may make by mistake: each raises naming the argument, or gives an unmistakable
signal, never a silently wrong result.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import m2po_ops
from m2po_ops import M2POStats, m2po_loss, m2po_mask, metrics_to_host

BACKENDS = ("torch", "triton")


def _batch(device, b=4, t=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    olp = -torch.rand(b, t, generator=g) * 3
    lp = olp + torch.randn(b, t, generator=g) * 0.4
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.9
    return tuple(x.to(device) for x in (lp, olp, adv, mask))


@pytest.mark.parametrize("name", ["miniclip_low", "miniclip_high"])
def test_miniclip_with_the_paper_rule_raises(name):
    """The paper's rule has no clip: a floor passed with it would do nothing."""
    lp, olp, adv, mask = _batch("cpu")
    for fn in (m2po_loss, m2po_mask):
        with pytest.raises(ValueError, match=name):
            fn(lp, olp, adv, mask, variant="paper", backend="torch", **{name: 0.3})
    with pytest.raises(ValueError, match=name):
        M2POStats(variant="paper", backend="torch", **{name: 0.3})
    m2po_loss(lp, olp, adv, mask, variant="official", backend="torch", **{name: 0.3})  # fine there


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cut_carries_its_tau(backend, device):
    """A cut solved at one tau and applied with another would mask by the wrong budget: the call
    raises; leaving tau unset takes the cut's."""
    lp, olp, adv, mask = _batch(device)
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


@pytest.mark.parametrize("bad", [42, "world", object()])
def test_group_of_the_wrong_type_raises_naming_it(bad):
    lp, olp, adv, mask = _batch("cpu")
    for fn in (m2po_loss, m2po_mask):
        with pytest.raises(TypeError, match="group"):
            fn(lp, olp, adv, mask, group=bad, backend="torch")
    stats = M2POStats(backend="torch")
    stats.update(lp, olp, adv, mask)
    with pytest.raises(TypeError, match="group"):
        stats.solve(group=bad)


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


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_metrics_come_to_the_host_in_one_transfer(variant, device):
    lp, olp, adv, mask = _batch(device)
    _, metrics = m2po_loss(lp, olp, adv, mask, variant=variant, backend="triton", validate=False)
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
    assert m2po_ops.metrics_to_host({}) == {}


@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_a_mask_value_other_than_0_or_1_raises(bad):
    """The mask says which tokens are valid; a fraction, a negative or a NaN is a mistake (a
    weight passed as a mask), not a validity."""
    lp, olp, adv, mask = _batch("cpu")
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
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_nan_mask_entry_is_padding(backend, variant, device):
    """With validate=False a NaN in a float mask is padding (not a valid token), exactly as a 0."""
    lp, olp, adv, mask = _batch(device)
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


def _left_pad(x, lengths, fill):
    """Row b's first lengths[b] entries moved to the end of the row (left padding)."""
    out = torch.full_like(x, fill)
    t = x.shape[1]
    for b, n in enumerate(lengths):
        out[b, t - n:] = x[b, :n]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_reads_each_sequences_first_valid_token(backend, device):
    """The official rule takes each sequence's advantage from its first valid token: a
    left-padded batch gives the same mask, loss and metrics as the same sequences right-padded,
    and a packed sequence whose first token is masked out reads its second."""
    g = torch.Generator().manual_seed(3)
    b, t = 6, 40
    lengths = [40, 31, 12, 25, 1, 38]
    olp = -torch.rand(b, t, generator=g) * 2
    lp = olp + torch.randn(b, t, generator=g) * 0.3
    adv = torch.randn(b, t, generator=g)  # per token: the first token's value decides
    right = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    args_r = [x.to(device) for x in (lp, olp, adv, right)]
    args_l = [_left_pad(x, lengths, f).to(device) for x, f in ((lp, 0.0), (olp, 0.0), (adv, 7.0), (right, False))]
    kw = dict(variant="official", tau=0.01, backend=backend, validate=False)
    k_r, m_r = m2po_mask(*args_r, **kw)
    k_l, m_l = m2po_mask(*args_l, **kw)
    assert torch.equal(_left_pad(k_r.cpu(), lengths, False), k_l.cpu())
    for name in ("trust_region_fraction", "masked_fraction", "clip_low", "clip_high"):
        assert torch.equal(m_r[name], m_l[name]), name
    assert float(m_r["masked_fraction"]) > 0
    # packed: sequence 1's first token is masked out, its second token's advantage decides
    lp1, olp1 = torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.zeros(4)
    adv1 = torch.tensor([1.0, -1.0, 1.0, 1.0])
    mask1 = torch.tensor([True, False, True, True])
    cu = torch.tensor([0, 1, 4])
    _, m = m2po_mask(*(x.to(device) for x in (lp1, olp1, adv1, mask1)), cu_seqlens=cu.to(device), **kw)
    # sequence 0 (A = 1, r > 1): eligible; sequence 1 reads A = 1 (token 2), both its tokens eligible
    assert float(m["trust_region_fraction"]) == 1.0


def _packed(device, n=60):
    g = torch.Generator().manual_seed(9)
    olp = -torch.rand(n, generator=g)
    lp, adv = olp + torch.randn(n, generator=g) * 0.3, torch.randn(n, generator=g)
    return [x.to(device) for x in (lp, olp, adv)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_with_validate_false_bad_inputs_give_nan_and_say_why(backend, variant, device):
    """validate=False cannot raise without a host read: a decreasing or out-of-range cu_seqlens
    tensor, or a tensor num_tokens <= 0, make loss and gradient NaN, and metrics["input_error"]
    says which (1: cu_seqlens, 2: num_tokens). Good inputs report 0."""
    lp, olp, adv = _packed(device)
    cases = [
        (dict(cu_seqlens=torch.tensor([0, 30, 20, 60])), 1.0),  # decreasing
        (dict(cu_seqlens=torch.tensor([0, 30, 61])), 1.0),  # past the end
        (dict(cu_seqlens=torch.tensor([-1, 30, 60])), 1.0),  # negative
        (dict(cu_seqlens=torch.tensor([-65, 30, 60])), 1.0),  # below -N: must not index out of range
        (dict(cu_seqlens=torch.tensor([70, 80])), 1.0),  # past the end: no valid token at all
        (dict(cu_seqlens=torch.tensor([0, 30, 60]), num_tokens=torch.tensor(float("inf"))), 2.0),
        (dict(cu_seqlens=torch.tensor([0, 30, 60]), num_tokens=torch.tensor(-5.0)), 2.0),
        (dict(cu_seqlens=torch.tensor([0, 30, 60]), num_tokens=torch.tensor(float("nan"))), 2.0),
        (dict(cu_seqlens=torch.tensor([0, 30, 61]), num_tokens=torch.tensor(-1)), 3.0),
        (dict(cu_seqlens=torch.tensor([0, 30, 60]), num_tokens=torch.tensor(45.0)), 0.0),  # good
    ]
    for kw, code in cases:
        kw = {k: v.to(device) for k, v in kw.items()}
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
        mask_kw = {k: v for k, v in kw.items() if k != "num_tokens"}
        _, m = m2po_mask(lp, olp, adv, variant=variant, backend=backend, validate=False, **mask_kw)
        assert float(m["input_error"]) == float(int(code) & 1), kw
    # with validate=True they raise, and host lists are checked whatever validate says
    with pytest.raises(ValueError, match="cu_seqlens"):
        m2po_loss(lp, olp, adv, cu_seqlens=torch.tensor([0, 30, 20, 60]).to(device), backend=backend)
    with pytest.raises(ValueError, match="num_tokens"):
        m2po_loss(lp, olp, adv, cu_seqlens=[0, 60], num_tokens=torch.tensor(-5.0).to(device), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m2po_loss(lp, olp, adv, cu_seqlens=[0, 30, 20, 60], backend=backend, validate=False)
    with pytest.raises(ValueError, match="num_tokens"):
        m2po_loss(lp, olp, adv, cu_seqlens=[0, 60], num_tokens=torch.tensor(float("inf")).to(device), backend=backend)


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


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_a_strided_cu_seqlens_tensor_reads_like_a_contiguous_one(variant, device):
    lp, olp, adv = _packed(device)
    mask = torch.rand(60, generator=torch.Generator().manual_seed(1)) < 0.8
    strided = torch.tensor([0, 7, 30, 7, 60], device=device)[::2]
    kw = dict(variant=variant, validate=False, tau=0.01)
    for backend in BACKENDS:
        k_s, m_s = m2po_mask(lp, olp, adv, mask.to(device), cu_seqlens=strided, backend=backend, **kw)
        k_c, m_c = m2po_mask(lp, olp, adv, mask.to(device), cu_seqlens=strided.contiguous(), backend=backend, **kw)
        assert torch.equal(k_s, k_c) and torch.equal(m_s["trust_region_fraction"], m_c["trust_region_fraction"])


def test_a_float64_first_advantage_beyond_float32_range_is_read_alike(device):
    """The official rule's first valid advantage keeps its dtype on the scan path: a float64 value
    beyond float32 range is the same (eligible) sign on both backends."""
    lp = torch.tensor([[0.0, 0.5, 0.4, 0.3]], dtype=torch.float64, device=device)
    olp = torch.zeros_like(lp)
    adv = torch.tensor([[0.0, 1e39, 1e39, 1e39]], dtype=torch.float64, device=device)
    mask = torch.tensor([[False, True, True, True]], device=device)
    fr = [float(m2po_mask(lp, olp, adv, mask, variant="official", backend=b, validate=False)[1]["trust_region_fraction"])
          for b in BACKENDS]
    assert fr == [1.0, 1.0]
