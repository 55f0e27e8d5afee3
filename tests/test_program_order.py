"""The fused kernels give the same results whatever order their programs run in.

The interpreter runs a launch's programs one after another in index order; a GPU runs them
concurrently in no fixed order, so the program that finishes a chunked pass (the last to
arrive: select1, select2, tie_scan, finalize) can be any of them. Here the interpreter's grid
order is reversed or shuffled, with chunk sizes that give every chunked pass several programs
(4 per select kernel, 3 for tie_scan and finalize), and the results must equal those of index order
bit for bit (loss, gradient, metrics) and agree with the PyTorch backend (masked count, which
tokens get a zero gradient, loss and gradient values).
"""

import os
import random

import pytest
import torch

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="program order is the GPU's own (this permutes the interpreter's)")

from m2po_ops import radix_select, m2po_loss  # noqa: E402
from m2po_ops import triton_backend as tb  # noqa: E402
from m2po_ops.kernels import common  # noqa: E402

SHAPE = (6, 1000)  # 6 blocks of 1,024 tokens: 3 tie_scan and 3 finalize programs at chunk 2


@pytest.fixture(autouse=True)
def _many_programs(monkeypatch):
    # 4 programs per select kernel (the GPU runs 32 and 128; the hand-off is the same, and the
    # interpreter pays per program)
    monkeypatch.setattr(tb, "SELECT1_CHUNK", radix_select.L1_BUCKETS // 4)
    monkeypatch.setattr(tb, "SELECT2_CHUNK", radix_select.L2_BUCKETS // 4)
    monkeypatch.setattr(tb, "TIE_CHUNK", 2)
    monkeypatch.setattr(tb, "FINAL_CHUNK", 2)
    monkeypatch.setattr(common, "INTERP_AGGREGATE", triton.language.constexpr(False))  # the GPU's paths


def _permuted(monkeypatch, order: str, seed: int = 0):
    """Run every launch's programs (grid axis 0) in ``order``: "reverse" or "shuffle"."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    rng = random.Random(seed)

    def set_grid_dim(self, nx, ny, nz):
        set_dim(self, nx, ny, nz)
        perm = list(range(nx))
        if order == "reverse":
            perm.reverse()
        else:
            rng.shuffle(perm)
        self._program_order = perm

    def set_grid_idx(self, x, y, z):
        set_idx(self, self._program_order[x], y, z)

    monkeypatch.setattr(builder, "set_grid_dim", set_grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)


def _batch(regime: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    olp = -torch.rand(SHAPE, generator=g) * 3
    if regime == "ties":  # a coarse grid: runs of equal m2 across blocks, ties at the cut
        delta = torch.randint(-2, 3, SHAPE, generator=g).float() * 0.25
    else:  # a few large log ratios: something is cut
        delta = torch.randn(SHAPE, generator=g) * 0.1
        delta[torch.rand(SHAPE, generator=g) < 0.05] *= 20
    adv = torch.randn(SHAPE, generator=g)
    mask = torch.rand(SHAPE, generator=g) < 0.9
    return olp + delta, olp, adv, mask


def _run(batch, variant, backend):
    lp, olp, adv, mask = batch
    leaf = lp.clone().requires_grad_(True)
    loss, metrics = m2po_loss(leaf, olp, adv, mask, variant=variant, backend=backend, validate=False)
    loss.backward()
    return loss.detach(), leaf.grad, {k: v.clone() for k, v in metrics.items()}


@pytest.mark.parametrize("variant,regime,order", [
    pytest.param("paper", "ties", "reverse", id="paper-ties-reverse"),
    pytest.param("paper", "tail", "shuffle", id="paper-tail-shuffle"),
    pytest.param("official", "ties", "shuffle", id="official-ties-shuffle"),
    pytest.param("official", "tail", "reverse", id="official-tail-reverse"),
])
def test_results_do_not_depend_on_program_order(variant, regime, order, monkeypatch):
    batch = _batch(regime, seed=7)
    in_order = _run(batch, variant, "triton")
    with monkeypatch.context() as m:
        _permuted(m, order, seed=3)
        permuted = _run(batch, variant, "triton")
    loss, grad, metrics = permuted
    assert torch.equal(loss, in_order[0])
    assert torch.equal(grad, in_order[1])
    for name, value in metrics.items():
        same = torch.equal(value, in_order[2][name]) or bool(value.isnan() & in_order[2][name].isnan())
        assert same, name
    assert 0 < float(metrics["masked_fraction"]) < 0.5  # something was cut: every pass did work
    # and the mask is the rule's: the masked count and the gradient's zeros are the PyTorch backend's
    ref_loss, ref_grad, ref_metrics = _run(batch, variant, "torch")
    assert float(metrics["masked_fraction"]) == float(ref_metrics["masked_fraction"])
    assert torch.equal(grad == 0, ref_grad == 0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
