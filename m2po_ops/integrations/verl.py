"""M2PO as a verl policy loss: ``actor.policy_loss.loss_mode=m2po`` (or ``m2po_official``).

verl (0.9.1) imports this module by itself at ``import verl`` through the ``verl.plugins``
entry point of m2po-ops, in the driver and in every Ray worker, so registering the losses here
is all a user needs. Full account: docs/verl.md.

Three things shape the design (verl 0.9.1):

- verl rejects unknown keys under ``actor.policy_loss`` and a ``configure()`` call in the driver
  does not reach the Ray workers, so the hyperparameters are environment variables (read at
  every call, validated, errors name the variable).
- verl calls the policy loss once per micro-batch and normalises with ``config.global_batch_info``
  (``batch_num_tokens`` all-reduced over the data-parallel group, ``dp_size``,
  ``global_batch_size``, ``loss_scale_factor``). Each of ``agg_loss``'s five modes is reproduced
  here with ``m2po_loss``'s own aggregation (see ``_normalisation``), so that the micro-batch
  losses of all ranks add up as verl's do.
- The plugin alone sees one micro-batch, so its mask is per micro-batch (a different mask than
  the paper's rule on the optimizer step). The exact mode (``M2PO_EXACT=1``) wraps verl's
  ``FSDPEngine.forward_backward_batch``, which runs one optimizer step's micro-batches on each
  rank: a no-grad ``M2POStats`` pre-pass over the same micro-batches, one cut solved over the
  engine's data-parallel group, then the training micro-batches with that cut.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import register_policy_loss

from ..api import m2po_loss, metrics_to_host
from ..config import BACKENDS
from ..constants import DEFAULT_TAU
from ..microbatch import M2POStats

logger = logging.getLogger(__name__)

#: verl ``loss_mode`` -> m2po-ops ``variant``
LOSS_MODES = {"m2po": "paper", "m2po_official": "official"}

#: every ``loss_agg_mode`` that verl 0.9.1's ``agg_loss`` and ``ActorConfig`` accept
VERL_LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                       "seq-mean-token-sum-norm")

ENV_TAU = "M2PO_TAU"
ENV_MINICLIP_LOW = "M2PO_MINICLIP_LOW"
ENV_MINICLIP_HIGH = "M2PO_MINICLIP_HIGH"
ENV_BACKEND = "M2PO_BACKEND"
ENV_VALIDATE = "M2PO_VALIDATE"
ENV_EXACT = "M2PO_EXACT"
ENV_CHECK_DRIFT = "M2PO_CHECK_DRIFT"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Settings:
    """The hyperparameters of one loss call, read from the environment."""

    variant: str
    tau: float
    miniclip_low: Optional[float]
    miniclip_high: Optional[float]
    backend: str
    validate: bool
    exact: bool
    check_drift: bool


def _env_float(name: str, default: Optional[float], what: str) -> Optional[float]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be {what}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be {what}")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} must be 1 or 0 (true/false, yes/no, on/off)")


def settings(variant: str) -> Settings:
    """The environment's hyperparameters for ``variant`` ("paper" or "official").

    Read at every call (cheap), so a variable exported to the Ray workers is what counts, not
    what the driver saw at import. Every bad value raises ``ValueError`` naming the variable.
    """
    tau = _env_float(ENV_TAU, DEFAULT_TAU, "a number >= 0 (inf masks nothing; default 0.04)")
    low = _env_float(ENV_MINICLIP_LOW, None, "a number >= 0 (the official rule's clip floor, e.g. 0.3)")
    high = _env_float(ENV_MINICLIP_HIGH, None, "a number >= 0 (the official rule's clip floor, e.g. 0.5)")
    if variant == "paper":
        # the paper's rule has no PPO clip, so a floor would silently do nothing
        for name, value in ((ENV_MINICLIP_LOW, low), (ENV_MINICLIP_HIGH, high)):
            if value is not None:
                raise ValueError(f"environment variable {name} is set, but loss_mode 'm2po' is the paper's rule "
                                 "(no clip); the floors apply to loss_mode 'm2po_official' only")
    backend = os.environ.get(ENV_BACKEND, "auto").strip() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"environment variable {ENV_BACKEND}={backend!r} must be one of {BACKENDS}")
    return Settings(variant=variant, tau=tau, miniclip_low=low, miniclip_high=high, backend=backend,
                    validate=_env_bool(ENV_VALIDATE, True), exact=_env_bool(ENV_EXACT, False),
                    check_drift=_env_bool(ENV_CHECK_DRIFT, False))


# ---------------------------------------------------------------------------------------------
# verl's normalisation
# ---------------------------------------------------------------------------------------------

def _batch_info(config) -> dict:
    """``config.global_batch_info`` (verl's ``ppo_loss`` fills it before every call), or {}."""
    if config is None:
        return {}
    info = getattr(config, "global_batch_info", None)
    if info is None and hasattr(config, "get"):
        info = config.get("global_batch_info", None)
    return dict(info) if info else {}


def _as_denominator(value, device: torch.device):
    """A verl count as m2po_loss's ``num_tokens``: a Python number stays one, a tensor moves to
    the loss's device as a float32 0-d tensor."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(())
    return float(value)


def _normalisation(loss_agg_mode: str, response_mask: Tensor, info: dict):
    """``(m2po loss_agg_mode, num_tokens, post-scale)`` so that m2po_loss gives verl's
    ``agg_loss(loss_mat, response_mask, loss_agg_mode, **global_batch_info)``
    (verl/trainer/ppo/core_algos.py, ``agg_loss``) on the M2PO per-token terms.

    Every mode but seq-mean-token-mean is a constant times the sum of the per-token terms, so
    it is m2po_loss's token-mean with that constant as ``num_tokens``:
    token-mean: sum / batch_num_tokens * dp; token-sum: sum * dp; seq-mean-token-sum:
    sum / global_batch_size * dp (a sequence's token sum, summed over sequences, is the sum;
    verl's "non-empty sequence" mask only drops zeros); seq-mean-token-sum-norm: that / horizon.
    seq-mean-token-mean weighs each sequence by 1 / its length: m2po_loss's own mode divides
    by the call's B rows, so the post-scale B / (global_batch_size / dp) makes it verl's.
    """
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of verl 0.9.1's {VERL_LOSS_AGG_MODES}: "
                         "the m2po policy loss reproduces exactly those")
    dp = info.get("dp_size") or 1
    dp = int(dp.item()) if isinstance(dp, Tensor) else int(dp)
    device = response_mask.device
    if loss_agg_mode == "token-mean":
        n = info.get("batch_num_tokens")
        if n is None:
            if dp > 1:  # as agg_loss: a local count would be another denominator on every rank
                raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs config.global_batch_info"
                                 "['batch_num_tokens'] (verl's ppo_loss sets it)")
            return "token-mean", None, None  # the call's valid tokens: agg_loss's loss_mask.sum()
        n = _as_denominator(n, device)
        # an all-padding step: verl divides 0 by 0 (NaN); m2po gives 0 (every term is 0)
        n = n.clamp_min(1) if isinstance(n, Tensor) else max(n, 1.0)
        return "token-mean", n / dp, None
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0, (float(dp) if dp != 1 else None)
    if response_mask.dim() != 2:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} needs response_mask shaped (batch, response_length), "
                         f"got shape {tuple(response_mask.shape)}")
    gbs = info.get("global_batch_size")
    if gbs is None:
        if dp > 1:
            raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs config.global_batch_info"
                             "['global_batch_size'] (verl's ppo_loss sets it)")
        # agg_loss's local count: the sequences with at least one valid token
        seqs = (response_mask.reshape(response_mask.shape[0], -1) != 0).any(-1).sum()
        denom = seqs.to(torch.float32).clamp_min(1)
    else:
        denom = _as_denominator(gbs, device) / dp
    if loss_agg_mode == "seq-mean-token-sum":
        return "token-mean", denom, None
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = info.get("loss_scale_factor")
        horizon = factor if factor is not None else response_mask.shape[-1]  # as agg_loss: the call's T
        return "token-mean", denom * _as_denominator(horizon, device), None
    return "seq-mean-token-mean", None, response_mask.shape[0] / denom


def _weighted_advantages(advantages: Tensor, weights: Tensor, response_mask: Tensor) -> Tensor:
    """verl's vanilla loss multiplies each token's surrogate by its rollout-correction weight
    (core_algos.py, ``pg_losses * rollout_is_weights``). For M2PO that is advantages * weights:
    the surrogate -keep * r * A (and the official rule's clipped one) is linear in A per token,
    and a weight > 0 keeps A's sign, so the trust region, the mask and the clip bounds stay
    those of the unweighted call. A weight of 0 on a valid token would take the token out of
    the trust region and change everyone's mask, so it raises (verl's two-sided rollout_is
    thresholds set such zeros); this check reads the weights on the host (one sync)."""
    if not isinstance(weights, Tensor):
        raise TypeError(f"rollout_is_weights must be a tensor or None, got {type(weights).__name__}")
    if weights.shape != response_mask.shape:
        raise ValueError(f"rollout_is_weights has shape {tuple(weights.shape)}, response_mask "
                         f"{tuple(response_mask.shape)}: verl's per-token weights are shaped like the mask")
    valid = response_mask.bool() if response_mask.dtype == torch.bool else response_mask != 0
    bad = int((valid & ~(torch.isfinite(weights) & (weights > 0))).sum())
    if bad:
        raise ValueError(
            f"rollout_is_weights: {bad} valid token(s) have a weight <= 0 or non-finite. M2PO applies verl's "
            "per-token weights to the surrogate and its gradient by scaling the advantages, which keeps the mask "
            "only for weights > 0 (a zero weight would take the token out of the M2PO trust region). Use an "
            "upper threshold only (truncated IS), or rejection sampling (rollout_rs), which drops tokens from "
            "response_mask instead")
    return advantages * weights.to(advantages.dtype)


# ---------------------------------------------------------------------------------------------
# exact mode: state handed from the engine hook to the loss
# ---------------------------------------------------------------------------------------------

class _Prepass:
    """The statistics pass of one optimizer step: the loss records each micro-batch here."""

    def __init__(self):
        self.stats: Optional[M2POStats] = None
        self.variant: Optional[str] = None

    def update(self, s: Settings, log_prob, old_log_prob, advantages, response_mask) -> None:
        if self.stats is None:
            self.variant = s.variant
            self.stats = M2POStats(tau=s.tau, variant=s.variant, backend=s.backend, miniclip_low=s.miniclip_low,
                                   miniclip_high=s.miniclip_high, validate=s.validate, check_drift=s.check_drift)
        elif s.variant != self.variant:
            raise RuntimeError(f"m2po exact mode: one optimizer step mixes loss modes ({self.variant!r} and "
                               f"{s.variant!r})")
        self.stats.update(log_prob.detach(), old_log_prob, advantages, response_mask)


class _CutSlot:
    """The cut of the training micro-batch being computed (one policy-loss call takes it)."""

    def __init__(self, cut, index: int):
        self.cut, self.index, self.taken = cut, index, False

    def take(self):
        if self.taken:
            raise RuntimeError("m2po exact mode: the policy loss was called twice for one micro-batch")
        self.taken = True
        return self.cut


_PREPASS: contextvars.ContextVar[Optional[_Prepass]] = contextvars.ContextVar("m2po_prepass", default=None)
_CUT: contextvars.ContextVar[Optional[_CutSlot]] = contextvars.ContextVar("m2po_cut", default=None)


# ---------------------------------------------------------------------------------------------
# the policy losses
# ---------------------------------------------------------------------------------------------

def _policy_loss(variant: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                 loss_agg_mode: str = "token-mean", config: Any = None,
                 rollout_is_weights: Optional[Tensor] = None):
    s = settings(variant)
    prepass = _PREPASS.get()
    if prepass is not None:
        # exact mode's no-grad statistics pass: record the micro-batch, no loss. The mask does
        # not depend on rollout_is_weights (they are > 0, checked in the training pass).
        prepass.update(s, log_prob, old_log_prob, advantages, response_mask)
        return log_prob.detach().new_zeros(()), {}
    mode, num_tokens, scale = _normalisation(loss_agg_mode, response_mask, _batch_info(config))
    if rollout_is_weights is not None:
        advantages = _weighted_advantages(advantages, rollout_is_weights, response_mask)
    slot = _CUT.get()
    cut = slot.take() if slot is not None else None
    if cut is None and s.exact and torch.is_grad_enabled():
        # a silent fallback to per-micro-batch masks is what exact mode exists to prevent
        raise RuntimeError(f"{ENV_EXACT}=1 but this training call did not come through the exact-mode hook: "
                           "call m2po_ops.integrations.verl.install_exact_mode(engine_cls) for the engine class "
                           "that runs this actor (default: verl's FSDPEngine), or unset " + ENV_EXACT)
    loss, metrics = m2po_loss(
        log_prob, old_log_prob, advantages, response_mask,
        tau=s.tau, variant=variant, loss_agg_mode=mode, num_tokens=num_tokens, backend=s.backend,
        miniclip_low=s.miniclip_low, miniclip_high=s.miniclip_high, validate=s.validate, cut=cut,
    )
    if scale is not None:
        loss = loss * scale
    # verl reads its metrics as Python floats (its vanilla loss calls .item() per metric): one
    # transfer for all of them
    out = {f"actor/m2po_{k}": v for k, v in metrics_to_host(metrics).items()}
    out["actor/m2po_exact"] = 1.0 if cut is not None else 0.0
    return loss, out


@register_policy_loss("m2po")  # type: ignore[arg-type]
def compute_policy_loss_m2po(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             loss_agg_mode: str = "token-mean", config: Any = None,
                             rollout_is_weights: Optional[Tensor] = None):
    """M2PO, the paper's Algorithm 1 (m2po_ops ``variant="paper"``), as a verl policy loss.

    verl's signature and return value ``(pg_loss, metrics)``; metrics are ``actor/m2po_*``
    floats. tau from ``M2PO_TAU``; see docs/verl.md for every variable.
    """
    return _policy_loss("paper", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


@register_policy_loss("m2po_official")  # type: ignore[arg-type]
def compute_policy_loss_m2po_official(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                      response_mask: Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                      rollout_is_weights: Optional[Tensor] = None):
    """M2PO as the authors' released code computes it (m2po_ops ``variant="official"``), as a
    verl policy loss. Floors from ``M2PO_MINICLIP_LOW`` / ``M2PO_MINICLIP_HIGH`` (default off)."""
    return _policy_loss("official", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


# ---------------------------------------------------------------------------------------------
# exact mode: the hook on verl's engine
# ---------------------------------------------------------------------------------------------

def _may_use_m2po(loss_function) -> bool:
    """False when the loss function visibly runs another policy loss (verl's
    ``partial(ppo_loss, config=actor_config)``): no pre-pass then. True when it cannot be told
    (the pre-pass then finds out: no m2po call, no cut)."""
    config = getattr(loss_function, "keywords", {}).get("config") if isinstance(loss_function, functools.partial) \
        else None
    try:
        mode = config.policy_loss.get("loss_mode", "vanilla")
    except Exception:  # not verl's ActorConfig: let the pre-pass decide
        return True
    return mode in LOSS_MODES


def _dp_group(engine):
    """The engine's data-parallel group (FSDPEngine: the "dp" dimension of the Ulysses mesh, so
    sequence-parallel replicas of the same sequences are not counted twice), or None for one
    rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = engine.get_data_parallel_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def _exact_forward_backward_batch(original):
    @functools.wraps(original)
    def forward_backward_batch(self, data, loss_function, forward_only=False):
        if forward_only or loss_function is None or not _may_use_m2po(loss_function):
            return original(self, data, loss_function, forward_only=forward_only)
        # 1. statistics pre-pass: verl's own micro-batch split and forward, no grad; the loss
        #    function (verl's ppo_loss) hands each micro-batch's tensors to the m2po loss, which
        #    records them. The split is deterministic, so pass 2 sees the same micro-batches.
        prepass = _Prepass()
        token = _PREPASS.set(prepass)
        try:
            original(self, data, loss_function, forward_only=True)
        finally:
            _PREPASS.reset(token)
        if prepass.stats is None:  # the loss never reached an m2po policy loss
            return original(self, data, loss_function, forward_only=False)
        # 2. one cut for the optimizer step: every micro-batch of every data-parallel rank
        cuts = prepass.stats.solve(group=_dp_group(self))
        calls = iter(range(len(cuts)))

        def loss_with_cut(*args, **kwargs):
            i = next(calls, None)
            if i is None:
                raise RuntimeError(f"m2po exact mode: more training micro-batches than the {len(cuts)} of the "
                                   "pre-pass (the micro-batch split must be deterministic)")
            token = _CUT.set(_CutSlot(cuts[i], i))
            try:
                return loss_function(*args, **kwargs)
            finally:
                _CUT.reset(token)

        # 3. the training pass: verl's loop, each micro-batch's loss with its slice of the cut
        out = original(self, data, loss_with_cut, forward_only=False)
        left = sum(1 for _ in calls)
        if left:
            raise RuntimeError(f"m2po exact mode: {left} pre-pass micro-batch(es) had no training micro-batch")
        return out

    forward_backward_batch._m2po_exact = True
    forward_backward_batch._m2po_original = original
    return forward_backward_batch


def install_exact_mode(engine_cls=None):
    """Wrap ``engine_cls.forward_backward_batch`` (default: verl's ``FSDPEngine``, in
    verl/workers/engine/fsdp/transformer_impl.py) with the exact mode. Idempotent; returns the
    class. The plugin calls it at ``import verl`` when ``M2PO_EXACT=1``."""
    if engine_cls is None:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngine as engine_cls
    current = getattr(engine_cls, "forward_backward_batch", None)
    if current is None:
        raise TypeError(f"{engine_cls.__name__} has no forward_backward_batch to hook")
    if not getattr(current, "_m2po_exact", False):
        engine_cls.forward_backward_batch = _exact_forward_backward_batch(current)
    return engine_cls


def uninstall_exact_mode(engine_cls=None):
    """Undo ``install_exact_mode`` (for tests)."""
    if engine_cls is None:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngine as engine_cls
    current = engine_cls.__dict__.get("forward_backward_batch")
    if current is not None and getattr(current, "_m2po_exact", False):
        engine_cls.forward_backward_batch = current._m2po_original
    return engine_cls


def _install_from_env() -> None:
    try:
        exact = _env_bool(ENV_EXACT, False)
    except ValueError as err:  # verl swallows plugin import errors at debug level: say it loudly
        logger.error("m2po: %s (the loss will raise it)", err)
        return
    if not exact:
        return
    try:
        install_exact_mode()
    except Exception as err:  # e.g. the FSDP engine's dependencies missing: the loss raises later
        logger.error("m2po: %s=1 but the exact-mode hook could not be installed on verl's FSDPEngine: %r",
                     ENV_EXACT, err)


_install_from_env()

__all__ = ["compute_policy_loss_m2po", "compute_policy_loss_m2po_official", "install_exact_mode",
           "uninstall_exact_mode", "settings", "LOSS_MODES", "VERL_LOSS_AGG_MODES"]
