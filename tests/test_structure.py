"""The package's structure, read from its source with ``ast`` (nothing is imported):

- its imports, function-level ones included, form a DAG;
- the rule constants, the bit patterns, the weight codes and the buffer offsets are written only
  in m2po_ops/constants.py (everything else names them);
- no function, kernels included, is longer than 100 lines.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONSTANTS = ROOT / "m2po_ops" / "constants.py"
MAX_FUNCTION_LINES = 100


def _modules() -> dict:
    """module name -> (path, is package __init__): m2po_ops/ and kernels/ (installed as
    m2po_ops.kernels)."""
    out = {}
    for folder, package in ((ROOT / "m2po_ops", "m2po_ops"), (ROOT / "kernels", "m2po_ops.kernels")):
        for path in folder.rglob("*.py"):
            if folder.name == "m2po_ops" and "kernels" in path.relative_to(folder).parts:
                continue  # (an installed copy or a link to kernels/, listed under its own folder)
            rel = path.relative_to(folder).with_suffix("").parts
            parts = [package] + [p for p in rel if p != "__init__"]
            out[".".join(parts)] = (path, path.name == "__init__.py")
    return out


MODULES = _modules()


def _imports(name: str, path: Path, is_package: bool) -> set:
    """The package modules ``name`` imports anywhere in its source (module level, functions,
    try blocks): ``from .x import y`` counts as an import of x.y when that is a module, else of x."""
    here = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


def _find_cycle(graph: dict):
    """A cycle of the graph as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_import_walk_sees_every_module_and_function_level_imports():
    """The walk is not vacuous: it lists the modules and finds imports inside functions."""
    assert {"m2po_ops", "m2po_ops.api", "m2po_ops.constants", "m2po_ops.kernels",
            "m2po_ops.kernels.common"} <= set(MODULES)
    graph = {name: _imports(name, *info) for name, info in MODULES.items()}
    assert "m2po_ops.constants" in graph["m2po_ops.kernels.common"]
    # a cycle made only of function-level imports is found too
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    source = "def f():\n    from .api import m2po_loss\n"
    tree_imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert tree_imports and tree_imports[0].module == "api"


