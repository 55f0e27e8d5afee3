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

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = ("tests", "histogram", "masks", "kernels", "bench")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: run bash bench/gpu_check.sh itself")
@pytest.mark.skipif(os.environ.get("M2PO_GPU_CHECK") == "1", reason="inside a run of bench/gpu_check.sh")
def test_gpu_check_dry_run_passes(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PYTHON=sys.executable)  # the interpreter running these tests
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its dry run
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
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
