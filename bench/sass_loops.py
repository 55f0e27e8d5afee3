"""Serial trip counts per kernel, read from the compiled SASS (no GPU needed).

    python -m bench.sass_loops                      # markdown tables for sm_90 (H100)
    python -m bench.sass_loops --json               # the same as JSON
    python -m bench.sass_loops --arch 80 --kernel select2_kernel --kernel tie_scan_kernel
    python -m bench.sass_loops --variant official   # the official rule's variants where it has them
    python -m bench.sass_loops --tokens 1048576     # runtime trip counts for another call size

Run it in a process without TRITON_INTERPRET (as m2po_ops.kernels.aot). Takes about 30 s on
two CPU cores with an empty Triton cache (stats_kernel and level2_kernel take most of it), a
few seconds with a warm one.

What it does, per kernel (one representative variant each, not the AOT sweep):

1. Record. One public call, ``m2po_loss(variant="paper", float32, bool mask, token-mean)`` on
   ``--tokens`` (4096) tokens, is recorded with ``aot.record`` (``launch_log(execute=False)``:
   nothing runs); first_valid_kernel and apply_official_kernel, which only the official rule
   launches, come from the same call with ``variant="official"``. ``--variant official`` takes
   every kernel the official call launches from it.
2. Compile. The launch is bound with ``aot.Binder`` (the JIT's own binder: same signature,
   constexprs and specialisation as on the GPU) and compiled with ``triton.compile`` for the
   target; registers and spill stack from ``aot._resources``.
3. Disassemble. ``nvdisasm -c -g`` (shipped inside the triton package) on ``asm["cubin"]``; ``-g``
   gives every instruction its source file and line (Triton emits line info; inlined helpers
   keep their own lines, e.g. common.py for ``add_aggregated``).
4. Loops. Basic blocks are cut at branch targets and after BRA / EXIT / RET; a BRA or EXIT is
   conditional when it has a guard (``@P0``, ``@!P0``) or a predicate operand (``BRA P1, ...``,
   ``EXIT P1``). Dominators are computed from the kernel's entry, and a loop is a back edge
   ``u -> h`` with ``h`` dominating ``u`` (its natural loop: the blocks that reach ``u``
   without passing ``h``). So a branch to a lower address that is not a loop -- the
   ``.L_x_N: BRA .L_x_N`` trap after the last EXIT (unreachable), an out-of-line block jumping
   back into the main path, the ``RET`` of an out-of-line subroutine such as the float64
   division slow path -- is not counted as one. Subroutines reached by ``CALL.REL`` are analysed
   on their own; a CALL inside a loop adds the subroutine's size to the loop body.
5. Source. A SASS loop is attributed to the Python ``for`` / ``while`` statement (from the AST
   of the kernel sources) on the line of its back-edge branch (Triton puts the loop's own line
   there), else to the innermost loop that contains most of its lines. Source loops with line
   info in the kernel but no SASS loop were unrolled (``tl.static_range``, or by LLVM / ptxas
   for a constant trip count) and are listed as such: their instructions are straight-line.
6. Trip counts. Per source loop a rule (``RULES`` below, keyed by function and loop header)
   derives the trips per program from the launch's constexprs (CHUNK, NB1, NB2, BLOCK, ...), its
   grid and its arguments, as the loop's ``range`` does, plus the worst case over every call the
   launcher accepts (fewer than ``m2po_ops.inputs.MAX_TOKENS`` tokens, grids as
   ``m2po_ops.triton_backend`` computes them). Data-dependent loops (``while``) get their bound
   and are marked with ``<=``. The SASS is used to cross-check: the loop's exit test (the
   ``ISETP`` that sets the predicate of its exiting branch; a 64-bit ``.EX`` pair is joined into
   one constant), the counter's step per SASS iteration (the ``IADD3`` / ``UIADD3`` of the
   compared register, which is also the unroll factor when the source step is 1) and, when the
   counter's last write before the loop is a constant in a dominating block, the trips the SASS
   itself implies (``sass_trips``). ptxas peels and unrolls constant-trip loops (e.g. select2's
   binary search: 2 peeled steps + 3 trips of a 10-fold unrolled body = SEARCH_STEPS 32), so a
   SASS loop's trips are the source trips divided by the unroll factor, minus peeled ones.
7. Output. Per SASS loop: instructions per SASS iteration (static count of the loop's blocks:
   every path of the body, so an upper bound for one iteration), trips per program, their
   product (serial instructions), and whether the loop is only reached by the last program to
   arrive (its header is dominated by the block that tests the ticket of
   ``common.last_to_arrive``). Per kernel: reachable instructions, static instructions outside
   loops and the longest path outside loops (instructions one program can execute at most
   outside loops: longest path through the loop-free CFG, a CALL adding its subroutine).

"Items" in the notes are what one trip advances over: a chunk row (select walks), a bucket
(add_aggregated), a probe (binary search), CHUNK vector lanes (tie_scan, finalize, first_valid,
select1's zeroing). ``serial_items`` = trips x items per trip, to compare with the design bound of
about 4,096 items per program outside an early exit.
"""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

REPRESENTATIVE = ("stats_kernel", "select1_kernel", "level2_kernel", "select2_kernel", "ties_kernel",
                  "tie_scan_kernel", "fix_paper_kernel", "apply_official_kernel", "finalize_kernel",
                  "first_valid_kernel")
OFFICIAL_ONLY = ("first_valid_kernel", "apply_official_kernel")
ITEM_BOUND = 4096  # design bound: items one program scans serially outside an early exit


