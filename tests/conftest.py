"""Test setup: without a GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any module that defines a kernel is imported, so it is
set here, at collection time, before the tests import m2po_ops.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
