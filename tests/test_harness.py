"""The test harness itself: every test that runs the Triton backend takes the ``device`` fixture.

On a GPU machine the Triton backend needs CUDA tensors; a test that builds CPU tensors and asks
for backend="triton" passes here (interpreter) and fails on the first GPU. So the rule is checked
statically, here, where no GPU is needed: a test function that names "triton" (a backend
argument or parameter) or calls the launcher module ``tb`` must take ``device``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
FILES = ("test_triton.py", "test_microbatch.py", "test_mask.py", "test_loss.py", "test_inputs.py")
# CPU tensors on purpose: checks that backend="auto" keeps CPU tensors off the Triton path
CPU_ONLY = {"test_auto_backend_picks_triton_for_cuda_and_torch_on_cpu"}


def _names_holding_triton(tree: ast.Module) -> set:
    """Module-level names bound to a value that contains "triton" (e.g. BACKENDS = (..., "triton")),
    and names imported from a helper module of tests/ (``from cases import BACKENDS``, ``from calls
    import assert_backends_agree``) that holds triton there or is a helper running the Triton backend."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(n, ast.Constant) and n.value == "triton" for n in ast.walk(node.value)
        ):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.ImportFrom) and node.module and (TESTS / f"{node.module}.py").is_file():
            helper = ast.parse((TESTS / f"{node.module}.py").read_text())
            theirs = _names_holding_triton(helper)
            theirs |= _helpers_running_triton(helper, theirs)
            out |= {a.asname or a.name for a in node.names if a.name in theirs}
    return out


def _runs_triton(fn: ast.FunctionDef, triton_names=frozenset()) -> bool:
    """The test names the Triton backend, a name bound to it, the launcher module ``tb`` (other
    than its recorder), or a module helper that itself runs the Triton backend."""
    nodes = [*fn.decorator_list, *fn.body]
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Constant) and node.value == "triton":
            return True
        if isinstance(node, ast.Name) and node.id in triton_names:
            return True
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tb"
                and node.attr != "launch_log"):
            return True
    return False


def _helpers_running_triton(tree: ast.Module, triton_names) -> set:
    """Module-level helper functions (not tests) that run the Triton backend, to a fixed point:
    a helper calling such a helper runs it too."""
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("test_")}
    found = set()
    while True:
        new = {name for name, fn in helpers.items() if name not in found and _runs_triton(fn, triton_names | found)}
        if not new:
            return found
        found |= new


def _tests(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    names = _names_holding_triton(tree)
    names |= _helpers_running_triton(tree, names)
    return [(n, names) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


@pytest.mark.parametrize("name", FILES)
def test_every_triton_test_takes_the_device_fixture(name):
    missing = []
    found = 0
    for fn, triton_names in _tests(TESTS / name):
        if fn.name in CPU_ONLY or not _runs_triton(fn, triton_names):
            continue
        found += 1
        if "device" not in [a.arg for a in fn.args.args]:
            missing.append(f"{name}:{fn.lineno} {fn.name}")
    assert found >= 2, "the rule should apply to this file"
    assert not missing, "tests that run the Triton backend without the device fixture:\n" + "\n".join(missing)


def test_the_rule_sees_a_cpu_only_triton_test():
    """The check flags a test that builds its tensors without the fixture."""
    src = (
        "BACKENDS = ('torch', 'triton')\n"
        "@pytest.mark.parametrize('backend', BACKENDS)\n"
        "def test_x(backend):\n    m2po_mask(torch.ones(3), torch.ones(3), torch.ones(3), backend=backend)\n"
    )
    tree = ast.parse(src)
    fn = tree.body[1]
    assert _runs_triton(fn, _names_holding_triton(tree)) and "device" not in [a.arg for a in fn.args.args]
    # through a helper, and with the recorder named first
    src = (
        "def agree(x):\n    return m2po_mask(x, x, x, backend='triton')\n"
        "def test_y():\n    with tb.launch_log():\n        agree(torch.ones(3))\n"
    )
    tree = ast.parse(src)
    names = _helpers_running_triton(tree, _names_holding_triton(tree))
    assert names == {"agree"} and _runs_triton(tree.body[1], names)
    # through names imported from the helper modules of tests/: the backend list and the helpers
    # that run the Triton backend (not the others)
    src = (
        "from cases import BACKENDS, make_case\n"
        "from calls import assert_backends_agree, run_loss\n"
        "def test_z():\n    assert_backends_agree(make_case(seed=0), 'paper', '', torch.device('cpu'))\n"
    )
    tree = ast.parse(src)
    names = _names_holding_triton(tree)
    assert {"BACKENDS", "assert_backends_agree"} <= names and not {"make_case", "run_loss"} & names
    assert _runs_triton(tree.body[2], names)
