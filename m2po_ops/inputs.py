"""Argument checking and the one flat token layout every backend works on.

Inputs come as a padded ``(B, T)`` batch with a mask, or as 1-D packed tokens with
``cu_seqlens`` (flash-attn's varlen convention). Both are turned into flat ``(N,)`` views plus
per-token sequence ids, so kernels never see a second grid dimension.

Every check that can be done from shapes, dtypes and devices is done here without touching
device memory. The checks that must read values (finiteness of valid tokens, the order of
``cu_seqlens``) run only with ``validate=True``: they are the only host syncs of the library.

On CPU tensors a "host read" is a plain memory read, not a synchronisation, so the PyTorch
backend branches on values there (``host_reads_free``): it skips work that the data makes
unnecessary. Every other device takes the sync-free path, which ``device_path()`` forces on CPU
tensors too (tests of that path, host-sync counting).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .config import M2POConfig
from .constants import INPUT_ERROR_CU_SEQLENS, INPUT_ERROR_NUM_TOKENS

try:  # (the host helpers on CPU use it when installed)
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Token indices are int32 inside the kernels' row arithmetic (an int64 division is a subroutine
# call per token on the GPU).
MAX_TOKENS = 2**31

_device_path_on_cpu = False


def host_reads_free(device: torch.device) -> bool:
    """Whether code may read tensor values on the host for free: CPU tensors, unless inside
    ``device_path()``."""
    return device.type == "cpu" and not _device_path_on_cpu


@contextlib.contextmanager
def device_path():
    """Run CPU tensors through the sync-free path that CUDA tensors take (no host reads), e.g.
    to test that path or to count its host syncs without a GPU."""
    global _device_path_on_cpu
    previous, _device_path_on_cpu = _device_path_on_cpu, True
    try:
        yield
    finally:
        _device_path_on_cpu = previous


_EXPONENT_MASK = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def count_true(flags: Tensor) -> Tensor:
    """The number of True entries of a bool tensor (int64 0-d). On the host numpy counts bytes
    several times faster than torch.count_nonzero on CPU; elsewhere it stays on the device."""
    if _np is not None and host_reads_free(flags.device) and flags.is_contiguous():
        return torch.tensor(int(_np.count_nonzero(flags.numpy())), dtype=torch.int64)
    return torch.count_nonzero(flags)


def _finite_or_zero(first: Tensor) -> Tensor:
    """A sequence's first advantage as the official rule reads it. Its first position may be
    padding holding garbage (left padding, a hole): it then reads as 0, so the sequence is
    ineligible, exactly as with zero padding. A valid first token with a non-finite advantage is
    caught (or made padding) like any other."""
    return torch.where(torch.isfinite(first), first, torch.zeros_like(first))


def _all_finite(x: Tensor) -> bool:
    """Host check (CPU): every value of x is finite. A sum propagates NaN and infinities (inf
    and -inf together give NaN), so a finite sum proves every value finite: one reduction, the
    fastest torch has on CPU. A non-finite sum (a non-finite value, or an overflow of the sum)
    is settled by min and max, which propagate NaN and cannot overflow."""
    if x.numel() == 0:
        return True
    if _np is not None and x.dtype in _EXPONENT_MASK and x.is_contiguous():
        # a half type is non-finite exactly when its exponent field is all ones (numpy has no
        # bfloat16, but it has the bits)
        bits = x.view(torch.int16).numpy()
        return int(_np.bitwise_and(bits, 0x7FFF).max()) < _EXPONENT_MASK[x.dtype]
    if math.isfinite(float(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@dataclass(frozen=True)
class Tokens:
    """The flat view of one call's tokens, in two forms.

    Sources, as the kernels read them (no copies, no launches for the common layouts):
    logprobs / old_logprobs: (N,) in the caller's dtype.
    adv_src, adv_div: token i's advantage is adv_src[i // adv_div] (adv_div = T for per-row
        advantages of a (B, T) batch, 1 otherwise; kernels take max(adv_div, 1)).
    first_src, first_div, first_mul: the advantage of token i's sequence's first token is
        first_src[(i // first_div) * first_mul] (official variant; None when not needed).
    mask_src: (N,) mask of any dtype (nonzero = valid), or None for "all valid".
    A valid token is one whose mask is nonzero and whose log-probs and advantage are finite
    (non-finite ones only get this far with validate=False).

    Derived per-token tensors for the reference (computed on first use): ``advantages``,
    ``adv_first``, ``valid``, ``nonfinite``, ``seq_id``.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    adv_src: Tensor
    adv_div: int
    first_src: Optional[Tensor]
    first_div: int
    first_mul: int
    mask_src: Optional[Tensor]
    num_seqs: int
    shape: torch.Size
    row_len: int = 0  # T of a (B, T) batch
    cu: Optional[Tensor] = None  # cu_seqlens of packed input
    packed_seq: Optional[Tensor] = None  # packed input: searchsorted sequence index per token
    inside: Optional[Tensor] = None  # packed input: token lies inside some sequence
    adv_per_row: bool = False  # advantages given as (B,) for a (B, T) batch (a layout fact, whatever T is)
    # official rule, per-token advantages, and padding or non-finite tokens possible: each
    # sequence's advantage is read at its first *valid* token, which takes a scan (first_src
    # then holds the first-position form, right for a right-padded batch only)
    first_scan: bool = False
    input_error: Optional[Tensor] = None  # int32 0-d INPUT_ERROR_* bits found on the device (validate=False)

    @property
    def first_per_row(self) -> bool:
        """The official variant's first-token advantage is read per row of a (B, T) batch."""
        return self.first_src is not None and len(self.shape) == 2

    @property
    def numel(self) -> int:
        return self.logprobs.numel()

    @property
    def device(self) -> torch.device:
        return self.logprobs.device

    def _positions(self) -> Tensor:
        return torch.arange(self.numel, device=self.device, dtype=torch.int64)

    @functools.cached_property
    def advantages(self) -> Tensor:
        if self.adv_div == 1:
            return self.adv_src.reshape(-1)
        return self.adv_src.repeat_interleave(self.adv_div, output_size=self.numel)

    @functools.cached_property
    def advantages_compute(self) -> Tensor:
        """advantages in the compute dtype (float64 for float64 logprobs, else float32), converted
        once per call (the trust region and the loss both read it)."""
        return self.advantages.to(torch.float64 if self.logprobs.dtype == torch.float64 else torch.float32)

    @functools.cached_property
    def first_valid_advantage(self) -> Tensor:
        """Per sequence (a row, or a cu_seqlens sequence): the advantage of its first valid token
        (0 where it has none). The torch form of the Triton first_valid_kernel."""
        valid, adv = self.valid, self.adv_src.reshape(-1)
        if self.cu is None:
            b, t = self.shape
            col = valid.reshape(b, t).to(torch.uint8).argmax(dim=1, keepdim=True)  # 0 for a row with none
            has = valid.reshape(b, t).any(dim=1)
            return torch.where(has, adv.reshape(b, t).gather(1, col).reshape(-1), torch.zeros_like(adv[:1]))
        n, pos = self.numel, self._positions()
        seq = self.seq_id.clamp(max=max(self.num_seqs - 1, 0))  # (tokens outside every sequence are not valid)
        at = torch.where(valid, pos, torch.full_like(pos, n))
        first_pos = torch.full((self.num_seqs,), n, dtype=torch.int64, device=self.device)
        first_pos.scatter_reduce_(0, seq, at, reduce="amin")
        has = first_pos < n
        return torch.where(has, adv[first_pos.clamp(max=max(n - 1, 0))], torch.zeros_like(adv[:1]))

    @functools.cached_property
    def adv_first(self) -> Optional[Tensor]:
        if self.first_src is None:
            return None
        rows = self.adv_first_rows
        if rows is not None:  # (B, T): each row's value over its T tokens (no per-token index; read only:
            # for B = 1 or T = 1 it is a view of adv_first_rows)
            b, t = self.shape
            return rows.reshape(b, 1).expand(b, t).reshape(-1)
        if self.first_scan:
            if self.numel == 0 or self.num_seqs == 0:
                return torch.zeros_like(self.adv_src.reshape(-1)[: self.numel])
            return self.first_valid_advantage[self.seq_id.clamp(max=self.num_seqs - 1)]
        if self.first_div == 1 and self.first_mul == 1 and self.first_src.numel() == self.numel:
            first = self.first_src.reshape(-1)
        else:
            first = self.first_src.reshape(-1)[(self._positions() // self.first_div) * self.first_mul]
        return _finite_or_zero(first)

    @functools.cached_property
    def adv_first_rows(self) -> Optional[Tensor]:
        """For a (B, T) batch (official rule): adv_first once per row, (B,); None otherwise."""
        if self.first_src is None or self.cu is not None or len(self.shape) != 2 or self.numel == 0:
            return None
        b = self.shape[0]
        if self.first_scan:
            return self.first_valid_advantage
        first = self.first_src.reshape(-1)[torch.arange(b, device=self.device) * self.first_mul]
        return _finite_or_zero(first)

    @functools.cached_property
    def mask_bool(self) -> Optional[Tensor]:
        """The mask as bool (N,), or None when there is none (every token masked in). May be the
        caller's own tensor: not to be written to."""
        return None if self.mask_src is None else _mask_to_bool(self.mask_src)

    @functools.cached_property
    def _base_and_finite(self):
        """(base, finite): the mask as bool, and the tokens whose inputs are all finite (None:
        every token, found on the host for CPU tensors, which skips three per-token passes)."""
        base = torch.ones(self.numel, dtype=torch.bool, device=self.device) if self.mask_src is None else (
            self.mask_bool)
        if host_reads_free(self.device) and self._logprobs_finite and _all_finite(self.adv_src):
            return base, None
        finite = torch.isfinite(self.logprobs) & torch.isfinite(self.old_logprobs) & torch.isfinite(self.advantages)
        return base, finite

    @functools.cached_property
    def _logprobs_finite(self) -> bool:
        """Host check (CPU): every logprobs and old_logprobs value is finite (padding included)."""
        return _all_finite(self.logprobs) and _all_finite(self.old_logprobs)

    def record_finite_logprobs(self) -> None:
        """Record that every logprobs and old_logprobs value is finite, as a caller that read a
        finite sum of their difference knows (an infinite or NaN value in either makes that
        difference, and so the sum, non-finite): the host check then does not read them again.
        Only meaningful before ``valid`` is first read."""
        self.__dict__["_logprobs_finite"] = True  # (what the cached_property would have stored)

    @property
    def all_finite(self) -> bool:
        """Known on the host that every input value is finite (padding included)."""
        return self._base_and_finite[1] is None

    @functools.cached_property
    def valid(self) -> Tensor:
        """Valid tokens (bool (N,)). May be the caller's own bool mask (flattened): not to be
        written to, nor returned to the caller without a copy."""
        base, finite = self._base_and_finite
        return base if finite is None else base & finite

    @functools.cached_property
    def num_valid(self) -> Tensor:
        """The valid-token count (int64 0-d)."""
        return count_true(self.valid)

    @functools.cached_property
    def nonfinite(self) -> Tensor:
        """How many tokens the mask calls valid hold a non-finite value (int64 0-d)."""
        base, finite = self._base_and_finite
        if finite is None:
            return torch.zeros((), dtype=torch.int64, device=self.device)
        return torch.count_nonzero(base & ~finite)

    @functools.cached_property
    def seq_id(self) -> Optional[Tensor]:
        """Sequence index per token (num_seqs for tokens outside every sequence), or None."""
        if self.cu is not None:
            return torch.where(self.inside, self.packed_seq, torch.full_like(self.packed_seq, self.num_seqs))
        if len(self.shape) == 2:
            return self._positions() // max(self.row_len, 1)
        return None

    @functools.cached_property
    def norm_length(self) -> Tensor:
        """The divisor of "seq-mean-token-sum-norm": T of a padded batch, the longest sequence
        of a packed one."""
        if self.cu is not None:
            lengths = self.cu[1:] - self.cu[:-1]
            return (lengths.max() if self.num_seqs > 0 else lengths.new_zeros(())).to(torch.float32)
        return torch.full((), float(self.row_len), device=self.device)


def _check_tensor(name: str, x, *, floating: bool) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}"
        )
    return x


def _check_device(name: str, x: Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logprobs is on {device}; all tensors must share a device")


def split_cu_seqlens(cu_seqlens):
    """cu_seqlens's type checked (an integer tensor, or a list of ints), in the operators' two
    forms: (tensor, None) or (None, list)."""
    if cu_seqlens is None:
        return None, None
    if isinstance(cu_seqlens, Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
            raise TypeError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
        return cu_seqlens, None
    if isinstance(cu_seqlens, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in cu_seqlens):
            raise TypeError("cu_seqlens must hold integers")
        return None, list(cu_seqlens)
    raise TypeError(f"cu_seqlens must be a 1-D integer tensor or a list of ints, got {type(cu_seqlens).__name__}")


def _cu_seqlens_count(cu_seqlens, n: int) -> int:
    """The number of sequences of a cu_seqlens argument, after the checks that read no device
    value: its type, dtype and shape (a tensor), or its values (a list: host numbers, checked
    whatever validate says, as that costs no sync)."""
    tensor, values = split_cu_seqlens(cu_seqlens)
    if tensor is not None:
        shape = tuple(tensor.shape)
    else:
        if len(values) > 1 and (any(b < a for a, b in zip(values, values[1:])) or values[0] < 0 or values[-1] > n):
            raise ValueError(f"cu_seqlens must be non-decreasing offsets within [0, {n}]")
        shape = (len(values),)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D with at least one entry, got shape {shape}")
    return shape[0] - 1


def _as_cu_seqlens(cu_seqlens, device: torch.device) -> Tensor:
    """cu_seqlens (checked by _cu_seqlens_count) as the int64 tensor the kernels index flat."""
    if isinstance(cu_seqlens, Tensor):
        return cu_seqlens.to(torch.int64).contiguous()
    return torch.tensor(cu_seqlens, dtype=torch.int64, device=device)


def graph_capturing(device: torch.device) -> bool:
    """Whether a CUDA-graph capture is recording on the current stream (a host query, no sync)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_capture(config: M2POConfig, cu_seqlens, device: torch.device) -> None:
    """What a captured graph cannot hold: host reads, and host values it would bake in."""
    if not graph_capturing(device):
        return
    if config.validate:
        raise ValueError("validate=True reads values on the host, which CUDA-graph capture forbids: pass "
                         "validate=False inside a captured graph")
    if cu_seqlens is not None and not isinstance(cu_seqlens, Tensor):
        raise ValueError("cu_seqlens given as a Python list would be baked into the captured CUDA graph: pass a "
                         "device tensor and update it in place before each replay")


def _mask_to_bool(mask: Tensor) -> Tensor:
    """Valid = nonzero and not NaN (a NaN is padding: it is not a 1)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point:
        return (mask != 0) & (mask == mask)
    return mask != 0


def prepare(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    config: M2POConfig,
    cu_seqlens: Union[Tensor, Sequence[int], None] = None,
) -> Tokens:
    """Check every argument and build the flat token view. Raises ValueError/TypeError naming the
    argument at fault."""
    logprobs, old_logprobs, advantages, mask = check_arguments(logprobs, old_logprobs, advantages, mask, config,
                                                                cu_seqlens)
    # a sequence's first position may not be valid: padding or holes (a mask), or a non-finite
    # value that validate=False turns into padding
    may_skip = mask is not None or not config.validate
    common = dict(logprobs=logprobs.detach().reshape(-1), old_logprobs=old_logprobs.detach().reshape(-1),
                  shape=logprobs.shape)
    mask_src = None if mask is None else mask.reshape(-1)
    advantages = advantages.detach()
    if logprobs.dim() == 2:
        tok = _padded_tokens(common, advantages, mask_src, config, may_skip)
    elif cu_seqlens is None:
        tok = _packed_tokens_without_sequences(common, advantages, mask_src)
    else:
        tok = _packed_tokens(common, advantages, mask, mask_src, config, cu_seqlens, may_skip)
    if config.validate:
        _validate_values(tok, mask)
    return tok


def check_types(logprobs, old_logprobs, advantages, mask) -> None:
    """The tensor arguments' types, checked before the operators (m2po_ops/ops.py) so that a
    wrong one gets this module's error naming it, not the dispatcher's (the operators check
    the rest)."""
    for name, x in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        _check_tensor(name, x, floating=False)
    if mask is not None:
        _check_tensor("mask", mask, floating=False)


def check_arguments(logprobs, old_logprobs, advantages, mask, config: M2POConfig, cu_seqlens):
    """Types, devices, shapes and the token count: every check that reads no values."""
    logprobs = _check_tensor("logprobs", logprobs, floating=True)
    old_logprobs = _check_tensor("old_logprobs", old_logprobs, floating=True)
    advantages = _check_tensor("advantages", advantages, floating=True)
    device = logprobs.device
    _check_device("old_logprobs", old_logprobs, device)
    _check_device("advantages", advantages, device)
    if mask is not None:
        mask = _check_tensor("mask", mask, floating=False)
        if mask.is_complex():
            raise TypeError(f"mask must be bool, integer or float 0/1, got {mask.dtype}")
        _check_device("mask", mask, device)

    if isinstance(cu_seqlens, Tensor):
        _check_device("cu_seqlens", cu_seqlens, device)
    _check_capture(config, cu_seqlens, device)
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be (B, T) or 1-D packed tokens, got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    if old_logprobs.shape != shape:
        raise ValueError(f"old_logprobs has shape {tuple(old_logprobs.shape)}, expected {tuple(shape)} like logprobs")
    if mask is not None and mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)} like logprobs")
    n = logprobs.numel()
    if n >= MAX_TOKENS:
        raise ValueError(f"logprobs holds {n} tokens; at most {MAX_TOKENS - 1} per call (split the batch into "
                         "micro-batches with M2POStats)")
    _check_layout(shape, advantages, config, cu_seqlens, n)
    return logprobs, old_logprobs, advantages, mask


def _check_layout(shape, advantages: Tensor, config: M2POConfig, cu_seqlens, n: int) -> None:
    """The layout's checks, none reading a value: cu_seqlens only with 1-D logprobs, what 1-D
    tokens without sequences allow, and the advantages' shape (per token or per sequence)."""
    if len(shape) == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only for 1-D packed logprobs; got (B, T) logprobs")
        b = shape[0]
        if advantages.shape != shape and advantages.shape != (b,):
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected {tuple(shape)} (per token) or "
                             f"({b},) (per sequence)")
    elif cu_seqlens is None:  # no sequences: only the paper rule with token-mean
        if config.rule == "official" or config.loss_agg_mode != "token-mean":
            what = ("variant='official' (it reads each sequence's first advantage)" if config.rule == "official"
                    else f"loss_agg_mode={config.loss_agg_mode!r}")
            raise ValueError(f"1-D packed logprobs need cu_seqlens for {what}")
        if advantages.shape != shape:
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected {tuple(shape)} like 1-D "
                             "logprobs (per-sequence advantages need cu_seqlens)")
    else:
        num_seqs = _cu_seqlens_count(cu_seqlens, n)
        if advantages.shape != shape and advantages.shape != (num_seqs,):
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected {tuple(shape)} (per token) or "
                             f"({num_seqs},) (per sequence of cu_seqlens)")


