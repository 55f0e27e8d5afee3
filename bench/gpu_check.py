"""The checks only a GPU can show, one step per call (bench/gpu_check.sh runs them all).

    python -m bench.gpu_check <step> --out DIR [--dry-run]
    python -m bench.gpu_check list          # the steps, one line each (no torch import)

Steps: tests, histogram, masks, kernels, bench (see STEPS). Each writes DIR/<step>.json (what it
measured, "passed"), prints progress to stderr and a last line "RESULT <step>: ok|FAIL: ..." to
stdout, and exits 1 when the check fails.

Without CUDA, or with --dry-run, a step runs the same code at a tiny size on CPU tensors with the
Triton kernels under the interpreter (TRITON_INTERPRET=1, set here before m2po_ops is imported),
so the script cannot rot between GPU sessions; its timings are then interpreter times, not
measurements.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it checks, the real sizes on the GPU). Printed by `list` and in dry-run.
STEPS = {
    "tests": ("the GPU tests (pytest -m gpu): sync-free under set_sync_debug_mode('error'), "
              "CUDA-graph replay on new data, both variants", "the tests' own sizes"),
    "histogram": ("the stats and level2 kernels' histograms equal torch's scatter_add histograms exactly, "
                  "and two runs of loss+backward and mask are bit-identical (loss, grad, keep, metrics)",
                  "16M tokens, typical and stressed regimes, paper and official"),
    "masks": ("keep masks of backend='triton' equal backend='torch' bit for bit: fp32/bf16 x paper/official "
              "x spread, bf16-quantised, near-on-policy, all-equal and tied-run m2 x 2-3 taus",
              "1M tokens ((1024, 1024) padded)"),
    "kernels": ("per-kernel device time (torch.profiler) of one forward+backward, against a plain read "
                "and a device copy of the same bytes", "32K / 1M / 16M tokens, fp32, paper, typical and none"),
    "bench": ("the short benchmark: python -m bench.run --quick --device cuda (every competitor's mask "
              "checked against the reference)", "32K and 1M tokens, fp32, 3 regimes"),
}

GPU_SIZES = dict(histogram=1 << 24, masks=1 << 20, kernels=[1 << 15, 1 << 20, 1 << 24])
DRY_SIZES = dict(histogram=4096, masks=2048, kernels=[2048])
# The Triton kernels the forward launches (names as the profiler shows them), in launch order.
TRITON_KERNELS = ("stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "ties_kernel",
                  "tie_scan_kernel", "apply_kernel", "finalize_kernel")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Ctx:
    """Where a step runs and writes."""

    def __init__(self, out: str, dry: bool):
        import torch

        self.out = out
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.sizes = DRY_SIZES if dry else GPU_SIZES

    def announce(self, step: str) -> None:
        what, sizes = STEPS[step]
        if self.dry:
            log(f"DRY RUN (CPU interpreter): would check {what} at {sizes} on the GPU; "
                "running the same code at a tiny size on the CPU")
        else:
            log(f"checking {what} at {sizes}")

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


def _bits(t):
    """A tensor's bit pattern (floats viewed as same-width ints), so NaN == NaN and -0 != +0."""
    import torch

    if t.dtype.is_floating_point:
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def bit_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


# ---------------------------------------------------------------------------------------------
# 1. tests


