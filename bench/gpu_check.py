"""The checks only a GPU can show, one step per call (bench/gpu_check.sh runs them all).

    python -m bench.gpu_check <step> --out DIR [--dry-run]
    python -m bench.gpu_check list          # the steps, one line each (no torch import)
    python -m bench.gpu_check probe         # first line "cuda <gpu-slug>" or "no-cuda", then the list

Steps: tests, histogram, masks, kernels, bench (see STEPS). Each writes DIR/<step>.json (what it
measured, "passed"), prints progress to stderr and a last line "RESULT <step>: ok|FAIL: ..." to
stdout, and exits 1 when the check fails. Other files a step writes never take the name
<step>.json, <step>.log or summary.* (the shell script's): tests.txt, kernels_table.json,
kernels.md, and bench.run's <device>-<date>-quick.json/.md.

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

# Run by the tests step whether or not it is marked gpu (see step_tests).
OFFICIAL_TEST = "tests/test_triton.py::test_official_bounds_keep_and_loss_are_bit_identical"

# name -> (what it checks, the real sizes on the GPU). Printed by `list` and in dry-run.
STEPS = {
    "tests": ("the GPU tests (pytest -m gpu): sync-free under set_sync_debug_mode('error'), "
              "CUDA-graph replay on new data, both variants, torch.compile(fullgraph=True) of a training step "
              "(Inductor and mode='reduce-overhead': eager's loss and gradients), and the official clip bounds, "
              "keep, loss and "
              f"gradient bit-identity test ({OFFICIAL_TEST}; run on its own if -m gpu does not select it)",
              "the tests' own sizes"),
    "histogram": ("the stats and level2 kernels' histograms equal torch's scatter_add histograms exactly, "
                  "and two runs of loss+backward and mask are bit-identical (loss, grad, keep, metrics)",
                  "16M tokens, typical and stressed regimes, paper and official"),
    "masks": ("backend='triton' against backend='torch' on fp32/bf16 x paper/official x spread, bf16-quantised, "
              "near-on-policy, all-equal and tied-run m2 x 2-3 taus: keep masks and the official clip bounds "
              "bit for bit (failing), loss bits and gradient differences (reported)",
              "1M tokens ((1024, 1024) padded)"),
    "kernels": ("per-kernel device time (torch.profiler, or CUDA events around each Triton launch where the "
                "profiler records no device events) of one forward+backward, against a plain read and a "
                "device copy of the same bytes; the first-GPU-run goals (1M eager time, 16M bandwidth "
                "against the copy, all-equal m2 against spread m2)",
                "32K / 1M / 16M tokens, fp32, paper, typical, none and all-equal"),
    "bench": ("the short benchmark: python -m bench.run --quick --device cuda (every competitor's mask "
              "checked against the reference)", "32K and 1M tokens, fp32, 3 regimes"),
}

GPU_SIZES = dict(histogram=1 << 24, masks=1 << 20, kernels=[1 << 15, 1 << 20, 1 << 24])
DRY_SIZES = dict(histogram=4096, masks=2048, kernels=[2048])
# The Triton kernels the forward launches (names as the profiler shows them), in launch order.
TRITON_KERNELS = ("stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "ties_kernel",
                  "tie_scan_kernel", "fix_paper_kernel", "apply_official_kernel", "finalize_kernel")


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


def _pytest(label: str, args: list, f) -> dict:
    """Run pytest with ``args``, streaming its output into the open file ``f`` (so a timeout still
    leaves what ran) and to stderr: {label, rc, summary (its last line), counts, command, ran
    (node ids in the short summary: -rp lists the passed ones)}."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    log("running " + " ".join(cmd[1:]) + f" >> {f.name}")
    f.write(f"$ {' '.join(cmd[1:])}\n")
    f.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        f.write(line)
        f.flush()
        sys.stderr.write("  | " + line)
        if line.strip():
            lines.append(line.rstrip("\n"))
    rc = proc.wait()
    f.write(f"(rc {rc})\n\n")
    f.flush()
    tail = lines[-1].strip().strip("= ") if lines else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                               tail)}
    ran = [m.group(2) for m in map(re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)").match, lines) if m]
    return dict(label=label, rc=rc, summary=tail, counts=counts, command=" ".join(cmd[1:]), ran=ran)


def step_tests(ctx: Ctx) -> dict:
    """pytest -m gpu: the tests marked gpu (on a GPU: sync debug mode "error", CUDA-graph replay,
    the official bit-identity test), and the official bit-identity test on its own if -m gpu did
    not run it (were it unmarked). Dry run: the official test is deselected and only collected
    (that its node id still resolves): it takes ~25 s under the interpreter on 2 cores, and
    `make test` runs it there already. Only these run, so tests/test_gpu_check.py (unmarked)
    never recurses. Both commands' output goes to tests.txt."""
    runs = []
    with open(ctx.path("tests.txt"), "w") as f:
        first = ["-rfEsxXp", "-m", "gpu", "tests"] + (["--deselect", OFFICIAL_TEST] if ctx.dry else [])
        runs.append(_pytest("pytest -m gpu", first, f))
        if ctx.dry:
            runs.append(_pytest("official bit-identity test (dry run: collected only)",
                                ["--collect-only", OFFICIAL_TEST], f))
        elif not any(n.startswith(OFFICIAL_TEST) for n in runs[0]["ran"]):
            runs.append(_pytest("official bit-identity test (not in -m gpu)", ["-rfEsxXp", OFFICIAL_TEST], f))
    # rc 5 = no test collected (the gpu tests are gone), rc 4 = the official test's node id is
    # gone: failures of this check too
    passed = all(r["rc"] == 0 for r in runs)
    skipped = sum(r["counts"].get("skipped", 0) for r in runs)
    official_ran = sorted(n for r in runs for n in r["ran"] if n.startswith(OFFICIAL_TEST))
    headline = "; ".join(f"{r['label']} rc={r['rc']}: {r['summary']}" for r in runs)
    if not ctx.dry:
        headline += f"; official bit-identity test: {len(official_ran)} ran"
    if skipped and not ctx.dry:
        headline += f" (WARNING: {skipped} skipped on a GPU)"
    return dict(passed=passed, headline=headline, runs=runs, official_test=OFFICIAL_TEST,
                official_test_ran=official_ran, output="tests.txt")


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
    """Exactness of the mergeable sums and histograms (integer atomics: any order gives the same
    bits; the 16M-token stats pass pre-aggregates per block) and run-to-run bit
    identity of the whole call (float partials reduced in a fixed order, not by atomics)."""
    import torch

    from m2po_ops import M2POConfig
    from m2po_ops import radix_select as H
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
            tb.stats_pass(tok, config, ws, write_keys=True)
            key = ws.key
            sums = H.summarize(key, config)  # tail histogram, below / tail counts and limbs
            expected = sums[:H.BELOW_COUNT].view(2, -1)
            hist_equal = torch.equal(ws.sums, sums)
            bad_buckets = int((ws.hist1 != expected).any(0).sum())
            # level 2 (the second atomic histogram, inside the bucket select1 picked), same test
            tb.select1(ws, config)
            tb.level2(ws, config)
            state1 = ws.state1.clone()
            refined_now = bool(state1[H.REFINE] != 0)  # (select1 zeroes hist2 only when it refines)
            slots = 4 if variant == "official" else 2  # (the paper rule's select2 reads slot 0 only)
            hist2_equal = (not refined_now) or torch.equal(
                ws.hist2[:slots], H.level2(key, state1, config).reshape(ws.hist2.shape)[:slots])
            refined = bool(state1[H.REFINE] != 0)
            first, second = _full_call(batch, variant), _full_call(batch, variant)
            differ = [k for k in first if not bit_equal(first[k], second[k])]
            row = dict(
                regime=regime, variant=variant, n_tokens=batch.n_tokens, num_valid=batch.num_valid,
                trust_region_tokens=int(expected[0].sum()), nonempty_buckets=int((expected[0] > 0).sum()),
                hist_equal=hist_equal, mismatching_buckets=bad_buckets, level2_refined=refined,
                level2_tokens=int(ws.hist2[0].sum() + (ws.hist2[2].sum() if variant == "official" else 0)) if refined
                else 0, hist2_equal=hist2_equal,
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


def _loss_and_grad(leaf, args, backend: str, **kw):
    """m2po_loss + backward on ``backend`` with ``leaf`` (the log-probs, a leaf requiring grad) in
    place of args[0]: (loss, its gradient, metrics). The leaf's .grad is left None."""
    from m2po_ops import m2po_loss

    _, olp, adv, mask = args
    leaf.grad = None
    loss, metrics = m2po_loss(leaf, olp, adv, mask, backend=backend, validate=False, **kw)
    loss.backward()
    grad, leaf.grad = leaf.grad, None
    return loss.detach(), grad, metrics


def _grad_diff(a, b) -> tuple:
    """(elements whose bits differ, max |a - b| / max(|a|, |b|) over them; 0 where equal)."""
    import torch

    differ = _bits(a) != _bits(b)
    n = int(differ.sum())
    if n == 0:
        return 0, 0.0
    a64, b64 = a.double()[differ], b.double()[differ]
    diff = (a64 - b64).abs()
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / torch.maximum(a64.abs(), b64.abs()))  # +0 vs -0: 0
    return n, float(rel.max())


def _case_name(r: dict) -> str:
    return f"{'f32' if r['dtype'] == 'float32' else 'bf16'}/{r['case']}/{r['variant']}/tau={r['tau']:g}"


def _list_cases(rows: list, limit: int = 10) -> str:
    names = [_case_name(r) for r in rows]
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more in masks.json)" if len(names) > limit else "")


