"""The two operators, ``torch.ops.m2po_ops.loss`` and ``torch.ops.m2po_ops.mask``: what
``m2po_loss`` and ``m2po_mask`` run, registered with ``torch.library`` so that
``torch.compile(fullgraph=True)`` sees each call as one node (README, "torch.compile").

Their schema holds only tensors and plain values:

- the inputs as ``m2po_loss`` takes them; ``cu_seqlens`` as a tensor or as ``cu_seqlens_list``
  (a Python list: its values are checked on the host, whatever ``validate`` says);
- ``cut``: the 9 tensors of a ``Cut`` in ``Cut.TENSORS`` order, or an empty list (solve here);
- the config's scalars, the backend's name, and the process group's name (``group.group_name``);
  the collectives run inside the operator;
- loss only: ``num_tokens`` as a 0-d tensor or as a Python number (``num_tokens_value``).

Outputs (each its own memory):

- ``loss``: 0-d, the loss (float64 for float64 input on the PyTorch backend, else float32);
  the only differentiable output;
- ``grad``: d loss / d logprobs up to the backward scale, shaped and typed like logprobs;
- ``keep`` (mask): bool, shaped like logprobs;
- ``values``: float32 [VALUES_LEN], the metrics and the backward scale in the V_* slots of
  m2po_ops/constants.py (``metrics.METRICS`` names them).

Backward is one multiply, ``grad * (grad_loss * values[V_SCALE])``. The autograd kernel is a
plain ``autograd.Function`` registered for the Autograd key: ``torch.library.custom_op`` with
``register_autograd`` does the same through generic argument handling that measured about 75 us
a call on the CPU thread, when a small call's whole host path is about 0.2 ms (README, "Inside
torch.compile").
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from . import constants as C
from .backend import Applied, Want
from .config import M2POConfig
from .cut import Cut
from .dispatch import get_backend, resolve_backend
from .inputs import (Tokens, check_arguments, check_num_tokens, check_num_tokens_meta, input_error, poison_of,
                     prepare)
from .metrics import values_of

LIBRARY = torch.library.Library("m2po_ops", "DEF")
_COMMON = ("Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor? mask, Tensor? cu_seqlens, "
           "SymInt[]? cu_seqlens_list, Tensor[] cut, float tau, str variant, float? miniclip_low, "
           "float? miniclip_high, bool validate, str backend, str? group_name")
LIBRARY.define(f"loss({_COMMON}, str loss_agg_mode, Tensor? num_tokens, float? num_tokens_value) "
               "-> (Tensor loss, Tensor grad, Tensor values)")
LIBRARY.define(f"mask({_COMMON}) -> (Tensor keep, Tensor values)")
LOSS = torch.ops.m2po_ops.loss.default
MASK = torch.ops.m2po_ops.mask.default

DOUBLE_BACKWARD = ("m2po_ops.loss: double backward (create_graph=True, then differentiating the gradient) is not "
                   "supported: the second derivative of the M2PO loss is not implemented")
FUNC_TRANSFORMS = ("m2po_ops.loss / m2po_ops.mask do not support torch.func transforms (grad, vjp, vmap, jacrev, "
                   "functional_call under grad, ...): call m2po_loss under plain autograd (loss.backward(), "
                   "torch.autograd.grad)")


def config_of(tau, variant, loss_agg_mode, miniclip_low, miniclip_high, validate) -> M2POConfig:
    """The M2POConfig of these settings, made (and checked) once per distinct settings (torch.compile
    traces the plain constructor: the settings are constants of its graph)."""
    if torch.compiler.is_compiling():
        return M2POConfig(tau, variant, loss_agg_mode, miniclip_low, miniclip_high, validate)
    return _config(tau, variant, loss_agg_mode, miniclip_low, miniclip_high, validate)


@functools.lru_cache(maxsize=256, typed=True)
def _config(tau, variant, loss_agg_mode, miniclip_low, miniclip_high, validate) -> M2POConfig:
    return M2POConfig(tau, variant, loss_agg_mode, miniclip_low, miniclip_high, validate)


def _group(group_name: Optional[str]):
    if group_name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


class Result(NamedTuple):
    """One call's outputs as the operators return them (keep or loss and grad, and values)."""

    keep: Optional[Tensor]
    loss: Optional[Tensor]
    grad: Optional[Tensor]
    values: Tensor


def run(tok: Tokens, config: M2POConfig, backend: str, cut: Optional[Cut], group, want_loss: bool,
        num_tokens=None) -> Result:
    """The backend's three steps (m2po_ops/backend.py): statistics, solve (unless a cut is given),
    apply; then the outputs in the operators' form. Inputs that validate=False found wrong on
    the device (input_error) give a NaN loss and gradient."""
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
    return _outputs(tok, cut, out, error, poison)


# (loss, keys) -> what the call wants: a loss builds no keep; a solve over a group reads every
# token's key (made once: the host path is the cost of small calls)
_WANTS = {(loss, keys): Want(loss=loss, keep=not loss, keys=keys) for loss in (False, True) for keys in (False, True)}