def step_tests(ctx: Ctx) -> dict:
    """pytest -m gpu: the tests marked gpu (on a GPU: sync debug mode "error", CUDA-graph replay).
    Only the gpu selection runs, so tests/test_gpu_check.py (unmarked) never recurses."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    log("running " + " ".join(cmd[1:]) + f" > {ctx.path('tests.txt')}")
    with open(ctx.path("tests.txt"), "w") as f:
        # stream, so a timeout still leaves what ran in tests.txt
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            f.flush()
            sys.stderr.write("  | " + line)
        rc = proc.wait()
    with open(ctx.path("tests.txt")) as f:
        tail = f.read().strip().splitlines()[-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                               tail[0])}
    # rc 5 = no test collected: the gpu tests are gone, which is a failure of this check too
    passed = rc == 0
    skipped = counts.get("skipped", 0)
    headline = f"pytest -m gpu rc={rc}: {tail[0].strip('= ')}"
    if skipped and not ctx.dry:
        headline += f" (WARNING: {skipped} skipped on a GPU)"
    return dict(passed=passed, headline=headline, rc=rc, counts=counts, command=" ".join(cmd[1:]),
                output="tests.txt")


# ---------------------------------------------------------------------------------------------
# 2. histogram


def _full_call(batch, variant):
    """One m2po_loss + backward and one m2po_mask on the Triton backend: everything they return."""
    from m2po_ops import m2po_loss, m2po_mask

    lp = batch.logprobs
    lp.grad = None
    loss, metrics = m2po_loss(*batch.args(), variant=variant, backend="triton", validate=False)
    loss.backward()
    keep, mask_metrics = m2po_mask(*batch.args(), variant=variant, backend="triton", validate=False)
    out = {"loss": loss.detach().clone(), "grad": lp.grad.detach().clone(), "keep": keep.clone()}
    out.update({f"loss_metrics.{k}": v.clone() for k, v in metrics.items()})
    out.update({f"mask_metrics.{k}": v.clone() for k, v in mask_metrics.items()})
    lp.grad = None
    return out


def step_histogram(ctx: Ctx) -> dict:
    """Histogram exactness (integer atomics: any order gives the same bits) and run-to-run bit
    identity of the whole call (float partials reduced in a fixed order, not by atomics)."""
    import torch

    from m2po_ops import M2POConfig
    from m2po_ops import histogram as H
    from m2po_ops import triton_backend as tb
    from m2po_ops.inputs import prepare

    from .inputs import make_batch

    n = ctx.sizes["histogram"]
    rows, passed = [], True
    for regime in ("typical", "stressed"):  # ~0.1% and ~5% masked: level2 and the tie passes run
        batch = make_batch(n, regime, "float32", device=ctx.device, seed=0)
        for variant in ("paper", "official"):
            t0 = time.perf_counter()
            config = M2POConfig(tau=0.04, variant=variant, validate=False)
            tok = prepare(*batch.args(), config)
            ws = tb.Workspace.allocate(tok.numel, tok.device)
            key = tb.stats_pass(tok, config, ws)
            expected = H.level1(key)
            hist_equal = torch.equal(ws.hist1, expected)
            bad_buckets = int((ws.hist1 != expected).any(0).sum())
            # level 2 (the second atomic histogram, inside the bucket select1 picked), same test
            tb.select1(ws, config)
            tb.level2(key, ws)
            state1 = ws.state1.clone()
            hist2_equal = torch.equal(ws.hist2, H.level2(key, state1).reshape(ws.hist2.shape))
            refined = bool(state1[H.REFINE] != 0)
            first, second = _full_call(batch, variant), _full_call(batch, variant)
            differ = [k for k in first if not bit_equal(first[k], second[k])]
            row = dict(
                regime=regime, variant=variant, n_tokens=batch.n_tokens, num_valid=batch.num_valid,
                trust_region_tokens=int(expected[0].sum()), nonempty_buckets=int((expected[0] > 0).sum()),
                hist_equal=hist_equal, mismatching_buckets=bad_buckets, level2_refined=refined,
                level2_tokens=int(ws.hist2[0].sum() + ws.hist2[2].sum()), hist2_equal=hist2_equal,
                masked_fraction=float(first["loss_metrics.masked_fraction"]),
                run_to_run_identical=not differ, differing_outputs=differ,
                compared_outputs=sorted(first), seconds=round(time.perf_counter() - t0, 3),
            )
            rows.append(row)
            passed &= hist_equal and hist2_equal and not differ
            log(f"  {regime:8s} {variant:8s} level-1 exact={hist_equal} ({bad_buckets} bad buckets of "
                f"{row['nonempty_buckets']} non-empty), level-2 exact={hist2_equal} (refined={refined}, "
                f"{row['level2_tokens']} tokens), masked {row['masked_fraction']:.4%}, "
                f"run-to-run identical={not differ}" + (f" differ: {differ}" if differ else ""))
        del batch
    headline = (f"{n} tokens: level-1 histogram exact in {sum(r['hist_equal'] for r in rows)}/{len(rows)}, "
                f"level-2 in {sum(r['hist2_equal'] for r in rows)}/{len(rows)}, "
                f"run-to-run bit-identical in {sum(r['run_to_run_identical'] for r in rows)}/{len(rows)}")
    return dict(passed=passed, headline=headline, n_tokens=n, cases=rows)


# ---------------------------------------------------------------------------------------------
# 3. masks

ROW = 1024  # (B, T) with T = 1024: the official variant needs rows (or cu_seqlens)
# distribution -> the taus it runs at: 0.04 (the paper's), 0 (every trust-region token with
# m2 > 0 masked) and, where 0.04 alone would not probe the interesting place, one more
MASK_CASES = {
    "spread": (0.04, 0.0),  # delta ~ N(0, 0.3): mean m2 ~0.09, a cut well inside a continuous spread
    "bf16_quantised": (0.04, 0.0),  # the same, log-probs rounded to bf16: many exact ties in m2
    "near_on_policy": (0.04, 0.0, 1e-7),  # |delta| ~ 1e-3 + a few outliers; 1e-7 cuts inside the bulk
    "all_equal": (0.04, 0.0, 0.25),  # every trust-region m2 = 0.25: all masked, or (tau = 0.25) none
    "tied_run": (0.04, 0.0),  # 70% m2 = 1/64, 30% m2 = 0.25: the cut lands inside the tied run
}


def mask_inputs(kind: str, n: int, dtype, device, seed: int = 0):
    """(logprobs, old_logprobs, advantages, mask) as (B, 1024), padded rows, GRPO advantages."""
    import torch

    b = max(1, n // ROW)
    g = torch.Generator().manual_seed(seed * 7919 + sorted(MASK_CASES).index(kind))
    lengths = torch.randint(ROW // 2, ROW + 1, (b,), generator=g)
    lengths[0] = ROW  # one full row
    mask = torch.arange(ROW)[None, :] < lengths[:, None]
    adv_row = torch.randn(b, 1, generator=g)
    old = -torch.empty(b, ROW).exponential_(1 / 0.7, generator=g)
    if kind in ("spread", "bf16_quantised"):
        delta = torch.randn(b, ROW, generator=g) * 0.3
    elif kind == "near_on_policy":
        delta = torch.randn(b, ROW, generator=g) * 1e-3
        valid = mask.reshape(-1).nonzero()[:, 0]
        k = max(4, int(0.002 * valid.numel()))  # ~0.2% outliers in the trust region, m2 in [16, 36]
        pick = valid[torch.randperm(valid.numel(), generator=g)[:k]]
        sign = torch.sign(adv_row).expand(b, ROW).reshape(-1)
        delta = delta.reshape(-1)
        delta[pick] = sign[pick] * (4 + 2 * torch.rand(k, generator=g))
        delta = delta.reshape(b, ROW)
    else:  # all_equal / tied_run: dyadic values, so old + delta and delta are exact in bf16 too
        old = -torch.randint(0, 64, (b, ROW), generator=g).float() / 16
        adv_row = adv_row.abs() + 0.1  # positive: delta > 0 puts every valid token in the trust region
        delta = torch.full((b, ROW), 0.5)
        if kind == "tied_run":
            delta = torch.where(torch.rand(b, ROW, generator=g) < 0.7, torch.full_like(delta, 0.125), delta)
    lp = old + delta
    if kind == "bf16_quantised":
        lp, old = lp.bfloat16().float(), old.bfloat16().float()
    garbage = -torch.empty(b, ROW).exponential_(1.0, generator=g) * 5  # padding: finite garbage, as verl
    lp = torch.where(mask, lp, garbage)
    old = torch.where(mask, old, torch.zeros_like(old))
    adv = torch.where(mask, adv_row.expand(b, ROW), torch.zeros(b, ROW))
    return lp.to(dtype).to(device), old.to(dtype).to(device), adv.to(device), mask.to(device)


def step_masks(ctx: Ctx) -> dict:
    """The fused kernels against the PyTorch reference on the distributions where GPU numerics
    (FMA contraction, approximate divides, bf16 loads) or tie handling could differ."""
    import torch

    from m2po_ops import m2po_mask

    n = ctx.sizes["masks"]
    rows, passed = [], True
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for kind, taus in MASK_CASES.items():
            args = mask_inputs(kind, n, dtype, ctx.device)
            for variant in ("paper", "official"):
                for tau in taus:
                    kt, mt = m2po_mask(*args, tau=tau, variant=variant, backend="triton", validate=False)
                    kr, mr = m2po_mask(*args, tau=tau, variant=variant, backend="torch", validate=False)
                    mismatches = int((kt != kr).sum())
                    row = dict(dtype=dname, case=kind, variant=variant, tau=tau, n_tokens=args[0].numel(),
                               masked_fraction_triton=float(mt["masked_fraction"]),
                               masked_fraction_torch=float(mr["masked_fraction"]),
                               trust_region_fraction=float(mr["trust_region_fraction"]),
                               mismatching_tokens=mismatches)
                    rows.append(row)
                    passed &= mismatches == 0
                    log(f"  {dname:8s} {kind:15s} {variant:8s} tau={tau:<6g} masked {row['masked_fraction_torch']:8.4%}"
                        f" (triton {row['masked_fraction_triton']:8.4%}), mismatching tokens {mismatches}")
    bad = [r for r in rows if r["mismatching_tokens"]]
    # a case meant to cut that masks nothing would check little: flagged, not failed
    uncut = sorted({f"{r['case']}/{r['variant']}" for r in rows if r["tau"] == 0.04 and r["masked_fraction_torch"] == 0})
    headline = (f"{len(rows) - len(bad)}/{len(rows)} cases bit-identical at {n} tokens"
                + (f"; MISMATCH in {len(bad)}: " + ", ".join(f"{r['dtype']}/{r['case']}/{r['variant']}/tau={r['tau']}"
                                                           for r in bad[:6]) if bad else "")
                + (f"; nothing masked at tau=0.04 in {uncut}" if uncut else ""))
    return dict(passed=passed, headline=headline, n_tokens=n, cases=rows, nothing_masked_at_0_04=uncut)


# ---------------------------------------------------------------------------------------------
# 4. kernels


def time_calls(fn, ctx: Ctx, iters: int) -> list:
    """Milliseconds per call. CUDA: an event pair around each call, launched back to back with one
    synchronize at the end (no host sync inside the timed loop; a call's time includes any wait
    for its own launches, as in eager training). CPU: wall time per call."""
    import torch

    if ctx.device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


def short_kernel_name(name: str) -> str:
    """Readable names for torch's templated kernels; Triton kernels keep their function name."""
    for k in TRITON_KERNELS:
        if k in name:
            return k
    low = name.lower()
    if "memset" in low:
        return "memset"
    if "memcpy" in low:
        return "memcpy"
    # e.g. "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float,
    # float, at::native::binary_internal::MulFunctor<float> >, ...>" -> "vectorized_elementwise_kernel[MulFunctor]"
    functors = list(dict.fromkeys(re.findall(r"(\w+Functor)\b", name)))
    inner = [f for f in functors if f not in ("BinaryFunctor", "AUnaryFunctor", "BUnaryFunctor")] or functors
    kernel = re.search(r"at::native::(?:\w+::)*(\w*kernel\w*)", name)
    if inner or kernel:
        return (kernel.group(1) if kernel else "kernel") + (f"[{','.join(inner)}]" if inner else "")
    return name[:80]


