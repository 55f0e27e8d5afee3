"""The library's operators (``torch.ops.m2po_ops.loss`` / ``.mask``) under torch.library's checks
and torch.compile:

- ``torch.library.opcheck`` on both operators: both variants, padded and packed input, with and
  without a given cut, on each backend (the Triton one under the interpreter on CPU);
- the eager entry (``ops.call``: the operator's autograd kernel without the dispatcher) and the
  dispatcher give the same bits;
- a training step (a linear policy, log-probs, ``m2po_loss``, backward) compiled with
  ``fullgraph=True``: one graph and no break, and the eager loss and gradients (bit for bit for
  the operator's own outputs; within 1e-6 relative for the policy's parameters, whose
  log-softmax Inductor fuses differently);
- double backward and torch.func transforms: a clear error each.
"""

from __future__ import annotations

import pytest
import torch

from m2po_ops import M2POStats, m2po_loss, m2po_mask
from m2po_ops.metrics import METRICS
from m2po_ops.ops import DOUBLE_BACKWARD, FUNC_TRANSFORMS, LOSS, MASK, config_of, cut_tensors

from cases import BACKENDS, batch_2d

VARIANTS = ("paper", "official")
LAYOUTS = ("padded", "packed")


def _inputs(layout: str, device, seed: int = 0) -> dict:
    """A (3, 40) batch whose |delta| ~ 0.4 makes tau 0.04 cut, padded with holes; or its valid
    tokens packed row after row with a cu_seqlens tensor."""
    lp, olp, adv, mask = batch_2d(device, b=3, t=40, seed=seed)
    if layout == "padded":
        return dict(lp=lp, olp=olp, adv=adv, mask=mask, cu=None)
    keep = mask.reshape(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), mask.sum(1).cumsum(0)])
    return dict(lp=lp.reshape(-1)[keep], olp=olp.reshape(-1)[keep], adv=adv.reshape(-1)[keep], mask=None, cu=cu)


def _cut(inp: dict, variant: str, backend: str):
    """The cut of a one-micro-batch M2POStats solve (the single call's cut, given to the op)."""
    stats = M2POStats(tau=0.04, variant=variant, backend=backend)
    stats.update(inp["lp"], inp["olp"], inp["adv"], inp["mask"], cu_seqlens=inp["cu"])
    return stats.solve()[0]


def _common(inp: dict, variant: str, backend: str, cut, lp=None) -> tuple:
    """The operators' common arguments (tau 0.04, validate=True, no group)."""
    return (inp["lp"] if lp is None else lp, inp["olp"], inp["adv"], inp["mask"], inp["cu"], None, cut_tensors(cut),
            0.04, variant, None, None, True, backend, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_cut", [False, True], ids=["solve", "cut"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(variant, layout, with_cut, backend, device):
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch with
    dynamic shapes, gradients included) passes on both operators, on a batch the budget cuts."""
    inp = _inputs(layout, device)
    cut = _cut(inp, variant, backend) if with_cut else None
    lp = inp["lp"].clone().requires_grad_(True)
    args = _common(inp, variant, backend, cut, lp)
    _, _, values = LOSS(*args, "token-mean", None, None)
    assert values[dict(METRICS)["masked_fraction"]] > 0  # (the cut masks something: the checks see it)
    torch.library.opcheck(LOSS, args + ("token-mean", None, None))
    torch.library.opcheck(MASK, _common(inp, variant, backend, cut))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_entry_and_dispatcher_agree(variant, backend, device):
    """m2po_loss's eager entry (ops.call: the autograd kernel, no dispatcher) and the operator
    through the dispatcher give bit-identical loss, gradient, metrics and keep."""
    inp = _inputs("padded", device)
    leaf = inp["lp"].clone().requires_grad_(True)
    loss, metrics = m2po_loss(leaf, inp["olp"], inp["adv"], inp["mask"], variant=variant, backend=backend)
    loss.backward()
    leaf2 = inp["lp"].clone().requires_grad_(True)
    loss2, _, values = LOSS(*_common(inp, variant, backend, None, leaf2), "token-mean", None, None)
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(leaf.grad, leaf2.grad)
    assert all(torch.equal(metrics[name], values[slot]) for name, slot in METRICS)
    keep, _ = m2po_mask(inp["lp"], inp["olp"], inp["adv"], inp["mask"], variant=variant, backend=backend)
    assert torch.equal(keep, MASK(*_common(inp, variant, backend, None))[0])


def test_fake_implementations_raise_naming_the_argument():
    """The fake implementations (what torch.compile traces) raise every argument error that
    reads no value: a wrong advantages shape, 1-D official input without cu_seqlens, a float or
    decreasing-list cu_seqlens, a mismatched mask."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def args(lp, adv, mask=None, cu=None, cu_list=None, variant="paper"):
        return (lp, lp, adv, mask, cu, cu_list, [], 0.04, variant, None, None, True, "torch", None)

    with FakeTensorMode():
        b2, flat = torch.zeros(3, 40), torch.zeros(12)
        cases = [
            (ValueError, "^advantages has shape", LOSS, args(b2, torch.zeros(5)) + ("token-mean", None, None)),
            (ValueError, "^advantages has shape", MASK, args(flat, torch.zeros(4), cu=torch.tensor([0, 6, 12]))),
            (ValueError, "cu_seqlens for variant='official'", MASK, args(flat, flat, variant="official")),
            (TypeError, "^cu_seqlens must hold integers", MASK, args(flat, flat, cu=torch.zeros(3))),
            (ValueError, "^cu_seqlens must be non-decreasing", MASK, args(flat, flat, cu_list=[0, 8, 6])),
            (ValueError, "^mask has shape", MASK, args(b2, b2, mask=torch.ones(3, 4, dtype=torch.bool))),
        ]
        for error, match, op, a in cases:
            with pytest.raises(error, match=match):
                op(*a)


