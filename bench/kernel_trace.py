"""Count what every Triton kernel launch really does, under the Triton interpreter (no GPU).

Performance targets live in the benchmark, but some structural properties of the fused backend
can be counted exactly on a CPU, so tests can fail when they regress:

1. bytes per pass: bytes loaded and stored by each launch (active lanes only, times the
   element size; atomics counted apart), per kernel and per token of the call;
2. serial work per program: elements loaded by each program (the items it scans serially);
3. atomic contention: for every atomic instruction executed by one program, the largest number
   of active lanes that target the same address (1 = pre-aggregated, no contention);
4. early exit: which launches did any work beyond reading a few scalars.

How it works: under ``TRITON_INTERPRET=1`` every ``kernel[grid](...)`` runs through
``triton.runtime.interpreter.GridExecutor``, which loops over the grid calling
``interpreter_builder.set_grid_idx(x, y, z)`` and then the kernel's Python body; every
``tl.load`` / ``tl.store`` (plain, masked, block-pointer or descriptor) reaches the builder's
``create_masked_load`` / ``create_masked_store`` with the lane addresses and the mask, and every
``tl.atomic_*`` reaches ``create_atomic_rmw`` (with a mask) or ``create_atomic_cas``.
``kernel_trace()`` wraps those methods (on the builder instance, restored on exit) and
``GridExecutor.__call__`` / ``_init_args_hst`` (to open one record per launch, named after the
kernel, with the address range of each tensor argument so that traffic is also attributed per
argument). Torch operators run inside the block (the workspace memset, backward's multiply)
are counted from their tensor sizes by a ``TorchDispatchMode`` and reported apart.

    with kernel_trace() as trace:
        loss, _ = m2po_ops.m2po_loss(..., backend="triton", validate=False)
        loss.backward()
    rows = summary(trace, num_tokens)      # one dict per kernel (and per torch op)
    print(format_table(rows))

CLI: ``python -m bench.kernel_trace [--tokens 65536] [--variant paper] [--regime typical]``
(regimes: none, typical, stressed, all-equal; ``--by-arg`` adds bytes per kernel argument).

It needs the interpreter: set TRITON_INTERPRET=1 before m2po_ops (or any kernel module) is
imported, as tests/conftest.py does (``@triton.jit`` decides at definition time); kernels
compiled for a GPU are not seen (``kernel_trace()`` raises if m2po_ops launched only those).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# records


@dataclass
class ProgramStats:
    """What one program (grid index) of one launch did."""

    pid: Tuple[int, int, int]
    loads: int = 0  # executed load instructions
    load_elems: int = 0  # active lanes loaded
    load_bytes: int = 0
    scalar_loads: int = 0  # load instructions with a single address (tl.load of a scalar pointer)
    scalar_load_elems: int = 0
    stores: int = 0
    store_elems: int = 0
    store_bytes: int = 0
    atomics: int = 0  # executed atomic instructions
    atomic_lanes: int = 0  # active lanes over all of them
    atomic_bytes: int = 0
    max_lanes_per_address: int = 0  # over this program's atomic instructions
    contended_atomics: int = 0  # atomic instructions in which two active lanes share an address
    arg_load_elems: Dict[str, int] = field(default_factory=dict)  # active lanes loaded, per argument

    @property
    def max_arg_load_elems(self) -> int:
        """Elements loaded from the one argument this program read most from."""
        return max(self.arg_load_elems.values(), default=0)

    def did_work(self, max_scalars: int = 4) -> bool:
        """True if the program stored, ran an atomic with an active lane, loaded a vector
        (any active lane of a multi-address load) or more than ``max_scalars`` scalars."""
        return bool(self.store_elems or self.atomic_lanes or self.load_elems > self.scalar_load_elems
                    or self.scalar_load_elems > max_scalars)


@dataclass
class AtomicEvent:
    """One atomic instruction executed by one program."""

    program: int  # index into LaunchTrace.programs
    op: str  # e.g. "ADD", "CAS"
    arg: str  # the kernel argument its addresses fall in ("?" if none)
    lanes: int  # active lanes
    addresses: int  # distinct addresses among them
    max_lanes_per_address: int
    elem_bytes: int


@dataclass
class ArgStats:
    """Traffic of one launch attributed to one tensor argument (summed over programs)."""

    load_elems: int = 0
    load_bytes: int = 0
    store_elems: int = 0
    store_bytes: int = 0
    atomic_lanes: int = 0
    atomic_bytes: int = 0


@dataclass
class LaunchTrace:
    index: int
    name: str
    grid: Tuple[int, int, int] = (0, 0, 0)
    programs: List[ProgramStats] = field(default_factory=list)
    args: Dict[str, ArgStats] = field(default_factory=dict)
    atomic_events: List[AtomicEvent] = field(default_factory=list)
    ranges: list = field(default_factory=list, repr=False)  # (start, end, name), largest first

    @property
    def num_programs(self) -> int:
        return len(self.programs)

    @property
    def load_bytes(self) -> int:
        return sum(p.load_bytes for p in self.programs)

    @property
    def store_bytes(self) -> int:
        return sum(p.store_bytes for p in self.programs)

    @property
    def load_elems(self) -> int:
        return sum(p.load_elems for p in self.programs)

    @property
    def store_elems(self) -> int:
        return sum(p.store_elems for p in self.programs)

    @property
    def atomic_lanes(self) -> int:
        return sum(p.atomic_lanes for p in self.programs)

    @property
    def atomic_bytes(self) -> int:
        return sum(p.atomic_bytes for p in self.programs)

    @property
    def max_program_load_elems(self) -> int:
        return max((p.load_elems for p in self.programs), default=0)

    @property
    def max_program_arg_load_elems(self) -> int:
        return max((p.max_arg_load_elems for p in self.programs), default=0)

    @property
    def max_lanes_per_address(self) -> int:
        return max((p.max_lanes_per_address for p in self.programs), default=0)

    @property
    def contended_atomics(self) -> int:
        return sum(p.contended_atomics for p in self.programs)

    def did_work(self, max_scalars: int = 4) -> bool:
        return any(p.did_work(max_scalars) for p in self.programs)


@dataclass
class TorchOp:
    """A torch operator run inside the block (outside kernels), counted from its tensors: bytes
    of the tensors it reads and of those it writes (in-place / out= arguments and outputs)."""

    name: str
    phase: str  # "forward" or "backward" (run by the autograd engine)
    read_bytes: int
    write_bytes: int


@dataclass
class Trace:
    launches: List[LaunchTrace] = field(default_factory=list)
    torch_ops: List[TorchOp] = field(default_factory=list)
    # names of the launches made through m2po_ops.triton_backend._launch (when that module is
    # imported): a cross-check that every launch of the backend was traced
    backend_launches: List[str] = field(default_factory=list)

    def kernel(self, name: str) -> List[LaunchTrace]:
        """The launches of the kernel called ``name``, in order."""
        return [lt for lt in self.launches if lt.name == name]

    def names(self) -> List[str]:
        return [lt.name for lt in self.launches]


# ---------------------------------------------------------------------------------------------
# the tracer


def _elem_bytes(ptrs) -> int:
    ty = ptrs.get_element_ty()
    return max(1, ty.primitive_bitwidth // 8)  # int1 (bool) is one byte, as the interpreter's addptr


def _tensor_range(t) -> Optional[Tuple[int, int]]:
    t = getattr(t, "base", t) if not isinstance(t, torch.Tensor) else t  # TensorWrapper
    if not isinstance(t, torch.Tensor):
        return None
    if t.numel() == 0:
        return None
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


class _Tracer:
    def __init__(self, trace: Trace):
        self.trace = trace
        self.launch: Optional[LaunchTrace] = None
        self.program: Optional[ProgramStats] = None

    # --- attribution
    def _labels(self, addrs: np.ndarray) -> np.ndarray:
        labels = np.full(addrs.shape, -1, dtype=np.int64)
        for i, (start, end, _) in enumerate(self.launch.ranges):  # largest first: the innermost wins
            labels[(addrs >= start) & (addrs < end)] = i
        return labels

    def _by_arg(self, addrs: np.ndarray, nbytes: int, kind: str) -> None:
        if addrs.size == 0:
            return
        labels = self._labels(addrs)
        names = [r[2] for r in self.launch.ranges]
        for label, count in zip(*np.unique(labels, return_counts=True)):
            name = names[label] if label >= 0 else "?"
            st = self.launch.args.setdefault(name, ArgStats())
            count = int(count)
            if kind == "load":
                self.program.arg_load_elems[name] = self.program.arg_load_elems.get(name, 0) + count
                st.load_elems += count
                st.load_bytes += count * nbytes
            elif kind == "store":
                st.store_elems += count
                st.store_bytes += count * nbytes
            else:
                st.atomic_lanes += count
                st.atomic_bytes += count * nbytes

    def _current(self) -> Optional[ProgramStats]:
        return self.program if self.launch is not None else None

    # --- events
    def on_load(self, ptrs, mask) -> None:
        p = self._current()
        if p is None:
            return
        addrs = np.asarray(ptrs.data).reshape(-1)
        active = addrs[np.asarray(mask.data, dtype=bool).reshape(-1)] if mask is not None else addrs
        nb = _elem_bytes(ptrs)
        p.loads += 1
        p.load_elems += active.size
        p.load_bytes += active.size * nb
        if addrs.size == 1:
            p.scalar_loads += 1
            p.scalar_load_elems += active.size
        self._by_arg(active, nb, "load")

    def on_store(self, ptrs, mask) -> None:
        p = self._current()
        if p is None:
            return
        addrs = np.asarray(ptrs.data).reshape(-1)
        active = addrs[np.asarray(mask.data, dtype=bool).reshape(-1)] if mask is not None else addrs
        nb = _elem_bytes(ptrs)
        p.stores += 1
        p.store_elems += active.size
        p.store_bytes += active.size * nb
        self._by_arg(active, nb, "store")

    def on_atomic(self, op: str, ptrs, mask) -> None:
        p = self._current()
        if p is None:
            return
        addrs = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            addrs = addrs[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape).reshape(-1)]
        nb = _elem_bytes(ptrs)
        p.atomics += 1
        p.atomic_lanes += addrs.size
        p.atomic_bytes += addrs.size * nb
        if addrs.size:
            _, counts = np.unique(addrs, return_counts=True)
            most, distinct = int(counts.max()), int(counts.size)
        else:
            most = distinct = 0
        p.max_lanes_per_address = max(p.max_lanes_per_address, most)
        p.contended_atomics += most > 1
        labels = self._labels(addrs[:1]) if addrs.size else np.array([-1])
        arg = self.launch.ranges[labels[0]][2] if labels[0] >= 0 else "?"
        self.launch.atomic_events.append(
            AtomicEvent(len(self.launch.programs) - 1, op, arg, int(addrs.size), distinct, most, nb))
        self._by_arg(addrs, nb, "atomic")


class _CountTorchOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes read / written by the torch operators run outside kernels (views and allocations
    move no data and are skipped)."""

    _FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "lift_fresh",
             "_local_scalar_dense", "resize_", "_to_copy_meta")

    def __init__(self, tracer: "_Tracer", trace: Trace):
        super().__init__()
        self.tracer = tracer
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "m2po_ops":  # the library's operator: count what runs inside it
            from m2po_ops.ops import IMPLEMENTATIONS

            with self:
                return IMPLEMENTATIONS[func](*args, **kwargs)
        out = func(*args, **kwargs)
        if self.tracer.launch is not None:  # the interpreter's own copies around a launch
            return out
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in self._FREE or name.startswith("empty"):
            return out
        read = write = 0
        written = set()
        schema = func._schema
        values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
        for a, v in zip(schema.arguments, values):
            tensors = [v] if isinstance(v, torch.Tensor) else [x for x in v if isinstance(x, torch.Tensor)] if (
                isinstance(v, (list, tuple))) else []
            for t in tensors:
                if a.alias_info is not None and a.alias_info.is_write:
                    write += t.numel() * t.element_size()
                    written.add(id(t))
                else:
                    read += t.numel() * t.element_size()
        outs = out if isinstance(out, (list, tuple)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and id(t) not in written:
                write += t.numel() * t.element_size()
        phase = "backward" if torch._C._current_autograd_node() is not None else "forward"
        self.trace.torch_ops.append(TorchOp(f"aten.{name}", phase, read, write))
        return out


@contextlib.contextmanager
def kernel_trace(torch_ops: bool = True):
    """Trace every Triton launch (and, with ``torch_ops``, every torch operator) run inside the
    block. Yields a ``Trace`` filled as the block runs.

    Only interpreted kernels are seen: those defined (``@triton.jit`` runs) while
    TRITON_INTERPRET=1. If the block launched kernels through m2po_ops' launcher but none was
    interpreted, it raises RuntimeError on exit rather than return an empty trace."""
    from triton.runtime import interpreter as interp

    trace = Trace()
    tracer = _Tracer(trace)
    builder = interp.interpreter_builder
    GE = interp.GridExecutor
    saved_builder = {name: builder.__dict__.get(name, None) for name in (
        "create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas", "set_grid_idx",
        "set_grid_dim")}
    orig = {name: getattr(builder, name) for name in saved_builder}
    saved_ge = {"__call__": GE.__call__, "_init_args_hst": GE._init_args_hst}

    def masked_load(ptrs, mask, other, *a, **k):
        tracer.on_load(ptrs, mask)
        return orig["create_masked_load"](ptrs, mask, other, *a, **k)

    def masked_store(ptrs, value, mask, *a, **k):
        tracer.on_store(ptrs, mask)
        return orig["create_masked_store"](ptrs, value, mask, *a, **k)

    def atomic_rmw(rmw_op, ptr, val, mask, *a, **k):
        tracer.on_atomic(getattr(rmw_op, "name", str(rmw_op)).split(".")[-1], ptr, mask)
        return orig["create_atomic_rmw"](rmw_op, ptr, val, mask, *a, **k)

    def atomic_cas(ptr, cmp, val, *a, **k):
        tracer.on_atomic("CAS", ptr, None)
        return orig["create_atomic_cas"](ptr, cmp, val, *a, **k)

    def set_grid_dim(nx, ny, nz):
        if tracer.launch is not None:
            tracer.launch.grid = (nx, ny, nz)
        return orig["set_grid_dim"](nx, ny, nz)

    def set_grid_idx(x, y, z):
        result = orig["set_grid_idx"](x, y, z)
        if tracer.launch is not None:
            tracer.program = ProgramStats((x, y, z))
            tracer.launch.programs.append(tracer.program)
        return result

    def ge_init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved_ge["_init_args_hst"](self, args_dev, kwargs)
        if tracer.launch is not None:
            ranges = []
            named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
            for name, arg in named:
                r = _tensor_range(arg)
                if r is not None:
                    ranges.append((r[0], r[1], name))
            merged: Dict[Tuple[int, int], str] = {}
            for start, end, name in ranges:  # aliased arguments (same view) share one label
                merged[(start, end)] = merged[(start, end)] + "=" + name if (start, end) in merged else name
            tracer.launch.ranges = sorted(((s, e, n) for (s, e), n in merged.items()), key=lambda r: r[0] - r[1])
        return args_hst, kwargs_hst

    def ge_call(self, *args, **kwargs):
        if tracer.launch is not None:  # not expected: launches do not nest
            return saved_ge["__call__"](self, *args, **kwargs)
        tracer.launch = LaunchTrace(len(trace.launches), self.fn.__name__)
        trace.launches.append(tracer.launch)
        try:
            return saved_ge["__call__"](self, *args, **kwargs)
        finally:
            tracer.launch = None
            tracer.program = None

    try:  # imported here so that a first call inside the block is cross-checked too
        import m2po_ops.triton_backend as backend
    except ImportError:
        backend = None
    saved_launch = getattr(backend, "_launch", None) if backend is not None else None

    def backend_launch(kernel, grid, *args, **meta):
        fn = getattr(kernel, "fn", kernel)
        trace.backend_launches.append(getattr(fn, "__name__", str(kernel)))
        return saved_launch(kernel, grid, *args, **meta)

    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.create_atomic_rmw = atomic_rmw
    builder.create_atomic_cas = atomic_cas
    builder.set_grid_idx = set_grid_idx
    builder.set_grid_dim = set_grid_dim
    GE.__call__ = ge_call
    GE._init_args_hst = ge_init_args_hst
    if saved_launch is not None:
        backend._launch = backend_launch
    mode = _CountTorchOps(tracer, trace) if torch_ops else contextlib.nullcontext()
    try:
        with mode:
            yield trace
        if trace.backend_launches and not trace.launches:
            raise RuntimeError("kernel_trace saw m2po_ops launch kernels but none ran in the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before importing m2po_ops (kernels compiled for a GPU "
                               "cannot be traced)")
    finally:
        for name, value in saved_builder.items():
            if value is None:
                builder.__dict__.pop(name, None)
            else:
                setattr(builder, name, value)
        GE.__call__ = saved_ge["__call__"]
        GE._init_args_hst = saved_ge["_init_args_hst"]
        if saved_launch is not None:
            backend._launch = saved_launch


# ---------------------------------------------------------------------------------------------
# summary


def summary(trace: Trace, num_tokens: int, max_scalars: int = 4) -> List[dict]:
    """One row per kernel (in order of first launch; launches of the same kernel merged), then
    one per torch operator and phase. Per-token figures divide by ``num_tokens`` (positions of
    the call, padding included).

    Kernel rows: kind="kernel", kernel, launches, programs, read_bytes, write_bytes,
    read_B_per_token, write_B_per_token, atomic_instructions, atomic_lanes, atomic_B_per_token,
    max_load_elems_per_program, max_arg_load_elems_per_program (elements one program loaded
    from the one argument it read most from), max_scalar_loads_per_program,
    max_lanes_per_address, contended_atomics (atomic instructions with two active lanes on one
    address), did_work (any program stored, ran an atomic lane, loaded a vector or more than
    ``max_scalars`` scalars), working_programs.
    Torch rows: kind="torch", kernel ("aten.op (phase)"), launches (calls), read/write bytes and
    per token; the kernel-only fields are None.
    """
    n = max(int(num_tokens), 1)
    rows: Dict[str, dict] = {}
    for lt in trace.launches:
        r = rows.setdefault(lt.name, dict(
            kind="kernel", kernel=lt.name, launches=0, programs=0, read_bytes=0, write_bytes=0,
            atomic_instructions=0, atomic_lanes=0, atomic_bytes=0, max_load_elems_per_program=0,
            max_arg_load_elems_per_program=0, max_scalar_loads_per_program=0, max_lanes_per_address=0,
            contended_atomics=0, did_work=False, working_programs=0))
        r["launches"] += 1
        r["programs"] += lt.num_programs
        r["read_bytes"] += lt.load_bytes
        r["write_bytes"] += lt.store_bytes
        r["atomic_instructions"] += len(lt.atomic_events)
        r["atomic_lanes"] += lt.atomic_lanes
        r["atomic_bytes"] += lt.atomic_bytes
        r["max_load_elems_per_program"] = max(r["max_load_elems_per_program"], lt.max_program_load_elems)
        r["max_arg_load_elems_per_program"] = max(r["max_arg_load_elems_per_program"],
                                                  lt.max_program_arg_load_elems)
        r["contended_atomics"] += lt.contended_atomics
        r["max_scalar_loads_per_program"] = max(r["max_scalar_loads_per_program"],
                                                max((p.scalar_load_elems for p in lt.programs), default=0))
        r["max_lanes_per_address"] = max(r["max_lanes_per_address"], lt.max_lanes_per_address)
        working = sum(p.did_work(max_scalars) for p in lt.programs)
        r["working_programs"] += working
        r["did_work"] = r["did_work"] or working > 0
    torch_rows: Dict[str, dict] = {}
    for op in trace.torch_ops:
        key = f"{op.name} ({op.phase})"
        r = torch_rows.setdefault(key, dict(
            kind="torch", kernel=key, launches=0, programs=None, read_bytes=0, write_bytes=0,
            atomic_instructions=None, atomic_lanes=None, atomic_bytes=None, max_load_elems_per_program=None,
            max_arg_load_elems_per_program=None, max_scalar_loads_per_program=None, max_lanes_per_address=None,
            contended_atomics=None, did_work=True, working_programs=None))
        r["launches"] += 1
        r["read_bytes"] += op.read_bytes
        r["write_bytes"] += op.write_bytes
    out = list(rows.values()) + list(torch_rows.values())
    for r in out:
        r["read_B_per_token"] = r["read_bytes"] / n
        r["write_B_per_token"] = r["write_bytes"] / n
        r["atomic_B_per_token"] = None if r["atomic_bytes"] is None else r["atomic_bytes"] / n
    return out


def totals(rows: List[dict]) -> dict:
    """Bytes per token over all rows (kernels and torch ops): read, written, atomic."""
    return dict(
        read_B_per_token=sum(r["read_B_per_token"] for r in rows),
        write_B_per_token=sum(r["write_B_per_token"] for r in rows),
        atomic_B_per_token=sum(r["atomic_B_per_token"] or 0.0 for r in rows),
    )


def linear_fit(small: Trace, n_small: int, large: Trace, n_large: int) -> Dict[str, dict]:
    """Per kernel (and torch op), its bytes as ``per_token * n + fixed`` from two traces of the
    same call at two sizes: {name: {read_per_token, read_fixed, write_per_token, write_fixed,
    atomic_per_token, atomic_fixed}}. Separates the traffic that grows with the tokens from the
    fixed cost (histogram scans, the workspace memset), which dominates per-token figures of a
    small call. Rows present in only one trace are left out."""
    a = {r["kernel"]: r for r in summary(small, 1)}
    b = {r["kernel"]: r for r in summary(large, 1)}
    dn = n_large - n_small
    if dn == 0:
        raise ValueError("linear_fit needs two different sizes")
    out = {}
    for name in a.keys() & b.keys():
        fit = {}
        for what, key in (("read", "read_bytes"), ("write", "write_bytes"), ("atomic", "atomic_bytes")):
            ya, yb = a[name][key] or 0, b[name][key] or 0
            slope = (yb - ya) / dn
            fit[f"{what}_per_token"] = slope
            fit[f"{what}_fixed"] = ya - slope * n_small
        out[name] = fit
    return out


def by_arg_rows(trace: Trace, num_tokens: int) -> List[dict]:
    """Per kernel and tensor argument: bytes read / written / atomically updated per token."""
    n = max(int(num_tokens), 1)
    acc: Dict[Tuple[str, str], ArgStats] = {}
    for lt in trace.launches:
        for arg, st in lt.args.items():
            a = acc.setdefault((lt.name, arg), ArgStats())
            for f in ("load_elems", "load_bytes", "store_elems", "store_bytes", "atomic_lanes", "atomic_bytes"):
                setattr(a, f, getattr(a, f) + getattr(st, f))
    return [dict(kernel=k, arg=a, read_B_per_token=s.load_bytes / n, write_B_per_token=s.store_bytes / n,
                 atomic_B_per_token=s.atomic_bytes / n, load_elems=s.load_elems, store_elems=s.store_elems,
                 atomic_lanes=s.atomic_lanes) for (k, a), s in acc.items()]


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}".rstrip("0").rstrip(".") if x else "0"
    return str(x)