def _padded_tokens(common: dict, advantages: Tensor, mask_src, config: M2POConfig, may_skip: bool) -> Tokens:
    """A (B, T) batch; advantages per token (B, T) or per row (B,)."""
    shape = common["shape"]
    b, t = shape
    official = config.rule == "official"  # (its trust region reads each sequence's first advantage)
    if advantages.shape == shape:
        # the authors read position 0 of each row (verl right-pads); first_scan moves the read
        # to the first valid token where padding or non-finite tokens may come first
        adv = dict(adv_src=advantages.reshape(-1), adv_div=1, first_src=advantages.reshape(-1),
                   first_div=max(t, 1), first_mul=t, first_scan=official and may_skip)
    else:  # (B,): one per row (check_arguments allows no other shape)
        adv = dict(adv_src=advantages, adv_div=t, first_src=advantages, first_div=max(t, 1), first_mul=1,
                   adv_per_row=True)
    if not official:
        adv["first_src"] = None
    return Tokens(**common, **adv, mask_src=mask_src, num_seqs=b, row_len=t)


def _packed_tokens_without_sequences(common: dict, advantages: Tensor, mask_src) -> Tokens:
    """1-D tokens without cu_seqlens: no sequences (check_arguments allows only the paper rule
    with token-mean and per-token advantages)."""
    return Tokens(**common, adv_src=advantages.reshape(-1), adv_div=1, first_src=None, first_div=1, first_mul=1,
                  mask_src=mask_src, num_seqs=0)