def _group(durations) -> dict:
    """(name, microseconds) pairs -> {short name: [total us, calls, {full names}]}."""
    out = {}
    for name, us in durations:
        entry = out.setdefault(short_kernel_name(name), [0.0, 0, set()])
        entry[0] += us
        entry[1] += 1
        entry[2].add(name[:300])
    return out


def device_kernel_times(fn, ctx: Ctx, iters: int):
    """Per-kernel device time over ``iters`` calls: {name: [total us, calls]}, and a note.

    CUDA: torch.profiler's device events (kernels, memsets; time_range is the device interval in
    every torch 2.x; device_time_total is the same number in newer ones). CPU (dry run): the
    interpreter's wall time per Triton launch, by wrapping the backend's launcher."""
    if ctx.device.type == "cuda":
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        durations = []
        for e in prof.events():
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            tr = getattr(e, "time_range", None)
            us = tr.elapsed_us() if tr is not None else getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            durations.append((e.name, float(us)))
        note = None if durations else "the profiler recorded no device events (CUPTI unavailable?)"
        return _group(durations), note
    from unittest import mock

    from m2po_ops import triton_backend as tb

    original = getattr(tb, "_launch", None)
    if original is None:
        return {}, "m2po_ops.triton_backend._launch not found: no per-kernel times"
    durations = []

    def timed(kernel, grid, *args, **meta):
        t0 = time.perf_counter()
        original(kernel, grid, *args, **meta)
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else getattr(kernel, "__name__", str(kernel))
        durations.append((name, (time.perf_counter() - t0) * 1e6))

    with mock.patch.object(tb, "_launch", timed):
        for _ in range(iters):
            fn()
    return _group(durations), "CPU interpreter wall time per launch (not a device time)"


