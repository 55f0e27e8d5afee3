"""The fused Triton backend: allocating wrappers around m2po_ops.kernels, launched in a fixed
order with no host synchronisation.

Forward (local solve), one launch each, whatever the data:
  workspace memset (torch.zeros), stats, select1, level2, select2, ties, tie_scan, apply,
  finalize
= 1 memset + 8 Triton kernels. Backward: one elementwise multiply (grad_output * stored grad).
The official rule with per-token advantages and a mask (or validate=False) first runs
first_valid (each sequence's first valid token): one launch more.
level2, ties and tie_scan return at once when nothing is masked (mean m2 <= tau, the common
case); the official variant never needs the tie passes, and they return at once there too.
With a given cut (micro-batch pre-pass) select1/level2/select2 are skipped; with a process
group the histograms are all-reduced between the passes (see m2po_ops/distributed.py).

Every kernel launch goes through ``_launch`` so tests can count them and the AOT tool can see
the arguments the JIT specialises on (``launch_log``).

Specialisation (what makes the JIT build another kernel variant): token counts, block counts,
divisors and float bit patterns are ``do_not_specialize`` int64 arguments, pointers to scalars
are not specialised on alignment, and every workspace slice starts on a 16-byte boundary. So
one warm-up call compiles every variant a configuration (variant, dtypes, mask dtype, loss
mode, tau = inf or not, miniclip) needs, at any size: a CUDA graph captured later loads no
module. Input tensors whose data pointer is not 16-byte aligned (a view at an odd offset)
still compile a variant of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import kernels as K
from .config import OFFICIAL_EPS, M2POConfig
from .cut import Cut
from .inputs import Tokens, token_weights
from .histogram import BELOW_COUNT, SELECT_CHUNK, STATE_LEN, SUMS_LEN
from .kernels.common import INTERPRET, KEEP_ALL_BITS, L1_BUCKETS, L2_BUCKETS, f64_bits
from .split import MAX_LIMBS, limb_count, threshold_bits

# Token kernels: BLOCK tokens per program. Select kernels: one program scanning CHUNK buckets
# at a time (large under the interpreter, where each step is a numpy call).
BLOCK = 1024
# Warps of the token kernels: 1024 tokens over 128 (stats, level2, ties) or 256 threads (apply).
# Chosen by the AOT spill check (python -m m2po_ops.kernels.aot): with 8 warps ptxas spills 8
# bytes in the official stats kernel on sm_90; with 4 it spills 16 bytes in the float64 official
# apply kernel on sm_80.
TOKEN_WARPS = 4
APPLY_WARPS = 8
# A register budget for ptxas (.maxnreg) in apply. Without one, ptxas on sm_90 settled on 48
# registers and spilled 16 bytes in an official apply variant; with this bound it uses 64 and
# spills nothing. (stats needs ~150 registers at 4 warps: a bound of 128 makes it spill.)
APPLY_MAXNREG = 128
SELECT_WARPS = 8  # select kernels also run without FMA contraction: their float64 tests are
# written as separate multiplies and adds (as the PyTorch description and the authors' code)
TIE_CHUNK = 1024  # blocks per step of tie_scan_kernel
FINAL_CHUNK = 1024
FIRST_CHUNK = 256  # tokens per step of first_valid_kernel (one step for a right-padded row)
FIRST_WARPS = 2


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the kernel, its grid and the arguments as the JIT sees them."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


_launches: Optional[list] = None
_execute = True


@contextlib.contextmanager
def launch_log(execute: bool = True):
    """Record the Triton launches made inside the block (a list of ``Launch``).

    ``execute=False`` records without launching, on any device (no GPU, no interpreter needed):
    the launcher never branches on device values, so the recorded sequence and arguments are
    those of a real call. Outputs are then left uncomputed. The AOT tool uses it to compile
    exactly the variants the JIT would build (m2po_ops/kernels/aot.py).
    """
    global _launches, _execute
    previous = _launches, _execute
    _launches, _execute = [], execute
    try:
        yield _launches
    finally:
        _launches, _execute = previous


def _launch(kernel, grid, *args, **meta):
    if _launches is not None:
        _launches.append(Launch(kernel, grid, args, meta))
    if _execute:
        kernel[grid](*args, **meta)


@dataclass
class Workspace:
    """One zeroed int64 buffer (a single memset) sliced into everything the passes need."""

    sums: Tensor  # int64 [SUMS_LEN]: the mergeable sums (m2po_ops/histogram.py), viewed as:
    hist1: Tensor  # int64 [2, L1]: the tail's level-1 histogram
    below: Tensor  # int64 [1 + MAX_LIMBS]: the below part's count and limbs
    below_max: Tensor  # int64 0-d: the largest below key (official)
    hist2: Tensor  # int64 [4, L2]: slot 0 (count, sig), slot 1 (count, sig)
    state1: Tensor  # int64 [STATE_LEN]: the select state
    part1: Tensor  # int64 [L1 / SELECT_CHUNK, PART_COLS]: select1's chunk totals
    part2: Tensor  # int64 [L2 / SELECT_CHUNK, PART_COLS]: select2's chunk totals
    counters: Tensor  # int64 [2]: programs of select1 / select2 that have finished
    n_valid: Tensor  # int64 0-d: this call's valid tokens
    cut_i64: Tensor  # int64 [3]: ties_kept, num_trust_region, num_valid
    stats_part: Tensor  # float64 [nblocks, STATS_COLS]
    apply_part: Tensor  # float64 [nblocks, 2]
    ties: Tensor  # int64 [nblocks]
    f32: Tensor  # float32 [14]: cut (lower, upper, m2, m2_after, threshold), 7 outputs, value bits, a zero
    nblocks: int

    @staticmethod
    def allocate(n: int, device) -> "Workspace":
        nblocks = max(1, math.ceil(n / BLOCK))
        p1, p2 = L1_BUCKETS // SELECT_CHUNK * K.PART_COLS, L2_BUCKETS // SELECT_CHUNK * K.PART_COLS
        sizes = [SUMS_LEN, 1, 4 * L2_BUCKETS, STATE_LEN, p1, p2, 2, 1, 3, nblocks * K.STATS_COLS,
                 nblocks * K.APPLY_COLS, nblocks, 7]
        # every part starts on a 16-byte boundary (2 int64), whatever nblocks: the JIT specialises
        # pointers on 16-byte alignment, and a parity-dependent offset would be another variant
        padded = [s + s % 2 for s in sizes]
        buf = torch.zeros(sum(padded), dtype=torch.int64, device=device)
        parts = [p[:s] for p, s in zip(torch.split(buf, padded), sizes)]
        f32 = parts[12].view(torch.float32)
        sums = parts[0]
        return Workspace(
            sums=sums,
            hist1=sums[:BELOW_COUNT].view(2, L1_BUCKETS),
            below=sums[BELOW_COUNT:],
            below_max=parts[1].view(()),
            hist2=parts[2].view(4, L2_BUCKETS),
            state1=parts[3],
            part1=parts[4].view(-1, K.PART_COLS),
            part2=parts[5].view(-1, K.PART_COLS),
            counters=parts[6],
            n_valid=parts[7].view(()),
            cut_i64=parts[8],
            stats_part=parts[9].view(torch.float64).view(nblocks, K.STATS_COLS),
            apply_part=parts[10].view(torch.float64).view(nblocks, K.APPLY_COLS),
            ties=parts[11],
            f32=f32,
            nblocks=nblocks,
        )

    def cut(self, config: M2POConfig) -> Cut:
        f = self.f32
        return Cut(
            variant=config.variant,
            tau=config.tau,
            value=f[12:13].view(torch.int32).view(()),
            ties_kept=self.cut_i64[0].view(()),
            lower=f[0].view(()),
            upper=f[1].view(()),
            num_valid=self.cut_i64[2].view(()),
            num_trust_region=self.cut_i64[1].view(()),
            m2=f[2].view(()),
            m2_after=f[3].view(()),
            threshold=f[4].view(()),
        )


def _tau_args(config: M2POConfig):
    hi, lo = config.tau_split
    tau_inf = math.isinf(config.tau)
    return dict(
        tau_hi_bits=f64_bits(0.0 if tau_inf else hi),
        tau_lo_bits=f64_bits(0.0 if tau_inf else lo),
        tau_bits=f64_bits(config.tau),
        tau_eps_bits=f64_bits(config.tau + OFFICIAL_EPS),
        eps_bits=f64_bits(OFFICIAL_EPS),
        OFFICIAL=config.variant == "official",
        TAU_INF=tau_inf,
    )


def first_valid_pass(tok: Tokens):
    """(first_src, first_div, first_mul): each sequence's advantage read at its first valid
    token (tok.first_scan), by one program per sequence; packed input maps it back to tokens."""
    mask = tok.mask_src if tok.mask_src is not None else tok.logprobs
    packed = tok.cu is not None
    first = torch.empty(max(tok.num_seqs, 1), dtype=tok.adv_src.dtype, device=tok.device)
    _launch(K.first_valid_kernel, (max(tok.num_seqs, 1),), tok.logprobs, tok.old_logprobs, tok.adv_src, mask,
            tok.cu if packed else tok.logprobs, first, tok.row_len, tok.numel,
            HAS_MASK=tok.mask_src is not None, PACKED=packed, CHUNK=FIRST_CHUNK, num_warps=FIRST_WARPS)
    if packed:  # per token (the gather the packed layout needs anyway)
        return first[tok.packed_seq.clamp(max=max(tok.num_seqs - 1, 0))], 1, 1
    return first, max(tok.row_len, 1), 1


def stats_pass(tok: Tokens, config: M2POConfig, ws: Workspace) -> Tensor:
    """Keys (int32: m2 bits in the trust region, else -1), level-1 histogram, partials."""
    n = tok.numel
    key = torch.empty(n, dtype=torch.int32, device=tok.device)
    first, first_div, first_mul = tok.first_src, tok.first_div, tok.first_mul
    if tok.first_scan and n > 0 and tok.num_seqs > 0:
        first, first_div, first_mul = first_valid_pass(tok)
    if first is None:
        first = tok.adv_src
    mask = tok.mask_src if tok.mask_src is not None else tok.logprobs
    _launch(
        K.stats_kernel, (ws.nblocks,),
        tok.logprobs, tok.old_logprobs, tok.adv_src, max(tok.adv_div, 1), first, first_div, first_mul, mask,
        key, ws.hist1, ws.below, ws.below_max, threshold_bits(config.variant, config.tau), ws.stats_part, ws.n_valid, n,
        OFFICIAL=config.variant == "official", HAS_MASK=tok.mask_src is not None, ADV_PER_ROW=tok.adv_per_row,
        FIRST_PER_ROW=tok.first_per_row, NB1=L1_BUCKETS, NLIMB=_nlimb(config), BLOCK=BLOCK, INTERP=INTERPRET,
        num_warps=TOKEN_WARPS,
    )
    return key


def _nlimb(config: M2POConfig) -> int:
    return limb_count(threshold_bits(config.variant, config.tau))


def select1(ws: Workspace, config: M2POConfig) -> None:
    _launch(K.select1_kernel, (L1_BUCKETS // SELECT_CHUNK,), ws.hist1, ws.below, ws.part1, ws.counters[0:1],
            ws.state1, **_tau_args(config), NB1=L1_BUCKETS, NLIMB=_nlimb(config), CHUNK=SELECT_CHUNK,
            num_warps=SELECT_WARPS, enable_fp_fusion=False)


def level2(key: Tensor, ws: Workspace, config: M2POConfig) -> None:
    _launch(K.level2_kernel, (ws.nblocks,), key, ws.state1, ws.hist2, threshold_bits(config.variant, config.tau),
            key.numel(), NB2=L2_BUCKETS, BLOCK=BLOCK, num_warps=TOKEN_WARPS)


def select2(ws: Workspace, config: M2POConfig, num_valid: Tensor) -> Cut:
    """Solve the cut into the workspace; ``num_valid`` (int64 0-d) becomes cut.num_valid."""
    args = _tau_args(config)
    _launch(
        K.select2_kernel, (L2_BUCKETS // SELECT_CHUNK,),
        ws.hist2, ws.state1, ws.below_max, ws.part2, ws.counters[1:2], num_valid, ws.f32[12:13].view(torch.int32),
        ws.cut_i64, ws.f32,
        args["tau_hi_bits"], args["tau_lo_bits"], args["tau_bits"], args["tau_eps_bits"], args["eps_bits"],
        f64_bits(config.miniclip_low or 0.0), f64_bits(config.miniclip_high or 0.0),
        OFFICIAL=args["OFFICIAL"], TAU_INF=args["TAU_INF"],
        HAS_MINI_LO=config.miniclip_low is not None, HAS_MINI_HI=config.miniclip_high is not None,
        KEEP_ALL=KEEP_ALL_BITS, NB2=L2_BUCKETS, CHUNK=SELECT_CHUNK,
        num_warps=SELECT_WARPS, enable_fp_fusion=False,
    )
    return ws.cut(config)


def ties_pass(key: Tensor, cut: Cut, ws: Workspace) -> None:
    _launch(K.ties_kernel, (ws.nblocks,), key, cut.value, ws.ties, key.numel(), KEEP_ALL=KEEP_ALL_BITS, BLOCK=BLOCK,
            num_warps=TOKEN_WARPS)
    _launch(K.tie_scan_kernel, (1,), cut.value, ws.ties, ws.nblocks, KEEP_ALL=KEEP_ALL_BITS, CHUNK=TIE_CHUNK,
            num_warps=4)


def _weights(tok: Tokens, config: M2POConfig, num_tokens, count: Tensor):
    """(WEIGHTS code, per-token weights, 0-d denominator, float bits) for apply_kernel (an
    unused pointer slot gets ``count``, which is always there)."""
    if config.loss_agg_mode != "token-mean":
        return K.W_PER_TOKEN, token_weights(tok, config, None, torch.float32), count, 0
    if num_tokens is None:
        return K.W_COUNT, count, count, 0
    if isinstance(num_tokens, Tensor):
        return K.W_TENSOR_DENOM, count, num_tokens, 0
    return K.W_SCALAR, count, count, f64_bits(num_tokens)


def apply_pass(tok: Tokens, config: M2POConfig, key: Tensor, cut: Cut, ws: Workspace, want_loss: bool,
               num_tokens=None, count: Optional[Tensor] = None, poison: Optional[Tensor] = None):
    n = tok.numel
    keep = torch.empty(n, dtype=torch.bool, device=tok.device)
    grad = torch.empty(n, dtype=torch.float32, device=tok.device) if want_loss else keep
    code, weights, denom, bits = _weights(tok, config, num_tokens, count if count is not None else ws.n_valid) if (
        want_loss) else (K.W_NONE, ws.n_valid, ws.n_valid, 0)
    mask = tok.mask_src if tok.mask_src is not None else tok.logprobs
    _launch(
        K.apply_kernel, (ws.nblocks,),
        tok.logprobs, tok.old_logprobs, tok.adv_src, max(tok.adv_div, 1), mask, key, weights, denom, bits,
        poison if poison is not None else ws.f32[13],
        cut.value, cut.ties_kept, cut.lower, cut.upper, ws.ties,
        keep, grad, ws.apply_part, n,
        OFFICIAL=config.variant == "official", HAS_MASK=tok.mask_src is not None, ADV_PER_ROW=tok.adv_per_row,
        WEIGHTS=code,
        KEEP_ALL=KEEP_ALL_BITS,
        BLOCK=BLOCK, INTERP=INTERPRET, num_warps=APPLY_WARPS, maxnreg=APPLY_MAXNREG,
    )
    out = ws.f32[5:12]
    _launch(K.finalize_kernel, (1,), ws.stats_part, ws.apply_part, out, ws.nblocks, STATS_COLS=K.STATS_COLS,
            CHUNK=FINAL_CHUNK)
    return keep, (grad if want_loss else None), out


def metrics_from(out: Tensor, cut: Cut, variant: str, zero: Tensor) -> dict:
    m = {
        "m2": cut.m2,
        "m2_after": cut.m2_after,
        "masked_fraction": out[1],
        "trust_region_fraction": out[2],
        "kl": out[3],
        "ratio_mean": out[4],
        "ratio_max": out[5],
        "cut": cut.threshold,
        "num_nonfinite": out[6],
        "input_error": zero,  # replaced by the API when it checked inputs on the device
    }
    if variant == "official":
        m["clip_low"] = cut.lower
        m["clip_high"] = cut.upper
    return m


def _contiguous(tok: Tokens) -> Tokens:
    """Kernels index flat, dense tensors: copy the (rare) strided or broadcast ones."""
    fields = {}
    for name in ("logprobs", "old_logprobs", "adv_src", "first_src", "mask_src"):
        x = getattr(tok, name)
        if x is not None and not x.is_contiguous():
            fields[name] = x.contiguous()
    return dataclasses.replace(tok, **fields) if fields else tok


def check_device(tok: Tokens) -> None:
    """The kernels need CUDA tensors, or CPU tensors under the interpreter (or a launch log that
    only records)."""
    if tok.device.type != "cuda" and not INTERPRET and _execute:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)")


def triton_forward(tok: Tokens, config: M2POConfig, cut: Optional[Cut], want_loss: bool, num_tokens=None,
                   solver=None, poison: Optional[Tensor] = None):
    """Run the passes. ``solver(key, ws) -> (cut, valid count)`` replaces the local solve
    (distributed use; the count is then the group's). ``poison`` (float32 0-d: 0 or NaN) is
    added to every token's weight.

    Returns keep, metrics, loss (0-d) or None, grad (float32, (N,)) or None.
    """
    check_device(tok)
    tok = _contiguous(tok)
    ws = Workspace.allocate(tok.numel, tok.device)
    key = stats_pass(tok, config, ws)
    count = ws.n_valid
    if cut is None:
        if solver is not None:
            cut, count = solver(key, ws)
        else:
            select1(ws, config)
            level2(key, ws, config)
            cut = select2(ws, config, ws.n_valid)
    ties_pass(key, cut, ws)
    keep, grad, out = apply_pass(tok, config, key, cut, ws, want_loss, num_tokens, count, poison)
    metrics = metrics_from(out, cut, config.variant, ws.f32[13].view(()))
    return keep, metrics, (out[0] if want_loss else None), grad