def step_masks(ctx: Ctx) -> dict:
    """The fused kernels against the PyTorch reference on the distributions where GPU numerics
    (FMA contraction, approximate divides, bf16 loads, libdevice exp) or tie handling could differ.

    Fails on any keep-mask difference and on any official clip-bound difference (the bounds are
    exp(+-tau_c) of a float32 tau_c on both backends: the Triton kernel matches torch's rounding).
    Loss and gradient differences are reported, not failed: the paper variant's weights go through
    exp, which on a GPU is libdevice's expf in Triton and torch's CUDA expf, possibly an ulp apart."""
    import torch

    from m2po_ops import m2po_mask

    n = ctx.sizes["masks"]
    rows, passed = [], True
    for di, (dname, dtype) in enumerate((("float32", torch.float32), ("bfloat16", torch.bfloat16))):
        for kind, taus in MASK_CASES.items():
            args = mask_inputs(kind, n, dtype, ctx.device)
            for vi, variant in enumerate(("paper", "official")):
                for ti, tau in enumerate(taus):
                    # dry run: one tau per dtype/distribution/variant, in turn (each tau still runs
                    # somewhere: 20 cases, not 48; ~0.5 s each under the interpreter)
                    if ctx.dry and ti != (di + vi) % len(taus):
                        continue
                    kt, mt = m2po_mask(*args, tau=tau, variant=variant, backend="triton", validate=False)
                    kr, mr = m2po_mask(*args, tau=tau, variant=variant, backend="torch", validate=False)
                    leaf = args[0].detach().clone().requires_grad_(True)  # one leaf, both backends
                    lt, gt, mlt = _loss_and_grad(leaf, args, "triton", tau=tau, variant=variant)
                    lr, gr, mlr = _loss_and_grad(leaf, args, "torch", tau=tau, variant=variant)
                    mismatches = int((kt != kr).sum())
                    row = dict(dtype=dname, case=kind, variant=variant, tau=tau, n_tokens=args[0].numel(),
                               masked_fraction_triton=float(mt["masked_fraction"]),
                               masked_fraction_torch=float(mr["masked_fraction"]),
                               trust_region_fraction=float(mr["trust_region_fraction"]),
                               mismatching_tokens=mismatches)
                    if variant == "official":  # from the mask call and the loss call, both backends
                        row["clip_low"] = float(mr["clip_low"])
                        row["clip_high"] = float(mr["clip_high"])
                        row["clip_bounds_identical"] = all(
                            bit_equal(x[k], y[k]) for x, y in ((mt, mr), (mlt, mlr)) for k in ("clip_low", "clip_high"))
                    else:
                        row["clip_bounds_identical"] = None
                    grad_differ, grad_rel = _grad_diff(gt, gr)
                    row.update(loss_triton=float(lt), loss_torch=float(lr), loss_bits_identical=bit_equal(lt, lr),
                               loss_rel_diff=(0.0 if bit_equal(lt, lr) else
                                              abs(float(lt) - float(lr)) / max(abs(float(lt)), abs(float(lr)), 1e-300)),
                               grad_differing_elements=grad_differ, grad_max_rel_diff=grad_rel)
                    rows.append(row)
                    passed &= mismatches == 0 and row["clip_bounds_identical"] is not False
                    log(f"  {dname:8s} {kind:15s} {variant:8s} tau={tau:<6g} masked {row['masked_fraction_torch']:8.4%}"
                        f" (triton {row['masked_fraction_triton']:8.4%}), mismatching tokens {mismatches}"
                        + ("" if row["clip_bounds_identical"] is None else f", clip bounds identical "
                           f"{row['clip_bounds_identical']}") + f", loss bits identical {row['loss_bits_identical']}"
                        f", grad differs in {grad_differ} (max rel {grad_rel:.2e})")
                    del kt, kr, lt, gt, lr, gr, leaf
            del args
    bad = [r for r in rows if r["mismatching_tokens"]]
    official = [r for r in rows if r["variant"] == "official"]
    bad_bounds = [r for r in official if not r["clip_bounds_identical"]]
    differ = [r for r in rows if not r["loss_bits_identical"] or r["grad_differing_elements"]]
    # a case meant to cut that masks nothing would check little: flagged, not failed
    uncut = sorted({f"{r['case']}/{r['variant']}" for r in rows if r["tau"] == 0.04 and r["masked_fraction_torch"] == 0})
    if differ:  # reported, not failed: listed in the headline
        loss_differ = sum(not r["loss_bits_identical"] for r in rows)
        grad_differ = sum(bool(r["grad_differing_elements"]) for r in rows)
        worst = max(r["grad_max_rel_diff"] for r in differ)
        numerics = (f"; reported, not failed: loss bits differ in {loss_differ}, grad bits in {grad_differ} of "
                    f"{len(rows)} cases (max grad rel diff {worst:.2e}): {_list_cases(differ)}")
    else:
        numerics = f"; loss and grad bit-identical in all {len(rows)}"
    headline = (f"keep masks bit-identical in {len(rows) - len(bad)}/{len(rows)} cases, official clip bounds in "
                f"{len(official) - len(bad_bounds)}/{len(official)} at {n} tokens"
                + (f"; KEEP MISMATCH in {len(bad)}: {_list_cases(bad, 6)}" if bad else "")
                + (f"; CLIP BOUNDS MISMATCH in {len(bad_bounds)}: {_list_cases(bad_bounds, 6)}" if bad_bounds else "")
                + numerics + (f"; nothing masked at tau=0.04 in {uncut}" if uncut else ""))
    return dict(passed=passed, headline=headline, n_tokens=n, cases=rows, nothing_masked_at_0_04=uncut,
                keep_mismatch=[_case_name(r) for r in bad], clip_bounds_mismatch=[_case_name(r) for r in bad_bounds],
                loss_or_grad_differ=[_case_name(r) for r in differ])


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


