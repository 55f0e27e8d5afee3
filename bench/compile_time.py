"""torch.compile of a training step that calls m2po_loss: compile time, cold and warm, and the
compiled step against the eager one, on the benchmark's device.

The step: a linear policy (features -> logits -> log-softmax -> the taken tokens' log-probs),
``m2po_loss`` (paper variant, tau 0.04, validate=False), backward; ``torch.compile(step,
fullgraph=True)`` with Inductor. A compiled step's first call traces it (Dynamo), builds the
forward and backward graphs (AOTAutograd) and generates and compiles their code (Inductor); its
first backward runs the compiled backward.

- cold: a fresh process with empty compile caches (a new ``TORCHINDUCTOR_CACHE_DIR`` and
  ``TRITON_CACHE_DIR``): what the first run on a machine pays;
- warm: a second fresh process on the same caches: what a restarted trainer pays (Dynamo traces
  again; Inductor's FX graph cache and the compiled code load from disk).

Each is the wall time of the first forward + backward (compile included), then the median of
the steady-state steps, compiled and eager, and the graph count and breaks torch._dynamo.explain
finds. A measurement, not a test (tests/test_compile.py checks the graph and the numbers).

    python -m bench.compile_time          # make bench records it in the JSON
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROWS, ROW_LEN, HIDDEN, VOCAB = 8, 512, 64, 256
STEPS = 20


def _child(device_name: str) -> dict:
    """One process's figures (run with fresh or warm caches by measure())."""
    import torch

    import m2po_ops

    if device_name == "cpu":  # (as make bench: one intra-op thread, see bench/README.md)
        torch.set_num_threads(1)
    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    policy = torch.nn.Linear(HIDDEN, VOCAB).to(device)
    feats = torch.randn(ROWS, ROW_LEN, HIDDEN, generator=g).to(device)
    actions = torch.randint(0, VOCAB, (ROWS, ROW_LEN), generator=g).to(device)

    def logprobs():
        return torch.log_softmax(policy(feats), -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        olp = logprobs() + (torch.randn(ROWS, ROW_LEN, generator=g) * 0.3).to(device)
    adv = torch.randn(ROWS, ROW_LEN, generator=g).to(device)
    mask = (torch.rand(ROWS, ROW_LEN, generator=g) < 0.9).to(device)

    def step(olp, adv, mask):
        loss, metrics = m2po_ops.m2po_loss(logprobs(), olp, adv, mask, validate=False)
        return loss, metrics["masked_fraction"]

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        policy.zero_grad()
        loss, _ = fn(olp, adv, mask)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    compiled = torch.compile(step, fullgraph=True)
    first = timed(compiled)
    compiled_s = statistics.median(timed(compiled) for _ in range(STEPS))
    eager_s = statistics.median(timed(step) for _ in range(STEPS))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(olp, adv, mask)
    return {"first_call_s": first, "compiled_step_ms": compiled_s * 1e3, "eager_step_ms": eager_s * 1e3,
            "graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count}


def _run_child(device_name: str, cache: str, timeout_s: float) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.compile_time", "--child", device_name], env=env,
                          capture_output=True, text=True, timeout=timeout_s,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"compile_time child failed: {proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0  # (python and torch start-up included)
    return out


def measure(device_name: str = "cpu", timeout_s: float = 600.0) -> dict:
    """Cold and warm figures of the compiled step (two child processes on one fresh cache)."""
    with tempfile.TemporaryDirectory(prefix="m2po-compile-cache-") as cache:
        cold = _run_child(device_name, cache, timeout_s)
        warm = _run_child(device_name, cache, timeout_s)
    return {
        "device": device_name,
        "step": f"linear policy {HIDDEN}->{VOCAB}, {ROWS}x{ROW_LEN} tokens, log-softmax + gather, m2po_loss "
                "(paper, tau 0.04, validate=False), backward; torch.compile(fullgraph=True), Inductor",
        "cold": cold,
        "warm": warm,
        "method": "first_call_s: wall time of the first compiled forward+backward in a fresh process (cold: empty "
                  "TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR; warm: a second process on the same caches); step "
                  f"times: median of {STEPS} forward+backward calls after it",
    }


def line(c: dict) -> str:
    """One line for the report."""
    if c.get("error"):
        return f"torch.compile of a training step: not measured ({c['error'][:200]})"
    cold, warm = c["cold"], c["warm"]
    return (f"torch.compile of a training step ({c['device']}, fullgraph=True, {cold['graphs']} graph, "
            f"{cold['graph_breaks']} breaks): compile + first step {cold['first_call_s']:.1f} s cold, "
            f"{warm['first_call_s']:.1f} s warm (caches on disk); then {warm['compiled_step_ms']:.2f} ms a step "
            f"compiled, {warm['eager_step_ms']:.2f} ms eager")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(argv[1] if len(argv) > 1 else "cpu")))
        return 0
    import torch

    print(line(measure("cuda" if torch.cuda.is_available() else "cpu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
