"""Test setup: without a GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any module that defines a kernel is imported, so it is
set here, at collection time, before the tests import m2po_ops.kernels.
"""

import functools
import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: `make test` runs two processes (pytest-xdist) on two
# cores, and two OpenMP threads each oversubscribe them; their spin-waits made the small CPU ops
# of the histogram solver up to 20x slower. Each test computes both sides of every comparison in
# its own process, so both run with this setting.
torch.set_num_threads(1)

import pytest  # noqa: E402


def _skip_repatching_in_device_calls() -> None:
    """Make the interpreter's device-function calls cheaper; what they compute is unchanged.

    Triton 3.6's interpreter patches the builtins of the triton.language modules a kernel's
    globals hold (tl, tl.core) for the whole run of the kernel (GridExecutor.__call__, restored
    at its end), and patches them again, from scratch, at every call of a @triton.jit helper
    (InterpretedFunction.__call__: ``_patch_lang(self.fn)``, an ``inspect.getmembers`` over the
    modules, never restored). When the helper's modules are already patched, that second patch
    replaces interpreter builtins with equal ones; it cost about 40% of the interpreter suite's
    time. Here a helper called inside a running kernel skips it when every module it would patch
    is patched already (by the kernel, or by an earlier helper's patch, which stays); otherwise,
    and outside a kernel, it patches as before. Only the interpreter is touched: a GPU compiles
    the kernels."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    device_call = interpreter.InterpretedFunction.__call__
    grid_call = interpreter.GridExecutor.__call__
    # written against 3.6's code: do nothing if that code is not what it expects
    if "_patch_lang(self.fn)" not in inspect.getsource(device_call) or "_patch_lang" not in inspect.getsource(grid_call):
        return
    langs_cache: dict = {}
    running: list = []  # the modules each running kernel patched (innermost last)
    kept: set = set()  # modules a helper's patch left patched for good

    def langs(fn) -> frozenset:
        # the modules _patch_lang(fn) patches
        found = langs_cache.get(fn)
        if found is None:
            found = langs_cache[fn] = frozenset(
                id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return found

    def run_kernel(self, *args, **kwargs):
        running.append(langs(self.fn))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            running.pop()

    def call_helper(self, *args, **kwargs):
        need = langs(self.fn)
        if not running or not need <= (running[-1] | kept):
            if running:  # (what the kernel patched it restores at its end: not kept)
                kept.update(need - running[-1])
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.GridExecutor.__call__ = run_kernel
    interpreter.InterpretedFunction.__call__ = call_helper


_skip_repatching_in_device_calls()


def _sort_with_numpy_in_the_interpreter() -> None:
    """tl.sort under the interpreter as one numpy sort instead of Triton's bitonic network run op by
    op (55 compare-and-swap stages over a 10-dimensional reshape: about a second per 1,024-element
    block, most of the time of the tests that run the GPU's aggregation paths). The contract the
    kernels rely on is the same: the values in ascending order along the last axis. A GPU compiles
    Triton's own sort (tests/test_aot.py), and tests/test_kernel_properties.py checks the sorted
    aggregation's sums against integer sums."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.language import standard
    from triton.runtime import interpreter

    def sort(x, dim=None, descending=tl.core.CONSTEXPR_0):
        dim = tl.core._unwrap_if_constexpr(dim)
        if dim is not None and dim not in (-1, len(x.shape) - 1):
            raise ValueError("tl.sort sorts along the last dimension only")
        out = np.sort(x.handle.data, axis=-1)
        if tl.core._unwrap_if_constexpr(descending):
            out = out[..., ::-1]
        return tl.core.tensor(interpreter.TensorHandle(np.ascontiguousarray(out), x.handle.dtype), x.type)

    tl.sort = standard.sort = sort


_sort_with_numpy_in_the_interpreter()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@functools.lru_cache(maxsize=None)
def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def example():
    """``example(name)``: examples/<name>.py imported as a module (the examples are scripts, not
    a package), once per session."""
    return _load_example


@pytest.fixture
def device() -> torch.device:
    """Where the Triton backend runs: the GPU when there is one, else the CPU with the kernels
    under the interpreter. Every test that calls the Triton backend takes its tensors here."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from torch's seed 0. Without CUDA the tests' tensors live on the CPU and
    seeding its generator is enough: torch.manual_seed would also queue lazy CUDA / XPU seeding
    calls that never run, each recording a stack trace (about 4 ms a test inside pytest)."""
    if DEVICE.type == "cuda":
        torch.manual_seed(0)
    else:
        torch.default_generator.manual_seed(0)