def _kernel_name(kernel) -> str:
    """A Triton kernel's function name (through Autotuner/Heuristics wrappers: .fn until the def)."""
    obj, seen = kernel, 0
    while hasattr(obj, "fn") and seen < 4:
        obj, seen = obj.fn, seen + 1
    return getattr(obj, "__name__", None) or getattr(kernel, "__name__", None) or str(kernel)


def _wrapped_launches(record):
    """A context manager patching m2po_ops.triton_backend._launch (every Triton launch of the
    backend goes through it) to call ``record(kernel, launch)`` where ``launch()`` runs the
    original; None when the backend has no _launch."""
    from unittest import mock

    from m2po_ops import triton_backend as tb

    original = getattr(tb, "_launch", None)
    if original is None:
        return None

    def wrapped(kernel, grid, *args, **meta):
        return record(kernel, lambda: original(kernel, grid, *args, **meta))

    return mock.patch.object(tb, "_launch", wrapped)


PROFILER_NO_EVENTS = "the profiler recorded no device events (CUPTI unavailable, e.g. under gVisor?)"


def _profiler_times(fn, iters: int):
    """torch.profiler's device events (kernels, memsets) over ``iters`` calls: [(name, us)], or
    (None, why) when it fails or records none. time_range is the device interval in every torch
    2.x (device_time_total is the same number in newer ones; cuda_time_total is deprecated)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        events = list(prof.events() or [])
    except Exception as exc:  # pragma: no cover - depends on the machine's CUPTI
        return None, f"torch.profiler failed ({type(exc).__name__}: {str(exc)[:200]})"
    durations = []
    for e in events:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        tr = getattr(e, "time_range", None)
        if tr is not None:
            us = tr.elapsed_us()
        else:
            us = getattr(e, "device_time_total", None)
            if us is None:
                us = getattr(e, "cuda_time_total", 0)
        durations.append((e.name, float(us)))
    if not durations:
        return None, PROFILER_NO_EVENTS
    return durations, None


def _event_times(fn, iters: int):
    """CUDA events around each Triton launch (through the backend's _launch) over ``iters`` calls:
    [(name, us)]. All pairs recorded during the loop; one synchronize at the end, then read."""
    import torch

    pairs = []

    def record(kernel, launch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = launch()
        end.record()
        pairs.append((_kernel_name(kernel), start, end))
        return out

    patch = _wrapped_launches(record)
    if patch is None:
        return None
    torch.cuda.synchronize()
    with patch:
        for _ in range(iters):
            fn()
    torch.cuda.synchronize()
    return [(name, start.elapsed_time(end) * 1e3) for name, start, end in pairs]


def device_kernel_times(fn, ctx: Ctx, iters: int, use_profiler: bool = True):
    """Per-kernel time over ``iters`` calls: ({name: [total us, calls, names]}, method, note).

    CUDA: torch.profiler's device events (every kernel and memset, Triton's and torch's); where
    the profiler fails or records no device event (the lent GPU machines run under gVisor, where
    CUPTI may not load), CUDA events around each Triton launch instead: Triton kernels only, and
    each pair also spans any gap before the kernel starts (launch-bound small sizes read high).
    CPU (dry run): the interpreter's wall time per Triton launch (the same _launch wrapper)."""
    if ctx.device.type == "cuda":
        note = "profiler skipped (it failed or recorded no device events in an earlier case)"
        if use_profiler:
            durations, note = _profiler_times(fn, iters)
            if durations is not None:
                return _group(durations), "profiler", None
        durations = _event_times(fn, iters)
        if durations is None:
            return {}, "none", note + "; m2po_ops.triton_backend._launch not found: no per-kernel times"
        return (_group(durations), "cuda_events",
                note + "; per-kernel times from CUDA events around each Triton launch (torch's own kernels not "
                "included; a pair also spans any launch gap before its kernel)")
    durations = []

    def record(kernel, launch):
        t0 = time.perf_counter()
        out = launch()
        durations.append((_kernel_name(kernel), (time.perf_counter() - t0) * 1e6))
        return out

    patch = _wrapped_launches(record)
    if patch is None:
        return {}, "none", "m2po_ops.triton_backend._launch not found: no per-kernel times"
    with patch:
        for _ in range(iters):
            fn()
    return _group(durations), "cpu_wall", "CPU interpreter wall time per launch (not a device time)"


def step_kernels(ctx: Ctx) -> dict:
    """Where the time goes, kernel by kernel, and how far the whole call is from the memory
    bound of just reading its inputs."""
    import torch

    from m2po_ops import m2po_loss

    from .kernel_trace import make_trace_batch

    warmup, iters = (1, 1) if ctx.dry else (3, 20)
    unit = "CPU interpreter wall time, not meaningful" if ctx.dry else "device time"
    cases, methods, use_profiler = [], [], True
    for n in ctx.sizes["kernels"]:
        for regime in KERNEL_REGIMES:
            batch = make_trace_batch(n, regime, "float32", seed=0)  # (built on the CPU: the same bits anywhere)
            lp = batch.logprobs.detach().to(ctx.device).requires_grad_(True)
            olp, adv, mask = (t.to(ctx.device) for t in batch.args()[1:])

            def step():
                lp.grad = None
                loss, _ = m2po_loss(lp, olp, adv, mask, backend="triton", validate=False)
                loss.backward()

            for _ in range(warmup):  # compiles on the first call
                step()
            ctx.sync()
            _, metrics = m2po_loss(lp, olp, adv, mask, backend="triton", validate=False)
            masked = float(metrics["masked_fraction"])  # read outside every timed region
            per_kernel, method, note = device_kernel_times(step, ctx, iters, use_profiler)
            use_profiler &= method == "profiler"  # one that failed or recorded nothing will not in the next case
            methods.append(method)
            call_ms = statistics.median(time_calls(step, ctx, iters))
            inputs = [t.detach() for t in (lp, olp, adv, mask)]

            def plain_read():
                # one reduction per input in its own dtype (a bool mask viewed as bytes: sum() would
                # first convert it to int64): each input byte read once, nothing written but 4 scalars
                return [(t.view(torch.uint8) if t.dtype == torch.bool else t).amax() for t in inputs]

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
                launches_per_call=sum(k["calls_per_iter"] for k in kernels), per_kernel_method=method,
                profiler_note=note,
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
            del batch, lp, olp, adv, mask, inputs
    per_kernel_method = "+".join(dict.fromkeys(methods))
    how = {"profiler": "torch.profiler device events", "none": "none",
           "cuda_events": "CUDA events around each Triton launch (the profiler recorded no device events)",
           "cpu_wall": "CPU interpreter wall time per Triton launch"}
    goals = kernel_goals(cases)
    data = dict(unit=unit, dry_run=ctx.dry, cases=cases, goals=goals, per_kernel_method=per_kernel_method,
                timing=("CUDA events around each call, back to back, median of iters; per-kernel: "
                        + ", ".join(how.get(m, m) for m in dict.fromkeys(methods))
                        + " over iters calls after warm-up" if not ctx.dry else unit))
    with open(ctx.path("kernels_table.json"), "w") as f:  # kernels.json is the step's result (main)
        json.dump(data, f, indent=1)
    with open(ctx.path("kernels.md"), "w") as f:
        f.write(kernels_markdown(data))
    big = next(c for c in reversed(cases) if c["regime"] == "typical")  # largest size, typical regime
    headline = (f"{big['n_tokens']} tokens {big['regime']}: fwd+bwd {big['call_us']:.1f} us = "
                f"{big['ratio_vs_read']:.2f}x a plain read of the inputs ({big['gbps_call']:.0f} GB/s); "
                f"per-kernel times by {per_kernel_method}; goals: "
                + "; ".join(f"{g['goal']}: {g['measured']} ({g['verdict']})" for g in goals)
                + (" [interpreter time]" if ctx.dry else ""))
    return dict(passed=True, headline=headline, output=["kernels_table.json", "kernels.md"],
                per_kernel_method=per_kernel_method, cases=cases, goals=goals)


# The regimes the kernels step times: the paper's typical batch, nothing masked, and every
# trust-region token at one m2 (one histogram address for every token: atomic contention).
KERNEL_REGIMES = ("typical", "none", "all-equal")
# Goals for the first GPU run (measured and reported, never asserted): 1M tokens forward+backward
# within 30 us eager (15 us replayed in a CUDA graph: the bench step's triton+graph row); at 16M
# tokens the call's bytes per second at least 70% of a device-to-device copy's; the all-equal
# distribution no more than 10% slower than spread m2 (the typical batch) at the same size.
GOAL_EAGER_1M_US = 30.0
GOAL_BANDWIDTH_FRACTION = 0.7
GOAL_ALL_EQUAL_SLOWDOWN = 1.1


def kernel_goals(cases: list) -> list:
    """The first-GPU-run goals from the kernels step's cases: one dict per goal (goal, measured,
    verdict: 'met', 'not met', or 'not measured' where the size was not run)."""
    by = {(c["n_tokens"], c["regime"]): c for c in cases}
    sizes = sorted({c["n_tokens"] for c in cases})

    def verdict(ok):
        return "met" if ok else "not met"

    goals = []
    one_m = by.get((1 << 20, "typical"))
    goals.append(dict(goal=f"1M tokens fwd+bwd eager <= {GOAL_EAGER_1M_US:g} us",
                      measured=f"{one_m['call_us']:.1f} us" if one_m else "-",
                      verdict=verdict(one_m["call_us"] <= GOAL_EAGER_1M_US) if one_m else "not measured"))
    big = by.get((1 << 24, "typical"))
    frac = big["gbps_call"] / big["gbps_copy"] if big else None
    goals.append(dict(goal=f"16M tokens: bytes/s (inputs read and gradient written, the floor's bytes) >= "
                           f"{GOAL_BANDWIDTH_FRACTION:.0%} of a device copy's",
                      measured=f"{frac:.0%}" if big else "-",
                      verdict=verdict(frac >= GOAL_BANDWIDTH_FRACTION) if big else "not measured"))
    n = sizes[-1] if sizes else None
    spread, equal = by.get((n, "typical")), by.get((n, "all-equal"))
    slow = equal["call_us"] / spread["call_us"] if spread and equal else None
    goals.append(dict(goal=f"all-equal m2 <= {GOAL_ALL_EQUAL_SLOWDOWN:.2f}x spread m2 (at {n} tokens)",
                      measured=f"{slow:.2f}x" if slow is not None else "-",
                      verdict=verdict(slow <= GOAL_ALL_EQUAL_SLOWDOWN) if slow is not None else "not measured"))
    return goals


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
    lines += ["", "Goals for the first GPU run (reported, not asserted; the 15 us CUDA-graph goal at 1M is the "
              "bench step's triton+graph row):", "", "| goal | measured | verdict |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']} | {g['verdict']} |" for g in data["goals"]]
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
    p.add_argument("step", choices=[*STEPS, "list", "probe", "env"])
    p.add_argument("--out", default=None, help="the results folder (one for all steps)")
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, Triton interpreter, tiny sizes")
    opts = p.parse_args(argv)
    if opts.step == "probe":
        # bench/gpu_check.sh's one python start before the steps (torch import + CUDA init once):
        # does this python's torch see CUDA, the GPU's name as a folder slug, then the list
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            print("cuda " + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"))
            log(f"probe: {sys.executable}: torch {torch.__version__}, CUDA {torch.version.cuda}, {name}")
        else:
            print("no-cuda")
            log(f"probe: {sys.executable}: torch {torch.__version__} sees no CUDA device")
    if opts.step in ("list", "probe"):
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
