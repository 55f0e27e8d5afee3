"""bench/gpu_check.sh --dry-run: the GPU check script runs end to end on the CPU (Triton under the
interpreter, tiny sizes), so it cannot rot between GPU sessions.

On a machine with CUDA this test is skipped: there the script itself is the check (run
``bash bench/gpu_check.sh``). Not marked ``gpu``: the script's ``tests`` step runs
``pytest -m gpu``, which must not select this test again (and the script sets M2PO_GPU_CHECK=1,
which skips it as well).
"""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = ("tests", "histogram", "masks", "kernels", "bench")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: run bash bench/gpu_check.sh itself")
@pytest.mark.skipif(os.environ.get("M2PO_GPU_CHECK") == "1", reason="inside a run of bench/gpu_check.sh")
def test_gpu_check_dry_run_passes(tmp_path):
    out = tmp_path / "gpu-check"
    tar = tmp_path / "returned" / "gpu-check.tar.gz"  # what a device run hands back: 2 files
    env = dict(os.environ, PYTHON=sys.executable)  # the interpreter running these tests
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its dry run
    env.pop("GPU_CHECK_BUDGET", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--tar", str(tar)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = f"rc={proc.returncode}\n--- stdout (tail)\n{proc.stdout[-6000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}"
    assert "checks this script runs on a GPU:" in proc.stdout, report
    listing = proc.stdout.split("checks this script runs on a GPU:", 1)[1]
    for step in STEPS:
        assert f"\n  {step} " in listing, (step, report)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run"
    assert [s["step"] for s in summary["steps"]] == list(STEPS), report
    assert {s["step"]: s["status"] for s in summary["steps"]} == {s: "ok" for s in STEPS}, report
    assert proc.returncode == 0, report
    for step in STEPS:
        result = json.loads((out / f"{step}.json").read_text())
        assert result["passed"] and result["dry_run"], (step, result.get("headline"))
    assert (out / "tests.txt").is_file() and (out / "kernels.md").is_file() and (out / "summary.md").is_file()
    # the step's detailed table has its own file: kernels.json is the step's result
    assert json.loads((out / "kernels.json").read_text())["step"] == "kernels"
    table = json.loads((out / "kernels_table.json").read_text())
    assert {c["regime"] for c in table["cases"]} == {"typical", "none", "all-equal"}
    # the first-GPU-run goals are reported (the dry run's one small size leaves two unmeasured)
    goals = {g["goal"].split(" ")[0]: g["verdict"] for g in table["goals"]}
    assert goals == {"1M": "not measured", "16M": "not measured", "all-equal": goals["all-equal"]}, table["goals"]
    assert goals["all-equal"] in ("met", "not met")
    assert "Goals for the first GPU run" in (out / "kernels.md").read_text()
    tests = json.loads((out / "tests.json").read_text())
    assert [r["rc"] for r in tests["runs"]] == [0, 0], tests["headline"]  # -m gpu, then the official test
    masks = json.loads((out / "masks.json").read_text())
    for case in masks["cases"]:
        assert case["mismatching_tokens"] == 0 and case["clip_bounds_identical"] is not False, case
        assert {"loss_bits_identical", "grad_differing_elements", "grad_max_rel_diff"} <= set(case), case
    assert all(c["clip_bounds_identical"] for c in masks["cases"] if c["variant"] == "official")
    # --tar: the whole folder in one .tar.gz, summary.md beside it
    assert sorted(p.name for p in tar.parent.iterdir()) == ["gpu-check.summary.md", "gpu-check.tar.gz"]
    with tarfile.open(tar) as tf:
        names = tf.getnames()
    for name in ("summary.json", "summary.md", "env.txt", "kernels.json", "kernels_table.json", "masks.json"):
        assert f"gpu-check/{name}" in names, (name, names)
    assert (tar.parent / "gpu-check.summary.md").read_text() == (out / "summary.md").read_text()


def test_gpu_check_exhausted_budget_skips_steps(tmp_path):
    """GPU_CHECK_BUDGET=1: no step has time left, so none starts; each is SKIPPED, a failure
    (exit 1), and --tar still packs the folder. No torch import, no step: well under a second."""
    out = tmp_path / "gpu-check"
    tar = tmp_path / "gc.tar.gz"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BUDGET="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--tar", str(tar)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    report = f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 1, report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["budget_s"] == 1, report
    assert [(s["step"], s["status"], s["rc"], s["json"]) for s in summary["steps"]] == [
        (step, "SKIPPED", None, None) for step in STEPS], report
    assert "SKIPPED" in (out / "summary.md").read_text()
    assert tar.is_file() and (tmp_path / "gc.summary.md").is_file()
    with tarfile.open(tar) as tf:
        assert "gpu-check/summary.json" in tf.getnames()