def _outputs(tok: Tokens, cut: Cut, out: Applied, error: Optional[Tensor], poison: Optional[Tensor]) -> Result:
    grad, scale = out.grad, out.scale
    if scale is not None and scale.dtype == torch.float64:
        # values are float32: a float64 scale goes into the float64 derivative instead (backward
        # then rounds (grad * scale) * g, not grad * (g * scale): the last bit may differ)
        grad, scale = grad * scale, None
    values = out.values if out.values is not None else values_of(out.metrics, cut, scale)
    loss = out.loss
    if error is not None:
        values[C.V_INPUT_ERROR] = error.to(torch.float32)
        if loss is not None:  # NaN even when no token is valid (nothing for the weights to carry it)
            loss = loss + poison.to(loss.dtype)
    if grad is not None:
        if grad.dtype != tok.logprobs.dtype:  # (the Triton interpreter keeps a half type's derivative in float32)
            grad = grad.to(tok.logprobs.dtype)
        grad = grad.view(tok.shape)
    return Result(out.keep, loss, grad, values)


def _prepare(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau, variant, miniclip_low,
             miniclip_high, validate, backend, loss_agg_mode="token-mean"):
    config = config_of(tau, variant, loss_agg_mode, miniclip_low, miniclip_high, validate)
    tok = prepare(logprobs, old_logprobs, advantages, mask, config,
                  cu_seqlens if cu_seqlens is not None else cu_seqlens_list)
    return config, tok, resolve_backend(backend, tok.device), Cut.from_tensors(cut, config, tok.device)


def _loss_impl(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau, variant,
               miniclip_low, miniclip_high, validate, backend, group_name, loss_agg_mode, num_tokens,
               num_tokens_value):
    config, tok, be, cut = _prepare(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau,
                                    variant, miniclip_low, miniclip_high, validate, backend, loss_agg_mode)
    num_tokens = check_num_tokens(num_tokens if num_tokens is not None else num_tokens_value, config, tok.device)
    out = run(tok, config, be, cut, _group(group_name), True, num_tokens)
    return out.loss, out.grad, out.values


def _mask_impl(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau, variant,
               miniclip_low, miniclip_high, validate, backend, group_name):
    config, tok, be, cut = _prepare(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau,
                                    variant, miniclip_low, miniclip_high, validate, backend)
    out = run(tok, config, be, cut, _group(group_name), False)
    keep = out.keep
    if mask is not None and keep.data_ptr() == mask.data_ptr():  # (tok.valid may be the caller's mask)
        keep = keep.clone()
    return keep.view(tok.shape), out.values


def _fake_checks(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau, variant,
                 miniclip_low, miniclip_high, validate, backend, loss_agg_mode="token-mean") -> tuple:
    """What the fake implementations check before giving shapes: every check that reads no value
    (types, devices, shapes, the layout, a list cu_seqlens: the same errors at trace time). The
    value checks (validate, a cu_seqlens tensor's order) run in the implementation when the
    compiled code runs. Returns (config, resolved backend)."""
    config = config_of(tau, variant, loss_agg_mode, miniclip_low, miniclip_high, validate)
    check_arguments(logprobs, old_logprobs, advantages, mask, config,
                    cu_seqlens if cu_seqlens is not None else cu_seqlens_list)
    Cut.from_tensors(cut, config, logprobs.device)
    return config, resolve_backend(backend, logprobs.device)


def _loss_fake(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau, variant,
               miniclip_low, miniclip_high, validate, backend, group_name, loss_agg_mode, num_tokens,
               num_tokens_value):
    config, be = _fake_checks(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau,
                              variant, miniclip_low, miniclip_high, validate, backend, loss_agg_mode)
    check_num_tokens_meta(num_tokens, config, logprobs.device)
    wide = be == "torch" and logprobs.dtype == torch.float64  # (the PyTorch backend computes float64 in float64)
    loss = logprobs.new_empty((), dtype=torch.float64 if wide else torch.float32)
    grad = logprobs.new_empty(logprobs.shape)
    return loss, grad, logprobs.new_empty(C.VALUES_LEN, dtype=torch.float32)


def _mask_fake(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau, variant,
               miniclip_low, miniclip_high, validate, backend, group_name):
    _fake_checks(logprobs, old_logprobs, advantages, mask, cu_seqlens, cu_seqlens_list, cut, tau, variant,
                 miniclip_low, miniclip_high, validate, backend)
    return (logprobs.new_empty(logprobs.shape, dtype=torch.bool),
            logprobs.new_empty(C.VALUES_LEN, dtype=torch.float32))


