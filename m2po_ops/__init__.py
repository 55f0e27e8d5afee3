"""m2po-ops: exact, sync-free M2PO (Second-Moment Trust Policy Optimization) for RL trainers.

Public API: ``m2po_mask``, ``m2po_loss``, ``Cut``, ``M2POConfig``, and for one cut over a whole
optimizer step split into micro-batches ``M2POStats`` / ``M2POCuts`` (across data-parallel ranks:
``group=``).
"""

from .api import m2po_loss, m2po_mask, resolve_backend, triton_available
from .config import M2POConfig
from .cut import Cut
from .stats import M2POCuts, M2POStats

__all__ = [
    "m2po_loss",
    "m2po_mask",
    "Cut",
    "M2POConfig",
    "M2POStats",
    "M2POCuts",
    "resolve_backend",
    "triton_available",
]
__version__ = "0.1.0"
