"""`make bench`: m2po_ops against the M2PO code users run today, on the same inputs, in one run.

    python -m bench.run            # full suite (CPU: sizes capped at 4M tokens; CUDA: up to 16M)
    python -m bench.run --quick    # about one minute
    python -m bench.run --sizes 32768,262144 --dtypes float32 --regimes typical

Prints a table (times and ratios, then host syncs / launches / memory), and writes
bench/results/<device>-<date>[-quick].json, .md (the tables) and .png (time vs tokens, log-log).
See bench/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch

import m2po_ops

from . import baselines, compile_time, competitors, host_path, report, syncs
from .timing import gc_paused
from .inputs import BASE_SIGMA, DTYPES, OUTLIER_RANGE, REGIME_RANGES, REGIMES, ROW_LEN, make_batch, tail_fraction

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

SIZES_CUDA = [32768, 262144, 1048576, 4194304, 16777216]
SIZES_CPU = [32768, 262144, 1048576, 4194304]  # 16M is left out on CPU to stay under 10 minutes
QUICK_CPU = [32768, 262144]
QUICK_CUDA = [32768, 1048576]
TAU = 0.04


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except Exception:
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": _loadavg(),
    }
    versions = {
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "gpu_name": None,
        "m2po_ops": m2po_ops.__version__,
        "m2po_ops_git": _git_commit(),
        "numpy": None,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import numpy

        versions["numpy"] = numpy.__version__
    except Exception:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        versions["gpu_name"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_sm_count"] = props.multi_processor_count
    return info, versions


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# ---------------------------------------------------------------------------------------------
# measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, budget_s: float, min_reps: int, max_reps: int) -> list:
    """Wall time of each call in ms (CUDA: events around the call, after a synchronize, so host
    stalls inside the call count)."""
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_floor(nbytes: int, device) -> dict:
    """The roofline floor: a device-to-device copy that reads and writes nbytes in all."""
    half = max(nbytes // 2, 1)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ts = time_steps(lambda: dst.copy_(src), device, 0.3, 10, 200)
    med = statistics.median(ts)
    return {"floor_us": med * 1e3, "floor_bytes": 2 * half, "floor_gbps": 2 * half / (med * 1e-3) / 1e9}


def count_launches(step, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = memcpy = memset = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        if "memcpy" in name:
            memcpy += 1
        elif "memset" in name:
            memset += 1
        else:
            kernels += 1
    return {"kernels": kernels, "memcpy": memcpy, "memset": memset}


def peak_extra_mb(step, device):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cuda_sync_warnings(step) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def reference(batch) -> dict:
    """The reference answer for both variants: keep mask, metrics, loss and gradient."""
    out = {}
    lp = batch.logprobs
    for variant in ("paper", "official"):
        keep, metrics = m2po_ops.m2po_mask(*batch.args(), variant=variant, backend="torch")
        lp.grad = None
        loss, _ = m2po_ops.m2po_loss(*batch.args(), variant=variant, backend="torch")
        loss.backward()
        out[variant] = {
            "keep": keep,
            "loss": loss.detach(),
            "grad": lp.grad.detach().clone(),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        lp.grad = None
    return out


def check(comp, batch, ref, device, opts, row: dict):
    """Set up one competitor on one input and run its checked, instrumented call: fills ``row``
    (syncs, mask and loss check, or the failure) and returns (runner, seconds of the checked
    call) when it may be timed, else None."""
    budget = opts.official_budget if comp.name == "official-eager" else None
    try:
        runner = competitors.prepare(comp, batch, official_budget_s=budget)
    except baselines.BudgetExceeded:
        raise
    except Exception as exc:  # e.g. CUDA graph capture failure, missing Triton backend
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        return None
    # 1) the checked, instrumented call (host syncs counted)
    try:
        for _ in range(comp.sync_runs):
            t_check = time.perf_counter()
            with syncs.count_syncs() as counted:
                keep, loss, grad = runner.check()
            _sync(device)
            t_check = time.perf_counter() - t_check
    except baselines.BudgetExceeded as exc:
        est_ms = exc.seconds * exc.candidates / max(exc.iterations, 1) * 1e3
        row.update(status="timeout", budget_s=budget, lower_bound_ms=exc.seconds * 1e3, estimated_ms=est_ms,
                   syncs=exc.iterations + 2, syncs_lower_bound=True,
                   note=f"threshold loop passed the per-call budget of {budget:g} s after {exc.iterations} of "
                        f"{exc.candidates} candidates; estimated_ms extrapolates linearly (not measured)")
        return None
    except Exception as exc:
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        return None
    row.update(syncs=counted.total, syncs_by_kind=dict(counted.by_kind))
    if runner.sync_probe is not None:
        # the library on CPU: the timed call reads values on the host (free there); the syncs a
        # GPU would see are those of the device path, which the probe runs on the same input
        with syncs.count_syncs() as device_counted:
            left_out = runner.sync_probe()
        by_kind = dict(device_counted.by_kind)
        if left_out:
            by_kind["Tensor.tolist"] = by_kind.get("Tensor.tolist", 0) - left_out
            by_kind = {k: v for k, v in by_kind.items() if v}
        row.update(syncs=sum(by_kind.values()), syncs_by_kind=by_kind, cpu_host_reads=counted.total,
                   syncs_note="counted on the device path (what a CUDA tensor runs), without split.limbs_to_float's "
                              f"CPU-only shortcut ({left_out} Tensor.tolist)")
    if keep is None:
        keep = runner.mask()
    r = ref[comp.variant]
    mismatches = int((keep.reshape(r["keep"].shape) != r["keep"]).sum())
    ref_loss = float(r["loss"])
    loss_err = abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_err = float((grad.float() - r["grad"].float()).abs().max()) if grad is not None else None
    row.update(mask_equal=mismatches == 0, mask_mismatches=mismatches, loss_rel_err=loss_err, grad_max_abs_err=grad_err)
    if mismatches or not math.isfinite(loss_err) or loss_err > 1e-3:
        row.update(status="wrong", note="mask differs from the reference" if mismatches else "loss differs")
        return None
    return runner, t_check


def _time_one(step, device) -> float:
    """Wall time of one call in ms (CUDA: events around the call, after a synchronize, so host
    stalls inside the call count)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def time_round_robin(timed: dict, rows: dict, device, opts) -> None:
    """Time the competitors of one input in rounds, one call of each per round, so that drifting
    machine load hits every competitor alike. The order rotates by one each round, so every
    competitor follows every other equally often: on a CPU the call before changes the next
    one's time (its caches and predictors; measured up to ~40% after official-eager's Python
    loop). At least opts.min_reps rounds, then more while the cell's budget (opts.rep_budget per
    competitor) lasts, at most opts.max_reps. Fills each row's median, p10/p90, min/max and
    reps."""
    times = {name: [] for name in timed}
    for name, (runner, t_check) in list(timed.items()):  # one untimed warm-up call each
        if not opts.quick and t_check < 0.25:
            try:
                runner.step()
                _sync(device)
            except baselines.BudgetExceeded as exc:
                rows[name].update(status="timeout", lower_bound_ms=exc.seconds * 1e3,
                                  note="threshold loop passed the per-call budget during the timed calls")
                del timed[name]
    budget = opts.rep_budget * max(len(timed), 1)
    start = time.perf_counter()
    rounds = 0
    with gc_paused():
        while timed and rounds < opts.max_reps and (rounds < opts.min_reps or time.perf_counter() - start < budget):
            order = list(timed.items())
            shift = rounds % len(order)
            for name, (runner, _) in order[shift:] + order[:shift]:
                try:
                    times[name].append(_time_one(runner.step, device))
                except baselines.BudgetExceeded as exc:
                    rows[name].update(status="timeout", lower_bound_ms=exc.seconds * 1e3,
                                      note="threshold loop passed the per-call budget during the timed calls")
                    del timed[name]
            rounds += 1
    for name in timed:
        ts, row = times[name], rows[name]
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [med] * 9
        row.update(status="ok", median_ms=med, p10_ms=q[0], p90_ms=q[-1], min_ms=min(ts), max_ms=max(ts), reps=len(ts))
        runner = timed[name][0]
        if runner.setup_s:
            key = "compile_s" if name == "compiled" else "setup_s"
            row[key] = max(runner.setup_s - med / 1e3, 0.0) if name == "compiled" else runner.setup_s