def test_metrics_and_loss_outputs():
    """The metrics are 0-d float32 tensors that do not require grad, with the official variant's
    clip bounds; the loss alone carries the graph."""
    inp = _inputs("padded", "cpu")
    leaf = inp["lp"].clone().requires_grad_(True)
    for variant, extra in (("paper", set()), ("official", {"clip_low", "clip_high"})):
        loss, metrics = m2po_loss(leaf, inp["olp"], inp["adv"], inp["mask"], variant=variant)
        assert loss.requires_grad and loss.dim() == 0
        assert set(metrics) == {name for name, _ in METRICS} | extra
        assert all(m.dim() == 0 and m.dtype == torch.float32 and not m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_may_change_in_place_before_backward(backend, device):
    """A metric changed in place before backward (an all-reduce for logging) leaves backward
    working and its gradient unchanged."""
    inp = _inputs("padded", device)
    grads = []
    for touch in (False, True):
        leaf = inp["lp"].clone().requires_grad_(True)
        loss, metrics = m2po_loss(leaf, inp["olp"], inp["adv"], inp["mask"], backend=backend)
        if touch:
            for m in metrics.values():
                m.mul_(2.0)
        loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_tracing_records_the_operator():
    """make_fx (pre-dispatch too) on real tensors records one m2po_ops.loss node: the eager
    shortcut steps aside under tracing modes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    inp = _inputs("padded", "cpu")

    def f(lp):
        return m2po_loss(lp, inp["olp"], inp["adv"], inp["mask"])[0]

    for pre_dispatch in (False, True):
        graph = make_fx(f, pre_dispatch=pre_dispatch)(inp["lp"]).graph
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        assert targets.count("m2po_ops.loss.default") == 1, (pre_dispatch, targets)


def test_double_backward_raises():
    """create_graph=True gives the first derivative; differentiating it raises DOUBLE_BACKWARD
    (the second derivative is not implemented: it must not silently be 0)."""
    inp = _inputs("padded", "cpu")
    leaf = inp["lp"].clone().requires_grad_(True)
    loss, _ = m2po_loss(leaf, inp["olp"], inp["adv"], inp["mask"])
    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        (g * g).sum().backward()
    assert "double backward" in DOUBLE_BACKWARD


@pytest.mark.parametrize("transform", ["grad", "vjp", "vmap"])
def test_func_transforms_raise(transform):
    """torch.func transforms raise FUNC_TRANSFORMS, naming the way that works."""
    inp = _inputs("padded", "cpu")

    def f(lp):
        return m2po_loss(lp, inp["olp"], inp["adv"], inp["mask"])[0]

    with pytest.raises(RuntimeError, match="torch.func"):
        if transform == "grad":
            torch.func.grad(f)(inp["lp"])
        elif transform == "vjp":
            torch.func.vjp(f, inp["lp"])
        else:
            torch.func.vmap(f)(inp["lp"].unsqueeze(0))
    assert "torch.func" in FUNC_TRANSFORMS


class _Policy(torch.nn.Module):
    """A linear policy: features -> logits -> the log-probs of the taken tokens."""

    def __init__(self, hidden: int = 16, vocab: int = 32):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, vocab)

    def forward(self, feats, actions):
        return torch.log_softmax(self.proj(feats), -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def _rollout(device, b: int = 4, t: int = 24, seed: int = 0):
    """A policy, features and actions, and stale log-probs 0.4 away (the budget cuts)."""
    g = torch.Generator().manual_seed(seed)
    policy = _Policy().to(device)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    feats = torch.randn(b, t, 16, generator=g).to(device)
    actions = torch.randint(0, 32, (b, t), generator=g).to(device)
    with torch.no_grad():
        olp = policy(feats, actions) + (torch.randn(b, t, generator=g) * 0.4).to(device)
    adv = torch.randn(b, t, generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) < 0.9).to(device)
    return policy, (feats, actions, olp, adv, mask)


def _step(policy, feats, actions, olp, adv, mask, **kw):
    loss, metrics = m2po_loss(policy(feats, actions), olp, adv, mask, **kw)
    return loss, metrics["masked_fraction"]


STEP_KWARGS = [
    pytest.param(dict(variant="paper"), id="paper"),
    pytest.param(dict(variant="official", validate=False), id="official-novalidate"),
    pytest.param(dict(variant="paper", loss_agg_mode="seq-mean-token-mean"), id="paper-seqmean"),
    pytest.param(dict(variant="paper", num_tokens=torch.tensor(70.0)), id="paper-num_tokens-tensor"),
    pytest.param(dict(variant="official", num_tokens=70), id="official-num_tokens-int"),
]


@pytest.mark.parametrize("kw", STEP_KWARGS)
def test_step_is_one_graph(kw):
    """torch._dynamo.explain finds one graph and no break in a training step's forward (with
    validate=True too: its host reads run inside the operator)."""
    policy, batch = _rollout("cpu")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_step)(policy, *batch, **kw)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_with_a_cut_and_packed_input_is_one_graph(layout):
    """A step that applies a given cut (M2POStats), on padded or packed input, is one graph."""
    inp = _inputs(layout, "cpu")
    cut = _cut(inp, "paper", "torch")
    leaf = inp["lp"].clone().requires_grad_(True)

    def step(lp):
        return m2po_loss(lp * 1.0, inp["olp"], inp["adv"], inp["mask"], cu_seqlens=inp["cu"], cut=cut,
                         num_tokens=cut.num_valid)[0]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(leaf)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_mask_is_one_graph():
    """m2po_mask (the mask operator) compiles as one graph too, and gives eager's keep."""
    inp = _inputs("padded", "cpu")

    def f(lp):
        keep, metrics = m2po_mask(lp * 1.0, inp["olp"], inp["adv"], inp["mask"])
        return keep, metrics["masked_fraction"]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(inp["lp"])
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    keep_c, masked_c = torch.compile(f, fullgraph=True)(inp["lp"])
    keep_e, masked_e = f(inp["lp"])
    assert torch.equal(keep_c, keep_e) and torch.equal(masked_c, masked_e)


