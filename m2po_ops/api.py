"""The public functions: m2po_mask and m2po_loss, with backend dispatch."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import microbatch
from .config import M2POConfig
from .constants import DEFAULT_TAU
from .cut import Cut
from .dispatch import resolve_backend
from .inputs import check_group, check_num_tokens, check_types, prepare, split_cu_seqlens
from .metrics import metrics_of, metrics_to_host  # noqa: F401 (public)
from .ops import LOSS, MASK, call, config_of, cut_tensors


def _resolve_tau(tau, cut):
    """tau=None: the cut's budget when a cut is given, else the paper's 0.04."""
    if tau is not None:
        return tau
    return cut.tau if isinstance(cut, Cut) else DEFAULT_TAU


def _check_cut(cut, config: M2POConfig, device: torch.device) -> Optional[Cut]:
    if cut is None:
        return None
    if not isinstance(cut, Cut):
        raise TypeError(f"cut must be an m2po_ops.Cut (from M2POStats.solve), got {type(cut).__name__}")
    if cut.variant != config.variant:
        raise ValueError(f"cut was solved for variant={cut.variant!r} but variant={config.variant!r} was asked")
    if cut.tau != config.tau:
        raise ValueError(f"cut was solved for tau={cut.tau!r} but tau={config.tau!r} was asked (leave tau unset to "
                         "use the cut's)")
    if cut.device != device:
        raise ValueError(f"cut is on {cut.device} but logprobs is on {device}")
    return cut


def _maybe_check_drift(logprobs, old_logprobs, advantages, mask, config: M2POConfig, backend: str, cu_seqlens,
                       cut: Optional[Cut], check_drift) -> None:
    """The opt-in pre-pass drift check (see M2POStats): None follows the cut's setting. A
    debugging aid that reads on the host: not inside torch.compile (it raises there)."""
    if check_drift is not None and not isinstance(check_drift, bool):
        raise TypeError(f"check_drift must be None or a bool, got {type(check_drift).__name__}")
    if check_drift is False:
        return
    if cut is None:
        if check_drift:
            raise ValueError("check_drift=True needs cut= (a cut from M2POStats.solve)")
        return
    if check_drift or getattr(cut, "check_drift", False):
        if torch.compiler.is_compiling():
            raise RuntimeError("check_drift reads the fingerprints on the host, which torch.compile cannot trace: "
                               "check drift in eager runs (M2POStats(check_drift=False) for compiled steps)")
        tok = prepare(logprobs, old_logprobs, advantages, mask, config, cu_seqlens)
        microbatch.check_drift(tok, config, backend, cut)


def _operator_args(logprobs, old_logprobs, advantages, mask, config: M2POConfig, backend: str, cu_seqlens, cut,
                   group, check_drift):
    """The checks made outside the operators (the Python objects their schema cannot carry:
    the cut, the group, a list cu_seqlens, the drift check), and the operators' common
    arguments."""
    check_group(group)
    check_types(logprobs, old_logprobs, advantages, mask)
    cut = _check_cut(cut, config, logprobs.device)
    be = resolve_backend(backend, logprobs.device)
    cu_tensor, cu_list = split_cu_seqlens(cu_seqlens)
    _maybe_check_drift(logprobs, old_logprobs, advantages, mask, config, be, cu_seqlens, cut, check_drift)
    return (logprobs, old_logprobs, advantages, mask, cu_tensor, cu_list, cut_tensors(cut), config.tau,
            config.variant, config.miniclip_low, config.miniclip_high, config.validate, be,
            None if group is None else group.group_name)


def m2po_mask(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    tau: Optional[float] = None,
    variant: str = "paper",
    backend: str = "auto",
    cu_seqlens: Union[Tensor, Sequence[int], None] = None,
    miniclip_low: Optional[float] = None,
    miniclip_high: Optional[float] = None,
    validate: bool = True,
    cut: Optional[Cut] = None,
    group=None,
    check_drift: Optional[bool] = None,
):
    """Which tokens M2PO keeps. Returns ``(keep, metrics)``.

    keep: bool tensor shaped like ``logprobs``; False on padding and on masked tokens (paper), or
    on tokens whose gradient the PPO clip cuts (official).
    metrics: dict of 0-d float32 tensors on the input's device (see README, "Metrics").
    See ``m2po_loss`` for the arguments.
    """
    config = config_of(_resolve_tau(tau, cut), variant, "token-mean", miniclip_low, miniclip_high, validate)
    args = _operator_args(logprobs, old_logprobs, advantages, mask, config, backend, cu_seqlens, cut, group,
                          check_drift)
    keep, values = call(MASK, *args)
    return keep, metrics_of(values, config.surrogate)


def m2po_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    tau: Optional[float] = None,
    variant: str = "paper",
    loss_agg_mode: str = "token-mean",
    num_tokens: Union[int, float, Tensor, None] = None,
    backend: str = "auto",
    cu_seqlens: Union[Tensor, Sequence[int], None] = None,
    miniclip_low: Optional[float] = None,
    miniclip_high: Optional[float] = None,
    validate: bool = True,
    cut: Optional[Cut] = None,
    group=None,
    check_drift: Optional[bool] = None,
):
    """The M2PO policy loss. Returns ``(loss, metrics)``; ``loss`` is 0-d and differentiable with
    respect to ``logprobs`` (old_logprobs and advantages are constants).

    logprobs, old_logprobs: (B, T) padded, or (N,) packed with ``cu_seqlens``; float32, bfloat16,
        float16 or float64. Computed in float32 (the torch backend: float64 for float64 input).
    advantages: like logprobs, or one value per sequence: (B,) / (num_seqs,).
    mask: 1 for valid response tokens, 0 for padding (bool, integer or float; NaN is padding);
        None means all valid.
    tau: second-moment budget (None: the paper's 0.04, or the budget ``cut`` was solved for;
        a different tau with a cut raises). variant: "paper" or "official".
    loss_agg_mode: "token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
        "seq-mean-token-sum-norm" (as in verl).
    num_tokens: token-mean denominator override, so the losses of micro-batches and ranks add up
        to the step's token mean (verl 0.9.1: batch_num_tokens / dp_size; plain DDP: the global
        valid-token count / world size; see README). It does not make the mask global: pass a
        ``cut`` from M2POStats for that.
    backend: "auto", "torch" or "triton".
    miniclip_low / miniclip_high: official variant's optional clip floors (authors: 0.3 / 0.5);
        they raise with variant="paper".
    validate: read values on the host and raise on non-finite values in valid tokens, mask
        values other than 0 / 1, a bad cu_seqlens tensor and a tensor num_tokens <= 0. With False
        nothing is read: non-finite tokens are padding (metrics["num_nonfinite"]), a bad
        cu_seqlens tensor or num_tokens tensor makes loss and gradient NaN
        (metrics["input_error"]), and nonzero mask values count as valid.
    cut: a Cut solved beforehand over the whole optimizer step: ``M2POStats(...).solve()[i]``
        for micro-batch i (pass ``num_tokens=cuts.num_valid`` too, so the micro-batch losses add
        up to the mini-batch loss). Either backend applies a cut solved by either backend.
    group: a torch.distributed process group. Without ``cut``: solve the cut over all its
        ranks' tokens (every rank gets its slice of the mask of one call on the concatenation
        of the ranks' tokens in rank order); all ranks must call. The token-mean denominator is
        then the group's valid-token count (unless ``num_tokens`` is given); the other metrics
        (masked_fraction, kl, ratio_*) stay local, while m2, m2_after and cut are global.
    check_drift: compare the pre-pass fingerprint carried by ``cut`` (from M2POStats) with this
        call's statistics and warn if they differ (a host sync; for debugging). None follows
        ``M2POStats(check_drift=...)``.
    """
    config = config_of(_resolve_tau(tau, cut), variant, loss_agg_mode, miniclip_low, miniclip_high, validate)
    args = _operator_args(logprobs, old_logprobs, advantages, mask, config, backend, cu_seqlens, cut, group,
                          check_drift)
    if num_tokens is not None and not isinstance(num_tokens, Tensor):  # (a number: checked here, no tensor made)
        num_tokens = check_num_tokens(num_tokens, config, logprobs.device)
        loss, _, values = call(LOSS, *args, config.loss_agg_mode, None, num_tokens)
    else:
        loss, _, values = call(LOSS, *args, config.loss_agg_mode, num_tokens, None)
    return loss, metrics_of(values, config.surrogate)