def format_table(rows: List[dict]) -> str:
    """The summary as a markdown table (kernels, then torch operators, then a total)."""
    head = ("| kernel | launches | programs | read B/tok | write B/tok | atomic B/tok | atomic lanes "
            "| max loads/program | max loads from one arg/program | max lanes/address | contended atomics "
            "| work beyond scalars |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        work = "-" if r["kind"] == "torch" else (
            f"yes ({r['working_programs']}/{r['programs']} programs)" if r["did_work"] else "no")
        lines.append("| " + " | ".join([
            r["kernel"] if r["kind"] == "kernel" else f"torch: {r['kernel']}",
            _fmt(r["launches"]), _fmt(r["programs"]), _fmt(r["read_B_per_token"]), _fmt(r["write_B_per_token"]),
            _fmt(r["atomic_B_per_token"]), _fmt(r["atomic_lanes"]), _fmt(r["max_load_elems_per_program"]),
            _fmt(r["max_arg_load_elems_per_program"]), _fmt(r["max_lanes_per_address"]),
            _fmt(r["contended_atomics"]), work]) + " |")
    t = totals(rows)
    lines.append(f"| **total** | | | {_fmt(t['read_B_per_token'])} | {_fmt(t['write_B_per_token'])} "
                 f"| {_fmt(t['atomic_B_per_token'])} | | | | | | |")
    return "\n".join(lines)