def cuda_extras(comp, runner, device, row: dict) -> None:
    """CUDA only: sync debug mode, kernel launches, peak extra memory."""
    small = (row.get("syncs") or 0) < 20000
    try:
        row["cuda_sync_warnings"] = cuda_sync_warnings(runner.step) if small else None
    except Exception as exc:
        row["cuda_sync_warnings_error"] = str(exc)[:300]
    try:
        if small:
            row["launches"] = count_launches(runner.step, device)
            if "+graph" in comp.name:
                row["launches"]["graph_launches"] = 1
        else:
            row["launches"] = None
            row["launches_note"] = "not profiled: one kernel launch per .item() of the Python loop"
    except Exception as exc:
        row["launches_error"] = str(exc)[:300]
    try:
        row["peak_extra_mb"] = peak_extra_mb(runner.step, device)
        if "+graph" in comp.name:
            row["peak_extra_mb_note"] = "replay allocates nothing: the graph's memory pool is set at capture"
    except Exception as exc:
        row["peak_extra_mb_error"] = str(exc)[:300]


def _sizes_note(on_cuda: bool, opts):
    if opts.sizes:
        return "sizes chosen with --sizes"
    if opts.quick:
        return ("quick run: " + ("32K and 1M" if on_cuda else "32K and 256K") + " tokens"
                + (", float32 only" if opts.dtypes == "float32" else "") + " (full run: make bench)")
    if not on_cuda:
        return ("CPU run: sizes capped at 4M tokens (16M on CUDA, or with --sizes) to keep make bench "
                "under 10 minutes on 2 cores")
    return None


