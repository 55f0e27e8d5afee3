"""pytest-benchmark version of the benchmark at small sizes (CI: ``make bench-pytest``).

Same competitors, same inputs and the same mask check as ``python -m bench.run``: each test
first checks the competitor's keep mask bit for bit against the reference, then times one
forward+backward call. The Triton rows run only on CUDA.
"""

from __future__ import annotations

import logging

import pytest
import torch

from . import competitors, syncs
from .inputs import make_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_TOKENS = 32768
if DEVICE == "cpu":
    torch.set_num_threads(1)  # as python -m bench.run on CPU (see bench/README.md)
logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
logging.getLogger("torch._inductor").setLevel(logging.ERROR)

_BATCHES = {}


def _batch(regime, dtype):
    key = (regime, dtype)
    if key not in _BATCHES:
        import m2po_ops

        b = make_batch(N_TOKENS, regime, dtype, device=DEVICE)
        ref = {v: m2po_ops.m2po_mask(*b.args(), variant=v, backend="torch")[0] for v in ("paper", "official")}
        _BATCHES[key] = (b, ref)
    return _BATCHES[key]


NAMES = [c.name for c in competitors.COMPETITORS]
CASES = [("typical", "float32"), ("stressed", "float32"), ("typical", "bfloat16")]


@pytest.mark.parametrize("regime,dtype", CASES, ids=[f"{r}-{d}" for r, d in CASES])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(benchmark, name, regime, dtype):
    comp = competitors.BY_NAME[name]
    if comp.cuda_only and DEVICE != "cuda":
        pytest.skip("Triton is timed on CUDA only (the CPU interpreter is not a speed measure)")
    if name == "compiled" and dtype != "float32":
        pytest.skip("compiled: float32 only here (a bfloat16 recompile costs CI ~20 s; bench.run times both)")
    batch, ref = _batch(regime, dtype)
    runner = competitors.prepare(comp, batch)
    for _ in range(comp.sync_runs):
        with syncs.count_syncs() as counted:
            keep, loss, _ = runner.check()
    if keep is None:
        keep = runner.mask()
    assert torch.equal(keep.reshape(ref[comp.variant].shape), ref[comp.variant]), f"{name}: mask differs"
    assert torch.isfinite(loss)
    if comp.library:
        assert counted.total == 0, f"{name} made host syncs: {dict(counted.by_kind)}"
    benchmark.extra_info.update(host_syncs=counted.total, n_tokens=batch.n_tokens, variant=comp.variant)

    def step():
        runner.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


def test_sync_counter_counts():
    """The counter sees the syncs it claims to see, and restores torch afterwards."""
    x = torch.arange(10.0)
    with syncs.count_syncs() as c:
        x.sum().item()
        torch.nonzero(x > 3)
        x[x > 5]
        bool((x > 2).any())
        x.tolist()
    assert c.total == 5, c.by_kind
    assert "item" not in torch.Tensor.__dict__


def test_sync_counter_clean_library():
    import m2po_ops

    b, _ = _batch("typical", "float32")
    with syncs.count_syncs() as c:
        m2po_ops.m2po_loss(*b.args(), backend="torch", validate=False)[0].backward()
    assert c.total == 0, c.by_kind
