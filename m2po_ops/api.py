"""The public functions: m2po_mask and m2po_loss, with backend dispatch."""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import reference
from .config import BACKENDS, DEFAULT_TAU, M2POConfig
from .cut import Cut
from .inputs import (Tokens, check_group, check_num_tokens, host_reads_free, input_error, poison_of, prepare, sum_f64,
                     sum_f64_host, token_mean_weight_host, token_weights)

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


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


def metrics_to_host(metrics: dict) -> dict:
    """The metrics of one call as Python floats, in one device-to-host transfer.

    The metrics are 0-d device tensors so that computing them never syncs; reading them one by
    one would cost one sync each. Call this where you log (it syncs once).
    """
    if not metrics:
        return {}
    values = torch.stack([v.reshape(()).float() for v in metrics.values()]).tolist()  # one copy kernel, one read
    return dict(zip(metrics.keys(), values))


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": Triton for CUDA tensors when Triton imports, the PyTorch reference otherwise."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    return backend


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
        from .stats import check_drift as _check

        _check(tok, config, backend, cut)


def _forward(tok: Tokens, config: M2POConfig, backend: str, cut: Optional[Cut], group, want_loss: bool, num_tokens=None):
    """Returns (keep, metrics, loss or None, per-token gradient or None). Inputs that
    validate=False found wrong on the device (input_error) give a NaN loss and gradient."""
    error = input_error(tok, num_tokens, config)
    poison = poison_of(error) if error is not None and want_loss else None
    keep, metrics, loss, grad, scale = _run_backend(tok, config, backend, cut, group, want_loss, num_tokens, poison)
    if error is not None:
        metrics["input_error"] = error.to(torch.float32)
        if loss is not None:  # NaN even when no token is valid (nothing for the weights to carry it)
            loss = loss + poison.to(loss.dtype)
    return keep, metrics, loss, grad, scale


def _run_backend(tok: Tokens, config: M2POConfig, backend: str, cut: Optional[Cut], group, want_loss: bool,
                 num_tokens, poison: Optional[Tensor]):
    if backend == "triton":
        from .triton_backend import triton_forward

        solver = None
        if group is not None and cut is not None and num_tokens is None and config.loss_agg_mode == "token-mean":
            num_tokens = cut.num_valid.clamp_min(1)  # the group's count, as the torch path uses
        if group is not None and cut is None:
            from .distributed import triton_group_solver

            solver = triton_group_solver(config, group)
        return triton_forward(tok, config, cut, want_loss, num_tokens, solver, poison, want_keep=not want_loss)
    n_tr = host = delta_sum = masked = None
    if cut is not None or group is None:
        delta, delta_sum = reference.log_ratio_and_sum(tok)
        ratio = reference.ratio_of(delta, config.variant)  # once: the trust region, the loss, the metrics
        tr = reference.trust_region(tok, delta, config, ratio)
        if host_reads_free(tok.device):  # compacted once, for the solver and for applying its cut:
            host = reference.compact_trust_region(delta, tr)  # m2 of the trust region only
            m2 = None
        else:
            m2 = delta * delta
        if cut is None:
            cut = reference.solve_trust_region(m2, tr, tok.num_valid, config, host)
            n_tr = cut.num_trust_region
    else:
        from .distributed import solve_group_torch

        cut, delta, m2, tr = solve_group_torch(tok, config, group)
        ratio = None
    ratio_v = reference.valid_ratio(tok, delta, config.variant, ratio)  # (in place: ratio is not read again)
    # token-mean paper loss: the terms' sign goes into the sum and the backward scale (a pass fewer)
    negated = want_loss and config.variant == "paper" and config.loss_agg_mode == "token-mean"
    if want_loss and host is not None and config.variant == "paper":  # the list alone: no keep tensor to build
        masked = reference.masked_paper_host(None, tr, cut, host)
    keep, loss, grad = reference.per_token(tok, cut, delta, m2, tr, ratio_v, host, negated=negated, masked=masked)
    metrics = reference.metrics(tok, cut, delta, tr, keep, config.variant, ratio_v, n_tr, delta_sum,
                                None if masked is None else masked.numel())
    if not want_loss:
        return keep, metrics, None, None, None
    num_valid = cut.num_valid if group is not None else None
    if config.loss_agg_mode == "token-mean":
        # as the kernels: the unweighted terms summed in float64, times the 1 / denominator once;
        # the derivative stored unweighted, the 1 / denominator applied in backward (the scale)
        on_host = host_reads_free(tok.device)
        if on_host and np is not None and num_tokens is None and num_valid is None:
            wf = token_mean_weight_host(tok, loss.dtype)  # (token_weights' value, no tensors)
        else:
            w = token_weights(tok, config, num_tokens, loss.dtype, num_valid, scalar=True)
            wf = float(w) if on_host else None
        if poison is not None:  # NaN on every valid token (padding keeps a zero gradient), as the kernels
            factor = torch.where(tok.valid, 1.0 + poison.to(loss.dtype), torch.zeros((), dtype=loss.dtype,
                                                                                   device=tok.device))
            loss = loss * factor
            grad = loss if grad is loss else grad * factor
        sign = -1.0 if negated else 1.0  # (the sum of the negated terms is the negated sum: exact)
        if on_host:  # the same float64 operations on host numbers, one tensor each
            t = sign * sum_f64_host(loss)
            value = torch.tensor(t if t == 0 else t * wf, dtype=loss.dtype)
            scale = torch.tensor(sign * (wf if math.isfinite(wf) else 0.0), dtype=loss.dtype)
            return keep, metrics, value, grad.to(tok.logprobs.dtype), scale
        total = sum_f64(loss) * sign
        value = torch.where(total == 0, total, total * w.double()).to(loss.dtype)
        # a zero or non-finite denominator scales no derivative (padding keeps its zero)
        scale = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
        if negated:  # the stored derivative is A r: the scale carries the sign
            scale = -scale
        return keep, metrics, value, grad.to(tok.logprobs.dtype), scale
    w = token_weights(tok, config, num_tokens, loss.dtype, num_valid)
    if poison is not None:  # NaN on every valid token (padding keeps a zero gradient), as the kernels
        w = torch.where(tok.valid, w + poison.to(w.dtype), torch.zeros_like(w))
    # (in place: loss and grad are this call's own buffers; the same one for the paper rule)
    term = loss.mul_(w)
    grad = term if grad is loss else grad.mul_(w)
    # summed in float64 and rounded once, as the Triton backend's partials: where the float64
    # sum of the float32 terms is exact, both backends give the same bits (README, "Float details")
    return keep, metrics, sum_f64(term).to(loss.dtype), grad.to(tok.logprobs.dtype), None


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
