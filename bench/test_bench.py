"""pytest-benchmark version of the benchmark at small sizes (CI: ``make bench-pytest``).

Same competitors, same inputs and the same mask check as ``python -m bench.run``: each test
first checks the competitor's keep mask bit for bit against the reference, then times one
forward+backward call. The Triton rows run only on CUDA.
"""

from __future__ import annotations

import collections
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
    if runner.sync_probe is not None:  # the library on CPU: the syncs of the path a CUDA tensor takes
        with syncs.count_syncs() as counted:
            left_out = runner.sync_probe()
        counted.by_kind["Tensor.tolist"] -= left_out  # split.limbs_to_float's CPU-only shortcut
        counted.by_kind += collections.Counter()  # (drops zero counts)
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
    """The torch backend's device path (what CUDA tensors run; on CPU tensors device_path() forces
    it) makes no host sync. Its CPU path reads values on the host, which is free there."""
    import m2po_ops
    from m2po_ops import radix_select
    from m2po_ops.inputs import device_path

    b, _ = _batch("typical", "float32")
    for variant in ("paper", "official"):
        with device_path(), syncs.count_syncs() as c, competitors.count_calls(radix_select, "limbs_to_float") as short:
            m2po_ops.m2po_loss(*b.args(), variant=variant, backend="torch", validate=False)[0].backward()
        # split.limbs_to_float reads CPU limbs with one Tensor.tolist (a shortcut CUDA tensors do not take)
        assert dict(c.by_kind) == ({"Tensor.tolist": short[0]} if short[0] else {}), c.by_kind


def test_host_path_measure_runs():
    """bench/host_path.py runs and returns its fields (a measurement: nothing is asserted on time)."""
    pytest.importorskip("triton")
    from . import host_path

    h = host_path.measure(n_tokens=4096, calls=3)
    assert set(h) >= {"n_tokens", "calls", "fused_us", "eager_us", "ratio", "launches_per_call"}
    assert h["n_tokens"] == 4096 and h["calls"] == 3 and h["fused_us"] > 0 and h["eager_us"] > 0
    assert h["launches_per_call"] > 0 and h["ratio"] == h["fused_us"] / h["eager_us"]
    assert 0 < h["function_floor_us"] and h["function_floor_ratio"] == h["function_floor_us"] / h["eager_us"]


def test_compile_time_measure_runs():
    """bench/compile_time.py compiles the step cold then warm in two processes and reports one
    graph with no break (the times are measurements: only their presence is checked)."""
    from . import compile_time

    c = compile_time.measure("cpu")
    for run in (c["cold"], c["warm"]):
        assert (run["graphs"], run["graph_breaks"]) == (1, 0)
        assert run["first_call_s"] > 0 and run["compiled_step_ms"] > 0 and run["eager_step_ms"] > 0
    assert "cold" in compile_time.line(c) and "warm" in compile_time.line(c)


def test_round_robin_timing_and_load_are_recorded(tmp_path):
    """A tiny run: every timed cell has at least 7 calls, each input its load before and after,
    the tail fraction, and the verdict states the sorted-eager target."""
    import json

    from . import report, run

    rc = run.main(["--sizes", "4096", "--dtypes", "float32", "--regimes", "none,heavy-tail", "--competitors",
                   "sorted-eager,m2po_ops[torch]/paper", "--no-plot", "--out-dir", str(tmp_path), "--rep-budget", "0"])
    assert rc == 0
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert all(r["status"] == "ok" and r["reps"] >= 7 for r in data["results"])
    assert all(inp["loadavg_before"] and inp["loadavg_after"] and 0 <= inp["tail_fraction"] <= 1
               for inp in data["inputs"])
    heavy = [inp for inp in data["inputs"] if inp["regime"] == "heavy-tail"][0]
    assert heavy["tail_fraction"] > 0.15
    assert "sorted-eager" in report.verdict(data) and "m2po_ops[torch]/paper" in report.verdict(data)
