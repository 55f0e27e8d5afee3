"""What only the fused Triton backend has: its launches, its kernels' partial sums, its early
exit, its wide-tail fix-up, its scratch reuse, no host synchronisation, CUDA-graph capture, no
PyTorch compute ops beside the kernels, and (on a GPU: FMA contraction, libdevice) the official
bounds, keep, loss and gradient bit for bit with the torch backend.

The ops both backends implement are tested per op, with the backend as a parameter:
tests/test_mask.py, tests/test_loss.py, tests/test_inputs.py.

Every test that runs the Triton backend takes the ``device`` fixture (conftest.py): the GPU when
there is one, else the CPU with the kernels under TRITON_INTERPRET=1. The GPU tests (sync debug
mode, CUDA-graph replay) run their whole harness on the CPU too, with stand-ins for what only a
GPU has, so a harness error shows up without a GPU. bench/gpu_check.py runs
test_official_bounds_keep_and_loss_are_bit_identical by this file's path and the test's name.
"""

from __future__ import annotations

import ast
import contextlib
import math
import pathlib
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import m2po_ops  # noqa: E402
from calls import run, run_calls  # noqa: E402
from cases import VARIANTS, regime_batch  # noqa: E402
from m2po_ops import radix_select  # noqa: E402
from m2po_ops import constants as C  # noqa: E402
from m2po_ops import m2po_loss, m2po_mask, resolve_backend  # noqa: E402
from m2po_ops import triton_backend as tb  # noqa: E402
from m2po_ops.config import M2POConfig  # noqa: E402
from m2po_ops.inputs import prepare  # noqa: E402
from m2po_ops.kernels.common import reciprocal_f32  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORWARD_KERNELS = {
    "paper": ["stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "ties_kernel", "tie_scan_kernel",
              "fix_paper_kernel", "finalize_kernel"],
    "official": ["stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "apply_official_kernel",
                 "finalize_kernel"],
}


# --------------------------------------------------------------------------------------------
# The official rule: bounds bit for bit on the GPU, and apply_official's wide-tail fix-up


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
@pytest.mark.parametrize("tau", [0.005, 0.02], ids=lambda tau: f"tau{tau}")
@pytest.mark.parametrize("seed", range(12), ids=lambda seed: f"seed{seed}-B4xT257")
@pytest.mark.parametrize("miniclip", [False, True], ids=["bounds", "miniclip"])
def test_official_bounds_keep_and_loss_are_bit_identical(miniclip, seed, tau, device):
    """On constrained official cuts the two backends give the same clip bounds (tau_c rounded
    to float32 before exp, as the reference and the authors' float32 tensor), the same keep
    mask, loss and gradient, bit for bit. Every case cuts."""
    clip = dict(miniclip_low=0.3, miniclip_high=0.5) if miniclip else {}
    args = _official_batch(seed, device)
    kw = dict(variant="official", tau=tau, **clip)
    k_ref, l_ref, g_ref, m_ref = run("torch", args, device, **kw)
    k_tri, l_tri, g_tri, m_tri = run("triton", args, device, **kw)
    desc = f"seed={seed} tau={tau} {clip}"
    assert torch.isfinite(m_ref["cut"]), desc  # the case really cuts
    assert torch.equal(m_tri["clip_low"], m_ref["clip_low"]), desc
    assert torch.equal(m_tri["clip_high"], m_ref["clip_high"]), desc
    assert torch.equal(k_tri, k_ref), desc
    assert torch.equal(l_tri, l_ref), desc
    assert torch.equal(g_tri, g_ref), desc


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