# ---------------------------------------------------------------------------------------------
# Trip-count rules, one per source loop: (function holding the loop, loop header) -> rule(ctx).
# A rule returns trips (this call), worst (any call the launcher accepts), items per trip, unit,
# how it was derived, and whether the loop is an early exit / data dependent.


class Ctx:
    """What a rule may read: the launch's constexprs and options (meta), grid, named arguments,
    and the launcher's constants for the worst case."""

    def __init__(self, launch, tokens: int):
        self.launch = launch
        self.meta = dict(launch.meta)
        self.grid = tuple(launch.grid)
        self.args = dict(zip(launch.kernel.arg_names, launch.args))
        self.tokens = tokens

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def limits():
        from m2po_ops import inputs
        from m2po_ops import triton_backend as tb

        max_tokens = inputs.MAX_TOKENS - 1
        nblocks = math.ceil(max_tokens / tb.BLOCK)
        return dict(max_tokens=max_tokens, nblocks=nblocks, tie_programs=math.ceil(nblocks / tb.TIE_CHUNK),
                    final_programs=math.ceil(nblocks / tb.FINAL_CHUNK), TIE_CHUNK=tb.TIE_CHUNK,
                    FINAL_CHUNK=tb.FINAL_CHUNK, BLOCK=tb.BLOCK)


def _rule_add_aggregated(ctx):
    from m2po_ops.kernels.common import FEW_BUCKETS

    few = int(FEW_BUCKETS.value if hasattr(FEW_BUCKETS, "value") else FEW_BUCKETS)
    return dict(trips=few, worst=few, items=1, unit="bucket", bound=True, early_exit=False,
                how=f"one trip per distinct bucket among the selected entries; this branch runs only when "
                    f"cnt <= FEW_BUCKETS = {few}, so <= {few} trips (each a BLOCK-wide min-reduction and 2 atomics)")


def _rule_zero_hist2(ctx):
    m = ctx.meta
    programs = m["NB1"] // m["CHUNK"]
    share = 4 * m["NB2"] // programs
    trips = math.ceil(share / m["CHUNK"])
    return dict(trips=trips, worst=trips, items=m["CHUNK"], unit="int64 stores",
                how=f"range(0, share, CHUNK): share = 4*NB2 // (NB1 // CHUNK) = 4*{m['NB2']} // {programs} = {share}; "
                    f"{share} / CHUNK {m['CHUNK']} = {trips} (constexprs, every size)")


def _rule_walk1(ctx):
    m = ctx.meta
    trips = m["NB1"] // m["CHUNK"]
    return dict(trips=trips, worst=trips, items=1, unit="chunk row (3 loads)",
                how=f"range(programs), programs = NB1 // CHUNK = {m['NB1']} // {m['CHUNK']} = {trips} (constexprs)")


def _rule_walk2(ctx):
    m = ctx.meta
    trips = m["NB2"] // m["CHUNK"]
    cols = 4 if m.get("OFFICIAL") else 3
    return dict(trips=trips, worst=trips, items=1, unit=f"chunk row ({cols} loads)",
                how=f"range(programs), programs = NB2 // CHUNK = {m['NB2']} // {m['CHUNK']} = {trips} (constexprs)")


def _rule_search(ctx):
    from m2po_ops.kernels.select import SEARCH_STEPS

    steps = int(SEARCH_STEPS.value if hasattr(SEARCH_STEPS, "value") else SEARCH_STEPS)
    return dict(trips=steps, worst=steps, items=1, unit="probe",
                how=f"range(SEARCH_STEPS) = {steps} (module constexpr)")


def _chunk_rows(ctx, programs_key: str, chunk_name: str, unit: str) -> dict:
    """A last program's read of the chunk rows: range(0, programs, CHUNK), programs = the grid."""
    lim = ctx.limits()
    chunk = ctx.meta["CHUNK"]
    programs = ctx.grid[0]
    trips = math.ceil(programs / chunk)
    worst = math.ceil(lim[programs_key] / chunk)
    return dict(trips=trips, worst=worst, items=chunk, unit=unit,
                how=f"range(0, programs, CHUNK): programs = grid = ceil(nblocks / {chunk_name}) = {programs} here, "
                    f"ceil({programs} / {chunk}) = {trips}; worst: {lim['max_tokens']} tokens -> {lim['nblocks']} "
                    f"blocks -> {lim[programs_key]} programs -> {worst} trip(s)")


def _rule_tie_scan(ctx):
    return _chunk_rows(ctx, "tie_programs", "TIE_CHUNK", "lanes (chunk totals, <= programs of them loaded)")


def _rule_finish(ctx):
    return _chunk_rows(ctx, "final_programs", "FINAL_CHUNK", "lanes (chunk rows of 8 loads, <= programs loaded)")


def _rule_first_valid(ctx):
    lim = ctx.limits()
    chunk = ctx.meta["CHUNK"]
    if ctx.meta.get("PACKED"):
        trips = math.ceil(ctx.args["n"] / chunk)
        here = f"packed: <= ceil(longest sequence / CHUNK) <= ceil(n {ctx.args['n']} / {chunk}) = {trips}"
    else:
        trips = math.ceil(ctx.args["row_len"] / chunk)
        here = f"<= ceil(row_len {ctx.args['row_len']} / CHUNK {chunk}) = {trips}"
    worst = math.ceil(lim["max_tokens"] / chunk)
    return dict(trips=trips, worst=worst, items=chunk, unit="tokens", bound=True, early_exit=True,
                how=f"while pos < first: stops after the chunk holding the row's first valid token (1 trip for a "
                    f"right-padded row); {here}; worst: one fully masked sequence of {lim['max_tokens']} tokens "
                    f"-> {worst} trips")


