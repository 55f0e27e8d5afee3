"""m2po-ops: exact, sync-free M2PO (Second-Moment Trust Policy Optimization) for RL trainers.

Public API: ``m2po_mask``, ``m2po_loss``, ``Cut``, ``M2POConfig``, and for one cut over a whole
optimizer step split into micro-batches ``M2POStats`` / ``M2POCuts`` (across data-parallel ranks:
``group=``).
"""

import importlib.abc
import importlib.util
import os
import sys


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Find ``m2po_ops.kernels`` in a source checkout used without installing
    (``PYTHONPATH=<repo>``, as bench/run_gpu.sh does): the kernels live in ``<repo>/kernels`` and
    setup.py installs them as ``m2po_ops.kernels``. Installed and editable layouts find the
    package before this finder is asked (it sits last on sys.meta_path)."""

    location = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels" or not os.path.isfile(os.path.join(self.location, "__init__.py")):
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(self.location, "__init__.py"), submodule_search_locations=[self.location]
        )


if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")):
    if not any(isinstance(f, _SourceTreeKernels) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeKernels())

from .api import m2po_loss, m2po_mask
from .dispatch import resolve_backend, triton_available
from .metrics import metrics_to_host
from .config import M2POConfig
from .cut import Cut
from .microbatch import M2POCuts, M2POStats

__all__ = [
    "m2po_loss",
    "m2po_mask",
    "metrics_to_host",
    "Cut",
    "M2POConfig",
    "M2POStats",
    "M2POCuts",
    "resolve_backend",
    "triton_available",
]
__version__ = "0.1.0"
