"""Ahead-of-time compilation of every m2po kernel for real GPU targets, without a GPU.

    python -m m2po_ops.kernels.aot            # table of registers / spills / shared memory
    python -m m2po_ops.kernels.aot --json     # the same as JSON

Each kernel is compiled with ``triton.compile`` for sm_80 (A100) and sm_90 (H100) in every
constexpr combination the launcher uses. This catches what the interpreter cannot: compile and
ptxas errors, register spills (cuobjdump's STACK), and shared memory over the target's limit
(Triton does not raise for that at compile time). Run it in a process without
TRITON_INTERPRET (the interpreter's kernel objects cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

SHARED_LIMIT = {80: 166_912, 90: 232_448}


def _configs():
    """(name, jit function, signature, constexprs, num_warps) for every launch the backend makes."""
    from . import apply, histogram, select
    from .common import KEEP_ALL_BITS, L1_BUCKETS, L2_BUCKETS

    # imported lazily: the launcher module imports torch
    from m2po_ops import triton_backend as tb

    block, tchunk, fchunk, warps = tb.BLOCK, tb.TIE_CHUNK, tb.FINAL_CHUNK, tb.TOKEN_WARPS
    chunk = 2048  # the GPU select chunk (tb.SELECT_CHUNK is larger under the interpreter)
    out = []
    for official, in_dtype in itertools.product((False, True), ("fp32", "bf16", "fp16")):
        sig = {
            "lp_ptr": f"*{in_dtype}", "olp_ptr": f"*{in_dtype}", "adv_ptr": f"*{in_dtype}", "adv_div": "i32",
            "first_ptr": f"*{in_dtype}", "first_div": "i32", "first_mul": "i32", "mask_ptr": "*i1",
            "key_ptr": "*i32", "hist1_ptr": "*i64", "part_ptr": "*fp64", "n_valid_ptr": "*i64", "n": "i64",
            "OFFICIAL": "constexpr", "HAS_MASK": "constexpr", "NB1": "constexpr", "BLOCK": "constexpr",
            "INTERP": "constexpr",
        }
        out.append((f"stats[official={official},{in_dtype}]", histogram.stats_kernel, sig,
                    dict(OFFICIAL=official, HAS_MASK=True, NB1=L1_BUCKETS, BLOCK=block, INTERP=False), warps))
        for weights in (apply.W_NONE, apply.W_COUNT, apply.W_SCALAR, apply.W_TENSOR_DENOM, apply.W_PER_TOKEN):
            wtype = "*i64" if weights in (apply.W_NONE, apply.W_COUNT, apply.W_SCALAR) else "*fp32"
            sig = {
                "lp_ptr": f"*{in_dtype}", "olp_ptr": f"*{in_dtype}", "adv_ptr": f"*{in_dtype}", "adv_div": "i32",
                "mask_ptr": "*i1", "key_ptr": "*i32", "w_ptr": wtype, "denom_bits": "i64", "value_ptr": "*i32", "ties_kept_ptr": "*i64",
                "lower_ptr": "*fp32", "upper_ptr": "*fp32", "ties_ptr": "*i64", "keep_ptr": "*i1",
                "grad_ptr": "*fp32", "part_ptr": "*fp64", "n": "i64",
                "OFFICIAL": "constexpr", "HAS_MASK": "constexpr", "WEIGHTS": "constexpr", "KEEP_ALL": "constexpr",
                "BLOCK": "constexpr",
                "INTERP": "constexpr",
            }
            out.append((f"apply[official={official},{in_dtype},w={weights}]", apply.apply_kernel, sig,
                        dict(OFFICIAL=official, HAS_MASK=True, WEIGHTS=weights, KEEP_ALL=KEEP_ALL_BITS, BLOCK=block,
                             INTERP=False),
                        warps))
    out.append(("level2", histogram.level2_kernel,
                {"key_ptr": "*i32", "state_ptr": "*i64", "hist2_ptr": "*i64", "n": "i64", "NB2": "constexpr",
                 "BLOCK": "constexpr"}, dict(NB2=L2_BUCKETS, BLOCK=block), warps))
    out.append(("ties", histogram.ties_kernel,
                {"key_ptr": "*i32", "value_ptr": "*i32", "ties_ptr": "*i64", "n": "i64", "KEEP_ALL": "constexpr",
                 "BLOCK": "constexpr"}, dict(KEEP_ALL=KEEP_ALL_BITS, BLOCK=block), warps))
    out.append(("tie_scan", histogram.tie_scan_kernel,
                {"value_ptr": "*i32", "ties_ptr": "*i64", "nblocks": "i32", "KEEP_ALL": "constexpr",
                 "CHUNK": "constexpr"}, dict(KEEP_ALL=KEEP_ALL_BITS, CHUNK=tchunk), 4))
    bits = {"tau_hi_bits": "i64", "tau_lo_bits": "i64", "tau_bits": "i64", "tau_eps_bits": "i64", "eps_bits": "i64"}
    for official, tau_inf in itertools.product((False, True), (False, True)):
        sig = {"hist1_ptr": "*i64", "state_ptr": "*i64", **bits, "OFFICIAL": "constexpr", "TAU_INF": "constexpr",
               "NB1": "constexpr", "CHUNK": "constexpr"}
        out.append((f"select1[official={official},tau_inf={tau_inf}]", select.select1_kernel, sig,
                    dict(OFFICIAL=official, TAU_INF=tau_inf, NB1=L1_BUCKETS, CHUNK=chunk), tb.SELECT_WARPS))
        for lo, hi in ((False, False), (True, True)) if official else ((False, False),):
            sig = {"hist1_ptr": "*i64", "hist2_ptr": "*i64", "state_ptr": "*i64", "n_valid_ptr": "*i64",
                   "cut_i32_ptr": "*i32", "cut_i64_ptr": "*i64", "cut_f32_ptr": "*fp32", **bits,
                   "mini_lo_bits": "i64", "mini_hi_bits": "i64", "OFFICIAL": "constexpr", "TAU_INF": "constexpr",
                   "HAS_MINI_LO": "constexpr", "HAS_MINI_HI": "constexpr", "KEEP_ALL": "constexpr",
                   "NB1": "constexpr", "NB2": "constexpr", "CHUNK": "constexpr", "INTERP": "constexpr"}
            out.append((f"select2[official={official},tau_inf={tau_inf},miniclip={lo}]", select.select2_kernel, sig,
                        dict(OFFICIAL=official, TAU_INF=tau_inf, HAS_MINI_LO=lo, HAS_MINI_HI=hi, KEEP_ALL=KEEP_ALL_BITS,
                             NB1=L1_BUCKETS, NB2=L2_BUCKETS, CHUNK=chunk, INTERP=False), tb.SELECT_WARPS))
    out.append(("finalize", apply.finalize_kernel,
                {"stats_ptr": "*fp64", "apply_ptr": "*fp64", "out_ptr": "*fp32", "nblocks": "i32",
                 "STATS_COLS": "constexpr", "CHUNK": "constexpr"},
                dict(STATS_COLS=histogram.STATS_COLS, CHUNK=fchunk), 4))
    return out


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path


def _resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1


def compile_all(archs=(80, 90)):
    """Compile every kernel configuration; returns a list of result dicts (error or resources)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run AOT compilation in a process without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, signature, constexprs, warps in _configs():
            fusion = not name.startswith("select")  # as the launcher: select kernels without FMA
            row = dict(kernel=name, arch=f"sm_{arch}", num_warps=warps)
            try:
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                compiled = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=3,
                                                                           enable_fp_fusion=fusion))
                reg, stack = _resources(compiled.asm["cubin"])
                shared = int(compiled.metadata.shared)
                row.update(registers=reg, spill_stack=stack, shared=shared, shared_limit=SHARED_LIMIT[arch],
                           ok=stack == 0 and shared <= SHARED_LIMIT[arch])
            except Exception as exc:  # report every failure, not only the first
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            results.append(row)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch or (80, 90)))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['arch']}  {r['kernel']:55s} ERROR {r['error']}")
            else:
                print(f"{r['arch']}  {r['kernel']:55s} regs={r['registers']:3d} spill={r['spill_stack']} "
                      f"shared={r['shared']}/{r['shared_limit']} warps={r['num_warps']}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