def _plain(args) -> bool:
    """Whether an operator call may run its implementation directly instead of through the
    dispatcher: plain tensors (no FakeTensor, functional or other subclass) and no dispatch
    mode (pre-dispatch ones included), which the dispatcher would route elsewhere. The
    dispatcher's boxing of the 17 arguments costs about 15 us a call on the CPU thread, which
    every small call pays."""
    if torch._C._len_torch_dispatch_stack() or torch._ops._len_torch_dispatch_stack_pre_dispatch():
        return False
    for t in args[:5]:  # logprobs, old_logprobs, advantages, mask, cu_seqlens
        if t is not None and type(t) is not Tensor:
            return False
    if len(args) > _NUM_TOKENS and args[_NUM_TOKENS] is not None and type(args[_NUM_TOKENS]) is not Tensor:
        return False
    return all(type(t) is Tensor for t in args[_CUT])


_CUT, _NUM_TOKENS = 6, 15  # (the operators' argument positions: cut, and the loss's num_tokens)


def _below_autograd(op, args, plain: bool):
    with torch._C._AutoDispatchBelowAutograd():  # (no history: only LossFunction differentiates)
        return IMPLEMENTATIONS[op](*args) if plain else op(*args)


class LossFunction(torch.autograd.Function):
    """The loss operator's autograd: forward runs the operator below autograd and keeps its
    derivative and values; backward is one multiply. Double backward raises (DOUBLE_BACKWARD).
    The operator's arguments come as one tuple (``apply``'s work is per argument)."""

    @staticmethod
    def forward(ctx, logprobs, args, plain):
        loss, grad, values = _below_autograd(LOSS, args, plain)
        ctx.save_for_backward(grad)
        # the metrics are views of values: kept as an attribute, not saved, so that a caller may
        # change a metric in place (an all-reduce for logging) before backward, which reads only
        # the scale slot, never handed out (values has no grad_fn: no reference cycle)
        ctx.values = values
        ctx.mark_non_differentiable(grad, values)
        ctx.set_materialize_grads(False)  # (no zero tensors made for the outputs backward ignores)
        return loss, grad, values

    @staticmethod
    def backward(ctx, grad_loss, _grad, _values):
        if grad_loss is None:  # (only the non-differentiable outputs were used)
            return None, None, None
        (grad,), values = ctx.saved_tensors, ctx.values
        if not torch.is_grad_enabled():  # (one rounding into logprobs' dtype: the product is formed in float32 or wider)
            return grad.mul(grad_loss * values[C.V_SCALE]), None, None
        with torch.no_grad():  # create_graph=True: differentiating d must fail loudly, not give 0
            d = grad.mul(grad_loss * values[C.V_SCALE])
        return torch._C._functions.DelayedError(DOUBLE_BACKWARD.encode(), 1)(d.requires_grad_()), None, None


def _loss_autograd(*args, plain: Optional[bool] = None):
    """The loss operator's Autograd kernel (``plain``: call() found a plain eager call)."""
    if plain is None:
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(FUNC_TRANSFORMS)
        plain = _plain(args)
    if torch.is_grad_enabled() and args[0].requires_grad:
        return LossFunction.apply(args[0], args, plain)
    return _below_autograd(LOSS, args, plain)


def _mask_autograd(*args, plain: Optional[bool] = None):
    if plain is None:
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(FUNC_TRANSFORMS)
        plain = _plain(args)
    return _below_autograd(MASK, args, plain)  # (keep and the metrics have no derivative)


LIBRARY.impl("loss", _loss_impl, "CompositeExplicitAutograd")
LIBRARY.impl("mask", _mask_impl, "CompositeExplicitAutograd")
LIBRARY.impl("loss", _loss_autograd, "Autograd")
LIBRARY.impl("mask", _mask_autograd, "Autograd")


def _no_transforms(*args, **kwargs):
    raise RuntimeError(FUNC_TRANSFORMS)


for _name in ("loss", "mask"):  # (vmap reaches this key before autograd's)
    LIBRARY.impl(_name, _no_transforms, "FuncTorchBatched")
torch.library.register_fake("m2po_ops::loss", _loss_fake, lib=LIBRARY)
torch.library.register_fake("m2po_ops::mask", _mask_fake, lib=LIBRARY)


# each operator's implementation (bench/kernel_trace.py runs it inside its dispatch mode, so that
# the mode sees the torch operators inside) and its autograd kernel
IMPLEMENTATIONS = {LOSS: _loss_impl, MASK: _mask_impl}
_AUTOGRAD = {LOSS: _loss_autograd, MASK: _mask_autograd}


def call(op, *args):
    """Run an operator: through the dispatcher under torch.compile, torch.func transforms,
    dispatch modes and tensor subclasses; in a plain eager call, its autograd kernel directly
    (the function the dispatcher would reach, without the dispatcher's per-argument cost)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or not _plain(args):
        return op(*args)
    return _AUTOGRAD[op](*args, plain=True)


def cut_tensors(cut: Optional[Cut]) -> List[Tensor]:
    """The operators' ``cut`` argument: a Cut's tensors, or [] for none."""
    return [] if cut is None else cut.tensors()