def test_compiled_validate_raises_naming_the_argument():
    """validate=True under fullgraph=True: a NaN on a valid token raises ValueError naming
    logprobs when the compiled step runs (the host read is inside the operator)."""
    inp = _inputs("padded", "cpu")

    def f(lp):
        return m2po_loss(lp * 1.0, inp["olp"], inp["adv"], inp["mask"])[0]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    compiled(inp["lp"])
    bad = inp["lp"].clone()
    bad[inp["mask"]] = float("nan")
    with pytest.raises(ValueError, match="^logprobs holds non-finite"):
        compiled(bad)


def test_compiled_step_over_changing_shapes():
    """One compiled function over batches of other shapes (Dynamo recompiles with dynamic
    shapes; the fake implementations take symbolic sizes): eager's loss and gradient each time."""
    torch._dynamo.reset()

    def f(lp, olp, adv, mask):
        return m2po_loss(lp * 1.0, olp, adv, mask)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for seed, (b, t) in enumerate(((3, 40), (5, 40), (6, 33), (2, 17))):
        lp, olp, adv, mask = batch_2d("cpu", b=b, t=t, seed=seed)
        leaf_c, leaf_e = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
        loss_c, loss_e = compiled(leaf_c, olp, adv, mask), f(leaf_e, olp, adv, mask)
        loss_c.backward()
        loss_e.backward()
        assert torch.equal(loss_c, loss_e) and torch.equal(leaf_c.grad, leaf_e.grad), (b, t)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).detach())


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_step_matches_eager(variant):
    """torch.compile(fullgraph=True, Inductor) of the forward, then backward (AOTAutograd's
    compiled backward): loss and parameter gradients within 1e-6 relative of eager, the mask's
    masked fraction equal."""
    policy, batch = _rollout("cpu")
    loss_e, masked_e = _step(policy, *batch, variant=variant)
    loss_e.backward()
    grads_e = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True)
    loss_c, masked_c = compiled(policy, *batch, variant=variant)
    loss_c.backward()
    assert masked_e > 0 and torch.equal(masked_c, masked_e)
    assert _relative(loss_c, loss_e) <= 1e-6
    for p, g in zip(policy.parameters(), grads_e):
        assert _relative(p.grad, g) <= 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_operator_is_bit_identical(variant):
    """Compiled with Inductor, the operator's own outputs (given the same log-probs) are eager's
    bits: loss, gradient and metrics."""
    inp = _inputs("padded", "cpu")

    def f(lp):
        loss, metrics = m2po_loss(lp, inp["olp"], inp["adv"], inp["mask"], variant=variant)
        return loss, metrics["m2_after"], metrics["masked_fraction"]

    leaf_e = inp["lp"].clone().requires_grad_(True)
    out_e = f(leaf_e)
    out_e[0].backward()
    torch._dynamo.reset()
    leaf_c = inp["lp"].clone().requires_grad_(True)
    out_c = torch.compile(f, fullgraph=True)(leaf_c)
    out_c[0].backward()
    assert all(torch.equal(c, e) for c, e in zip(out_c, out_e))
    assert torch.equal(leaf_c.grad, leaf_e.grad)


