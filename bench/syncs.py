"""Counting host synchronisations per call.

``count_syncs()`` is a context manager that patches every PyTorch entry point whose result the
host must wait for (a value read back, or an output whose size depends on the data) and counts
the calls made while it is active. On a CPU machine nothing actually waits, so this is the
honest count of the device-to-host round trips the same code makes on a GPU. On CUDA the
benchmark also records the count reported by ``torch.cuda.set_sync_debug_mode("warn")``.

Counted (each call = one sync):
- value reads: ``Tensor.item``, ``Tensor.tolist``, ``bool(t)``, ``int(t)``, ``float(t)``,
  ``operator.index(t)``;
- data-dependent output sizes: ``torch.nonzero`` / ``Tensor.nonzero``, ``torch.argwhere``,
  ``torch.masked_select`` / ``Tensor.masked_select``, ``torch.unique``, indexing or index
  assignment with a boolean tensor (``x[mask]``, ``x[mask] = v``), ``torch.where(cond)`` with one
  argument;
- copies to the host: ``Tensor.cpu``, ``Tensor.numpy``, ``Tensor.to("cpu")`` from another device.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch

METHOD = (
    "Every call to a PyTorch entry point that makes the host wait for the device (item, tolist, "
    "bool/int/float of a tensor, nonzero/argwhere/masked_select/unique, boolean-mask indexing and "
    "index assignment, single-argument torch.where, cpu/numpy/to(cpu)) is counted by patching "
    "those entry points for one call. On CPU this counts the round trips the code would make on "
    "a GPU; on CUDA torch.cuda.set_sync_debug_mode('warn') is recorded as well."
)

_SIMPLE_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
                   "cpu", "numpy")
_FUNCS = ("nonzero", "argwhere", "masked_select", "unique")


def _has_bool_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


class SyncCount:
    def __init__(self):
        self.by_kind = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_kind": dict(sorted(self.by_kind.items()))}


@contextlib.contextmanager
def count_syncs():
    """``with count_syncs() as c: ...``; then ``c.total`` and ``c.by_kind``."""
    counter = SyncCount()
    depth = [0]  # count the outermost call only (e.g. Tensor.cpu inside Tensor.numpy)
    saved = []

    def wrap(owner, name, kind, predicate=None):
        original = owner.__dict__.get(name, None)
        target = getattr(owner, name)

        @functools.wraps(target)
        def wrapper(*args, **kwargs):
            if depth[0] == 0 and (predicate is None or predicate(*args, **kwargs)):
                counter.by_kind[kind] += 1
            depth[0] += 1
            try:
                return target(*args, **kwargs)
            finally:
                depth[0] -= 1

        saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def to_host(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args else None)
        if isinstance(dev, (str, torch.device)):
            return torch.device(dev).type == "cpu" and self.device.type != "cpu"
        return False

    try:
        for name in _SIMPLE_METHODS:
            wrap(torch.Tensor, name, f"Tensor.{name}")
        wrap(torch.Tensor, "to", "Tensor.to(cpu)", to_host)
        wrap(torch.Tensor, "__getitem__", "bool-mask index", lambda self, index: _has_bool_index(index))
        wrap(torch.Tensor, "__setitem__", "bool-mask assign", lambda self, index, value: _has_bool_index(index))
        for name in _FUNCS:
            wrap(torch, name, f"torch.{name}")
        wrap(torch, "where", "torch.where(cond)", lambda *a, **k: len(a) + len(k) == 1)
        yield counter
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