def format_by_arg(rows: List[dict]) -> str:
    lines = ["| kernel | argument | read B/tok | write B/tok | atomic B/tok | loaded elems | stored elems "
             "| atomic lanes |", "|" + "|".join(["---"] * 8) + "|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arg']} | {_fmt(r['read_B_per_token'])} | {_fmt(r['write_B_per_token'])} "
                     f"| {_fmt(r['atomic_B_per_token'])} | {r['load_elems']} | {r['store_elems']} "
                     f"| {r['atomic_lanes']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs and CLI

REGIMES = ("none", "typical", "stressed", "all-equal")
ALL_EQUAL_DELTA = 0.5  # m2 = 0.25 exactly for every valid token (all have a nonzero advantage)


def make_trace_batch(n_tokens: int, regime: str, dtype: str = "float32", seed: int = 0):
    """A bench/inputs.py batch (per-token advantages, bool mask). ``regime="all-equal"``: the
    "none" batch with old_logprobs rounded to a multiple of 1/4 (in [-30, 0]: exact in float32
    and bfloat16) and delta = sign(A) * 0.5 on every valid token, so that lp - old is exactly
    +-0.5: every valid token is in the trust region with m2 = 0.25 (> tau: all of them form one
    run of ties, in one level-1 and one level-2 bucket: the worst case for atomic contention)."""
    from bench.inputs import DTYPES, make_batch

    if regime != "all-equal":
        return make_batch(n_tokens, regime, dtype, seed=seed)
    b = make_batch(n_tokens, "none", dtype, seed=seed)
    with torch.no_grad():
        old = torch.where(b.mask, (b.old_logprobs.float() * 4).round().clamp(-120, 0) / 4, b.old_logprobs.float())
        lp = torch.where(b.mask, old + torch.sign(b.advantages) * ALL_EQUAL_DELTA, b.logprobs.detach().float())
    b.old_logprobs = old.to(DTYPES[dtype])
    b.logprobs = lp.to(DTYPES[dtype]).requires_grad_(True)
    b.regime = regime
    return b


def trace_call(batch, variant: str = "paper", **kwargs) -> Trace:
    """Trace one m2po_loss forward + backward (backend="triton", validate=False) on ``batch``."""
    import m2po_ops

    batch.logprobs.grad = None
    with kernel_trace() as trace:
        loss, _ = m2po_ops.m2po_loss(*batch.args(), variant=variant, backend="triton", validate=False, **kwargs)
        loss.backward()
    return trace


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--variant", default="paper", choices=("paper", "official"))
    p.add_argument("--regime", default="typical", choices=REGIMES)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--by-arg", action="store_true", help="also print bytes per kernel argument")
    p.add_argument("--max-scalars", type=int, default=4, help="scalar loads a program may make and count as idle")
    a = p.parse_args(argv)
    batch = make_trace_batch(a.tokens, a.regime, a.dtype)
    trace = trace_call(batch, a.variant)
    n = batch.n_tokens
    print(f"### {a.variant} / {a.regime} / {a.dtype}: {n} tokens ({batch.num_valid} valid), "
          f"{len(trace.launches)} kernel launches\n")
    print(format_table(summary(trace, n, a.max_scalars)))
    if a.by_arg:
        print()
        print(format_by_arg(by_arg_rows(trace, n)))
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