@pytest.mark.parametrize("seed", [0, 1], ids=lambda seed: f"seed{seed}-B4xT300")
@pytest.mark.parametrize("fallback", [False, True], ids=["tail", "fallback"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_official_constrained_bounds_recompute_the_wide_tail_or_the_block(layout, fallback, seed, device):
    """With constrained bounds apply_official recomputes only each block's wide tail when every
    other token's ratio lies inside the solved bounds (typical batches), and every token
    otherwise; both give the torch backend's keep, gradient and loss bit for bit, with
    per-token advantages whose sign differs from the first token's, padded and packed, token
    and sequence weights, and inputs poisoned by validate=False (a bad num_tokens, and packed a
    decreasing cu_seqlens: NaN loss and gradient). One m2po_mask call serves the loss calls that
    differ only in loss-only arguments."""
    lp, olp, adv, mask = _wide_tail_batch(seed, fallback, device)
    kw = dict(tau=0.04, validate=False)
    if layout == "packed":  # the valid tokens of each row, back to back
        lens = mask.sum(1)
        cu = [0] + torch.cumsum(lens, 0).tolist()
        lp, olp, adv = lp[mask], olp[mask], adv[mask]
        mask = torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed)).to(device) < 0.95
        kw["cu_seqlens"] = cu
    # (mask arguments, [(loss-only arguments, exact loss)]): the same mask call for each group
    groups = [(kw, [({}, True), (dict(loss_agg_mode="seq-mean-token-mean"), False),
                    (dict(loss_agg_mode="seq-mean-token-sum-norm"), False),
                    (dict(num_tokens=torch.tensor(-1.0, device=device)), True)])]  # poisoned: NaN loss and gradient
    if layout == "packed":
        bad = dict(cu_seqlens=torch.tensor([0, 50] + cu[2:-1] + [cu[1]], device=device))  # decreasing
        groups.append((dict(kw, **bad), [({}, True)]))
    for mask_kw, calls in groups:
        extras = [extra for extra, _ in calls]
        k_ref, _, ref = run_calls("torch", (lp, olp, adv, mask), device, "official", extras, **mask_kw)
        with _apply_modes() as modes:
            k_tri, _, tri = run_calls("triton", (lp, olp, adv, mask), device, "official", extras, **mask_kw)
        # one fix-up per forward: the mask call's and each loss call's
        assert modes == ["whole" if fallback else "tail"] * (1 + len(calls)), (modes, layout, mask_kw)
        for (extra, exact_loss), r, t in zip(calls, ref, tri):
            desc = f"seed={seed} {layout} {'bad cu_seqlens ' if mask_kw is not kw else ''}{extra}"
            _assert_identical((k_ref, *r), (k_tri, *t), desc, exact_loss)
            if "num_tokens" in extra or mask_kw is not kw:
                assert torch.isnan(t[0]) and torch.isnan(t[1]).any(), desc


def test_official_wide_tail_with_an_overflowing_ratio_gives_the_torch_loss(device):
    """A token whose ratio overflows float32 has an infinite loss term under the unconstrained
    bounds: the wide-tail pass replaces the tails' sums instead of correcting them (no inf - inf),
    so every block is redone through its wide tail and the loss is the torch backend's (inf), by
    the count and per sequence. (One m2po_mask call serves both loss calls.)"""
    lp, olp, adv, mask = (x.reshape(1, -1) for x in _wide_tail_batch(0, False, device, b=1, t=3000))
    lp = lp.clone()
    adv = adv.clone()
    lp[0, 2500], adv[0, 2500], mask[0, 2500] = olp[0, 2500] + 100.0, -0.5, True  # -A r = +inf, not clipped
    extras = [{}, dict(loss_agg_mode="seq-mean-token-mean")]
    k_ref, _, ref = run_calls("torch", (lp, olp, adv, mask), device, "official", extras, tau=0.04)
    with _apply_modes() as modes:
        k_tri, _, tri = run_calls("triton", (lp, olp, adv, mask), device, "official", extras, tau=0.04)
    assert modes == ["tail"] * 3, modes  # the mask call's forward and each loss call's
    for extra, r, t in zip(extras, ref, tri):
        _assert_identical((k_ref, *r), (k_tri, *t), str(extra), exact_loss=not extra)
        assert t[0] == float("inf")


# --------------------------------------------------------------------------------------------
# Structure: launches, mergeable statistics, early exit, backend choice