def test_compiled_step_with_backward_inside():
    """A whole step, backward included (dynamo's trace_autograd_ops), compiles as one graph and
    gives eager's parameter gradients within 1e-6 relative."""
    policy, batch = _rollout("cpu")

    def step(policy, *batch):
        loss, _ = _step(policy, *batch)
        loss.backward()
        return loss.detach()

    loss_e = step(policy, *batch)
    grads_e = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(step)(policy, *batch)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        policy.zero_grad()
        torch._dynamo.reset()
        loss_c = torch.compile(step, fullgraph=True)(policy, *batch)
    assert _relative(loss_c, loss_e) <= 1e-6
    for p, g in zip(policy.parameters(), grads_e):
        assert _relative(p.grad, g) <= 1e-6


def test_config_of_caches_checked_settings():
    """config_of returns one M2POConfig per distinct settings, and still raises naming a bad one
    (a cached call never skips the checks of new settings)."""
    a = config_of(0.04, "paper", "token-mean", None, None, True)
    assert a is config_of(0.04, "paper", "token-mean", None, None, True)
    with pytest.raises(TypeError, match="validate"):
        config_of(0.04, "paper", "token-mean", None, None, 1)
    with pytest.raises(ValueError, match="tau"):
        config_of(-1.0, "paper", "token-mean", None, None, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_step_on_cuda():
    """On a GPU (the Triton backend): the compiled step matches eager within 1e-6 relative, with
    Inductor and replayed in a CUDA graph (mode="reduce-overhead", validate=False)."""
    variant = "paper"
    policy, batch = _rollout("cuda")
    loss_e, _ = _step(policy, *batch, variant=variant, validate=False)
    loss_e.backward()
    grads_e = [p.grad.clone() for p in policy.parameters()]
    for mode in ("default", "reduce-overhead"):
        policy.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(_step, fullgraph=True, mode=mode)
        for _ in range(3):  # (reduce-overhead records on a later call, then replays)
            policy.zero_grad()
            loss_c, _ = compiled(policy, *batch, variant=variant, validate=False)
            loss_c.backward()
        assert _relative(loss_c, loss_e) <= 1e-6, mode
        for p, g in zip(policy.parameters(), grads_e):
            assert _relative(p.grad, g) <= 1e-6, mode
