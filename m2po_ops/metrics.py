"""The metrics dict every backend returns (README, "Metrics"): 0-d float32 tensors on the input's
device, so computing them never syncs; ``metrics_to_host`` reads them in one transfer."""

from __future__ import annotations

import torch
from torch import Tensor

from .cut import Cut


def metrics_dict(cut: Cut, masked_fraction: Tensor, trust_region_fraction: Tensor, kl: Tensor, ratio_mean: Tensor,
                 ratio_max: Tensor, num_nonfinite: Tensor, zero: Tensor) -> dict:
    """The metrics of one call from its cut and its per-token statistics. ``input_error`` starts
    at ``zero`` (the API replaces it when it checked inputs on the device); the official rule adds
    its clip bounds."""
    m = {
        "m2": cut.m2,
        "m2_after": cut.m2_after,
        "masked_fraction": masked_fraction,
        "trust_region_fraction": trust_region_fraction,
        "kl": kl,
        "ratio_mean": ratio_mean,
        "ratio_max": ratio_max,
        "cut": cut.threshold,
        "num_nonfinite": num_nonfinite,
        "input_error": zero,
    }
    if cut.surrogate == "ppo_clip":  # (its solved bounds)
        m["clip_low"] = cut.lower
        m["clip_high"] = cut.upper
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