RULES = {
    ("add_aggregated", "while b < INT64_MAX"): _rule_add_aggregated,
    ("select1_kernel", "for z in range(0, share, CHUNK)"): _rule_zero_hist2,
    ("_walk1", "for c in range(programs)"): _rule_walk1,
    ("_walk2", "for c in range(programs)"): _rule_walk2,
    ("_paper_run", "for _ in range(SEARCH_STEPS)"): _rule_search,
    ("_official_run", "for _ in range(SEARCH_STEPS)"): _rule_search,
    ("tie_scan_kernel", "for c in range(0, programs, CHUNK)"): _rule_tie_scan,
    ("_finish", "for c in range(0, programs, CHUNK)"): _rule_finish,
    ("first_valid_kernel", "while pos < first"): _rule_first_valid,
}


# ---------------------------------------------------------------------------------------------
# Source loops (AST of the kernel files)


class SourceLoop:
    def __init__(self, path, func, node, header, static):
        self.path = path
        self.file = os.path.basename(path)
        self.func = func
        self.lineno = node.lineno
        self.end = node.end_lineno
        self.header = header
        self.static = static
        self.node = node

    @property
    def key(self):
        return (self.func, self.header)

    def label(self):
        return f"{self.file}:{self.lineno} `{self.header}` ({self.func})"

    def step(self, meta):
        """The source step of a ``range`` loop (1 for ``range(n)``), or None."""
        it = getattr(self.node, "iter", None)
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"):
            return None
        if len(it.args) < 3:
            return 1
        arg = it.args[2]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
            return arg.value
        if isinstance(arg, ast.Name) and isinstance(meta.get(arg.id), int):
            return meta[arg.id]
        return None


@functools.lru_cache(maxsize=64)
def source_loops(path: str) -> tuple:
    """Every for / while statement of a Python file, with its enclosing function."""
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError):
        return ()
    out = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.For):
                header = f"for {ast.unparse(child.target)} in {ast.unparse(child.iter)}"
                it = child.iter
                static = isinstance(it, ast.Call) and ast.unparse(it.func).endswith("static_range")
                out.append(SourceLoop(path, func, child, header, static))
            elif isinstance(child, ast.While):
                out.append(SourceLoop(path, func, child, f"while {ast.unparse(child.test)}", False))
            visit(child, func)

    visit(tree, None)
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _ticket_line(path: str):
    """(file, line) of ``return ticket == ...`` in common.last_to_arrive, if that file has it."""
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "last_to_arrive":
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.Return):
                    return stmt.lineno
    return None


# ---------------------------------------------------------------------------------------------
# SASS parsing, CFG, dominators, natural loops

_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LOC = re.compile(r'//## File "(.+?)", line (\d+)')
_LABEL = re.compile(r"^([^\s/][^\s:]*):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_PRED_OPERAND = re.compile(r"^(?:BRA|EXIT|RET)\S*\s+!?U?P[0-6T]\b")


class Ins:
    __slots__ = ("addr", "text", "loc", "guard", "op", "operands", "target")

    def __init__(self, addr, text, loc):
        self.addr = addr
        self.text = text
        self.loc = loc
        body = text
        self.guard = None
        if body.startswith("@"):
            self.guard, body = body.split(None, 1)
        parts = body.split(None, 1)
        self.op = parts[0]
        rest = parts[1] if len(parts) > 1 else ""
        m = _TARGET.search(rest)
        self.target = m.group(1) if m else None
        rest = _TARGET.sub("", rest)
        self.operands = [o.strip() for o in rest.split(",") if o.strip()]

    @property
    def base(self):
        return self.op.split(".")[0]

    @property
    def conditional(self):
        guarded = self.guard is not None and self.guard not in ("@PT",)
        return guarded or bool(_PRED_OPERAND.match(f"{self.op} {' '.join(self.operands)}"))


def _nvdisasm() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_nvdisasm(), "-c", "-g", f.name], capture_output=True, text=True, check=True).stdout


def parse_sass(text: str):
    """Instructions in address order, label -> address, function name -> entry address."""
    ins, labels, funcs, pending, loc = [], {}, {}, [], None
    for line in text.splitlines():
        m = _LOC.search(line)
        if m:
            loc = (m.group(1), int(m.group(2)))
            continue
        m = _INS.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
                if not name.startswith("."):
                    funcs[name] = addr
            pending = []
            ins.append(Ins(addr, m.group(2), loc))
            continue
        m = _LABEL.match(line.strip())
        if m and not line.lstrip().startswith("//"):
            pending.append(m.group(1))
    return ins, labels, funcs


