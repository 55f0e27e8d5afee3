"""m2po-ops: exact, sync-free M2PO (Second-Moment Trust Policy Optimization) for RL trainers.

Public API: ``m2po_mask``, ``m2po_loss``, ``Cut``, ``M2POConfig``.
"""

from .api import m2po_loss, m2po_mask, resolve_backend, triton_available
from .config import M2POConfig
from .cut import Cut

__all__ = ["m2po_loss", "m2po_mask", "Cut", "M2POConfig", "resolve_backend", "triton_available"]
__version__ = "0.1.0"
