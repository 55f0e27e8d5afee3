"""Fused Triton kernels of m2po-ops, installed as ``m2po_ops.kernels``.

Token passes (grid over blocks of tokens; token_passes.py, apply.py): stats_kernel (the one full read), level2_kernel,
ties_kernel, fix_paper_kernel (these three read only each block's compacted tail),
apply_official_kernel. Chunked passes (one program per chunk, the last to arrive finishing):
select1_kernel, select2_kernel (histograms to cut), tie_scan_kernel (per-block tie offsets),
finalize_kernel (partials to loss and metrics). first_valid_kernel: one program per sequence.
The launch order and buffers are in m2po_ops/triton_backend.py; the algorithm, in PyTorch, is
m2po_ops/radix_select.py; the buffer layouts and every shared number, m2po_ops/constants.py.
"""

from .apply import apply_official_kernel, finalize_kernel, fix_paper_kernel
from .select import select1_kernel, select2_kernel
from .token_passes import first_valid_kernel, level2_kernel, stats_kernel, tie_scan_kernel, ties_kernel

ALL_KERNELS = (
    first_valid_kernel,
    stats_kernel,
    select1_kernel,
    level2_kernel,
    select2_kernel,
    ties_kernel,
    tie_scan_kernel,
    fix_paper_kernel,
    apply_official_kernel,
    finalize_kernel,
)

__all__ = [
    "ALL_KERNELS",
    "apply_official_kernel",
    "fix_paper_kernel",
    "finalize_kernel",
    "first_valid_kernel",
    "level2_kernel",
    "select1_kernel",
    "select2_kernel",
    "stats_kernel",
    "tie_scan_kernel",
    "ties_kernel",
]