class CFG:
    """Basic blocks of one function (from its entry to the next function's entry)."""

    def __init__(self, ins, labels, entry, end):
        self.ins = [i for i in ins if entry <= i.addr < end]
        self.labels = labels
        self.entry = entry
        by_addr = {i.addr: k for k, i in enumerate(self.ins)}
        leaders = {entry}
        for k, i in enumerate(self.ins):
            if i.base == "BRA" and i.target in labels:
                leaders.add(labels[i.target])
            if i.base in ("BRA", "EXIT", "RET", "BRX", "JMX") and k + 1 < len(self.ins):
                leaders.add(self.ins[k + 1].addr)
        starts = sorted(a for a in leaders if a in by_addr)
        self.blocks = {}  # start addr -> list of Ins
        for s, e in zip(starts, starts[1:] + [None]):
            lo = by_addr[s]
            hi = by_addr[e] if e is not None else len(self.ins)
            self.blocks[s] = self.ins[lo:hi]
        self.succ = {}
        self.calls = {}
        for s, block in self.blocks.items():
            last = block[-1]
            nxt = self.ins[by_addr[last.addr] + 1].addr if by_addr[last.addr] + 1 < len(self.ins) else None
            out = []
            if last.base == "BRA":
                if last.target in labels:
                    out.append(labels[last.target])
                if last.conditional and nxt is not None:
                    out.append(nxt)
            elif last.base in ("EXIT", "RET"):
                if last.conditional and nxt is not None:
                    out.append(nxt)
            elif last.base in ("BRX", "JMX"):
                out = []  # indirect: not followed (not emitted for these kernels)
            elif nxt is not None:
                out.append(nxt)
            self.succ[s] = [t for t in out if t in self.blocks]
            self.calls[s] = [i.target for i in block if i.base == "CALL" and i.target]
        self.reachable = self._reach()
        self.pred = collections.defaultdict(list)
        for s in self.reachable:
            for t in self.succ[s]:
                self.pred[t].append(s)
        self.dom = self._dominators()

    def _reach(self):
        seen, stack = set(), [self.entry]
        while stack:
            b = stack.pop()
            if b in seen or b not in self.blocks:
                continue
            seen.add(b)
            stack.extend(self.succ[b])
        return seen

    def _dominators(self):
        nodes = sorted(self.reachable)
        dom = {b: set(nodes) for b in nodes}
        dom[self.entry] = {self.entry}
        changed = True
        while changed:
            changed = False
            for b in nodes:
                if b == self.entry:
                    continue
                preds = [p for p in self.pred[b] if p in self.reachable]
                new = set.intersection(*(dom[p] for p in preds)) if preds else set()
                new = new | {b}
                if new != dom[b]:
                    dom[b] = new
                    changed = True
        return dom

    def block_of(self, addr):
        best = None
        for s in self.blocks:
            if s <= addr and (best is None or s > best):
                best = s
        return best

    def natural_loops(self):
        """{header: set of blocks}; back edges u -> h with h dominating u."""
        loops = collections.defaultdict(set)
        for u in self.reachable:
            for h in self.succ[u]:
                if h in self.dom[u]:
                    body, stack = {h}, [u]
                    while stack:
                        b = stack.pop()
                        if b not in body:
                            body.add(b)
                            stack.extend(p for p in self.pred[b] if p in self.reachable)
                    loops[h] |= body
        return dict(loops)

    def count(self, blocks):
        return sum(1 for b in blocks for i in self.blocks[b] if i.base != "NOP")


# ---------------------------------------------------------------------------------------------
# Exit test and counter of one SASS loop (the cross-check)

_IMM = re.compile(r"^-?(0x[0-9a-f]+|\d+)$")


def _imm(tok):
    if tok in ("RZ", "URZ"):
        return 0
    return int(tok, 0) if _IMM.match(tok) else None


def _is_reg(tok):
    return re.match(r"^U?R\d+$", tok) is not None