def _packed_tokens(common: dict, advantages: Tensor, mask, mask_src, config: M2POConfig, cu_seqlens,
                   may_skip: bool) -> Tokens:
    """1-D tokens in cu_seqlens sequences; advantages per token or per sequence."""
    shape = common["shape"]
    device = common["logprobs"].device
    n = common["logprobs"].numel()
    official = config.rule == "official"
    cu = _as_cu_seqlens(cu_seqlens, device)
    num_seqs = cu.numel() - 1
    input_error = None
    if isinstance(cu_seqlens, Tensor) and num_seqs > 0:
        bad = (cu[1:] < cu[:-1]).any() | (cu[0] < 0) | (cu[-1] > n)
        if config.validate:
            if bool(bad):
                raise ValueError(f"cu_seqlens must be non-decreasing offsets within [0, {n}]")
        else:  # no host read: the result is poisoned instead (see input_error)
            input_error = bad.to(torch.int32) * INPUT_ERROR_CU_SEQLENS
    pos = torch.arange(n, device=device, dtype=torch.int64)
    # Sequence i holds tokens cu[i] <= pos < cu[i+1]; tokens outside every sequence are padding.
    seq = torch.searchsorted(cu[1:], pos, right=True) if num_seqs > 0 else pos.new_zeros(n)
    inside = (pos >= cu[0]) & (pos < cu[-1])
    safe_seq = seq.clamp(max=max(num_seqs - 1, 0))
    if advantages.shape == shape:
        adv_tok = advantages.reshape(-1)
        starts = cu[:-1].clamp(min=0, max=max(n - 1, 0))  # (a bad cu under validate=False must not index out)
        adv_seq_first = adv_tok[starts] if n > 0 else adv_tok.new_zeros(num_seqs)
    else:  # (num_seqs,): one per sequence (check_arguments allows no other shape)
        adv_seq_first = advantages
        adv_tok = advantages[safe_seq] if num_seqs > 0 else advantages.new_zeros(n)
    first = (adv_seq_first[safe_seq] if num_seqs > 0 else adv_tok.new_zeros(n)) if official else None
    return Tokens(**common, adv_src=adv_tok, adv_div=1, first_src=first, first_div=1, first_mul=1,
                  mask_src=inside if mask is None else (_mask_to_bool(mask_src) & inside),
                  num_seqs=num_seqs, cu=cu, packed_seq=seq, inside=inside,
                  first_scan=official and may_skip and advantages.shape == shape, input_error=input_error)


