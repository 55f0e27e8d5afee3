"""The metrics every call returns (README, "Metrics"): 0-d float32 tensors on the input's device,
so computing them never syncs; ``metrics_to_host`` reads them in one transfer.

The ops (m2po_ops/ops.py) carry them as one float32 values vector with the backward scale (the
V_* slots of m2po_ops/constants.py); ``METRICS`` names each slot once, for both forms.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import constants as C
from .cut import Cut

# name -> slot of the values vector, in the order of the dict; the ppo_clip surrogate adds its
# solved clip bounds
METRICS = (("m2", C.V_M2), ("m2_after", C.V_M2_AFTER), ("masked_fraction", C.V_MASKED_FRACTION),
           ("trust_region_fraction", C.V_TRUST_REGION_FRACTION), ("kl", C.V_KL), ("ratio_mean", C.V_RATIO_MEAN),
           ("ratio_max", C.V_RATIO_MAX), ("cut", C.V_CUT), ("num_nonfinite", C.V_NUM_NONFINITE),
           ("input_error", C.V_INPUT_ERROR))
CLIP_METRICS = (("clip_low", C.V_CLIP_LOW), ("clip_high", C.V_CLIP_HIGH))


def metrics_dict(cut: Cut, masked_fraction: Tensor, trust_region_fraction: Tensor, kl: Tensor, ratio_mean: Tensor,
                 ratio_max: Tensor, num_nonfinite: Tensor, zero: Tensor) -> dict:
    """The metrics of one call from its cut and its per-token statistics. ``input_error`` starts
    at ``zero`` (the API replaces it when it checked inputs on the device); the official rule adds
    its clip bounds."""
    values = (cut.m2, cut.m2_after, masked_fraction, trust_region_fraction, kl, ratio_mean, ratio_max,
              cut.threshold, num_nonfinite, zero)
    m = {name: v for (name, _), v in zip(METRICS, values)}
    if cut.surrogate == "ppo_clip":  # (its solved bounds)
        m["clip_low"] = cut.lower
        m["clip_high"] = cut.upper
    return m


def values_of(metrics: dict, cut: Cut, scale: Optional[Tensor]) -> Tensor:
    """The values vector (float32 [VALUES_LEN]) of a backend that keeps its metrics apart: one
    stack of the dict's tensors, the cut's clip bounds and the backward scale (None: 1)."""
    parts = [None] * C.VALUES_LEN
    for name, slot in METRICS:
        parts[slot] = metrics[name]
    parts[C.V_CLIP_LOW], parts[C.V_CLIP_HIGH] = cut.lower, cut.upper
    parts[C.V_SCALE] = scale if scale is not None else torch.ones((), dtype=torch.float32, device=cut.device)
    return torch.stack([p.to(torch.float32) for p in parts])


_VIEWS = "_m2po_views"


def with_views(values: Tensor) -> tuple:
    """The 0-d views of a values vector, made once and kept on the tensor, so that metrics_of
    does not make them again (13 views cost ~8 us of a small call's host path)."""
    views = values.unbind()
    setattr(values, _VIEWS, views)
    return views


def metrics_of(values: Tensor, surrogate: str) -> dict:
    """The metrics dict of an operator's values vector: 0-d views of it (the operators mark it
    not differentiable)."""
    parts = None if torch.compiler.is_compiling() else getattr(values, _VIEWS, None)
    if parts is None:
        parts = values.unbind()
    m = {name: parts[slot] for name, slot in METRICS}
    if surrogate == "ppo_clip":
        for name, slot in CLIP_METRICS:
            m[name] = parts[slot]
    return m


def metrics_to_host(metrics: dict) -> dict:
    """The metrics of one call as Python floats, in one device-to-host transfer.

    The metrics are 0-d device tensors so that computing them never syncs; reading them one by
    one would cost one sync each. Call this where you log (it syncs once).
    """
    if not metrics:
        return {}
    values = torch.stack([v.reshape(()).float() for v in metrics.values()]).tolist()  # one copy kernel, one read
    return dict(zip(metrics.keys(), values))
