"""Structural performance properties of the fused kernels, counted exactly under the Triton
interpreter with bench/kernel_trace.py (times are for benchmarks; these counts are not):

- no atomic instruction of a program sends two lanes to one address (histograms are
  pre-aggregated in the block), even when every token has the same m2;
- no program loads more than about SERIAL_LIMIT elements from one buffer (parallel chunk
  scans; nothing grows with the token count);
- when nothing is masked, every kernel after stats returns at once (a few scalars at most);
- the bytes per token of a forward+backward on the benchmark's layout (float32, per-token
  advantages, bool mask) stay within the budget the README states.

The tracer sees interpreted kernels only, so these run where conftest.py turns the interpreter
on (every machine without a GPU).
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the source tree, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.kernel_trace import linear_fit, make_trace_batch, trace_call  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="Triton kernels are compiled here (CUDA): nothing to trace")

N = 4096
SERIAL_LIMIT = 4096 + 64  # one chunk of buckets or blocks, plus a few scalars (limbs, state)
# forward + backward bytes per token for float32 on the benchmark's layout (README, "How the
# fused backend works"): stats reads 13 and writes the 4-byte derivative, backward reads it and
# writes the gradient; the tail passes add a little per masked-regime token (official: per
# wide-tail token, also when the clip bounds are constrained)
BYTES_PER_TOKEN = 38.0


@pytest.fixture(autouse=True)
def _gpu_chunks(monkeypatch):
    """The select kernels' chunk sizes of the GPU (the interpreter's are larger, for speed)."""
    from m2po_ops import triton_backend as tb
    from m2po_ops.constants import LEVEL2_CHUNK, SELECT_CHUNK

    from m2po_ops.kernels import common

    monkeypatch.setattr(tb, "SELECT1_CHUNK", SELECT_CHUNK)
    monkeypatch.setattr(tb, "SELECT2_CHUNK", LEVEL2_CHUNK)
    monkeypatch.setattr(common, "INTERP_AGGREGATE", triton.language.constexpr(False))  # the GPU's paths


def _trace(variant, regime, n=N, **kw):
    return trace_call(make_trace_batch(n, regime), variant, **kw)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("regime", ["all-equal", "typical", "stressed"])
def test_no_atomic_sends_two_lanes_to_one_address(variant, regime, device):
    """Every atomic instruction of every program targets distinct addresses."""
    trace = _trace(variant, regime)
    contended = [(lt.name, e.arg, e.lanes, e.max_lanes_per_address)
                 for lt in trace.launches for e in lt.atomic_events if e.max_lanes_per_address > 1]
    assert not contended, contended
    assert trace.kernel("stats_kernel")[0].atomic_lanes > 0  # (the histograms were updated at all)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_no_program_scans_more_than_a_chunk(variant, device):
    """Every program of every launch loads at most SERIAL_LIMIT elements from any one buffer,
    on batches where every pass runs (all tokens tied above tau)."""
    for n in (N, 4 * N):
        trace = _trace(variant, "all-equal", n=n)
        long = [(lt.name, p.pid, p.max_arg_load_elems) for lt in trace.launches for p in lt.programs
                if p.max_arg_load_elems > SERIAL_LIMIT]
        assert not long, (n, long)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_passes_over_blocks_split_into_programs_at_any_size(variant, device):
    """At 2**24 tokens (16384 blocks; recorded, not run) the passes over per-block data run one
    program per chunk of blocks, so none scans more than SERIAL_LIMIT rows whatever the size;
    every other launch is one program per block of tokens or per chunk of buckets."""
    import torch

    from m2po_ops import m2po_loss
    from m2po_ops import triton_backend as TB

    rows, row_len = 1 << 13, 1 << 11
    n = rows * row_len
    lp = torch.zeros(rows, row_len, requires_grad=True)
    with TB.launch_log(execute=False) as launches:
        m2po_loss(lp, torch.zeros(rows, row_len), torch.ones(rows), variant=variant, backend="triton", validate=False)
    nblocks = n // TB.BLOCK
    per_program = {"tie_scan_kernel": TB.TIE_CHUNK, "finalize_kernel": TB.FINAL_CHUNK}
    for launch in launches:
        grid = launch.grid[0]
        if launch.name in per_program:
            assert grid * per_program[launch.name] >= nblocks and grid <= SERIAL_LIMIT, (launch.name, grid)
            assert per_program[launch.name] * (8 if launch.name == "finalize_kernel" else 1) <= SERIAL_LIMIT
        elif launch.name.startswith("select"):
            assert grid >= 32, (launch.name, grid)
        else:
            assert grid == nblocks, (launch.name, grid)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_nothing_masked_every_pass_after_stats_returns_at_once(variant, device):
    """With the trust region's mean m2 under tau, each launch after stats (but the final
    reduction) reads and writes a few scalars per program at most and issues no atomics."""
    trace = _trace(variant, "none")
    names = trace.names()
    assert trace.backend_launches == names
    after = trace.launches[names.index("stats_kernel") + 1:]
    assert [lt.name for lt in after][-1] == "finalize_kernel"
    busy = [(lt.name, p.pid, p.load_elems, p.store_elems, p.atomic_lanes) for lt in after[:-1] for p in lt.programs
            if p.load_elems > 32 or p.store_elems > 16 or p.atomic_lanes]
    assert not busy, busy


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("regime", ["none", "typical"])
def test_bytes_per_token_of_a_forward_and_backward(variant, regime, device):
    """Bytes per token that grow with the tokens (a fit over two sizes), summed over every
    kernel and torch op of m2po_loss + backward, stay within BYTES_PER_TOKEN; stats reads
    each input once, and the passes after it read no per-token input: the official rule's
    constrained bounds (the typical batch) re-read only the wide tail's tokens."""
    a, b = N, 2 * N
    fit = linear_fit(_trace(variant, regime, n=a), a, _trace(variant, regime, n=b), b)
    total = sum(f["read_per_token"] + f["write_per_token"] for f in fit.values())
    assert total <= BYTES_PER_TOKEN, {k: (round(f["read_per_token"], 2), round(f["write_per_token"], 2))
                                      for k, f in fit.items()}
    if variant == "official":
        # unconstrained: no read at all; constrained: the wide tail (a few % of the valid tokens,
        # 17 B each: its position and the four inputs) instead of every token (13 B)
        apply = fit["apply_official_kernel"]
        assert apply["read_per_token"] < (0.1 if regime == "none" else 1.5), apply
        assert apply["write_per_token"] < (0.1 if regime == "none" else 0.5), apply
    # 13 = logprobs, old_logprobs, advantages (4 each), mask (1); the official rule also reads
    # each row's first advantage, one address per row (the tracer counts it per lane; the GPU's
    # cache serves it)
    assert fit["stats_kernel"]["read_per_token"] == pytest.approx(17.0 if variant == "official" else 13.0, abs=0.1)
    assert fit["stats_kernel"]["write_per_token"] <= 4.5  # the float32 derivative, partials, tail


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("regime", ["all-equal", "typical", "stressed", "wide"])
def test_the_gpu_aggregation_paths_give_exact_sums(variant, regime, device):
    """The block pre-aggregation as the GPU runs it (one bucket; a few buckets one at a time;
    many, sorted and segment-scanned: "wide" puts ~half of each block in distinct tail buckets)
    gives the PyTorch description's sums and level-2 histograms bit for bit."""
    from m2po_ops import radix_select
    from m2po_ops import triton_backend as tb
    from m2po_ops.config import M2POConfig
    from m2po_ops.inputs import prepare

    if regime == "wide":
        g = torch.Generator().manual_seed(3)
        n = 2 * tb.BLOCK
        old = -torch.rand(n, generator=g) * 3
        adv = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        args = (old + adv.sign() * (0.25 + torch.rand(n, generator=g)), old, adv, torch.rand(n, generator=g) < 0.9)
    else:
        batch = make_trace_batch(N // 2, regime)
        args = tuple(t.detach() for t in batch.args())
    config = M2POConfig(tau=0.04, variant=variant, validate=False)
    tok = prepare(*args, config, [0, args[0].numel()] if args[0].dim() == 1 and variant == "official" else None)
    ws = tb.Workspace.allocate(tok.numel, tok.device)
    tb.stats_pass(tok, config, ws, write_keys=True)
    assert torch.equal(ws.sums, radix_select.summarize(ws.key, config)), regime
    tb.select1(ws, config)
    tb.level2(ws, config)
    state = ws.state1.clone()
    if int(state[radix_select.REFINE]):
        want = radix_select.level2(ws.key, state, config).reshape(ws.hist2.shape)
        slots = 4 if variant == "official" else 2
        assert torch.equal(ws.hist2[:slots], want[:slots]), regime