def test_imports_form_a_dag():
    """Every import in the package, function-level ones included, goes one way: no module
    reaches itself, so none needs a lazy import to dodge a cycle."""
    graph = {name: _imports(name, *info) for name, info in MODULES.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


# ---------------------------------------------------------------------------------------------
# Constants written once

# values that only m2po_ops/constants.py may write as literals (floats by value, whatever the
# spelling; ints as the bit patterns they are)
RULE_FLOATS = {1e-12: "OFFICIAL_EPS", 20.0: "DELTA_CLAMP", 100000.0: "OFFICIAL_NO_CONSTRAINT_HIGH",
               2.0**-24: "RATIO_ABOVE_ONE_DELTA", 2.0**-25: "RATIO_BELOW_ONE_DELTA"}
BIT_PATTERNS = {0x7F800000: "F32_INF_BITS", 0x7F7FFFFF: "F32_MAX_BITS", 0x7FFFFFFF: "KEEP_ALL_BITS",
                0x3FFFFFFF: "LIMB_MASK"}
# names that hold a buffer layout: a pointer, a partial row, an output row; the Python views of
# the results and the workspace's parts
BUFFER_NAMES = ("row", "arow", "out")
SLOTTED = ("f", "i", "f32", "cut_i64", "res", "out", "outputs", "counter", "counters", "sums", "state", "state1",
           "hist2", "ratio_range", "stats_part", "apply_part", "part1", "part2", "final_chunks")
# pointers indexed by element, not by slot: cu_seqlens[seq + 1] is the next sequence's start
ELEMENT_POINTERS = ("cu_ptr",)


def _python_files():
    return [info[0] for info in MODULES.values() if info[0] != CONSTANTS]


def _leaves(node):
    """The operands of a tree of + and * (the parts of an address computation)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        return _leaves(node.left) + _leaves(node.right)
    return [node]


def _name(node) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _is_buffer(node) -> bool:
    name = _name(node)
    return (name.endswith("_ptr") and name not in ELEMENT_POINTERS) or name in BUFFER_NAMES


def _int_constant(node) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _folded(node):
    """The value of an arithmetic expression of number literals (2.0 ** -24, -(1 << 30)), else
    None."""
    if not isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return None
    if not all(isinstance(n, (ast.BinOp, ast.UnaryOp, ast.Constant, ast.operator, ast.unaryop))
               for n in ast.walk(node)):
        return None
    if not all(type(n.value) in (int, float) for n in ast.walk(node) if isinstance(n, ast.Constant)):
        return None
    try:
        return eval(compile(ast.Expression(body=node), "<literal>", "eval"), {"__builtins__": {}})
    except Exception:  # (an overflow, a division by zero: not a constant we look for)
        return None


WEIGHT_NAMES = ("WEIGHTS", "weights")


def _literal_violations(path: Path) -> list:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT)
    bad = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        value = node.value if isinstance(node, ast.Constant) and type(node.value) is float else _folded(node)
        if isinstance(value, float):
            for rule_value, name in RULE_FLOATS.items():
                if math.isclose(abs(value), rule_value, rel_tol=1e-15):
                    bad.append(f"{where}: {value!r} is constants.{name}")
        if _int_constant(node) and node.value in BIT_PATTERNS:
            bad.append(f"{where}: {node.value:#x} is constants.{BIT_PATTERNS[node.value]}")
        # weight codes: compared, or passed to a kernel, by name
        # (in the kernels a lower-case ``weights`` is the code too; elsewhere it is a tensor)
        names = WEIGHT_NAMES if rel.parts[0] == "kernels" else WEIGHT_NAMES[:1]
        if isinstance(node, ast.Compare) and _name(node.left) in names:
            if any(_int_constant(c) for c in node.comparators):
                bad.append(f"{where}: a weight code written as a number (constants.W_*)")
        if isinstance(node, ast.keyword) and node.arg in names and _int_constant(node.value):
            bad.append(f"{where}: a weight code written as a number (constants.W_*)")
        # buffer offsets: a pointer or row plus a number (slot 0 too: it has a name)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            leaves = _leaves(node)
            if any(_is_buffer(x) for x in leaves) and any(_int_constant(x) for x in leaves):
                bad.append(f"{where}: a buffer offset written as a number (a constants slot)")
        # slots of a results or partials tensor read by number (x[3], x[5:13])
        if isinstance(node, ast.Subscript) and _name(node.value) in SLOTTED:
            s = node.slice
            if _int_constant(s) or (isinstance(s, ast.Slice) and any(
                    _int_constant(b) and b.value != 0 for b in (s.lower, s.upper))):
                bad.append(f"{where}: a slot read by number (a constants slot)")
    return bad


def test_the_literal_scan_finds_what_it_looks_for(tmp_path):
    """The scan is not vacuous: each kind of literal is reported in a file that holds it."""
    probe = tmp_path / "triton_backend.py"
    probe.write_text(
        "x = 1e-12\ny = -20.0\nz = 100_000.0\nk = 0x7F800000\nd = -(2.0 ** -25)\n"
        "if WEIGHTS == 4:\n    pass\nf(WEIGHTS=1)\n"
        "tl.store(row + 6, v)\ntl.load(part_ptr + c * COLS + 1)\ntl.store(out + 0, v)\ntl.load(cu_ptr + seq + 1)\n"
        "a = res.f[5:13]\nb = out[7]\nc = parts[0]\ne = ws.ratio_range[1]\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _literal_violations(probe)
    finally:
        ROOT = saved
    kinds = "\n".join(found)
    for part in ("OFFICIAL_EPS", "DELTA_CLAMP", "OFFICIAL_NO_CONSTRAINT_HIGH", "F32_INF_BITS", "RATIO_BELOW_ONE_DELTA"):
        assert part in kinds, part
    assert kinds.count("weight code") == 2
    assert kinds.count("buffer offset") == 3 and kinds.count("slot read by number") == 3


def test_shared_constants_are_written_only_in_the_constants_module():
    """1e-12, 20.0, 100000.0, the float32 bit patterns, the weight codes and the buffer offsets
    appear as literals only in m2po_ops/constants.py; the Python code and the kernels name them."""
    bad = [v for path in _python_files() for v in _literal_violations(path)]
    assert not bad, "\n".join(bad)


def test_the_constants_module_imports_nothing():
    """The kernels and every Python module read it, so it depends on nothing (no torch, no
    triton, no package module)."""
    tree = ast.parse(CONSTANTS.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


# ---------------------------------------------------------------------------------------------
# Function length


def _functions():
    for path in (info[0] for info in MODULES.values()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


@pytest.mark.parametrize("limit", [pytest.param(MAX_FUNCTION_LINES, id="100-lines")])
def test_no_function_is_longer_than_the_limit(limit):
    """Every function and kernel of the package, decorators excluded, docstring included, fits in
    100 lines."""
    functions = list(_functions())
    assert any(node.name == "stats_kernel" for _, node in functions)  # (kernels are walked)
    long = [f"{path}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path, node in functions if node.end_lineno - node.lineno + 1 > limit]
    assert not long, "\n".join(long)