def _validate_values(tok: Tokens, mask) -> None:
    """validate=True: the host reads that prove the mask 0/1 and the valid tokens finite."""
    if mask is not None and mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask holds values other than 0 and 1 (a NaN, a fraction or a negative number): it "
                         "is a validity mask, not a weight; with validate=False nonzero counts as valid and "
                         "NaN as padding")
    base, finite = tok._base_and_finite
    if finite is not None and bool((base & ~finite).any()):
        for name, x in (("logprobs", tok.logprobs), ("old_logprobs", tok.old_logprobs), ("advantages", tok.advantages)):
            if bool((base & ~torch.isfinite(x)).any()):
                raise ValueError(
                    f"{name} holds non-finite values (inf/NaN) on valid tokens; fix the data, or pass "
                    "validate=False to treat such tokens as padding (counted in metrics['num_nonfinite'])"
                )


def check_group(group) -> None:
    """group: None or a torch.distributed process group (a wrong type would fail deep inside a
    collective)."""
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(group).__name__}")


def input_error(tok: Tokens, num_tokens, config: M2POConfig) -> Optional[Tensor]:
    """The INPUT_ERROR_* bits validate=False found on the device (int32 0-d), or None when
    nothing was checked on the device (validate=True checked on the host and raised)."""
    errors = [tok.input_error] if tok.input_error is not None else []
    if isinstance(num_tokens, Tensor) and not config.validate:
        # negative, NaN or infinite (0 is left to the weights: inf on valid tokens, and an
        # all-padding step with num_tokens = its valid count 0 is fine)
        bad = ~(torch.isfinite(num_tokens) & (num_tokens >= 0))
        errors.append(bad.to(torch.int32) * INPUT_ERROR_NUM_TOKENS)
    if not errors:
        return None
    return errors[0] if len(errors) == 1 else errors[0] | errors[1]