def step_kernels(ctx: Ctx) -> dict:
    """Where the time goes, kernel by kernel, and how far the whole call is from the memory
    bound of just reading its inputs."""
    import torch

    from m2po_ops import m2po_loss

    from .inputs import make_batch

    warmup, iters = (1, 1) if ctx.dry else (3, 20)
    unit = "CPU interpreter wall time, not meaningful" if ctx.dry else "device time"
    cases = []
    for n in ctx.sizes["kernels"]:
        for regime in ("typical", "none"):
            batch = make_batch(n, regime, "float32", device=ctx.device, seed=0)
            lp, olp, adv, mask = batch.args()

            def step():
                lp.grad = None
                loss, _ = m2po_loss(lp, olp, adv, mask, backend="triton", validate=False)
                loss.backward()

            for _ in range(warmup):  # compiles on the first call
                step()
            ctx.sync()
            _, metrics = m2po_loss(lp, olp, adv, mask, backend="triton", validate=False)
            masked = float(metrics["masked_fraction"])  # read outside every timed region
            per_kernel, note = device_kernel_times(step, ctx, iters)
            call_ms = statistics.median(time_calls(step, ctx, iters))

            def plain_read():  # one reduction per input: each byte read once, nothing written
                return lp.detach().sum() + olp.sum() + adv.sum() + mask.sum()

            in_bytes = sum(t.numel() * t.element_size() for t in (lp, olp, adv, mask))
            src = torch.empty(in_bytes, dtype=torch.uint8, device=ctx.device)
            dst = torch.empty_like(src)
            plain_read()
            dst.copy_(src)
            read_ms = statistics.median(time_calls(plain_read, ctx, iters))
            copy_ms = statistics.median(time_calls(lambda: dst.copy_(src), ctx, iters))
            del src, dst
            kernels = [dict(kernel=k, calls_per_iter=c / iters, mean_us_per_call=t / c, us_per_iter=t / iters,
                            full_names=sorted(names))
                       for k, (t, c, names) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])]
            device_sum_us = sum(k["us_per_iter"] for k in kernels)
            min_bytes = batch.nbytes_min()  # inputs read + gradient written
            case = dict(
                n_tokens=batch.n_tokens, regime=regime, masked_fraction=masked, iters=iters,
                call_us=call_ms * 1e3, device_sum_us=device_sum_us, kernels=kernels,
                launches_per_call=sum(k["calls_per_iter"] for k in kernels), profiler_note=note,
                input_bytes=in_bytes, min_bytes_fwd_bwd=min_bytes,
                read_us=read_ms * 1e3, copy_us=copy_ms * 1e3,
                gbps_call=min_bytes / (call_ms * 1e-3) / 1e9,
                gbps_read=in_bytes / (read_ms * 1e-3) / 1e9,
                gbps_copy=2 * in_bytes / (copy_ms * 1e-3) / 1e9,  # a copy reads and writes in_bytes
                ratio_vs_read=call_ms / read_ms, ratio_vs_copy=call_ms / copy_ms,
            )
            cases.append(case)
            log(f"  {n:>9} tokens {regime:8s} masked {masked:.3%}: fwd+bwd {case['call_us']:.1f} us "
                f"(kernels {device_sum_us:.1f} us, {case['launches_per_call']:.0f} launches), plain read "
                f"{case['read_us']:.1f} us, copy {case['copy_us']:.1f} us -> {case['ratio_vs_read']:.2f}x read"
                + (f" [{note}]" if note else ""))
            del batch, lp, olp, adv, mask
    data = dict(unit=unit, dry_run=ctx.dry, cases=cases,
                timing=("CUDA events around each call, back to back, median of iters; per-kernel: torch.profiler "
                        "device events over iters calls after warm-up" if not ctx.dry else unit))
    with open(ctx.path("kernels.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(ctx.path("kernels.md"), "w") as f:
        f.write(kernels_markdown(data))
    big = cases[-2] if len(cases) >= 2 else cases[-1]  # largest size, typical regime
    headline = (f"{big['n_tokens']} tokens {big['regime']}: fwd+bwd {big['call_us']:.1f} us = "
                f"{big['ratio_vs_read']:.2f}x a plain read of the inputs ({big['gbps_call']:.0f} GB/s)"
                + (" [interpreter time]" if ctx.dry else ""))
    return dict(passed=True, headline=headline, output=["kernels.json", "kernels.md"], cases=cases)


def kernels_markdown(data: dict) -> str:
    lines = [f"# Per-kernel times of one m2po_loss forward+backward (fp32, paper, Triton)", "",
             f"Unit: {data['unit']}. Timing: {data['timing']}.", "",
             "| tokens | regime | masked | fwd+bwd | kernels sum | launches | plain read | copy | "
             "input MB | GB/s call (min bytes) | GB/s read | GB/s copy (r+w) | call / read | call / copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["cases"]:
        lines.append(f"| {c['n_tokens']} | {c['regime']} | {c['masked_fraction']:.3%} | {c['call_us']:.1f} us | "
                     f"{c['device_sum_us']:.1f} us | {c['launches_per_call']:.0f} | {c['read_us']:.1f} us | "
                     f"{c['copy_us']:.1f} us | {c['input_bytes'] / 1e6:.1f} | {c['gbps_call']:.0f} | "
                     f"{c['gbps_read']:.0f} | {c['gbps_copy']:.0f} | {c['ratio_vs_read']:.2f}x | "
                     f"{c['ratio_vs_copy']:.2f}x |")
    for c in data["cases"]:
        lines += ["", f"## {c['n_tokens']} tokens, {c['regime']}" + (f" ({c['profiler_note']})" if c["profiler_note"] else ""),
                  "", "| kernel | calls / iter | mean us / call | us / iter | share |", "|---|---|---|---|---|"]
        total = c["device_sum_us"] or 1.0
        for k in c["kernels"]:
            lines.append(f"| {k['kernel']} | {k['calls_per_iter']:g} | {k['mean_us_per_call']:.2f} | "
                         f"{k['us_per_iter']:.2f} | {k['us_per_iter'] / total:.1%} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# 5. bench


def step_bench(ctx: Ctx) -> dict:
    """The real benchmark's quick mode on the GPU. Dry run: the same CLI on the CPU at 4K tokens,
    without the `compiled` competitor (its torch.compile takes ~30 s on 2 cores: the whole run
    measured 37 s with it, 2 s without; the CPU benchmark itself is `make bench`)."""
    if ctx.dry:
        from . import competitors

        names = [c.name for c in competitors.COMPETITORS if not c.cuda_only and c.name != "compiled"]
        log("DRY RUN: would run python -m bench.run --quick --device cuda --out-dir DIR --no-plot")
        args = ["--quick", "--device", "cpu", "--sizes", "4096", "--regimes", "typical", "--dtypes", "float32",
                "--competitors", ",".join(names)]
    else:
        args = ["--quick", "--device", "cuda"]
    cmd = [sys.executable, "-m", "bench.run", *args, "--out-dir", ctx.out, "--no-plot"]
    log("running " + " ".join(cmd[1:]))
    started = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    written = [p for p in glob.glob(os.path.join(ctx.out, "*quick*.json")) if os.path.getmtime(p) >= started - 1]
    rows, wrong, errors, triton = [], [], [], []
    if written:
        with open(written[0]) as f:
            rows = json.load(f).get("results", [])
        wrong = [r for r in rows if r.get("status") == "wrong" or r.get("mask_equal") is False]
        errors = [r for r in rows if r.get("status") == "error" and r["competitor"].startswith("m2po_ops")]
        triton = [r for r in rows if r["competitor"].startswith("m2po_ops[triton]") and r.get("status") == "ok"]
    passed = rc == 0 and bool(written) and not wrong and not errors
    summary = "; ".join(f"{r['competitor'].replace('m2po_ops', '')} {r['n_tokens']}/{r['regime']} {r['median_ms'] * 1e3:.0f} us"
                        for r in triton if r["regime"] == "typical")
    headline = (f"bench.run rc={rc}, {len(rows)} rows, {len(wrong)} wrong masks, {len(errors)} m2po_ops errors"
                + (f"; {summary}" if summary else ""))
    return dict(passed=passed, headline=headline, rc=rc, command=" ".join(cmd[1:]),
                output=[os.path.basename(p) for p in written],
                wrong=[{k: r.get(k) for k in ("competitor", "n_tokens", "dtype", "regime", "note")} for r in wrong],
                errors=[{k: r.get(k) for k in ("competitor", "n_tokens", "regime", "error")} for r in errors])


# ---------------------------------------------------------------------------------------------
# env and main


def write_env(ctx: Ctx) -> None:
    """Versions into DIR/env.txt (bench/gpu_check.sh appends nvidia-smi on a GPU)."""
    import platform

    import torch

    lines = [f"date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", f"mode: {'dry run (CPU interpreter)' if ctx.dry else 'GPU'}",
             f"python: {platform.python_version()} ({sys.executable})", f"platform: {platform.platform()}",
             f"torch: {torch.__version__} (CUDA {torch.version.cuda})"]
    for mod in ("triton", "numpy"):
        try:
            lines.append(f"{mod}: {__import__(mod).__version__}")
        except Exception as exc:  # pragma: no cover - depends on the machine
            lines.append(f"{mod}: not importable ({exc})")
    if not ctx.dry:
        p = torch.cuda.get_device_properties(0)
        lines.append(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.1f} GiB")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        lines.append(f"git: {commit.stdout.strip() or 'unknown (no .git here)'}")
    except Exception:
        lines.append("git: unknown")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    with open(ctx.path("env.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


STEP_FUNCS = {"tests": step_tests, "histogram": step_histogram, "masks": step_masks, "kernels": step_kernels,
              "bench": step_bench}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=[*STEPS, "list", "env"])
    p.add_argument("--out", default=None, help="the results folder (one for all steps)")
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, Triton interpreter, tiny sizes")
    opts = p.parse_args(argv)
    if opts.step == "list":
        for name, (what, sizes) in STEPS.items():
            print(f"  {name:10s} {what} [GPU: {sizes}]")
        return 0
    if not opts.out:
        p.error("--out DIR is required")
    os.makedirs(opts.out, exist_ok=True)

    import torch

    dry = opts.dry_run or not torch.cuda.is_available()
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before m2po_ops.kernels is imported (by the steps)
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    ctx = Ctx(opts.out, dry)
    if opts.step == "env":
        write_env(ctx)
        return 0

    ctx.announce(opts.step)
    t0 = time.perf_counter()
    try:
        result = STEP_FUNCS[opts.step](ctx)
    except Exception as exc:
        traceback.print_exc()
        result = dict(passed=False, headline=f"error: {type(exc).__name__}: {str(exc)[:300]}",
                      traceback=traceback.format_exc())
    result = dict(step=opts.step, dry_run=dry, device=str(ctx.device), seconds=round(time.perf_counter() - t0, 2),
                  **result)
    with open(ctx.path(f"{opts.step}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    headline = " ".join(str(result["headline"]).split())
    print(f"RESULT {opts.step}: {'ok' if result['passed'] else 'FAIL'}: {headline}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
