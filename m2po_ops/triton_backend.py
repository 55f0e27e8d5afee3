"""The fused Triton backend: allocating wrappers around m2po_ops.kernels, launched in a fixed
order with no host synchronisation.

Forward (local solve), one launch each, whatever the data:
  paper:    scratch and results memsets, stats, select1, level2, select2, ties, tie_scan,
            fix_paper, finalize (2 memsets + 8 Triton kernels)
  official: the memsets, stats, select1, level2, select2, apply_official, finalize
            (2 + 6), after first_valid (each sequence's first valid token) with per-token
            advantages and a mask or validate=False.
Backward: grad_output times the 1 / denominator scale, times the stored derivative.
stats is the one full read (the derivative as if nothing were masked, the compacted tail, the
split's sums); every pass after it but finalize returns at once when nothing is cut (mean m2
<= tau, the common case), and the passes after select2 read only the tail (the official rule:
its wide tail, or every token when a ratio outside it leaves the solved bounds). With a given
cut (micro-batch pre-pass) select1/level2/select2 are skipped; with a process group the sums
are all-reduced between the passes (see m2po_ops/distributed.py). ``TritonBackend`` is the
backend protocol (m2po_ops/backend.py) over these passes.

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
import functools
import math
import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import constants as C
from . import distributed
from . import kernels as K
from .backend import Applied, Parts, Summary, Want
from .config import M2POConfig
from .constants import (BELOW_COUNT, HIST2_ROWS, KEEP_ALL_BITS, L1_BUCKETS, L2_BUCKETS, LEVEL2_CHUNK, OFFICIAL_EPS,
                        OFFICIAL_NO_CONSTRAINT_HIGH, SELECT_CHUNK, STATE_LEN, SUMS_LEN, W_COUNT, W_NONE, W_PER_TOKEN,
                        W_SCALAR, W_TENSOR_DENOM)
from .cut import Cut
from .inputs import Tokens, graph_capturing, token_weights
from .metrics import with_views
from .kernels.common import INTERPRET, f64_bits
from .split import limb_count, threshold_bits

# Token kernels: BLOCK tokens per program. Select kernels: one program scanning CHUNK buckets
# at a time (large under the interpreter, where each step is a numpy call).
BLOCK = 1024
# Warps of the token kernels: 1024 tokens over 128 (level2, ties, fix_paper), 256 (stats,
# apply_official) threads. Chosen by the AOT spill check (python -m m2po_ops.kernels.aot): at 4
# warps ptxas spilled 8 to 16 bytes in stats variants on sm_80 and sm_90 (~180 registers: the
# in-block sort of the tail aggregation); at 8 warps it needs ~95, and with a register budget
# (without one ptxas settled on 80 for one sm_90 variant and spilled) it spills nothing.
TOKEN_WARPS = 4
STATS_WARPS = 8
STATS_MAXNREG = 128
APPLY_WARPS = 8
# A register budget for ptxas (.maxnreg) in apply. Without one, ptxas on sm_90 settled on 48
# registers and spilled 16 bytes in an official apply variant; with this bound every variant
# uses 48 to 61 on sm_80 and sm_90 and spills nothing. (stats needs ~150 registers at 4 warps:
# a bound of 128 makes it spill.)
APPLY_MAXNREG = 128
SELECT_WARPS = 8
# ptxas settled on 64 registers for the select kernels at 8 warps and spilled a register in the
# last program's walk (sm_90); with this budget it spills nothing (the AOT spill check)
SELECT_MAXNREG = 128
# Every kernel with float arithmetic runs without FMA contraction (enable_fp_fusion=False): the
# select kernels' float64 tests are written as separate multiplies and adds (as the PyTorch
# description and the authors' code); stats / apply_official's float64 exp polynomial and
# finalize's reciprocal Newton steps were verified (against torch, on every count up to 2**17)
# as the interpreter runs them, unfused; and the token terms then round as torch's CPU ops do.
# Buckets per program of select1 / select2 on the GPU (m2po_ops/radix_select.py): each program reads
# its chunk and the last one one more, so no program scans more than ~4096 values. Under the
# interpreter every program and every scalar step is a Python call: one program there
# (tests/test_kernel_properties.py counts the kernels' work with the GPU's).
SELECT1_CHUNK = L1_BUCKETS if INTERPRET else SELECT_CHUNK
SELECT2_CHUNK = L2_BUCKETS if INTERPRET else LEVEL2_CHUNK
TIE_CHUNK = 4096  # blocks per program of tie_scan_kernel
FINAL_CHUNK = 512  # blocks per program of finalize_kernel (8 partials each: 4096 loads)
FIRST_CHUNK = 256  # tokens per step of first_valid_kernel (one step for a right-padded row)
FIRST_WARPS = 2


class Launch(NamedTuple):
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




# int64 words of the sink: 16 bytes, so that a view of it as any dtype starts on the 16-byte
# boundary real outputs start on (the JIT specialises pointers on it)
SINK_WORDS = 2


class _Layout(NamedTuple):
    nblocks: int
    total: int  # int64 words
    regions: tuple  # (zeroed, raw) in int64 words
    zeroed: tuple  # int64 part sizes, each followed by its padding to 16 bytes
    raw: tuple  # int32 part sizes, each followed by its padding to 16 bytes


def _layout(n: int) -> _Layout:
    # keyed on the chunk sizes too: they set the partial rows' sizes, and tests change them (the
    # GPU's select chunks under the interpreter, small chunks to get many programs)
    return _layout_for(n, SELECT1_CHUNK, SELECT2_CHUNK, TIE_CHUNK, FINAL_CHUNK)


@functools.lru_cache(maxsize=256)
def _layout_for(n: int, select1_chunk: int, select2_chunk: int, tie_chunk: int, final_chunk: int) -> _Layout:
    nblocks = max(1, math.ceil(n / BLOCK))
    p1, p2 = L1_BUCKETS // select1_chunk * C.PART_COLS, L2_BUCKETS // select2_chunk * C.PART_COLS
    # sums, below_max, ratio_range (official: the extreme ratios outside the wide tail), state1,
    # part1, part2, counters, n_valid, stats_part, apply_part, ties, tie_chunks, final_chunks,
    # sink (16 bytes: what a pass is handed for an output it does not write)
    zeroed = [SUMS_LEN, 1, len((C.RATIO_MIN_FLIPPED, C.RATIO_MAX)), STATE_LEN, p1, p2, C.NUM_COUNTERS, 1,
              nblocks * C.STATS_COLS, nblocks * C.APPLY_COLS, nblocks, math.ceil(nblocks / tie_chunk),
              math.ceil(nblocks / final_chunk) * C.FINAL_COLS, SINK_WORDS]
    n_pad = nblocks * BLOCK
    # hist2 (int64 [HIST2_ROWS, L2]: two int32 words a bucket), tail keys / positions / terms,
    # tail counts, keys
    raw = [2 * HIST2_ROWS * L2_BUCKETS, n_pad, n_pad, n_pad, nblocks, n]
    zeroed = tuple(x for s in zeroed for x in (s, s % 2))
    raw = tuple(x for s in raw for x in (s, -s % 4))
    regions = (sum(zeroed), sum(raw) // 2)
    return _Layout(nblocks, sum(regions), regions, zeroed, raw)


def _memset(t: Tensor) -> None:
    """Zero a workspace buffer: a device memset, stubbed like the kernels when the launch log
    only records (nothing reads the buffers then)."""
    if _execute:
        t.zero_()


class Results:
    """The results of one call, in their own zeroed allocation so that the cut and metrics a
    caller holds (until backward, or longer) keep no scratch alive: float32 slots first, the
    first VALUES_LEN of them the ops' values vector (the cut's floats, finalize's outputs, the
    input error), then the cut's value bits; then cut_i64 (ties_kept, num_trust_region,
    num_valid, -). The F32_*, CUT_*, OUT_* and V_* slots of m2po_ops/constants.py. The loss is a
    0-d float32 of its own (finalize)."""

    __slots__ = ("cut_i64", "f32", "f", "i", "value_bits", "value", "zero", "values")

    def __init__(self, device):
        buf = torch.empty(C.RESULTS_LEN, dtype=torch.int64, device=device)
        _memset(buf)
        f32, self.cut_i64 = buf.split((C.F32_LEN // 2, C.CUT_I64_LEN))
        self.f32 = f32.view(torch.float32)
        self.values = self.f32[:C.VALUES_LEN]
        # 0-d views, one op per group: the values slots (the cut's floats, the zero, the scale and
        # the metrics the operators hand out: kept with the vector, see metrics.with_views) and
        # the cut's integers
        self.f, self.i = with_views(self.values), self.cut_i64.unbind()
        self.value_bits = self.f32.view(torch.int32)[C.F32_VALUE_BITS:C.F32_VALUE_BITS + 1]  # int32 [1], select2 writes it
        self.value, self.zero = self.value_bits.view(()), self.f[C.F32_INPUT_ERROR]


class Workspace:
    """One call's buffers: one scratch allocation and the call's ``Results``.

    The scratch is an int64 prefix that is zeroed (one memset: everything accumulated, or read
    before it is written) followed by int32 words that are always written first (the level-2
    histograms, zeroed by select1 only when a cut is refined; the compacted tail; the keys).
    Every part starts on a 16-byte boundary whatever the size (the JIT specialises pointers on
    16-byte alignment; a size-dependent offset would be another variant). The split sizes are
    computed once per token count (``_layout``); ``for_call`` reuses the scratch of small calls.
    """

    __slots__ = ("zeroed", "sums", "below_max", "ratio_range", "state1", "part1", "part2", "counters", "n_valid",
                 "stats_part", "apply_part", "ties", "tie_chunks", "final_chunks", "hist2", "tail_key", "tail_pos",
                 "tail_term", "tail_cnt", "key", "sink", "sinks", "nblocks", "counter", "res", "layout")

    @staticmethod
    def allocate(n: int, device) -> "Workspace":
        lay = _layout(n)
        ws = Workspace()
        ws.layout = lay
        buf = torch.empty(lay.total, dtype=torch.int64, device=device)
        ws.zeroed, raw = buf.split(lay.regions)
        _memset(ws.zeroed)
        z = ws.zeroed.split(lay.zeroed)  # with a padding part after every part
        (ws.sums, ws.below_max, ws.ratio_range, ws.state1, ws.part1, ws.part2, ws.counters, ws.n_valid, stats_part,
         apply_part, ws.ties, ws.tie_chunks, final_chunks, ws.sink) = z[0::2]
        ws.sinks = {}
        r = raw.view(torch.int32).split(lay.raw)
        hist2, ws.tail_key, ws.tail_pos, tail_term, ws.tail_cnt, ws.key = r[0::2]
        # views the kernels index as such (a reshape of a contiguous part: no copy)
        ws.hist2 = hist2.view(torch.int64).view(HIST2_ROWS, L2_BUCKETS)
        ws.tail_term = tail_term.view(torch.float32)
        ws.stats_part = stats_part.view(torch.float64)
        ws.apply_part = apply_part.view(torch.float64)
        ws.final_chunks = final_chunks.view(torch.float64)
        ws.below_max, ws.n_valid = ws.below_max.view(()), ws.n_valid.view(())
        ws.counter = ws.counters.split(1)  # select1, select2, tie_scan, finalize
        ws.nblocks, ws.res = lay.nblocks, Results(device)
        return ws

    @staticmethod
    def for_call(n: int, device) -> "Workspace":
        """The workspace of one fused call. Calls of at most ``SCRATCH_CACHE_TOKENS`` tokens (where
        the host path is the cost) reuse the scratch of the previous call of the same size on
        the same device, thread and stream: one memset instead of an allocation and its ~20
        views. The results are always new. Never during CUDA-graph capture: a graph must own
        the memory it replays on (allocated in capture, it lives in the graph's pool)."""
        if n > SCRATCH_CACHE_TOKENS or graph_capturing(device):
            return Workspace.allocate(n, device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device, threading.get_ident(), stream)
        ws = _scratch.get(key)
        if ws is None or ws.layout is not _layout(n):
            ws = _scratch[key] = Workspace.allocate(n, device)
            return ws
        _memset(ws.zeroed)
        ws.res = Results(device)
        return ws

    def sink_as(self, dtype: torch.dtype) -> Tensor:
        """The sink viewed in ``dtype`` (made once per workspace: the reused scratch of small calls
        keeps its views)."""
        view = self.sinks.get(dtype)
        if view is None:
            view = self.sinks[dtype] = self.sink.view(dtype)
        return view

    @property
    def hist1(self) -> Tensor:
        """int64 [2, L1]: the tail's level-1 histogram (count row, significand row)."""
        return self.sums[:BELOW_COUNT].view(2, L1_BUCKETS)

    @property
    def f32(self) -> Tensor:
        return self.res.f32

    @property
    def cut_i64(self) -> Tensor:
        return self.res.cut_i64

    def cut(self, config: M2POConfig) -> Cut:
        r = self.res
        f, i = r.f, r.i
        return Cut(variant=config.variant, tau=config.tau, value=r.value, ties_kept=i[C.CUT_TIES_KEPT],
                   lower=f[C.CUT_LOWER], upper=f[C.CUT_UPPER], num_valid=i[C.CUT_NUM_VALID],
                   num_trust_region=i[C.CUT_NUM_TRUST_REGION], m2=f[C.CUT_M2], m2_after=f[C.CUT_M2_AFTER],
                   threshold=f[C.CUT_THRESHOLD])

    @property
    def out(self) -> Tensor:
        """finalize's outputs (float32 [OUT_LEN], the OUT_* slots)."""
        return self.res.f32[C.F32_OUT:C.F32_OUT + C.OUT_LEN]

    @property
    def cut_value_bits(self) -> Tensor:
        """int32 [1]: where select2 stores the cut's value bits."""
        return self.res.value_bits

    @property
    def zero(self) -> Tensor:
        """A float32 0-d zero (a dummy pointer for arguments a variant does not read, and the
        input_error metric when nothing was checked)."""
        return self.res.zero


# Calls up to this many tokens reuse their scratch (Workspace.for_call): ~1.3 MB at most, kept
# per device, thread and stream.
SCRATCH_CACHE_TOKENS = 1 << 16
_scratch: dict = {}


@functools.lru_cache(maxsize=64)
def _tau_args(config: M2POConfig) -> dict:
    """The select kernels' budget arguments (computed once per configuration; not to be
    modified)."""
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


@functools.lru_cache(maxsize=None)
def unconstrained_bounds(miniclip_low, miniclip_high) -> tuple:
    """The official rule's clip bounds when nothing is constrained, as float32 bit patterns:
    reference.official_bounds' chain for the authors' clip_low = 0, clip_high = 100000, in
    Python floats (float64), through the floors, rounded to float32. What stats applies before
    the cut is known (and select2 stores when nothing is refined)."""
    eps_lo, eps_hi = 1.0 - 0.0, OFFICIAL_NO_CONSTRAINT_HIGH - 1.0
    if miniclip_low is not None:
        eps_lo = max(eps_lo, miniclip_low)
    if miniclip_high is not None:
        eps_hi = max(eps_hi, miniclip_high)
    return tuple(struct.unpack("<i", struct.pack("<f", x))[0] for x in (1.0 - eps_lo, 1.0 + eps_hi))


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


def _weight_code(config: M2POConfig, want_loss: bool) -> int:
    if not want_loss:
        return W_NONE
    return W_COUNT if config.loss_agg_mode == "token-mean" else W_PER_TOKEN


def stats_pass(tok: Tokens, config: M2POConfig, ws: Workspace, *, grad: Optional[Tensor] = None,
               keep: Optional[Tensor] = None, weights: Optional[Tensor] = None, poison: Optional[Tensor] = None,
               write_keys: bool = False) -> None:
    """The full read: grad (input dtype, derivative as if nothing were masked) when given, keep
    when given, ws.key when write_keys; the tail, the split's sums, the metric partials."""
    n = tok.numel
    first, first_div, first_mul = tok.first_src, tok.first_div, tok.first_mul
    if tok.first_scan and n > 0 and tok.num_seqs > 0:
        first, first_div, first_mul = first_valid_pass(tok)
    if first is None:
        first = tok.adv_src
    mask = tok.mask_src if tok.mask_src is not None else ws.sink_as(torch.bool)
    # Outputs not asked for get the sink, viewed in the output's dtype: a mask's call, a loss's,
    # a pre-pass's and a process group's then pass the same pointer types, and share one compiled
    # variant (the WRITE_* bits say what is written)
    outputs = ((C.WRITE_GRAD if grad is not None else 0) | (C.WRITE_KEEP if keep is not None else 0)
               | (C.WRITE_KEYS if write_keys else 0))
    if grad is None:
        grad = ws.sink_as(_grad_dtype(tok.logprobs.dtype))
    if keep is None:
        keep = ws.sink_as(torch.bool)
    # how to read, likewise a runtime bit set; the sink stands in for an absent mask or weights
    layout = ((C.READ_MASK if tok.mask_src is not None else 0) | (C.READ_ADV_PER_ROW if tok.adv_per_row else 0)
              | (C.READ_FIRST_PER_ROW if tok.first_per_row else 0) | (C.READ_WEIGHTS if weights is not None else 0))
    lower_u, upper_u = unconstrained_bounds(config.miniclip_low, config.miniclip_high)
    _launch(
        K.stats_kernel, (ws.nblocks,),
        tok.logprobs, tok.old_logprobs, tok.adv_src, max(tok.adv_div, 1), first, first_div, first_mul, mask,
        weights if weights is not None else ws.sink_as(torch.float32), poison if poison is not None else ws.zero,
        grad, keep, ws.key, ws.tail_key, ws.tail_pos, ws.tail_term, ws.tail_cnt, ws.sums, ws.below_max,
        ws.ratio_range,
        threshold_bits(config.rule, config.tau), lower_u, upper_u, ws.stats_part, ws.n_valid, n, layout, outputs,
        OFFICIAL=config.variant == "official", NB1=L1_BUCKETS, NLIMB=_nlimb(config), BLOCK=BLOCK, INTERP=INTERPRET,
        num_warps=STATS_WARPS, maxnreg=STATS_MAXNREG, enable_fp_fusion=False,
    )


@functools.lru_cache(maxsize=64)
def _nlimb(config: M2POConfig) -> int:
    return limb_count(threshold_bits(config.rule, config.tau))


def select1(ws: Workspace, config: M2POConfig) -> None:
    _launch(K.select1_kernel, (L1_BUCKETS // SELECT1_CHUNK,), ws.sums, ws.hist2, ws.part1, ws.counter[C.COUNTER_SELECT1],
            ws.state1, **_tau_args(config), NB1=L1_BUCKETS, NB2=L2_BUCKETS, NLIMB=_nlimb(config),
            CHUNK=SELECT1_CHUNK, num_warps=SELECT_WARPS, maxnreg=SELECT_MAXNREG, enable_fp_fusion=False)


def level2(ws: Workspace, config: M2POConfig, key: Optional[Tensor] = None) -> None:
    """Level-2 histograms from this call's compacted tail, or from a keys tensor (micro-batches
    and process groups keep keys; the kernel adds, so several keys tensors accumulate)."""
    dense = key is not None
    nblocks = max(1, math.ceil(key.numel() / BLOCK)) if dense else ws.nblocks
    _launch(K.level2_kernel, (nblocks,), key if dense else ws.tail_key, ws.tail_cnt, ws.state1, ws.hist2,
            threshold_bits(config.rule, config.tau), key.numel() if dense else 0,
            OFFICIAL=config.variant == "official", DENSE=dense, NB2=L2_BUCKETS, BLOCK=BLOCK, num_warps=TOKEN_WARPS)


def select2(ws: Workspace, config: M2POConfig, num_valid: Tensor) -> Cut:
    """Solve the cut into the workspace; ``num_valid`` (int64 0-d) becomes cut.num_valid."""
    args = _tau_args(config)
    _launch(
        K.select2_kernel, (L2_BUCKETS // SELECT2_CHUNK,),
        ws.hist2, ws.state1, ws.below_max, ws.part2, ws.counter[C.COUNTER_SELECT2], num_valid, ws.cut_value_bits,
        ws.cut_i64, ws.f32,
        args["tau_hi_bits"], args["tau_lo_bits"], args["tau_bits"], args["tau_eps_bits"], args["eps_bits"],
        f64_bits(config.miniclip_low or 0.0), f64_bits(config.miniclip_high or 0.0),
        OFFICIAL=args["OFFICIAL"], TAU_INF=args["TAU_INF"],
        HAS_MINI_LO=config.miniclip_low is not None, HAS_MINI_HI=config.miniclip_high is not None,
        KEEP_ALL=KEEP_ALL_BITS, NB2=L2_BUCKETS, CHUNK=SELECT2_CHUNK,
        num_warps=SELECT_WARPS, maxnreg=SELECT_MAXNREG, enable_fp_fusion=False,
    )
    return ws.cut(config)


def ties_pass(cut: Cut, ws: Workspace) -> None:
    _launch(K.ties_kernel, (ws.nblocks,), ws.tail_key, ws.tail_cnt, cut.value, ws.ties, KEEP_ALL=KEEP_ALL_BITS,
            BLOCK=BLOCK, num_warps=TOKEN_WARPS)
    _launch(K.tie_scan_kernel, (math.ceil(ws.nblocks / TIE_CHUNK),), cut.value, ws.ties, ws.tie_chunks,
            ws.counter[C.COUNTER_TIE_SCAN], ws.nblocks, KEEP_ALL=KEEP_ALL_BITS, CHUNK=TIE_CHUNK, num_warps=4)


def fix_pass(tok: Tokens, config: M2POConfig, cut: Cut, ws: Workspace, grad: Optional[Tensor],
             keep: Optional[Tensor], weights: Optional[Tensor], poison: Optional[Tensor]) -> None:
    """What the cut changes in stats' output: the paper rule's masked tail tokens, or the
    official rule's solved bounds on the wide tail's tokens (on every token when a ratio
    outside the wide tail lies outside the bounds; each pass returns at once when nothing
    changes)."""
    poison = poison if poison is not None else ws.zero
    if config.variant == "paper":
        _launch(K.fix_paper_kernel, (ws.nblocks,), ws.tail_key, ws.tail_pos, ws.tail_term, ws.tail_cnt, cut.value,
                cut.ties_kept, ws.ties, ws.tie_chunks, poison, grad if grad is not None else ws.zero,
                keep if keep is not None else ws.zero, ws.apply_part, KEEP_ALL=KEEP_ALL_BITS,
                WRITE_GRAD=grad is not None, WRITE_KEEP=keep is not None, TIE_CHUNK=TIE_CHUNK, BLOCK=BLOCK,
                num_warps=TOKEN_WARPS, enable_fp_fusion=False)
        return
    lower_u, upper_u = unconstrained_bounds(config.miniclip_low, config.miniclip_high)
    mask = tok.mask_src if tok.mask_src is not None else tok.logprobs
    code = (W_PER_TOKEN if weights is not None else W_COUNT) if grad is not None else W_NONE
    _launch(K.apply_official_kernel, (ws.nblocks,), tok.logprobs, tok.old_logprobs, tok.adv_src, max(tok.adv_div, 1),
            mask, weights if weights is not None else ws.zero, poison, cut.lower, cut.upper, lower_u, upper_u,
            ws.ratio_range, ws.tail_pos, ws.tail_cnt, grad if grad is not None else ws.zero,
            keep if keep is not None else ws.zero, ws.apply_part, tok.numel,
            HAS_MASK=tok.mask_src is not None, ADV_PER_ROW=tok.adv_per_row, WEIGHTS=code,
            WRITE_KEEP=keep is not None, BLOCK=BLOCK, num_warps=APPLY_WARPS, maxnreg=APPLY_MAXNREG,
            enable_fp_fusion=False)


def finalize(config: M2POConfig, ws: Workspace, want_loss: bool, num_tokens=None,
             count: Optional[Tensor] = None) -> Optional[Tensor]:
    """Metrics and the backward scale into ws.out (float32 [OUT_LEN]); the
    loss (float32 0-d, returned when asked; a mask call's lands in the sink)."""
    weights = _weight_code(config, want_loss)
    denom, bits = (count if count is not None else ws.n_valid), 0
    if weights == W_COUNT and num_tokens is not None:
        if isinstance(num_tokens, Tensor):
            weights, denom = W_TENSOR_DENOM, num_tokens
        else:
            weights, bits = W_SCALAR, f64_bits(num_tokens)
    loss = torch.empty((), dtype=torch.float32, device=ws.sink.device) if want_loss else None
    _launch(K.finalize_kernel, (math.ceil(ws.nblocks / FINAL_CHUNK),), ws.stats_part, ws.apply_part, ws.final_chunks,
            ws.counter[C.COUNTER_FINALIZE], denom, bits, ws.out, loss if want_loss else ws.sink_as(torch.float32),
            ws.nblocks, WEIGHTS=weights, STATS_COLS=C.STATS_COLS, CHUNK=FINAL_CHUNK, enable_fp_fusion=False)
    return loss


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


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stored derivative's dtype: the input's (backward then moves as few bytes as the
    gradient itself). Under the interpreter half types stay float32: its bf16/fp16 stores do
    not round to nearest, the GPU's do (backward rounds into the input dtype either way)."""
    if INTERPRET and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


@dataclass
class TritonStatistics:
    """One call's statistics: its workspace after the stats pass, and the outputs stats wrote
    as if nothing were cut (the derivative, keep; None where not asked), with the per-token
    weights and the poison the fix-up passes apply again."""

    tok: Tokens
    ws: Workspace
    grad: Optional[Tensor]
    keep: Optional[Tensor]
    weights: Optional[Tensor]
    poison: Optional[Tensor]


class TritonSteps:
    """distributed.solve_steps' histogram steps, by the Triton passes, on a workspace whose
    mergeable sums (ws.sums, ws.below_max) the stats pass filled or a pre-pass added up."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.sums = ws.sums
        self.below_max = ws.below_max.reshape(1)

    @classmethod
    def from_sums(cls, sums: Tensor, below_max: Tensor, max_tokens: int) -> "TritonSteps":
        ws = Workspace.allocate(max(max_tokens, 1), sums.device)
        ws.sums.copy_(sums)
        ws.below_max.copy_(below_max)
        return cls(ws)

    def select1(self, config: M2POConfig) -> Tensor:
        select1(self.ws, config)
        return self.ws.state1

    def level2(self, keys, state1: Tensor, config: M2POConfig) -> Tensor:
        for k in keys:  # the kernel adds into ws.hist2, so micro-batches accumulate
            level2(self.ws, config, key=k)
        return self.ws.hist2

    def select2(self, hist2: Tensor, state1: Tensor, config: M2POConfig, num_valid: Tensor) -> Cut:
        return select2(self.ws, config, num_valid)


class TritonBackend:
    """The backend protocol (m2po_ops/backend.py) by the fused passes: statistics is the stats
    pass (and first_valid), solve the select passes, apply the tie and fix-up passes and
    finalize. No step reads a device value on the host."""

    name = "triton"

    def statistics(self, tok: Tokens, config: M2POConfig, want: Want, poison: Optional[Tensor] = None):
        check_device(tok)
        tok = _contiguous(tok)
        outputs = want.loss or want.keep
        # (a keys-only pass keeps its sums beyond the call: a workspace of its own, not the reused one)
        ws = Workspace.for_call(tok.numel, tok.device) if outputs else Workspace.allocate(tok.numel, tok.device)
        grad = torch.empty(tok.numel, dtype=_grad_dtype(tok.logprobs.dtype), device=tok.device) if want.loss else None
        keep = torch.empty(tok.numel, dtype=torch.bool, device=tok.device) if want.keep else None
        weights = None
        if want.loss and config.loss_agg_mode != "token-mean":
            weights = token_weights(tok, config, None, torch.float32)
        stats_pass(tok, config, ws, grad=grad, keep=keep, weights=weights, poison=poison, write_keys=want.keys)
        return TritonStatistics(tok, ws, grad, keep, weights, poison)

    def summary(self, st: TritonStatistics) -> Summary:
        ws = st.ws
        return Summary(ws.key.clone(), ws.n_valid.clone(), ws.sums.clone(), ws.below_max.clone())

    def solve(self, st: TritonStatistics, config: M2POConfig, group) -> Cut:
        ws = st.ws
        if group is None:
            select1(ws, config)
            level2(ws, config)
            return select2(ws, config, ws.n_valid)
        cut, _ = distributed.solve_steps(TritonSteps(ws), [ws.key], ws.n_valid, config, group)
        return distributed.part_cuts([ws.key], cut, group)[0]

    def solve_parts(self, parts: Parts, config: M2POConfig, group) -> Tuple[Cut, Tensor]:
        steps = TritonSteps.from_sums(parts.sums, parts.below_max, max(k.numel() for k in parts.keys))
        return distributed.solve_steps(steps, parts.keys, parts.num_valid, config, group)

    def apply(self, st: TritonStatistics, config: M2POConfig, cut: Cut, want: Want, *, local_solve: bool,
              num_tokens=None, num_valid: Optional[Tensor] = None, poison: Optional[Tensor] = None) -> Applied:
        """num_valid: the group's valid count (the token-mean denominator of a process group).
        local_solve and poison: the statistics already hold what they change here."""
        ws = st.ws
        if config.variant == "paper":
            ties_pass(cut, ws)
        fix_pass(st.tok, config, cut, ws, st.grad, st.keep, st.weights, st.poison)
        loss = finalize(config, ws, want.loss, num_tokens, num_valid if num_valid is not None else ws.n_valid)
        res = ws.res
        if cut.m2 is not res.f[C.CUT_M2]:  # a cut solved elsewhere: its floats into the values vector
            torch.stack([cut.lower, cut.upper, cut.m2, cut.m2_after, cut.threshold], out=res.f32[:C.F32_OUT])
        # (the metrics are the values vector's slots: no dict here, the operators build it once)
        if not want.loss:
            return Applied(st.keep, None, None, None, None, res.values)
        return Applied(st.keep, None, loss, st.grad, res.f[C.V_SCALE], res.values)


TRITON = TritonBackend()
