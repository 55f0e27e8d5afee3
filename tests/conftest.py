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

import pytest  # noqa: E402

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
    torch.manual_seed(0)
