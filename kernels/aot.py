"""Ahead-of-time compilation of the kernel variants the JIT really builds, without a GPU.

    python -m m2po_ops.kernels.aot            # table of registers / spills / shared memory
    python -m m2po_ops.kernels.aot --json     # the same as JSON
    python -m m2po_ops.kernels.aot --sweep    # distinct variants per kernel over sizes 1 .. 2**20

What is compiled is not written out by hand. Representative calls of the public API run through
the launcher with ``launch_log(execute=False)``, on CPU tensors: nothing is launched, every launch
is recorded with its real arguments. Each recorded launch then goes through the JIT's own binder
for the target (Triton's ``create_function_from_signature`` and ``JITFunction._pack_args``), so
the signature, the constexprs and the specialisation attributes (16-byte divisibility of pointers
and integers, ``*u1`` for bool masks, integers equal to 1) are exactly those a launch on that GPU
would compile. Distinct keys are compiled once each with ``triton.compile`` for sm_80 (A100)
and sm_90 (H100).

This catches what the interpreter cannot: compile and ptxas errors, register spills
(cuobjdump's STACK), shared memory over the target's limit (Triton does not raise for that),
instructions whose rounding the bit-exact contract forbids (approximate divides and square
roots), and the number of variants a workload builds (each is a compilation, and one first met
during CUDA-graph capture would load a module, which capture forbids). Run it in a process
without TRITON_INTERPRET (the interpreter's kernel objects cannot be compiled).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

SHARED_LIMIT = {80: 166_912, 90: 232_448}
# PTX the kernels must not contain: fp32 "/" compiles to div.full.f32 (up to 2 ulp) and
# sqrt.approx is not correctly rounded; the masks and bounds are specified bit for bit.
FORBIDDEN_PTX = ("div.full.f32", "div.approx", "sqrt.approx")


def _check_process():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run AOT compilation in a process without TRITON_INTERPRET=1")


def _calls(n: int, variant: str, dtype, mask_kind: str, mode: str = "mask", tau: float = 0.04,
           layout: str = "2d", adv_dtype=None, **extra):
    """One public-API call on CPU tensors of n tokens, returned as a thunk. layout: "2d" (B, T)
    with per-token advantages (T = 64, or n when 64 does not divide n), "per_row" the same with
    (B,) advantages, "packed" 1-D with cu_seqlens."""
    import torch

    import m2po_ops

    g = torch.Generator().manual_seed(n)
    t = 64 if n % 64 == 0 else n
    shape = (n // t, t) if layout != "packed" else (n,)
    olp = -torch.rand(shape, generator=g)
    lp = (olp + torch.randn(shape, generator=g) * 0.3).to(dtype)
    olp = olp.to(dtype)
    adv = torch.randn(shape[:1] if layout == "per_row" else shape, generator=g).to(adv_dtype or dtype)
    mask = {"none": None, "bool": torch.rand(shape, generator=g) < 0.9}.get(mask_kind)
    if mask is None and mask_kind != "none":
        mask = (torch.rand(shape, generator=g) < 0.9).to(getattr(torch, mask_kind))
    kw = dict(variant=variant, tau=tau, backend="triton", validate=False, **extra)
    if layout == "packed":
        kw["cu_seqlens"] = torch.tensor([0, n // 3, n])
    if mode == "mask":
        return lambda: m2po_ops.m2po_mask(lp, olp, adv, mask, **kw)
    if mode == "num_tokens_tensor":
        kw["num_tokens"] = torch.tensor(float(n))
    elif mode == "num_tokens_int64":  # M2POStats' cuts.num_valid
        kw["num_tokens"] = torch.tensor(n)
    elif mode == "num_tokens_number":
        kw["num_tokens"] = float(n)
    elif mode != "loss":
        kw["loss_agg_mode"] = mode
    return lambda: m2po_ops.m2po_loss(lp, olp, adv, mask, **kw)


def scenarios(n: int = 4096):
    """(label, thunk) for every configuration the library can launch, once each."""
    import torch

    out = []
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    for variant in ("paper", "official"):
        for dtype in (f32, bf16, f16):
            for mode in ("mask", "loss"):
                out.append((f"{variant} {dtype} bool-mask {mode}", _calls(n, variant, dtype, "bool", mode)))
        for dtype, mask_kind in ((f32, "none"), (f64, "bool"), (f32, "int32"), (bf16, "bfloat16")):
            for mode in ("mask", "loss"):
                out.append((f"{variant} {dtype} {mask_kind}-mask {mode}", _calls(n, variant, dtype, mask_kind, mode)))
        for mode in ("num_tokens_number", "num_tokens_tensor", "num_tokens_int64", "seq-mean-token-mean"):
            out.append((f"{variant} fp32 {mode}", _calls(n, variant, f32, "bool", mode)))
        for layout in ("per_row", "packed"):
            for dtype in (f32, bf16, f16):
                out.append((f"{variant} {dtype} {layout}", _calls(n, variant, dtype, "bool", "loss", layout=layout)))
        for mask_kind in ("int64", "uint8", "float32"):  # HF attention masks, byte masks, float masks
            out.append((f"{variant} fp32 {mask_kind}-mask", _calls(n, variant, f32, mask_kind, "loss")))
        # bf16 log-probs with float32 advantages (what most trainers hold)
        out.append((f"{variant} bf16 fp32-adv", _calls(n, variant, bf16, "bool", "loss", adv_dtype=f32)))
        out.append((f"{variant} micro-batch pre-pass", _prepass(n, variant)))
        out.append((f"{variant} process group", _group_call(n, variant)))
        out.append((f"{variant} tau=inf", _calls(n, variant, f32, "bool", "loss", tau=float("inf"))))
    out.append(("official miniclip", _calls(n, "official", f32, "bool", "loss", miniclip_low=0.3, miniclip_high=0.5)))
    return out


def _prepass(n: int, variant: str):
    """M2POStats over two micro-batches, then each micro-batch's loss with its cut."""

    def call():
        import torch

        import m2po_ops

        g = torch.Generator().manual_seed(n)
        olp = -torch.rand(2, n // 64, 64, generator=g)
        lp, adv = olp + torch.randn(olp.shape, generator=g) * 0.3, torch.randn(olp.shape, generator=g)
        mask = torch.rand(olp.shape, generator=g) < 0.9
        stats = m2po_ops.M2POStats(variant=variant, backend="triton", validate=False)
        for i in range(2):
            stats.update(lp[i], olp[i], adv[i], mask[i])
        cuts = stats.solve()
        for i in range(2):
            m2po_ops.m2po_loss(lp[i], olp[i], adv[i], mask[i], variant=variant, backend="triton", validate=False,
                               cut=cuts[i], num_tokens=cuts.num_valid)

    return call


def _group_call(n: int, variant: str):
    """A one-rank gloo group: the distributed solve's launches (collectives run on CPU tensors)."""

    def call():
        import socket

        import torch.distributed as dist

        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        _calls(n, variant, __import__("torch").float32, "bool", "loss", group=dist.group.WORLD)()

    return call


def record(thunk) -> list:
    """The launches one call makes (nothing runs)."""
    from m2po_ops import triton_backend as tb

    with tb.launch_log(execute=False) as log:
        thunk()
    return list(log)


class Binder:
    """The JIT's own argument binding for one target: launch -> (key, compile inputs)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self._binders = {}

    def bind(self, launch):
        from triton.runtime.jit import create_function_from_signature

        fn = launch.kernel
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = self._binders[fn](*launch.args, **launch.meta)
        key = (launch.name, str(specialization), str(sorted(options.items())))
        return key, (bound, specialization, options)

    def compile(self, launch, bound_spec_opts):
        import triton
        from triton.compiler import ASTSource

        bound, specialization, options = bound_spec_opts
        fn = launch.kernel
        opts, signature, constexprs, attrs = fn._pack_args(self.backend, options, bound, specialization, options)
        return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target, options=opts.__dict__)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1


_LABEL_FLAGS = ("OFFICIAL", "HAS_MASK", "ADV_PER_ROW", "FIRST_PER_ROW", "WEIGHTS", "WRITE_KEEP", "WRITE_KEYS", "DENSE", "TAU_INF",
                "HAS_MINI_LO")


def _describe(launch, spec) -> str:
    """A short label of one variant: the kernel, its input and mask dtypes, its constexprs."""
    _, specialization, _ = spec
    names = launch.kernel.arg_names
    consts = [f"{a}={v}" for a, (t, v) in zip(names, specialization) if t == "constexpr" and a in _LABEL_FLAGS]
    types = [f"{a.removesuffix('_ptr')}:{t}" for a, (t, _) in zip(names, specialization) if a in ("lp_ptr", "mask_ptr")]
    return f"{launch.name.removesuffix('_kernel')}[{','.join(types + consts)}]"


def compile_all(archs=(80, 90)):
    """Compile every distinct variant the scenarios launch; one result dict per (arch, variant)."""
    _check_process()
    launches = [launch for _, thunk in scenarios() for launch in record(thunk)]
    results = []
    for arch in archs:
        binder = Binder(arch)
        seen = {}
        for launch in launches:
            key, spec = binder.bind(launch)
            if key not in seen:
                seen[key] = (launch, spec)
        for key, (launch, spec) in seen.items():
            row = dict(kernel=_describe(launch, spec), arch=f"sm_{arch}", num_warps=spec[2].get("num_warps", 4))
            try:
                compiled = binder.compile(launch, spec)
                reg, stack = _resources(compiled.asm["cubin"])
                shared = int(compiled.metadata.shared)
                ptx = compiled.asm["ptx"]
                forbidden = [op for op in FORBIDDEN_PTX if op in ptx]
                row.update(registers=reg, spill_stack=stack, shared=shared, shared_limit=SHARED_LIMIT[arch],
                           forbidden_ptx=forbidden, sqrt_rn_f64="sqrt.rn.f64" in ptx,
                           fma_f64=len(re.findall(r"\bfma\.rn\.f64", ptx)),
                           vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)),
                           ok=stack == 0 and shared <= SHARED_LIMIT[arch] and not forbidden)
            except Exception as exc:  # report every failure, not only the first
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
            results.append(row)
    return results


# the size sweep: every n in 1..17, then 2**k - 1, 2**k, 2**k + 1 up to 2**20, and a few odd sizes
SWEEP_SIZES = sorted(set(range(1, 18)) | {2**k + d for k in range(5, 21) for d in (-1, 0, 1)}
                     | {3000, 4097 * 3, 99_999, 777_777})


def variant_sweep(sizes=SWEEP_SIZES, arch: int = 90) -> dict:
    """Distinct JIT variants per kernel over ``sizes``, for both variants, two mask dtypes and
    the three layouts (fp32, token-mean).

    Returns {"per_kernel": {kernel: count}, "per_config": {config: {kernel: count}}}.
    """
    import torch

    _check_process()
    binder = Binder(arch)
    per_kernel = collections.defaultdict(set)
    per_config = collections.defaultdict(lambda: collections.defaultdict(set))
    for variant in ("paper", "official"):
        for mask_kind in ("bool", "float32"):
            for layout in ("2d", "per_row", "packed"):
                config = f"{variant},{mask_kind}-mask,{layout}"
                for n in sizes:
                    for launch in record(_calls(n, variant, torch.float32, mask_kind, "loss", layout=layout)):
                        key, _ = binder.bind(launch)
                        per_kernel[launch.name].add(key)
                        per_config[config][launch.name].add(key)
    return dict(
        sizes=[min(sizes), max(sizes), len(sizes)],
        per_kernel={k: len(v) for k, v in sorted(per_kernel.items())},
        per_config={c: {k: len(v) for k, v in sorted(d.items())} for c, d in per_config.items()},
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    parser.add_argument("--sweep", action="store_true", help="count variants over sizes instead of compiling")
    args = parser.parse_args(argv)
    if args.sweep:
        report = variant_sweep()
        print(json.dumps(report, indent=1))
        return 0
    results = compile_all(tuple(args.arch or (80, 90)))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['arch']}  {r['kernel']:75s} ERROR {r['error']}")
            else:
                print(f"{r['arch']}  {r['kernel']:75s} regs={r['registers']:3d} spill={r['spill_stack']} "
                      f"shared={r['shared']}/{r['shared_limit']} warps={r['num_warps']}"
                      + (f" FORBIDDEN {r['forbidden_ptx']}" if r["forbidden_ptx"] else ""))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