_CMP = {"EQ": lambda a, b: a == b, "NE": lambda a, b: a != b, "LT": lambda a, b: a < b,
        "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b}


def _definer(cfg, body_ins, before_addr, pred):
    """The last instruction before ``before_addr`` in the loop that writes predicate ``pred``."""
    for i in reversed([i for i in body_ins if i.addr < before_addr]):
        if i.operands and i.operands[0] == pred and i.base in ("ISETP", "UISETP"):
            return i
        if i.operands and i.operands[0] == pred and i.base == "PLOP3" and len(i.operands) >= 6:
            # PLOP3.LUT P0, PT, PT, PT, UP0, 0x80, 0x0: a copy of UP0 (AND with true inputs)
            ins_ = [o for o in i.operands[2:5] if o not in ("PT", "UPT")]
            if i.operands[5] == "0x80" and len(ins_) == 1 and not ins_[0].startswith("!"):
                return _definer(cfg, body_ins, i.addr, ins_[0])
            return None
        if i.operands and i.operands[0] == pred:
            return None  # written by something else (R2P, ...): not followed
    return None


def exit_test(cfg, loop_blocks, header):
    """The loop's exit test as (description, details) from its exiting branch, or (None, {})."""
    body_ins = sorted((i for b in loop_blocks for i in cfg.blocks[b]), key=lambda i: i.addr)
    candidates = []
    for b in loop_blocks:
        last = cfg.blocks[b][-1]
        if last.base not in ("BRA", "EXIT") or not last.conditional or last.guard is None:
            continue
        outs = [t for t in cfg.succ[b] if t not in loop_blocks]
        back = last.base == "BRA" and last.target in cfg.labels and cfg.labels[last.target] == header
        if outs or last.base == "EXIT" or back:
            candidates.append((0 if back else 1, last, back))
    if not candidates:
        return None, {}
    _, br, back = sorted(candidates, key=lambda c: (c[0], -c[1].addr))[0]
    neg = br.guard.startswith("@!")
    pred = br.guard.lstrip("@!")
    # the branch is taken when guard holds; for a back edge that means "continue"
    continue_when = (not neg) if back else neg
    d = _definer(cfg, body_ins, br.addr, pred)
    if d is None:
        return f"{br.guard} {br.op} (predicate set by a non-compare)", {}
    cond = next((c for c in _CMP if f".{c}" in d.op), None)
    a, b = d.operands[2], d.operands[3]
    info = dict(branch=br.text, compare=d.text, back_edge=back, continue_when=continue_when, cond=cond)
    hi = None
    if ".EX" in d.op:  # 64-bit: this is the high half; the low half sets the chained predicate
        chain = d.operands[-1].lstrip("!")
        hi = (a, b)
        lo = _definer(cfg, body_ins, d.addr, chain)
        if lo is None:
            return f"{d.text} (64-bit, low half not found)", info
        a, b = lo.operands[2], lo.operands[3]
        info["compare"] = f"{lo.text} / {d.text}"
    reg, const, swapped = None, None, False
    if _is_reg(a) and a not in ("RZ", "URZ"):
        reg, const = a, b
    elif _is_reg(b) and b not in ("RZ", "URZ"):
        reg, const, swapped = b, a, True
    info.update(reg=reg, swapped=swapped)
    value = _imm(const) if const is not None else None
    if value is not None and hi is not None:
        hv = _imm(hi[1] if not swapped else hi[0])
        if hv is not None:
            value = ((hv & 0xFFFFFFFF) << 32) | (value & 0xFFFFFFFF)
            if value >= 1 << 63:
                value -= 1 << 64
    info["const"] = value
    sym = {"EQ": "==", "NE": "!=", "LT": "<", "LE": "<=", "GT": ">", "GE": ">="}.get(cond, "?")
    lhs, rhs = (const, reg) if swapped else (reg, const)
    rhs_txt = f"{value:#x}" if (value is not None and not swapped) else rhs
    lhs_txt = f"{value:#x}" if (value is not None and swapped) else lhs
    kind = "constant" if value is not None else "runtime value"
    where = "continue while" if continue_when else "exit when"
    return f"{where} {lhs_txt} {sym} {rhs_txt} ({kind})", info


def counter_step(cfg, loop_blocks, reg):
    """The immediate added to ``reg`` once per SASS iteration (sum over the body), or None."""
    if reg is None:
        return None
    total, found = 0, False
    for b in loop_blocks:
        for i in cfg.blocks[b]:
            if i.base in ("IADD3", "UIADD3", "IADD", "VIADD", "UIADD") and i.operands and i.operands[0] == reg:
                srcs = [o for o in i.operands[1:] if not re.match(r"^!?U?P[0-6T]$", o)]
                if reg in srcs:
                    imms = [_imm(o) for o in srcs if o != reg and o not in ("RZ", "URZ")]
                    imms = [v for v in imms if v is not None]
                    if len(imms) == 1:
                        total += imms[0]
                        found = True
                        continue
                return None  # some other update of the counter
            elif i.operands and i.operands[0] == reg and i.base not in ("ISETP", "UISETP"):
                return None
    return total if found else None


def counter_init(cfg, loop_blocks, header, reg):
    """The constant ``reg`` holds on entry, when its last write before the loop is a constant move
    in a block that dominates the header."""
    if reg is None:
        return None
    before = [i for i in cfg.ins if i.addr < header and cfg.block_of(i.addr) not in loop_blocks]
    for i in reversed(before):
        if not i.operands or i.operands[0] != reg:
            continue
        blk = cfg.block_of(i.addr)
        if blk not in cfg.reachable or blk not in cfg.dom.get(header, ()):
            return None
        if i.base in ("MOV", "UMOV") and len(i.operands) >= 2:
            return _imm(i.operands[1])
        if i.op.startswith("IMAD.MOV") and len(i.operands) == 4 and i.operands[1] in ("RZ", "URZ") \
                and i.operands[2] in ("RZ", "URZ"):
            return _imm(i.operands[3])
        if i.base == "CS2R" and i.operands[1:] == ["SRZ"]:
            return 0
        return None
    return None


def simulate(init, step, info, cap=10_000_000):
    """Trips of a bottom-tested loop: counter += step, then the test (as in these loops)."""
    if None in (init, step, info.get("const"), info.get("cond")) or step == 0 or not info.get("back_edge"):
        return None
    c, cmp = init, _CMP[info["cond"]]
    for trips in range(1, cap):
        c += step
        holds = cmp(info["const"], c) if info["swapped"] else cmp(c, info["const"])
        if holds != info["continue_when"]:
            return trips
    return None


# ---------------------------------------------------------------------------------------------
# Per-kernel analysis


def _attribute(loop_ins, back_ins, sources):
    """The source loop of a SASS loop: the one on the back-edge branch's line, else the innermost
    loop containing most of the body's lines."""
    if back_ins is not None and back_ins.loc:
        path, line = back_ins.loc
        for s in sources.get(path, ()):
            if s.lineno == line:
                return s
    lines = collections.Counter(i.loc for i in loop_ins if i.loc)
    best, score = None, 0
    for path, loops in sources.items():
        for s in loops:
            n = sum(c for (p, ln), c in lines.items() if p == path and s.lineno <= ln <= s.end)
            if n > score or (n == score and n and best is not None and s.end - s.lineno < best.end - best.lineno):
                best, score = s, n
    return best


def analyze(name, launch, spec, compiled, tokens, arch):
    """Loops, trip counts and straight-line counts of one compiled kernel."""
    from m2po_ops.kernels import aot

    cubin = compiled.asm["cubin"]
    reg, stack = aot._resources(cubin)
    text = disassemble(cubin)
    ins, labels, funcs = parse_sass(text)
    entries = sorted(funcs.values())
    entry = funcs.get(name, entries[0] if entries else 0)
    ends = {e: (entries[k + 1] if k + 1 < len(entries) else 1 << 62) for k, e in enumerate(entries)}
    cfg = CFG(ins, labels, entry, ends.get(entry, 1 << 62))
    subs, sub_cfgs = {}, []
    for fname, faddr in funcs.items():
        if faddr != entry:
            sub = CFG(ins, labels, faddr, ends[faddr])
            subs[fname] = sub.count(sub.reachable)
            sub_cfgs.append((fname, sub))

    # source loops of the files the line info names (the repository's kernel sources only)
    kernel_dir = os.path.dirname(os.path.abspath(launch.kernel.fn.__code__.co_filename
                                                 if hasattr(launch.kernel, "fn") else __file__))
    paths = {i.loc[0] for i in cfg.ins if i.loc and os.path.dirname(os.path.abspath(i.loc[0])) == kernel_dir}
    sources = {p: source_loops(p) for p in sorted(paths)}
    ticket_addr = None
    for p in paths:
        line = _ticket_line(p)
        if line is not None:
            hits = [i for i in cfg.ins if i.loc == (p, line) and i.base in ("ISETP", "UISETP")]
            if hits:
                ticket_addr = hits[0].addr
    ticket_block = cfg.block_of(ticket_addr) if ticket_addr is not None else None

    ctx = Ctx(launch, tokens)
    loops = cfg.natural_loops()
    in_loop = set().union(*loops.values()) if loops else set()
    rows = []
    attributed = collections.defaultdict(list)
    for header in sorted(loops):
        blocks = loops[header]
        body_ins = sorted((i for b in blocks for i in cfg.blocks[b]), key=lambda i: i.addr)
        back = [cfg.blocks[u][-1] for u in blocks if header in cfg.succ[u]]
        back_ins = max(back, key=lambda i: i.addr) if back else None
        src = _attribute(body_ins, back_ins, sources)
        n_ins = cfg.count(blocks) + sum(subs.get(t, 0) for b in blocks for t in cfg.calls[b])
        test, info = exit_test(cfg, blocks, header)
        step = counter_step(cfg, blocks, info.get("reg"))
        init = counter_init(cfg, blocks, header, info.get("reg"))
        sass_trips = simulate(init, step, info)
        nested = [h for h, bs in loops.items() if h != header and header in bs]
        row = dict(kernel=name, header=f"{header:#06x}", end=f"{max(i.addr for i in body_ins):#06x}",
                   instructions=n_ins, source=src.label() if src else "unattributed",
                   source_key=list(src.key) if src else None, exit_test=test, counter_step=step, counter_init=init,
                   sass_trips=sass_trips, nested_in=[f"{h:#06x}" for h in nested],
                   last_program_only=bool(ticket_block is not None and ticket_block in cfg.dom.get(header, ())
                                          and ticket_block != header))
        rows.append(row)
        if src is not None:
            attributed[src].append(row)

    # trip counts: per source loop, split over its SASS loops by their unroll factors
    for src, srows in attributed.items():
        rule = RULES.get(src.key)
        r = rule(ctx) if rule else None
        sstep = src.step(ctx.meta)  # None for a while loop: its counter (if any) is not an unroll count
        for row in srows:
            cs = row["counter_step"]
            row["unroll"] = abs(cs) // sstep if sstep and cs and abs(cs) % sstep == 0 and abs(cs) >= sstep else 1
        max_k = max(row["unroll"] for row in srows)
        for row in srows:
            row["rule"] = r
            if r is None:
                row.update(trips=None, trips_exact=False)
                continue
            k = row["unroll"]
            if row["sass_trips"] is not None:
                trips, exact = row["sass_trips"], not r.get("bound", False)
            elif k < max_k:  # the remainder loop after a loop unrolled max_k times: < max_k source trips
                trips, exact = min(r["trips"], max_k - 1) // k, False
            else:  # the loop itself (or one of several inlined copies of it: each runs the full count)
                trips = r["trips"] // k
                exact = k == 1 and max_k == 1 and not r.get("bound", False)
            row.update(trips=trips, trips_exact=exact, source_trips=r["trips"], worst_source_trips=r["worst"],
                       items_per_trip=r["items"], unit=r["unit"], early_exit=r.get("early_exit", False),
                       how=r["how"], serial_items=r["trips"] * r["items"], worst_serial_items=r["worst"] * r["items"])
            if row["sass_trips"] is not None and not r.get("bound"):
                row["peeled"] = r["trips"] - row["sass_trips"] * k
            row["serial_instructions"] = trips * row["instructions"] if trips is not None else None

    # source loops with line info here but no SASS loop: unrolled
    unrolled = []
    looped = set(attributed)
    for path, loops_here in sources.items():
        for s in loops_here:
            if s in looped:
                continue
            n = sum(1 for i in cfg.ins if i.loc and i.loc[0] == path and s.lineno <= i.loc[1] <= s.end
                    and cfg.block_of(i.addr) in cfg.reachable)
            if not n:
                continue
            inner = any(o is not s and o.lineno <= s.lineno and s.end <= o.end and o in looped for o in loops_here)
            if inner:
                continue  # part of a loop that is a SASS loop
            rule = RULES.get(s.key)
            r = rule(ctx) if rule else None
            unrolled.append(dict(kernel=name, source=s.label(), instructions=n, static_range=s.static,
                                 trips=r["trips"] if r else None, items_per_trip=r["items"] if r else None,
                                 unit=r["unit"] if r else None, how=r["how"] if r else None,
                                 serial_items=r["trips"] * r["items"] if r else None,
                                 worst_serial_items=r["worst"] * r["items"] if r else None))

    # every branch to a lower (or its own) address, and whether it is a loop's back edge
    backward = []
    for fname, g in [(name, cfg)] + sub_cfgs:
        for i in g.ins:
            if i.base == "BRA" and i.target in labels and labels[i.target] <= i.addr:
                blk, tgt = g.block_of(i.addr), labels[i.target]
                if blk not in g.reachable:
                    kind = "unreachable (the trap after the last EXIT)" if tgt == i.addr else "unreachable"
                elif tgt in g.dom[blk]:
                    kind = "loop back edge" if g is cfg else f"loop back edge in subroutine {fname}"
                else:
                    kind = "backward jump, not a loop (target does not dominate it)"
                backward.append(dict(addr=f"{i.addr:#06x}", target=f"{tgt:#06x}", text=i.text, kind=kind,
                                     function=fname))
    reachable = cfg.count(cfg.reachable)
    outside = cfg.count(cfg.reachable - in_loop)
    longest = _longest_path(cfg, in_loop, subs)
    return dict(kernel=name, arch=f"sm_{arch}", variant=aot._describe(launch, spec),
                grid=list(launch.grid), registers=reg, spill_stack=stack, instructions=reachable,
                outside_loops=outside, longest_path_outside_loops=longest, subroutines=subs,
                ticket_compare=f"{ticket_addr:#06x}" if ticket_addr is not None else None,
                loops=rows, unrolled=unrolled, backward_branches=backward)


def _longest_path(cfg, in_loop, subs):
    """Most instructions one program executes outside loops: longest path over forward edges."""
    order = sorted(cfg.reachable)
    best = {}
    for b in reversed(order):  # successors over forward edges have higher addresses
        w = 0 if b in in_loop else cfg.count([b]) + sum(subs.get(t, 0) for t in cfg.calls[b])
        nxt = [best[t] for t in cfg.succ[b] if t > b and t in best]
        best[b] = w + (max(nxt) if nxt else 0)
    return best.get(cfg.entry, 0)


# ---------------------------------------------------------------------------------------------
# Recording, compiling, reporting


def representative_launches(tokens: int = 4096, variant: str = "paper") -> dict:
    """kernel name -> (Launch, label of the call): one launch per kernel."""
    import torch

    from m2po_ops.kernels import aot

    calls = {v: aot.record(aot._calls(tokens, v, torch.float32, "bool", "loss")) for v in ("paper", "official")}
    out = {}
    for v in (variant, "official" if variant == "paper" else "paper"):
        for launch in calls[v]:
            if launch.name in out:
                continue
            if v == "paper" and variant == "paper" and launch.name in OFFICIAL_ONLY:
                continue
            out[launch.name] = (launch, f"{v} fp32 bool-mask token-mean loss, {tokens} tokens")
    return out


def run(arch: int = 90, tokens: int = 4096, variant: str = "paper", kernels=None) -> dict:
    from m2po_ops.kernels import aot

    aot._check_process()
    t0 = time.perf_counter()
    launches = representative_launches(tokens, variant)
    binder = aot.Binder(arch)
    results = []
    for name in REPRESENTATIVE:
        if kernels and name not in kernels:
            continue
        if name not in launches:
            continue
        launch, call = launches[name]
        key, spec = binder.bind(launch)
        t = time.perf_counter()
        compiled = binder.compile(launch, spec)
        compile_s = time.perf_counter() - t
        res = analyze(name, launch, spec, compiled, tokens, arch)
        res.update(call=call, compile_s=round(compile_s, 2))
        results.append(res)
    return dict(arch=f"sm_{arch}", tokens=tokens, variant=variant, seconds=round(time.perf_counter() - t0, 1),
                source=_source_state(), kernels=results)


def _source_state() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "kernels", "m2po_ops"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [d[3:] for d in dirty if d.strip()]
        return head + (f" (uncommitted changes in {', '.join(dirty)})" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(x, exact=True):
    if x is None:
        return "?"
    return f"{x:,}" if exact else f"<= {x:,}"


def markdown(report: dict) -> str:
    out = [f"# Serial trip counts per kernel from the SASS ({report['arch']})", "",
           f"`python -m bench.sass_loops --arch {report['arch'][3:]}` -- source {report['source']}; "
           f"representative calls at {report['tokens']:,} tokens; {report['seconds']} s.", "",
           "## Loops", "",
           "| kernel | loop (source) | instructions per iteration | trip count per program | serial instructions "
           "(product) | note |", "|---|---|---|---|---|---|"]
    for k in report["kernels"]:
        kname = k["kernel"].removesuffix("_kernel")
        if not k["loops"] and not k["unrolled"]:
            out.append(f"| {kname} | (no loop in the SASS) | - | - | - | straight-line: "
                       f"{k['outside_loops']:,} instructions |")
        for row in k["loops"]:
            notes = []
            if row.get("last_program_only"):
                notes.append("**last program only**")
            if row.get("early_exit"):
                notes.append("early exit (data-dependent)")
            elif row.get("rule") and row["rule"].get("bound"):
                notes.append("data-dependent bound")
            if row.get("unroll", 1) > 1:
                notes.append(f"unrolled x{row['unroll']} by ptxas ({row['instructions'] / row['unroll']:.0f} per "
                             f"source iteration)")
            if row.get("source_trips") is not None:
                notes.append(f"source trips {row['source_trips']:,} x {row['items_per_trip']:,} {row['unit']} = "
                             f"{row['serial_items']:,} items; worst case {row['worst_source_trips']:,} trips "
                             f"({row['worst_serial_items']:,} items)")
            if row.get("peeled"):
                notes.append(f"{row['peeled']} iteration(s) peeled into straight-line code")
            if row["exit_test"]:
                sim = f", from {row['counter_init']:#x} -> {row['sass_trips']} trips" \
                    if row["sass_trips"] is not None else ""
                step = f"; counter {row['counter_step']:+#x}/trip{sim}" if row["counter_step"] is not None else ""
                notes.append(f"SASS: {row['exit_test']}{step}")
            if row.get("nested_in"):
                notes.append(f"nested in loop at {', '.join(row['nested_in'])}")
            trips = _fmt(row.get("trips"), row.get("trips_exact", False))
            serial = _fmt(row.get("serial_instructions"), row.get("trips_exact", False))
            out.append(f"| {kname} | {row['source']} [SASS {row['header']}-{row['end']}] | {row['instructions']:,} | "
                       f"{trips} | {serial} | {'; '.join(notes)} |")
        for u in k["unrolled"]:
            why = "tl.static_range" if u["static_range"] else "unrolled by the compiler"
            extra = f"; {u['trips']} x {u['items_per_trip']:,} {u['unit']} = {u['serial_items']:,} items" \
                if u["trips"] is not None else ""
            out.append(f"| {kname} | {u['source']} | - (no loop) | {u['trips'] if u['trips'] is not None else '-'} "
                       f"(unrolled) | {u['instructions']:,} (straight-line) | {why}{extra} |")
    out += ["", "## Per kernel", "",
            "| kernel | variant compiled | grid here | regs | SASS instructions | outside loops (static) | "
            "longest path outside loops | SASS loops (backward BRAs that are not loops) | largest trip count (here / worst) | largest loop items per "
            "program (here / worst) | loops only in the last program |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in report["kernels"]:
        trips = [(r.get("source_trips") or 0, r.get("worst_source_trips") or 0) for r in k["loops"]]
        trips += [(u["trips"] or 0, u["trips"] or 0) for u in k["unrolled"] if u["trips"] is not None]
        items = [(r.get("serial_items") or 0, r.get("worst_serial_items") or 0) for r in k["loops"]]
        items += [(u["serial_items"] or 0, u["worst_serial_items"] or 0) for u in k["unrolled"]
                  if u["serial_items"] is not None]
        t = max(trips, default=(0, 0), key=lambda x: x[1])
        it = max(items, default=(0, 0), key=lambda x: x[1])
        last = [r["header"] for r in k["loops"] if r.get("last_program_only")]
        subs = "".join(f" + {n} in {s.split('$')[-1]}" for s, n in k["subroutines"].items())
        out.append(f"| {k['kernel'].removesuffix('_kernel')} | `{k['variant']}` | {tuple(k['grid'])} | {k['registers']} | "
                   f"{k['instructions']:,}{subs} | {k['outside_loops']:,} | {k['longest_path_outside_loops']:,} | "
                   f"{len(k['loops'])} ({sum(b['kind'] != 'loop back edge' for b in k['backward_branches'])}) | {t[0]:,} / {t[1]:,} | {it[0]:,} / {it[1]:,} | "
                   f"{', '.join(last) if last else '-'} |")
    out += ["", "## Derivations", ""]
    seen = set()
    for k in report["kernels"]:
        for r in k["loops"] + k["unrolled"]:
            how = r.get("how")
            if how and (r["source"], how) not in seen:
                seen.add((r["source"], how))
                out.append(f"- {k['kernel']}: {r['source']}: {how}.")
    out += ["", "## Against the design bound", ""]
    for k in report["kernels"]:
        worst = [(r.get("worst_serial_items") or 0, r) for r in k["loops"] + k["unrolled"]]
        worst = [(w, r) for w, r in worst if w]
        if not worst:
            out.append(f"- {k['kernel']}: no loop; straight-line only.")
            continue
        w, r = max(worst, key=lambda x: x[0])
        flag = "exceeds" if w > ITEM_BOUND + 64 else "within"
        early = ", an early-exit loop" if r.get("early_exit") else ""
        out.append(f"- {k['kernel']}: largest loop {r['source']}: worst {w:,} items per program ({r['unit']}{early}): "
                   f"{flag} {ITEM_BOUND:,}.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM architecture (default 90: H100)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the representative call (default 4096)")
    parser.add_argument("--variant", choices=("paper", "official"), default="paper",
                        help="rule of the representative call (kernels it does not launch come from the other)")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable), e.g. select2_kernel")
    args = parser.parse_args(argv)
    kernels = [k if k.endswith("_kernel") else f"{k}_kernel" for k in args.kernel] if args.kernel else None
    report = run(args.arch, args.tokens, args.variant, kernels)
    if args.json:
        for k in report["kernels"]:
            for r in k["loops"]:
                r.pop("rule", None)
        print(json.dumps(report, indent=1, default=str))
    else:
        print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
