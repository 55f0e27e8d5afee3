"""How the per-op test files call the library, and how they compare results.

- ``run_loss``: (loss, gradient, metrics, keep) of the torch backend on a fresh leaf.
- ``run`` / ``run_calls``: the same from either backend on the ``device`` fixture's device;
  ``run_calls`` makes one m2po_mask call and one m2po_loss call per set of loss-only arguments.
- ``assert_backends_agree``: the Triton backend against the torch backend (keep bit for bit,
  loss / gradient / metrics within rtol 1e-5).
- ``closed_form``, ``assert_close_rel``, ``packed_from_2d``: the paper loss written out, a
  relative comparison, and a right-padded batch packed with cu_seqlens.
"""

from __future__ import annotations

import numpy as np
import torch

from m2po_ops import m2po_loss, m2po_mask

LOSS_ONLY = ("loss_agg_mode", "num_tokens")


def run_loss(lp, olp, adv, mask=None, **kw):
    """(loss, grad w.r.t. logprobs, metrics, keep) from the torch backend on a fresh leaf."""
    leaf = lp.detach().clone().requires_grad_(True)
    kw.setdefault("backend", "torch")
    loss, metrics = m2po_loss(leaf, olp, adv, mask, **kw)
    loss.backward()
    mkw = {k: v for k, v in kw.items() if k not in LOSS_ONLY}
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


def packed_from_2d(lp, olp, adv, mask, lengths):
    """Pack row b's first lengths[b] tokens (mask beyond them must be 0)."""
    parts = lambda x: torch.cat([x[b, : lengths[b]] for b in range(x.shape[0])]) if x.shape[0] else x.reshape(-1)
    cu = [0] + list(np.cumsum(lengths))
    return parts(lp), parts(olp), parts(adv), parts(mask), [int(v) for v in cu]


def run_calls(backend, case_or_args, device, variant="paper", loss_extras=({},), **kw):
    """(keep, mask metrics, [(loss, grad, metrics) per entry of loss_extras]) of one backend: keep
    and its metrics from one m2po_mask call with ``kw``, then one m2po_loss call (and backward, on
    a fresh leaf) with ``kw`` plus each entry of ``loss_extras`` (loss-only arguments:
    loss_agg_mode, num_tokens)."""
    if hasattr(case_or_args, "lp"):
        c = case_or_args
        lp, olp, adv, mask, extra = c.lp, c.olp, c.adv, c.mask, c.kwargs()
    else:
        lp, olp, adv, mask = case_or_args
        extra = {}
    kw = {**extra, **kw}
    assert not set(kw) & set(LOSS_ONLY), "loss-only arguments go in loss_extras"
    lp, olp, adv = lp.to(device), olp.to(device), adv.to(device)
    mask = mask.to(device) if mask is not None else None

    def on_device(d):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}

    kw = on_device(kw)
    keep, mask_metrics = m2po_mask(lp, olp, adv, mask, variant=variant, backend=backend, **kw)
    out = []
    for loss_kw in loss_extras:
        leaf = lp.detach().clone().requires_grad_(True)
        loss, metrics = m2po_loss(leaf, olp, adv, mask, variant=variant, backend=backend, **kw, **on_device(loss_kw))
        loss.backward()
        out.append((loss.detach(), leaf.grad, metrics))
    return keep, mask_metrics, out


def run(backend, case_or_args, device, variant="paper", **kw):
    """(keep, loss, grad, metrics) of one backend: mask from m2po_mask, loss/grad from m2po_loss."""
    loss_kw = {k: v for k, v in kw.items() if k in LOSS_ONLY}
    mask_kw = {k: v for k, v in kw.items() if k not in LOSS_ONLY}
    keep, _, [(loss, grad, metrics)] = run_calls(backend, case_or_args, device, variant, [loss_kw], **mask_kw)
    return keep, loss, grad, metrics


def assert_backends_agree(case, variant, desc, device, rtol=1e-5, loss_extras=None, **kw):
    """The Triton backend's keep equals the torch backend's; loss, gradient and every metric of
    each m2po_loss call (``kw`` plus each entry of ``loss_extras``; by default the loss-only
    arguments in ``kw``) agree within rtol (half-precision gradients: one ulp of the half type).
    Returns the Triton backend's run_calls answer, for further checks without calling it again."""
    if loss_extras is None:
        loss_extras = [{k: v for k, v in kw.items() if k in LOSS_ONLY}]
        kw = {k: v for k, v in kw.items() if k not in LOSS_ONLY}
    k_ref, _, ref = run_calls("torch", case, device, variant, loss_extras, **kw)
    k_tri, mask_metrics_tri, tri = run_calls("triton", case, device, variant, loss_extras, **kw)
    assert torch.equal(k_ref, k_tri), f"keep differs at {(k_ref != k_tri).nonzero().flatten()[:8].tolist()}: {desc}"
    atol = 1e-7
    for loss_kw, (l_ref, g_ref, m_ref), (l_tri, g_tri, m_tri) in zip(loss_extras, ref, tri):
        what = f"{desc} {loss_kw}" if loss_kw else desc
        half = g_ref.dtype in (torch.bfloat16, torch.float16)
        torch.testing.assert_close(l_tri, l_ref, rtol=rtol, atol=atol, msg=lambda m: f"loss: {m} {what}")
        # half-precision gradients are rounded to the input dtype by the same torch op on both sides,
        # from float32 values that agree to ~1e-6: allow one ulp of the half type
        torch.testing.assert_close(
            g_tri.float(), g_ref.float(), rtol=1e-2 if half else rtol, atol=atol, msg=lambda m: f"grad: {m} {what}"
        )
        assert m_ref.keys() == m_tri.keys()
        for name in m_ref:
            assert m_tri[name].shape == () and m_tri[name].device == k_tri.device, name
            torch.testing.assert_close(
                m_tri[name], m_ref[name], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"metric {name}: {m} {what}"
            )
    return k_tri, mask_metrics_tri, tri
