"""The kernel tracer (bench/kernel_trace.py) counts what it claims to count.

Checked on small Triton kernels defined here, whose loads, stores and atomics per program are
known by construction (masked loads, scalar loads, bool stores, an atomic with 8 lanes on one
address, a CAS, an early exit), then once on a small m2po_loss call with invariants that hold
whatever the kernels look like. The tracer sees interpreted kernels only, and Triton picks the
interpreter when it is imported (triton.language's own jit functions, tl.sum included): these
tests run where conftest.py turns it on, i.e. on every machine without a GPU (a CUDA machine
skips them: its kernels are compiled).
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the source tree, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.kernel_trace import (by_arg_rows, format_table, kernel_trace, linear_fit, make_trace_batch,  # noqa: E402
                                summary)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="Triton kernels are compiled here (CUDA): nothing to trace")

BLOCK = 16
N = 40  # 3 programs: 16, 16 and 8 active lanes


@triton.jit
def _probe_kernel(x_ptr, y_ptr, b_ptr, flag_ptr, hist_ptr, cnt_ptr, mx_ptr, lock_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid * BLOCK + lane
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)  # float32, masked: 16 / 16 / 8 lanes
    flag = tl.load(flag_ptr)  # one int64 scalar
    tl.store(y_ptr + offs, x * 2.0 + flag.to(tl.float32), mask=inb)  # float32, masked
    tl.store(b_ptr + offs, x > 0, mask=inb)  # bool: one byte per lane
    tl.atomic_add(hist_ptr + lane // 8, tl.full([BLOCK], 1, tl.int32), sem="relaxed")  # 16 lanes, 8 per address
    tl.atomic_add(cnt_ptr + pid, tl.sum(inb.to(tl.int32)), sem="relaxed")  # 1 lane
    tl.atomic_max(mx_ptr + lane, offs.to(tl.int32), mask=inb, sem="relaxed")  # 16 / 16 / 8 lanes, 1 per address
    tl.atomic_cas(lock_ptr + pid, 0, 1)  # scalar compare-and-swap: 1 lane


@triton.jit
def _maybe_kernel(flag_ptr, x_ptr, BLOCK: tl.constexpr):
    """Returns at once unless *flag_ptr != 0: then reads and rewrites BLOCK float32s."""
    if tl.load(flag_ptr) != 0:
        lane = tl.arange(0, BLOCK)
        tl.store(x_ptr + lane, tl.load(x_ptr + lane) + 1.0)


@triton.jit
def _tile_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """A 2-D tile (BLOCK x 4) read with a mask on one column, via a block pointer for the store."""
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, 4)[None, :]
    v = tl.load(x_ptr + r * 4 + c, mask=c < 3, other=0.0)  # 3 of 4 columns
    out = tl.make_block_ptr(y_ptr, (BLOCK, 4), (4, 1), (0, 0), (BLOCK, 4), (1, 0))
    tl.store(out, v)


def _probe_args():
    x = torch.arange(N, dtype=torch.float32) - 5  # some negative
    return dict(
        x=x,
        y=torch.zeros(N, dtype=torch.float32),
        b=torch.zeros(N, dtype=torch.bool),
        flag=torch.tensor(3, dtype=torch.int64),
        hist=torch.zeros(2, dtype=torch.int32),
        cnt=torch.zeros(3, dtype=torch.int32),
        mx=torch.full((BLOCK,), -1, dtype=torch.int32),
        lock=torch.zeros(3, dtype=torch.int32),
    )


def _run_probe(a):
    _probe_kernel[(3,)](a["x"], a["y"], a["b"], a["flag"], a["hist"], a["cnt"], a["mx"], a["lock"], N, BLOCK=BLOCK)


def test_probe_counts_per_program():
    a = _probe_args()
    with kernel_trace() as trace:
        _run_probe(a)
    # the kernel really ran
    assert torch.equal(a["y"], a["x"] * 2 + 3)
    assert a["hist"].tolist() == [24, 24] and a["cnt"].tolist() == [16, 16, 8] and a["lock"].tolist() == [1, 1, 1]

    assert trace.names() == ["_probe_kernel"]
    (lt,) = trace.launches
    assert lt.grid == (3, 1, 1) and lt.num_programs == 3
    assert [p.pid for p in lt.programs] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    for p, lanes in zip(lt.programs, (16, 16, 8)):
        assert (p.loads, p.load_elems, p.load_bytes) == (2, lanes + 1, 4 * lanes + 8)  # x + the int64 flag
        assert (p.scalar_loads, p.scalar_load_elems) == (1, 1)
        assert (p.stores, p.store_elems, p.store_bytes) == (2, 2 * lanes, 4 * lanes + lanes)
        # add (16 lanes) + add (1) + max (masked) + cas (1), all 4-byte
        assert p.atomics == 4
        assert p.atomic_lanes == 16 + 1 + lanes + 1
        assert p.atomic_bytes == 4 * p.atomic_lanes
        assert p.max_lanes_per_address == 8 and p.contended_atomics == 1
        assert p.arg_load_elems == {"x_ptr": lanes, "flag_ptr": 1}
        assert p.max_arg_load_elems == lanes
        assert p.did_work()
    assert lt.load_bytes == 4 * N + 3 * 8 and lt.store_bytes == 5 * N
    assert lt.max_program_load_elems == 17 and lt.max_lanes_per_address == 8 and lt.contended_atomics == 3

    # one record per atomic instruction and program, attributed to its argument
    ev = [(e.program, e.op, e.arg, e.lanes, e.addresses, e.max_lanes_per_address) for e in lt.atomic_events]
    assert ev[:4] == [(0, "ADD", "hist_ptr", 16, 2, 8), (0, "ADD", "cnt_ptr", 1, 1, 1),
                      (0, "MAX", "mx_ptr", 16, 16, 1), (0, "CAS", "lock_ptr", 1, 1, 1)]
    assert ev[10] == (2, "MAX", "mx_ptr", 8, 8, 1)
    assert len(ev) == 12

    # traffic per argument, summed over programs
    args = lt.args
    assert (args["x_ptr"].load_elems, args["x_ptr"].load_bytes) == (N, 4 * N)
    assert (args["y_ptr"].store_elems, args["y_ptr"].store_bytes) == (N, 4 * N)
    assert (args["b_ptr"].store_elems, args["b_ptr"].store_bytes) == (N, N)
    assert args["flag_ptr"].load_bytes == 24
    assert (args["hist_ptr"].atomic_lanes, args["mx_ptr"].atomic_lanes) == (48, N)


def test_summary_per_token():
    a = _probe_args()
    with kernel_trace() as trace:
        _run_probe(a)
        _run_probe(a)  # a second launch of the same kernel: merged in the summary
    rows = summary(trace, num_tokens=N)
    (r,) = [r for r in rows if r["kind"] == "kernel"]
    assert r["kernel"] == "_probe_kernel" and r["launches"] == 2 and r["programs"] == 6
    assert r["read_B_per_token"] == 2 * (4 * N + 24) / N
    assert r["write_B_per_token"] == 2 * 5 * N / N
    assert r["atomic_lanes"] == 2 * (3 * 18 + N) and r["atomic_B_per_token"] == 4 * r["atomic_lanes"] / N
    assert r["max_load_elems_per_program"] == 17 and r["max_arg_load_elems_per_program"] == 16
    assert r["max_lanes_per_address"] == 8 and r["contended_atomics"] == 6
    assert r["did_work"] and r["working_programs"] == 6
    table = format_table(rows)
    assert "| _probe_kernel | 2 | 6 |" in table and "**total**" in table
    rows_by_arg = {(x["kernel"], x["arg"]): x for x in by_arg_rows(trace, N)}
    assert rows_by_arg[("_probe_kernel", "b_ptr")]["write_B_per_token"] == 2.0


def test_linear_fit_splits_per_token_and_fixed_bytes():
    traces = {}
    for n in (32, 40):  # the same 3 programs: x is read per token, the flag once per program
        a = _probe_args()
        with kernel_trace() as traces[n]:
            _probe_kernel[(3,)](a["x"], a["y"], a["b"], a["flag"], a["hist"], a["cnt"], a["mx"], a["lock"], n,
                                BLOCK=BLOCK)
    fit = linear_fit(traces[32], 32, traces[40], 40)["_probe_kernel"]
    assert (fit["read_per_token"], fit["read_fixed"]) == (4.0, 24.0)
    assert (fit["write_per_token"], fit["write_fixed"]) == (5.0, 0.0)
    # atomics: hist (16 lanes) + cnt + cas per program are fixed, mx is per token
    assert (fit["atomic_per_token"], fit["atomic_fixed"]) == (4.0, 3 * 18 * 4.0)


def test_early_exit_and_scalar_only():
    flag = torch.zeros((), dtype=torch.int64)
    x = torch.zeros(BLOCK, dtype=torch.float32)
    with kernel_trace() as trace:
        _maybe_kernel[(4,)](flag, x, BLOCK=BLOCK)  # every program reads the flag and returns
        flag.fill_(1)
        _maybe_kernel[(2,)](flag, x, BLOCK=BLOCK)
    idle, busy = trace.launches
    assert [p.load_elems for p in idle.programs] == [1, 1, 1, 1]
    assert not idle.did_work() and idle.store_bytes == 0 and idle.max_program_load_elems == 1
    assert busy.did_work() and busy.max_program_load_elems == 1 + BLOCK and busy.store_bytes == 2 * 4 * BLOCK
    assert not idle.did_work(max_scalars=1) and idle.programs[0].did_work(max_scalars=0)
    rows = {r["kernel"]: r for r in summary(trace, BLOCK)}
    assert rows["_maybe_kernel"]["working_programs"] == 2
    assert torch.equal(x, torch.full((BLOCK,), 2.0))


def test_2d_masked_load_and_block_pointer_store():
    x = torch.arange(BLOCK * 4, dtype=torch.float32)
    y = torch.full((BLOCK * 4,), -1.0)
    with kernel_trace() as trace:
        _tile_kernel[(1,)](x, y, BLOCK=BLOCK)
    (p,) = trace.launches[0].programs
    assert (p.load_elems, p.load_bytes) == (3 * BLOCK, 12 * BLOCK)
    assert (p.store_elems, p.store_bytes) == (4 * BLOCK, 16 * BLOCK)
    assert p.scalar_loads == 0


def test_patches_are_restored():
    from triton.runtime import interpreter as interp

    before = (interp.GridExecutor.__call__, interp.GridExecutor._init_args_hst)
    a = _probe_args()
    with pytest.raises(ZeroDivisionError):
        with kernel_trace() as trace:
            _run_probe(a)
            1 / 0
    assert (interp.GridExecutor.__call__, interp.GridExecutor._init_args_hst) == before
    assert not any(k.startswith(("create_", "set_grid")) for k in vars(interp.interpreter_builder))
    _run_probe(a)  # not traced any more
    assert len(trace.launches) == 1


def test_torch_ops_forward_and_backward():
    w = torch.ones(100, requires_grad=True)
    with kernel_trace() as trace:
        z = torch.zeros(1000)  # a memset: 4000 bytes written
        loss = (w * 3.0).sum()
        loss.backward()
    assert z.sum() == 0
    ops = [(o.name, o.phase) for o in trace.torch_ops]
    assert ("aten.zeros", "forward") in ops and ("aten.mul", "forward") in ops
    assert any(phase == "backward" for _, phase in ops)
    zeros = [o for o in trace.torch_ops if o.name == "aten.zeros"][0]
    assert (zeros.read_bytes, zeros.write_bytes) == (0, 4000)
    mul = [o for o in trace.torch_ops if o.name == "aten.mul" and o.phase == "forward"][0]
    assert (mul.read_bytes, mul.write_bytes) == (400, 400)
    rows = {r["kernel"]: r for r in summary(trace, 100)}
    assert rows["aten.zeros (forward)"]["write_B_per_token"] == 40.0


def test_m2po_call_is_traced():
    """On a real call, whatever the kernels: every launch through the backend's launcher is
    traced, each input is read at least once and the gradient written at least once."""
    import m2po_ops
    import m2po_ops.triton_backend as tb

    batch = make_trace_batch(4096, "all-equal")
    with kernel_trace() as trace:
        loss, metrics = m2po_ops.m2po_loss(*batch.args(), backend="triton", validate=False)
        loss.backward()
    assert m2po_ops.metrics_to_host(metrics)["masked_fraction"] > 0.9  # one run of ties, all masked
    assert trace.launches and all(lt.num_programs > 0 for lt in trace.launches)
    if hasattr(tb, "_launch"):
        assert trace.backend_launches == trace.names()
    rows = summary(trace, batch.n_tokens)
    kernels = [r for r in rows if r["kind"] == "kernel"]
    assert sum(r["read_B_per_token"] for r in kernels) >= 4 + 4 + 4 + 1  # logprobs, old, advantages, mask
    assert sum(r["write_B_per_token"] for r in rows) >= 4  # the float32 gradient