@pytest.mark.parametrize("variant", VARIANTS)
def test_launch_count_is_fixed(variant, device):
    seen = []
    for regime in ("none", "some", "ties"):
        lp, olp, adv, mask = regime_batch(regime, device=device)
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_histograms_merge_and_match_the_torch_description(variant, device):
    """The stats kernel's mergeable sums (tail histogram, below count and limbs, tail count and
    limbs) equal the PyTorch description's bit for bit, and add up across parts of a batch."""
    lp, olp, adv, mask = regime_batch("some", n=5000, device=device)
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
    lp, olp, adv, mask = regime_batch("none", device=device)
    config = M2POConfig(tau=0.04)
    tok = prepare(lp, olp, adv, mask, config)
    _, metrics = m2po_loss(lp, olp, adv, mask, tau=config.tau, backend="triton")
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
    lp, olp, adv, mask = regime_batch("some", n=300)
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
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["2d", "packed_cu"])
def test_triton_path_is_sync_free_with_validate_false(variant, layout, device):
    """Forward, backward, the mask and a sequence-level mode run without a host sync (after a
    warm-up call that compiles the kernels)."""
    n = 60_000 if device.type == "cuda" else 600
    lp, olp, adv, mask = regime_batch("ties", n=n, device=device)
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
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_graph_replay_matches_eager(variant, device):
    """One captured forward+backward, replayed after new log-probs, advantages, mask and
    num_tokens (a 0-d device tensor) are copied into its inputs, equals eager calls on the new
    data, in regimes that mask nothing, some tokens, and inside a run of ties."""
    rows, t = (40, 1000) if device.type == "cuda" else (4, 500)
    n = rows * t

    def batch(regime, seed):
        return [x.reshape(rows, t) for x in regime_batch(regime, n=n, seed=seed, device=device)]

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
    lp, olp, adv, mask = (x.reshape(4, 250) for x in regime_batch("some", n=1000, device=device))
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


# --------------------------------------------------------------------------------------------
# No PyTorch compute beside the kernels; the kernels' reciprocal; scratch reuse


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_pytorch_compute_ops_beside_the_kernels(variant, device):
    """Besides the Triton kernels, forward+backward with validate=False runs exactly four PyTorch
    ops of its own that launch work on a GPU: the scratch and results memsets and backward's two
    multiplies (paper: 12 launches in all). Views and allocations of uninitialised memory launch
    nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from m2po_ops.ops import IMPLEMENTATIONS

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
            if func.namespace == "m2po_ops":  # the library's operator: record what runs inside it
                with self:
                    return IMPLEMENTATIONS[func](*args, **(kwargs or {}))
            if not state["in_kernel"]:
                name = func.overloadpacket.__name__
                if name not in free:
                    self.ops.append(name)
            return func(*args, **(kwargs or {}))

    lp, olp, adv, mask = (x.reshape(30, 100) for x in regime_batch("ties", device=device))
    leaf = lp.clone().requires_grad_(True)
    tb._launch = quiet_launch
    try:
        with Record() as rec:
            loss, _ = m2po_loss(leaf, olp, adv, mask, variant=variant, backend="triton", validate=False)
            loss.backward()
        # zero_, zero_: the scratch and results memsets (Workspace); ones_like: autograd's
        # seed of loss.backward() (any loss has it); mul, mul: the loss operator's backward
        # (grad_output x the 1 / denominator scale, then x the stored derivative)
        assert sorted(rec.ops) == ["mul", "mul", "ones_like", "zero_", "zero_"], rec.ops
    finally:
        tb._launch = launch


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_calls_of_one_size_share_scratch_but_each_keeps_its_results(variant, device):
    """Small calls reuse the previous call's scratch (Workspace.for_call), never its results:
    the loss, metrics and gradient of a first call are unchanged by a second call of the same
    size on other data, and both equal the PyTorch backend's."""
    shape = (30, 100)
    first = [x.reshape(shape) for x in regime_batch("some", seed=1, device=device)]
    second = [x.reshape(shape) for x in regime_batch("ties", seed=2, device=device)]
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
