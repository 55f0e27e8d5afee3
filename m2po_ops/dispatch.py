"""Which backend runs a call: "auto" resolves to Triton for CUDA tensors (when triton imports)
and to the PyTorch backend otherwise."""

from __future__ import annotations

import functools

import torch

from .backend import Backend
from .config import BACKENDS
from .torch_backend import TORCH


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package and the kernels import."""
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": Triton for CUDA tensors when Triton imports, the PyTorch reference otherwise."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    return backend


def get_backend(name: str) -> Backend:
    """The backend object of a resolved name ("torch" or "triton")."""
    if name == "triton":
        # (triton is an optional dependency: its backend is imported when first asked for)
        from .triton_backend import TRITON

        return TRITON
    return TORCH