def poison_of(error: Tensor) -> Tensor:
    """float32 0-d: 0, or NaN when any error bit is set (added to every valid token's weight and
    to the loss, so the loss and gradient are NaN)."""
    return torch.where(error != 0, float("nan"), 0.0).to(torch.float32)


def check_num_tokens_meta(num_tokens, config: M2POConfig, device: torch.device) -> None:
    """The checks of check_num_tokens that read no value."""
    if num_tokens is None:
        return
    if config.loss_agg_mode != "token-mean":
        raise ValueError(f"num_tokens only applies to loss_agg_mode='token-mean', got {config.loss_agg_mode!r}")
    if isinstance(num_tokens, Tensor) and num_tokens.device != device:
        raise ValueError(f"num_tokens is on {num_tokens.device} but logprobs is on {device}")


def check_num_tokens(num_tokens, config: M2POConfig, device: torch.device):
    """num_tokens: the token-mean denominator override (a positive number or a 0-d tensor on
    ``device``; with validate=False a tensor is checked on the device, see input_error)."""
    if num_tokens is None:
        return None
    check_num_tokens_meta(num_tokens, config, device)
    if not isinstance(num_tokens, Tensor) and graph_capturing(device):
        # a replay would keep scaling by the number seen at capture, whatever the step's count
        raise ValueError(f"num_tokens={num_tokens!r} is a Python number, which a captured CUDA graph bakes in: "
                         "pass a 0-d device tensor and update it in place before each replay")
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be a scalar, got shape {tuple(num_tokens.shape)}")
        if num_tokens.dtype == torch.bool or num_tokens.is_complex():
            raise TypeError(f"num_tokens must be a number, got {num_tokens.dtype}")
        if config.validate and not bool(torch.isfinite(num_tokens) & (num_tokens > 0)):
            raise ValueError("num_tokens must be > 0")
        return num_tokens.reshape(())
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, float)):
        raise TypeError(f"num_tokens must be a positive number or a 0-d tensor, got {type(num_tokens).__name__}")
    if not (num_tokens > 0) or num_tokens != num_tokens or num_tokens == float("inf"):
        raise ValueError(f"num_tokens must be a finite number > 0, got {num_tokens}")
    return float(num_tokens)


