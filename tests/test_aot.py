"""Every kernel variant the JIT would build compiles for real GPUs (sm_80, sm_90) without one,
and sizes never add a variant.

m2po_ops.kernels.aot records the launches of representative public-API calls (nothing runs),
binds them with the JIT's own binder for the target, and compiles each distinct key. The tests
run it in fresh processes without TRITON_INTERPRET and with an empty Triton cache (so ptxas
really runs), one process per architecture, side by side.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)
# Distinct variants per kernel over sizes 1 .. 2**20 for one configuration (variant, mask dtype,
# layout): exactly one. Over the whole sweep (2 variants x 2 mask dtypes x 3 layouts) at most:
SWEEP_BOUND = {"first_valid_kernel": 4, "stats_kernel": 12, "apply_official_kernel": 6, "fix_paper_kernel": 1,
               "select1_kernel": 2, "select2_kernel": 2, "level2_kernel": 2, "ties_kernel": 1, "tie_scan_kernel": 1,
               "finalize_kernel": 1}
# every configuration launches these (the paper rule adds the tie and fix-up passes, the
# official one apply_official and, with per-token advantages, first_valid)
ALWAYS = {"stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "finalize_kernel"}


def _aot(cache, *args):
    """The AOT tool in a fresh process: no interpreter, an empty Triton cache (ptxas really runs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache
    return subprocess.Popen([sys.executable, "-m", "m2po_ops.kernels.aot", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _collect(proc, timeout=900):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert out.strip(), err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def aot_report():
    with tempfile.TemporaryDirectory() as c80, tempfile.TemporaryDirectory() as c90:
        procs = [_aot(cache, "--json", "--arch", str(arch)) for arch, cache in zip(ARCHS, (c80, c90))]
        return [row for proc in procs for row in _collect(proc)]


@pytest.fixture(scope="module")
def sweep():
    with tempfile.TemporaryDirectory() as cache:
        return _collect(_aot(cache, "--sweep"))


def test_every_kernel_compiles_for_sm80_and_sm90(aot_report):
    archs = {r["arch"] for r in aot_report}
    assert archs == {"sm_80", "sm_90"}
    kernels = {r["kernel"].split("[")[0] for r in aot_report}
    assert kernels == {"first_valid", "stats", "apply_official", "fix_paper", "level2", "ties", "tie_scan", "select1",
                       "select2", "finalize"}
    errors = [f"{r['arch']} {r['kernel']}: {r['error']}" for r in aot_report if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_spills_and_shared_memory_within_limits(aot_report):
    for r in aot_report:
        print(f"{r['arch']} {r['kernel']:60s} regs={r['registers']:3d} spill={r['spill_stack']} shared={r['shared']}")
    spills = [f"{r['arch']} {r['kernel']}: STACK={r['spill_stack']}" for r in aot_report if r["spill_stack"] != 0]
    assert not spills, "\n".join(spills)
    over = [f"{r['arch']} {r['kernel']}: {r['shared']} > {r['shared_limit']}" for r in aot_report
            if r["shared"] > r["shared_limit"]]
    assert not over, "\n".join(over)
    assert all(0 < r["registers"] <= 255 for r in aot_report)


def test_no_approximate_divide_or_square_root(aot_report):
    """The weights (1 / count) and the official tau_c must be correctly rounded, as torch's:
    a plain fp32 "/" compiles to div.full.f32 (up to 2 ulp)."""
    bad = [f"{r['arch']} {r['kernel']}: {r['forbidden_ptx']}" for r in aot_report if r.get("forbidden_ptx")]
    assert not bad, "\n".join(bad)
    official_select2 = [r for r in aot_report if r["kernel"].startswith("select2[") and "OFFICIAL=True" in r["kernel"]]
    assert official_select2 and all(r["sqrt_rn_f64"] for r in official_select2)


def test_no_contracted_float64_multiply_add(aot_report):
    """The float64 arithmetic (the official ratio's exp polynomial, the reciprocal's Newton steps,
    the select kernels' budget tests) is the sequence of separately rounded operations the
    interpreter runs and the tests verify; ptxas would otherwise contract a * b + c into one fma
    (128 of them in stats and apply_official, 5 in finalize), another rounding than the tested
    one."""
    fused = [f"{r['arch']} {r['kernel']}: {r['fma_f64']}" for r in aot_report if r.get("fma_f64")]
    assert not fused, "\n".join(fused)
    assert all("fma_f64" in r for r in aot_report if r.get("ok"))


def test_full_blocks_load_vectors(aot_report):
    """Token counts are not specialised, so a bounds mask `offs < n` would make every access a
    single-element one; full blocks run without it. Every token kernel reading float32 inputs
    has 128-bit (or 64-bit) vector loads."""
    token = [r for r in aot_report if r["kernel"].startswith(("stats[", "apply_official[")) and "lp:*fp32" in r["kernel"]]
    assert token
    scalar_only = [f"{r['arch']} {r['kernel']}" for r in token if r["vector_loads"] == 0]
    assert not scalar_only, "\n".join(scalar_only)


def test_the_variants_are_those_the_jit_builds(aot_report):
    """Bool masks reach the kernels as *u1 (not *i1), and each dtype and mask kind the API
    accepts has its own stats and apply variants."""
    stats = {r["kernel"] for r in aot_report if r["kernel"].startswith("stats[") and r["arch"] == "sm_90"}
    assert any("mask:*u1" in k for k in stats) and not any("*i1" in r["kernel"] for r in aot_report)
    for dtype in ("*fp32", "*bf16", "*fp16", "*fp64"):
        assert any(f"lp:{dtype}" in k for k in stats), dtype


def test_every_launched_kernel_is_covered(aot_report):
    """A kernel added to the launcher but not reached by the scenarios would escape the checks."""
    from m2po_ops import kernels

    covered = {r["kernel"].split("[")[0] + "_kernel" for r in aot_report}
    assert {k.fn.__name__ if hasattr(k, "fn") else k.__name__ for k in kernels.ALL_KERNELS} == covered


def test_sizes_never_add_a_variant(sweep):
    """Sizes 1 .. 2**20 (every n up to 17, 2**k - 1, 2**k, 2**k + 1, odd sizes): one variant per
    kernel per configuration, so one warm-up call at any size compiles what a CUDA graph
    captured later at another size needs."""
    assert sweep["sizes"][0] == 1 and sweep["sizes"][1] >= 2**20
    for config, counts in sweep["per_config"].items():
        assert ALWAYS <= set(counts) <= set(SWEEP_BOUND), config
        assert all(c == 1 for c in counts.values()), (config, counts)
    over = {k: c for k, c in sweep["per_kernel"].items() if c > SWEEP_BOUND[k]}
    assert not over, over
