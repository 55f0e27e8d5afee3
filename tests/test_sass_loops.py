"""Serial trip counts read from the compiled SASS stay under the design bound (bench/sass_loops.py).

Compiles three small kernels for sm_90 in a fresh process (no TRITON_INTERPRET, an empty Triton
cache, so ptxas really runs; about 10 s on two cores): select2_kernel (the level-2 walk and the
binary search, both only in the last program to arrive), tie_scan_kernel and finalize_kernel
(loops whose trip count depends on the grid). The large token kernels (stats, level2: ~15 s of
ptxas) are left to ``python -m bench.sass_loops``.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 4096 + 64  # items (or trips) one program may handle serially outside an early exit
KERNELS = ("select2_kernel", "tie_scan_kernel", "finalize_kernel")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        args = [sys.executable, "-m", "bench.sass_loops", "--arch", "90", "--json"]
        for k in KERNELS:
            args += ["--kernel", k]
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k["kernel"]: k for k in json.loads(proc.stdout)["kernels"]}


def test_every_kernel_compiled_and_every_loop_attributed(report):
    assert set(report) == set(KERNELS)
    for k in report.values():
        assert k["loops"], k["kernel"]
        for row in k["loops"]:
            assert row["source_key"] is not None, row
            assert row.get("source_trips") is not None, f"no trip-count rule for {row['source']}"


def test_largest_trip_count_within_bound(report):
    for k in report.values():
        for row in k["loops"]:
            assert row["worst_source_trips"] <= BOUND, row["source"]
            assert row["worst_serial_items"] <= BOUND, (row["source"], row["worst_serial_items"])


def test_select2_loops_are_the_walk_and_the_search_in_the_last_program(report):
    rows = report["select2_kernel"]["loops"]
    by_header = {tuple(r["source_key"]): r for r in rows}
    walk = by_header[("_walk2", "for c in range(programs)")]
    (search,) = [r for (func, header), r in by_header.items()
                 if func in ("_paper_run", "_official_run") and header == "for _ in range(SEARCH_STEPS)"]
    assert walk["source_trips"] == 65536 // 512 and search["source_trips"] == 32
    assert all(r["last_program_only"] for r in rows)
    # the SASS agrees where it shows its counter: peeled + trips x unroll = the source's trips
    for r in (walk, search):
        if r["sass_trips"] is not None:
            assert r["peeled"] + r["sass_trips"] * r["unroll"] == r["source_trips"], r


def test_grid_dependent_loops_and_traps(report):
    for name in ("tie_scan_kernel", "finalize_kernel"):
        (row,) = report[name]["loops"]
        assert row["last_program_only"] and row["trips"] == 1  # one program at 4096 tokens
        assert "runtime value" in row["exit_test"]
    # the `.L_x_N: BRA .L_x_N` trap after the last EXIT is a backward branch but no loop
    kinds = [b["kind"] for k in report.values() for b in k["backward_branches"]]
    assert any(kind.startswith("unreachable") for kind in kinds)
    assert sum(kind == "loop back edge" for kind in kinds) == sum(len(k["loops"]) for k in report.values())
