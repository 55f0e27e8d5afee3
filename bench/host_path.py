"""The fused backend's host path: what one m2po_loss call costs the CPU thread that launches it.

On a GPU the fused call is a fixed number of asynchronous kernel launches; at small batches the
time the host spends getting to them (argument checks, the flat token view, workspace slices,
launch arguments, autograd) is the whole cost. This measures it with the kernels stubbed:
``m2po_ops.triton_backend.launch_log(execute=False)`` records every launch without running it (no
GPU, no interpreter), outputs are left uncomputed, and backward still runs. It is compared with
a plain eager GRPO-style loss on the same tensors (sub, clamp, exp, mul, where, sum, div and its
backward), the least a trainer's own loss code does per call.

    python -m bench.host_path            # one line; make bench records it in the JSON

The goal is a ratio <= 0.6 (fused host path / eager loss). This is a measurement, not a test. It also
times an autograd.Function that does nothing (``_Passthrough``): the Python floor under any
loss with a custom backward, to read the fused figure against.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from .timing import gc_paused

N_TOKENS = 4096
CALLS = 1000


def _eager_grpo(logprobs, old_logprobs, advantages, mask):
    """A plain GRPO-style token-mean loss in eager PyTorch (no clip decision, no mask solve)."""
    ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -20.0, 20.0))
    terms = torch.where(mask, -advantages * ratio, torch.zeros((), dtype=ratio.dtype))
    return terms.sum() / mask.sum().clamp_min(1)


class _Passthrough(torch.autograd.Function):
    """The least a loss with its own backward costs in Python: an autograd.Function whose
    forward returns a precomputed loss and whose backward returns a precomputed gradient (no
    checks, no launches, no arithmetic). The floor of any design built on autograd.Function."""

    @staticmethod
    def forward(ctx, logprobs, loss, grad):
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.grad, None, None


def measure(n_tokens: int = N_TOKENS, calls: int = CALLS, dtype: torch.dtype = torch.float32,
            variant: str = "paper") -> dict:
    """Median host time of one forward+backward of the fused call (kernels stubbed) and of the
    eager loss, on a bench-layout batch (rows of 2048 tokens, per-token advantages, bool mask),
    interleaved call by call. Returns the fields make bench records."""
    import m2po_ops
    from m2po_ops import triton_backend

    from .inputs import make_batch

    batch = make_batch(n_tokens, "typical", {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    lp, olp, adv, mask = batch.args()

    def fused():
        lp.grad = None
        loss, _ = m2po_ops.m2po_loss(lp, olp, adv, mask, variant=variant, backend="triton", validate=False)
        loss.backward()

    def eager():
        lp.grad = None
        _eager_grpo(lp, olp, adv, mask).backward()

    loss0, grad0 = torch.zeros(()), torch.zeros_like(lp)

    def floor():
        lp.grad = None
        _Passthrough.apply(lp, loss0, grad0).backward()

    with triton_backend.launch_log(execute=False) as launches, gc_paused():
        fused()  # warm-up (imports, caches)
        launches_per_call = len(launches)
        eager()
        floor()
        t_fused, t_eager, t_floor = [], [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            fused()
            t1 = time.perf_counter()
            eager()
            t2 = time.perf_counter()
            floor()
            t3 = time.perf_counter()
            t_fused.append(t1 - t0)
            t_eager.append(t2 - t1)
            t_floor.append(t3 - t2)
    fused_us, eager_us = statistics.median(t_fused) * 1e6, statistics.median(t_eager) * 1e6
    floor_us = statistics.median(t_floor) * 1e6
    return {
        "n_tokens": batch.n_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "variant": variant,
        "calls": calls,
        "launches_per_call": launches_per_call,
        "fused_us": fused_us,
        "eager_us": eager_us,
        "ratio": fused_us / eager_us,
        "function_floor_us": floor_us,
        "function_floor_ratio": floor_us / eager_us,
        "goal_ratio": 0.6,
        "method": "median host wall time of forward+backward, calls interleaved with the eager loss; the fused "
                  "call under m2po_ops.triton_backend.launch_log(execute=False): launches recorded, not run",
    }


def main() -> int:
    torch.set_num_threads(1)
    h = measure()
    print(f"host path ({h['n_tokens']} tokens, {h['dtype']}, {h['launches_per_call']} launches stubbed): fused "
          f"{h['fused_us']:.0f} us, eager GRPO loss {h['eager_us']:.0f} us, ratio {h['ratio']:.2f} (goal <= 0.6); "
          f"an empty autograd.Function alone {h['function_floor_us']:.0f} us ({h['function_floor_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