def token_weights(tok: Tokens, config: M2POConfig, num_tokens, dtype: torch.dtype, num_valid: Optional[Tensor] = None,
                  scalar: bool = False) -> Tensor:
    """Per-token weight w with loss = sum_i w_i * l_i for the chosen aggregation mode.

    num_valid: a global valid-token count (distributed / micro-batch use) for "token-mean".
    scalar: for "token-mean", return the 0-d weight of a valid token (for terms that are already
    0 on padding, and a denominator known to be finite and > 0: a padding token times a scalar
    is 0 only then); the other modes ignore it.
    """
    mode = config.loss_agg_mode
    if mode == "token-mean":
        if num_tokens is not None:
            denom = torch.as_tensor(num_tokens, dtype=dtype, device=tok.device)
        elif num_valid is not None:
            denom = num_valid.to(dtype).clamp_min(1)
        else:
            denom = tok.num_valid.to(dtype).clamp_min(1)  # the int64 count rounded once, as the kernels
        if scalar:
            return torch.ones((), dtype=dtype, device=tok.device) / denom  # = valid / denom on a valid token
        # padding weighs 0 whatever the denominator (0 / 0 would be NaN on padding)
        return torch.where(tok.valid, tok.valid.to(dtype) / denom, torch.zeros((), dtype=dtype, device=tok.device))
    valid = tok.valid.to(dtype)
    num_seqs = max(tok.num_seqs, 1)
    if mode == "seq-mean-token-sum":
        return valid / num_seqs
    if mode == "seq-mean-token-sum-norm":
        return valid / tok.norm_length.to(dtype).clamp_min(1)
    # seq-mean-token-mean: an empty sequence contributes 0 (verl would give 0/0 = NaN).
    counts = torch.zeros(tok.num_seqs + 1, dtype=dtype, device=tok.device).scatter_add_(0, tok.seq_id, valid)
    return valid / (counts[tok.seq_id].clamp_min(1) * num_seqs)