def run(opts) -> dict:
    device = torch.device(opts.device)
    on_cuda = device.type == "cuda"
    if opts.sizes:
        sizes = [int(s) for s in opts.sizes.split(",")]
    elif on_cuda:
        sizes = QUICK_CUDA if opts.quick else SIZES_CUDA
    else:
        sizes = QUICK_CPU if opts.quick else SIZES_CPU
    dtypes = opts.dtypes.split(",")
    regimes = opts.regimes.split(",")
    comps = [c for c in competitors.COMPETITORS if on_cuda or not c.cuda_only]
    if opts.competitors:
        wanted = opts.competitors.split(",")
        comps = [c for c in comps if c.name in wanted]
    if on_cuda and not m2po_ops.triton_available():
        log("warning: triton is not importable; the Triton rows will be reported as errors")

    info, versions = machine_info(device)
    started = time.time()
    results, inputs = [], []
    timed_out = set()  # (competitor, dtype, regime) that hit the budget at a smaller size
    for n in sizes:
        for dtype in dtypes:
            for regime in regimes:
                t_in = time.perf_counter()
                batch = make_batch(n, regime, dtype, device=device, seed=opts.seed)
                ref = reference(batch)
                rec = {
                    "n_tokens": batch.n_tokens, "dtype": dtype, "regime": regime, "rows": batch.logprobs.shape[0],
                    "row_len": batch.logprobs.shape[1], "num_valid": batch.num_valid,
                    "valid_fraction": batch.num_valid / batch.n_tokens,
                    "masked_fraction": {v: ref[v]["metrics"]["masked_fraction"] for v in ref},
                    "trust_region_fraction": {v: ref[v]["metrics"]["trust_region_fraction"] for v in ref},
                    "m2_before": ref["paper"]["metrics"]["m2"],
                    "m2_after": {v: ref[v]["metrics"]["m2_after"] for v in ref},
                    "min_bytes": batch.nbytes_min(),
                    "tail_fraction": tail_fraction(batch, TAU),
                }
                if on_cuda:
                    rec.update(copy_floor(batch.nbytes_min(), device))
                inputs.append(rec)
                rows, timed = {}, {}
                for comp in comps:
                    row = {"competitor": comp.name, "variant": comp.variant, "n_tokens": batch.n_tokens,
                           "dtype": dtype, "regime": regime}
                    rows[comp.name] = row
                    key = (comp.name, dtype, regime)
                    if key in timed_out:
                        row.update(status="skipped", note="timed out at a smaller size in this regime")
                        continue
                    ready = check(comp, batch, ref, device, opts, row)
                    if ready is not None:
                        timed[comp.name] = ready
                rec["loadavg_before"] = _loadavg()
                time_round_robin(dict(timed), rows, device, opts)
                rec["loadavg_after"] = _loadavg()
                for comp in comps:
                    row = rows[comp.name]
                    if row.get("status") == "timeout":
                        timed_out.add((comp.name, dtype, regime))
                    if on_cuda and row.get("status") == "ok":
                        cuda_extras(comp, timed[comp.name][0], device, row)
                        if rec.get("floor_us"):
                            row["bandwidth_fraction"] = rec["floor_us"] / (row["median_ms"] * 1e3)
                    results.append(row)
                del batch, ref
                if on_cuda:
                    torch.cuda.empty_cache()
                log(f"  {n:>9} {dtype:<8} {regime:<8} done in {time.perf_counter() - t_in:5.1f} s "
                    f"(total {time.time() - started:5.0f} s)")
    try:
        host = host_path.measure(calls=100 if opts.quick else host_path.CALLS)
    except Exception as exc:  # triton missing on this machine
        host = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    compiled = None
    if not opts.quick:  # (two processes that compile: ~30 s on 2 CPU cores, more than --quick's minute allows)
        try:
            compiled = compile_time.measure(device.type)
        except Exception as exc:  # noqa: BLE001 (reported, not fatal: the tables stand alone)
            compiled = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    info["loadavg_at_end"] = _loadavg()
    report.add_ratios(results)
    not_timed = []
    if not on_cuda:
        not_timed = [{"competitor": c.name, "reason": "CUDA only: on CPU the Triton backend would run in its "
                      "interpreter, which is not a speed measure"} for c in competitors.COMPETITORS if c.cuda_only]
    return {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "quick": bool(opts.quick),
        "machine": info,
        "versions": versions,
        "config": {
            "tau": TAU, "sizes": sizes, "dtypes": dtypes, "regimes": {r: REGIMES[r] for r in regimes},
            "regime_construction": {
                "row_len": ROW_LEN, "delta_sigma": BASE_SIGMA, "outlier_abs_delta": list(OUTLIER_RANGE),
                "planted_abs_delta_by_regime": {r: list(REGIME_RANGES.get(r, OUTLIER_RANGE)) for r in regimes},
                "tail_fraction": "per input: the fraction of the paper rule's trust region with m2 > tau",
                "outlier_fraction_of_valid": {r: REGIMES[r] for r in regimes},
                "padding": "row lengths uniform in [T/16, T], 15% of rows at T; padding holds finite garbage",
            },
            "seed": opts.seed, "official_budget_s": opts.official_budget, "rep_budget_s": opts.rep_budget,
            "min_reps": opts.min_reps, "max_reps": opts.max_reps,
            "sizes_note": _sizes_note(on_cuda, opts),
        },
        "methods": {
            "time": "per forward+backward call (loss.backward(); autograd.grad inside the CUDA graph), median "
                    "and p10/p90 over at least min_reps calls; the competitors of one input are timed in rounds, "
                    "one call of each per round, so load drift hits all alike, the order rotating by one each "
                    "round, so every competitor follows every other equally often (after one untimed warm-up call "
                    "each; the checked call is the warm-up in --quick and for calls over 0.25 s); "
                    "CPU figures are wall times on a machine that may be shared (see machine.loadavg_* and each "
                    "input's loadavg_before / loadavg_after); CPU: perf_counter; CUDA: CUDA events after a "
                    "synchronize (host stalls inside a call count); Python's cyclic garbage collector off "
                    "while timing, after one collection (as timeit does: a collection's pause depends on the "
                    "whole process's heap, not on the call that triggers it)",
            "syncs": syncs.METHOD + " The library's PyTorch backend on CPU reads values on the host, which is "
                     "free there; its row counts the device path (the code a CUDA tensor runs, forced with "
                     "m2po_ops.inputs.device_path()) and gives the CPU path's reads as cpu_host_reads.",
            "launches": "CUDA only: torch.profiler CUDA activity of one call; kernels, memcpy, memset counted",
            "peak_extra_mb": "CUDA only: max_memory_allocated during one call minus memory_allocated before "
                             "(includes the gradient); n/a on CPU (no honest allocator hook for torch there)",
            "bandwidth_fraction": "CUDA only: floor_us / median time, floor_us = a device-to-device copy that "
                                  "moves min_bytes (read logprobs, old_logprobs, advantages, mask; write grad)",
            "mask_check": "every competitor's keep mask is compared bit for bit with m2po_mask(backend='torch') "
                          "of its variant (official-eager: variant='official', keep = valid & ~clipped); a "
                          "mismatch is reported as 'wrong' and not timed. Loss within 1e-3 relative as well.",
            "ratio": "x = competitor median / the fastest m2po_ops path of the same variant on the same input",
            "official_budget": "official-eager's Python loop stops after official_budget_s per call: reported "
                               "as timeout with a linear extrapolation (estimated_ms, not measured); larger "
                               "sizes of that dtype/regime are then skipped",
        },
        "competitors": [{"name": c.name, "variant": c.variant, "library": c.library, "description": c.description,
                         "timed": on_cuda or not c.cuda_only} for c in comps],
        "not_timed": not_timed,
        "inputs": inputs,
        "results": results,
        "host_path": host,
        "compile": compiled,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about one minute: small sizes, fewer reps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="", help="comma-separated token counts (overrides the defaults)")
    p.add_argument("--dtypes", default="", help="comma-separated (default: float32,bfloat16; --quick: float32)")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--competitors", default="", help="comma-separated names (default: all for the device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official-budget", type=float, default=None,
                   help="seconds per call for official-eager's Python loop (default: CPU 2, --quick 0.3, CUDA 5)")
    p.add_argument("--rep-budget", type=float, default=None, help="seconds of timed calls per cell")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default on CPU: 1, see bench/README.md; CUDA: torch's default)")
    p.add_argument("--no-plot", action="store_true")
    opts = p.parse_args(argv)
    cuda = opts.device.startswith("cuda")
    if not opts.dtypes:
        opts.dtypes = "float32" if opts.quick else ",".join(DTYPES)
    if opts.official_budget is None:
        opts.official_budget = 0.3 if opts.quick else (5.0 if cuda else 2.0)
    if opts.rep_budget is None:
        opts.rep_budget = (0.15 if opts.quick else 0.8) if not cuda else (0.2 if opts.quick else 0.3)
    opts.min_reps = 7  # rounds: every cell's median is of at least 7 calls of each competitor
    opts.max_reps = (10 if opts.quick else 25) if not cuda else 200
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if opts.threads is None and not cuda:
        # One intra-op thread on CPU: on a shared 2-core machine, OpenMP barriers of a 2-thread pool
        # wait for descheduled threads and turn every small op into milliseconds (measured: the same
        # 32K call took 3 ms alone and 400 ms under load). One thread keeps the figures about the
        # code's work, and stable.
        opts.threads = 1
    if opts.threads:
        torch.set_num_threads(opts.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch._inductor").setLevel(logging.ERROR)

    log(f"m2po-ops benchmark on {opts.device} ({'quick' if opts.quick else 'full'} run)")
    data = run(opts)
    device = torch.device(opts.device)
    date = _dt.date.today().isoformat()
    stem = f"{device_slug(device)}-{date}" + ("-quick" if opts.quick else "") + (f"-{opts.tag}" if opts.tag else "")
    os.makedirs(opts.out_dir, exist_ok=True)
    path_json = os.path.join(opts.out_dir, stem + ".json")
    tables = report.tables(data)
    # (after the tables: the host path, then torch.compile's compile time when measured)
    tail = report.host_path_line(data) + ("\n\n" + compile_time.line(data["compile"]) if data.get("compile") else "")
    print(tables + "\n\n" + tail)
    with open(path_json, "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(opts.out_dir, stem + ".md"), "w") as f:
        f.write(tables + "\n\n" + tail + "\n\n" + report.verdict(data) + "\n")
    if not opts.no_plot:
        try:
            report.plot(data, os.path.join(opts.out_dir, stem + ".png"))
        except Exception as exc:  # matplotlib missing on a bare GPU machine
            log(f"plot skipped: {type(exc).__name__}: {exc}")
    log(f"wrote {path_json} (+ .md, .png) in {data['wall_s']:.0f} s")
    print(report.verdict(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
