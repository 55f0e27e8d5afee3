"""The public functions: m2po_mask and m2po_loss, with backend dispatch."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import microbatch
from .backend import Applied, Want
from .config import M2POConfig
from .constants import DEFAULT_TAU
from .cut import Cut
from .dispatch import get_backend, resolve_backend
from .inputs import Tokens, check_group, check_num_tokens, input_error, poison_of, prepare
from .metrics import metrics_to_host  # noqa: F401 (public)


class AttachGrad(torch.autograd.Function):
    """Returns ``loss`` with d loss / d logprobs = ``scale * grad`` (both computed in forward by
    a backend: ``grad`` per token in logprobs' dtype, ``scale`` a 0-d tensor or None for 1).

    Backward is one multiply: grad * (grad_output * scale), into logprobs' dtype.
    """

    @staticmethod
    def forward(ctx, logprobs: Tensor, loss: Tensor, grad: Tensor, scale: Optional[Tensor]):
        ctx.save_for_backward(grad, scale)
        ctx.shape, ctx.dtype = logprobs.shape, logprobs.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, scale = ctx.saved_tensors
        if scale is not None:
            grad_output = grad_output * scale
        # one rounding into logprobs' dtype (the product is formed in float32 or wider)
        return grad.mul(grad_output).to(ctx.dtype).view(ctx.shape), None, None, None


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


def _maybe_check_drift(tok: Tokens, config: M2POConfig, backend: str, cut: Optional[Cut], check_drift) -> None:
    """The opt-in pre-pass drift check (see M2POStats): None follows the cut's setting."""
    if check_drift is not None and not isinstance(check_drift, bool):
        raise TypeError(f"check_drift must be None or a bool, got {type(check_drift).__name__}")
    if check_drift is False:
        return
    if cut is None:
        if check_drift:
            raise ValueError("check_drift=True needs cut= (a cut from M2POStats.solve)")
        return
    if check_drift or getattr(cut, "check_drift", False):
        microbatch.check_drift(tok, config, backend, cut)


# (loss, keys) -> what the call wants: a loss builds no keep; a solve over a group reads every
# token's key (made once: the host path is the cost of small calls)
_WANTS = {(loss, keys): Want(loss=loss, keep=not loss, keys=keys) for loss in (False, True) for keys in (False, True)}


def _forward(tok: Tokens, config: M2POConfig, backend: str, cut: Optional[Cut], group, want_loss: bool,
             num_tokens=None) -> Applied:
    """The backend's three steps (m2po_ops/backend.py): statistics, solve (unless a cut is given),
    apply. Inputs that validate=False found wrong on the device (input_error) give a NaN loss and
    gradient."""
    error = input_error(tok, num_tokens, config)
    poison = poison_of(error) if error is not None and want_loss else None
    be = get_backend(backend)
    want = _WANTS[want_loss, group is not None and cut is None]
    statistics = be.statistics(tok, config, want, poison)
    local_solve = cut is None and group is None
    if cut is None:
        cut = be.solve(statistics, config, group)
    # over a group, token-mean divides by the group's valid count (the cut's)
    out = be.apply(statistics, config, cut, want, local_solve=local_solve, num_tokens=num_tokens,
                   num_valid=cut.num_valid if group is not None else None, poison=poison)
    if error is not None:
        out.metrics["input_error"] = error.to(torch.float32)
        if out.loss is not None:  # NaN even when no token is valid (nothing for the weights to carry it)
            out = out._replace(loss=out.loss + poison.to(out.loss.dtype))
    return out


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
    config = M2POConfig(tau=_resolve_tau(tau, cut), variant=variant, miniclip_low=miniclip_low,
                        miniclip_high=miniclip_high, validate=validate)
    check_group(group)
    tok = prepare(logprobs, old_logprobs, advantages, mask, config, cu_seqlens)
    cut = _check_cut(cut, config, tok.device)
    be = resolve_backend(backend, tok.device)
    _maybe_check_drift(tok, config, be, cut, check_drift)
    keep, metrics, _, _, _ = _forward(tok, config, be, cut, group, want_loss=False)
    if mask is not None and keep.data_ptr() == mask.data_ptr():  # (tok.valid may be the caller's mask)
        keep = keep.clone()
    return keep.reshape(tok.shape), metrics


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
    config = M2POConfig(
        tau=_resolve_tau(tau, cut),
        variant=variant,
        loss_agg_mode=loss_agg_mode,
        miniclip_low=miniclip_low,
        miniclip_high=miniclip_high,
        validate=validate,
    )
    check_group(group)
    tok = prepare(logprobs, old_logprobs, advantages, mask, config, cu_seqlens)
    num_tokens = check_num_tokens(num_tokens, config, tok.device)
    cut = _check_cut(cut, config, tok.device)
    be = resolve_backend(backend, tok.device)
    _maybe_check_drift(tok, config, be, cut, check_drift)
    _, metrics, loss, grad, scale = _forward(tok, config, be, cut, group, want_loss=True, num_tokens=num_tokens)
    return AttachGrad.apply(logprobs, loss, grad, scale), metrics