def sum_f64(x: Tensor) -> Tensor:
    """x summed in float64 (0-d). On CPU, torch converts the whole tensor to float64 first (a
    buffer the allocator maps fresh on every call: the page faults cost more than the sum);
    numpy's reduction converts block by block, and chunks do where numpy is missing."""
    if not host_reads_free(x.device) or x.numel() <= _SUM_CHUNK:
        return x.sum(dtype=torch.float64)
    if _np is None:  # pragma: no cover
        flat = x.detach().reshape(-1)
        return torch.stack([flat[i:i + _SUM_CHUNK].sum(dtype=torch.float64)
                            for i in range(0, flat.numel(), _SUM_CHUNK)]).sum()
    return torch.tensor(sum_f64_host(x), dtype=torch.float64)


def sum_f64_host(x: Tensor) -> float:
    """sum_f64(x) as a host number (CPU tensors)."""
    if _np is None or x.numel() <= _SUM_CHUNK:
        return float(sum_f64(x))
    return float(_np.add.reduce(x.detach().reshape(-1).numpy(), dtype=_np.float64))


_SUM_CHUNK = 1 << 16


def token_mean_weight_host(tok: Tokens, dtype: torch.dtype) -> float:
    """The value of token_weights(tok, token-mean config, None, dtype, scalar=True), on the host
    (CPU tensors): 1 / max(valid count, 1), the count rounded once to dtype and the quotient
    rounded once (numpy's float32 division is correctly rounded, as torch's)."""
    count = int(tok.num_valid)
    if dtype == torch.float64:
        return 1.0 / max(float(count), 1.0)
    one = _np.float32(1.0)
    return float(one / max(_np.float32(count), one))
