"""The competitors of the benchmark as uniform runners.

A competitor is set up once per input (``prepare(batch)``), which returns a ``Runner`` with:
- ``step()``: one forward + backward call (what is timed);
- ``check()``: one call that also returns the keep mask, the loss and the gradient, for the
  comparison with the reference (the mask must be bit-identical).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import m2po_ops
from m2po_ops import radix_select
from m2po_ops.inputs import device_path

from . import baselines


@contextlib.contextmanager
def count_calls(module, name: str):
    """Count the calls of module.name inside the block (a one-element list)."""
    original, calls = getattr(module, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


@dataclass
class Runner:
    step: Callable[[], None]
    check: Callable[[], tuple]  # -> (keep or None, loss, grad); its host syncs are counted
    mask: Optional[Callable[[], torch.Tensor]] = None  # keep mask when check() gives None (not counted)
    setup_s: float = 0.0  # one-off cost (compile, graph capture), reported separately
    # the call whose host syncs are counted, when not check(); returns how many reads to leave out
    sync_probe: Optional[Callable[[], int]] = None
    notes: list = field(default_factory=list)


@dataclass(frozen=True)
class Competitor:
    name: str
    variant: str  # the rule it implements: its mask is compared with m2po_mask(variant=...)
    library: bool  # one of this library's paths (the ratios are taken against these)
    cuda_only: bool
    description: str
    sync_runs: int = 1  # instrumented calls; the last is counted (compiled: the first recompiles)


COMPETITORS = [
    Competitor("official-eager", "official", False, False,
               "The authors' released rule as they run it: harmful tokens by boolean indexing, torch.sort, "
               "threshold by a Python loop over the candidates with one .item() each, then the PPO-clip loss "
               "in eager PyTorch (bench/baselines.py)."),
    Competitor("sorted-eager", "paper", False, False,
               "The paper's Algorithm 1 as careful ports run it: nonzero, a stable sort, a float64 prefix-mean "
               "cut read with .item(), the mask built by index assignment, then the loss in eager PyTorch."),
    Competitor("compiled", "paper", False, False,
               "torch.compile(sorted-eager, dynamic=True); the compile time is reported separately.", sync_runs=2),
    Competitor("m2po_ops[torch]/paper", "paper", True, False,
               "m2po_ops.m2po_loss(variant='paper', backend='torch', validate=False), eager."),
    Competitor("m2po_ops[torch]/official", "official", True, False,
               "m2po_ops.m2po_loss(variant='official', backend='torch', validate=False), eager."),
    Competitor("m2po_ops[triton]/paper", "paper", True, True,
               "m2po_ops.m2po_loss(variant='paper', backend='triton', validate=False), eager calls."),
    Competitor("m2po_ops[triton]/official", "official", True, True,
               "m2po_ops.m2po_loss(variant='official', backend='triton', validate=False), eager calls."),
    Competitor("m2po_ops[triton]+graph/paper", "paper", True, True,
               "The Triton call (forward + torch.autograd.grad) captured once in a CUDA graph and replayed."),
    Competitor("m2po_ops[triton]+graph/official", "official", True, True,
               "The Triton call (forward + torch.autograd.grad) captured once in a CUDA graph and replayed."),
]
BY_NAME = {c.name: c for c in COMPETITORS}

# One compiled callable per process: torch.compile with dynamic shapes compiles once per dtype
# (plus small recompiles), not once per input.
_COMPILED = None


def compiled_fn():
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo.config as dynamo_config

        # Recompiles (dtype, the sync counter's patched methods) must not hit the default limit of
        # 8, past which dynamo silently falls back to eager and "compiled" would time eager code.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _COMPILED = baselines.compiled_sorted_eager(dynamic=True)
    return _COMPILED


def _eager_runner(batch, fn) -> Runner:
    lp = batch.logprobs

    def step():
        lp.grad = None
        loss, _ = fn()
        loss.backward()

    def check():
        lp.grad = None
        loss, keep = fn()
        loss.backward()
        return keep, loss.detach(), lp.grad.detach().clone()

    return Runner(step, check)


def _library_runner(batch, variant: str, backend: str) -> Runner:
    args = batch.args()
    lp = batch.logprobs

    def call():
        loss, _ = m2po_ops.m2po_loss(*args, variant=variant, backend=backend, validate=False)
        return loss

    def step():
        lp.grad = None
        call().backward()

    def check():
        lp.grad = None
        loss = call()
        loss.backward()
        return None, loss.detach(), lp.grad.detach().clone()

    def mask():
        return m2po_ops.m2po_mask(*args, variant=variant, backend=backend, validate=False)[0]

    probe = None
    if lp.device.type == "cpu" and backend == "torch":
        def probe() -> int:
            """The path a CUDA tensor takes (the one whose syncs a GPU would see). Returns the reads
            not to count: split.limbs_to_float takes a Python shortcut for CPU tensors (one
            Tensor.tolist per call) that CUDA tensors do not take."""
            with device_path(), count_calls(radix_select, "limbs_to_float") as shortcut:
                step()
            return shortcut[0]

    return Runner(step, check, mask, sync_probe=probe)


def _graph_runner(batch, variant: str) -> Runner:
    """Capture forward + autograd.grad of the Triton call in a CUDA graph (static input buffers:
    the batch's own tensors). Raises if capture fails; the caller records the error."""
    args = batch.args()
    lp = batch.logprobs
    t0 = time.perf_counter()

    def body():
        loss, _ = m2po_ops.m2po_loss(*args, variant=variant, backend="triton", validate=False)
        (grad,) = torch.autograd.grad(loss, lp)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up (Triton autotuning, allocator) off the capture stream
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = body()
    torch.cuda.synchronize()
    setup = time.perf_counter() - t0

    def step():
        graph.replay()

    def check():
        graph.replay()
        return None, static_loss.detach().clone(), static_grad.detach().clone()

    def mask():  # the graph replays the same kernels as the eager Triton call
        return m2po_ops.m2po_mask(*args, variant=variant, backend="triton", validate=False)[0]

    r = Runner(step, check, mask, setup_s=setup)
    r.graph = graph  # keep alive
    return r


def prepare(comp: Competitor, batch, official_budget_s: Optional[float] = None) -> Runner:
    args = batch.args()
    if comp.name == "official-eager":
        return _eager_runner(batch, lambda: baselines.official_eager(*args, budget_s=official_budget_s))
    if comp.name == "sorted-eager":
        return _eager_runner(batch, lambda: baselines.sorted_eager(*args))
    if comp.name == "compiled":
        fn = compiled_fn()
        runner = _eager_runner(batch, lambda: fn(*args))
        t0 = time.perf_counter()
        runner.step()  # compiles (or recompiles) for this input's shape/dtype
        runner.setup_s = time.perf_counter() - t0
        return runner
    if comp.name.startswith("m2po_ops[torch]"):
        return _library_runner(batch, comp.variant, "torch")
    if comp.name.startswith("m2po_ops[triton]+graph"):
        return _graph_runner(batch, comp.variant)
    if comp.name.startswith("m2po_ops[triton]"):
        return _library_runner(batch, comp.variant, "triton")
    raise KeyError(comp.name)
