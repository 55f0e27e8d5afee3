"""Memory-light log-probs for M2PO: ``log softmax(hidden @ W.T)[token]`` without the ``(B, T, V)``
float32 tensor.

The usual way (``log_softmax(model(ids).logits.float(), -1).gather(...)``) materialises the
logits and their float32 log-softmax, and autograd keeps them for backward: 4 bytes x tokens x
vocabulary each, 1.25 GB for 2,048 tokens at Qwen's 152K vocabulary. The policy loss only needs
one log-prob per token, so the head can run a slice at a time and recompute in backward. Three
ways, all feeding ``m2po_loss`` unchanged:

- ``recipe_logprobs``: plain PyTorch, a slice of tokens at a time under activation
  checkpointing (the README's drop-in loop). Peak: a few (chunk x V) float32 tensors.
- ``trl_logprobs``: TRL's ``ChunkedLogProbFunction`` (trl >= 1.16; what ``GRPOTrainer`` runs
  through its fused LM head): tiles of tokens x 32,768 vocabulary entries, an online
  logsumexp, and a backward that recomputes each tile. Triton on CUDA, torch elsewhere.
- ``liger_logprobs``: Liger's ``LigerFusedLinearPPOBase.chunk_forward`` (liger-kernel 0.8.5):
  tiles of 2,048 tokens x 4,096 vocabulary entries, the same idea.

``dense_logprobs`` is the usual way, for comparison.

    python examples/chunked_logprobs.py                    # the peak-memory table (README)
    python examples/chunked_logprobs.py --path trl --vocab 152064   # one measurement
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from torch.utils.checkpoint import checkpoint

PATHS = ("dense", "recipe", "trl", "liger")


def dense_logprobs(hidden, weight, targets):
    """The (B, T, V) way: float32 logits, their log-softmax, a gather."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]


def recipe_logprobs(hidden, weight, targets, chunk=128):
    """log softmax(hidden @ weight.T)[targets], ``chunk`` tokens at a time; each slice is
    recomputed in backward (checkpoint), so autograd keeps no (chunk, V) tensor between the passes."""

    def piece(h, t):
        logits = (h @ weight.T).float()
        return logits.gather(-1, t[:, None])[:, 0] - logits.logsumexp(-1)

    h, t = hidden.flatten(0, -2), targets.flatten()
    out = [checkpoint(piece, h[i:i + chunk], t[i:i + chunk], use_reentrant=False) for i in range(0, t.numel(), chunk)]
    return torch.cat(out).view(targets.shape)


def trl_logprobs(hidden, weight, targets, chunk_size=32768):
    """TRL 1.16's chunked head (trl.kernels.ChunkedLogProbFunction), as its fused LM head calls it:
    hidden (N, H), weight (V, H), no bias, temperature 1, vocabulary tiles of ``chunk_size``
    (TRL's: 32,768), no softcapping, logit scale 1, no optional outputs."""
    from trl.kernels import ChunkedLogProbFunction

    h, t = hidden.flatten(0, -2), targets.flatten()
    logprobs = ChunkedLogProbFunction.apply(h, weight, None, t, 1.0, chunk_size, None, 1.0, ())[0]
    return logprobs.view(targets.shape)


def liger_logprobs(hidden, weight, targets):
    """liger-kernel 0.8.5's chunked head: ``LigerFusedLinearPPOBase.chunk_forward`` takes
    (B, T, H) hidden states and (B, T) targets and returns (B, T) float32 log-probs."""
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    h = hidden if hidden.dim() == 3 else hidden[None]
    return LigerFusedLinearPPOBase.chunk_forward(h, weight, targets.view(h.shape[:2])).view(targets.shape)


LOGPROBS = {"dense": dense_logprobs, "recipe": recipe_logprobs, "trl": trl_logprobs, "liger": liger_logprobs}


def make_batch(tokens, hidden_size, vocab, seed=0, rows=4):
    """A batch as a policy update sees it: hidden states (rows, T, H) and the lm-head weight (V, H)
    (leaves, so their gradients can be compared), sampled actions, behaviour log-probs a little
    off the current ones (dense log-probs plus noise, computed a row at a time), one advantage per
    row, right padding."""
    g = torch.Generator().manual_seed(seed)
    T = tokens // rows
    hidden = (torch.randn(rows, T, hidden_size, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5).requires_grad_()
    actions = torch.randint(0, vocab, (rows, T), generator=g)
    with torch.no_grad():
        old = torch.cat([dense_logprobs(hidden[r:r + 1], weight, actions[r:r + 1]) for r in range(rows)])
        old = old + 0.3 * torch.randn(rows, T, generator=g)
    advantages = torch.randn(rows, generator=g)
    mask = torch.arange(T)[None, :] < torch.randint(T // 2, T + 1, (rows, 1), generator=g)
    return hidden, weight, actions, old, advantages, mask


def m2po_step(path, hidden, weight, actions, old, advantages, mask, tau=0.04):
    """Log-probs through ``path``, then ``m2po_loss`` and backward. Returns the log-probs."""
    from m2po_ops import m2po_loss

    logprobs = LOGPROBS[path](hidden, weight, actions)
    loss, _ = m2po_loss(logprobs, old, advantages, mask, tau=tau)
    loss.backward()
    return logprobs.detach()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak() -> None:
    """Reset this process's resident-memory high-water mark (ru_maxrss, VmHWM) to its current
    resident size (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``), so that each measurement
    sees its own peak, not an earlier one (an import, the previous measurement)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(paths, vocabs, tokens, hidden_size):
    """Peak resident memory of one forward + backward (log-probs, m2po_loss, backward) per path and
    vocabulary, above what the process held just before it (the inputs included), in MiB:
    ru_maxrss after the step minus the resident size before it, the high-water mark reset first."""
    warm = make_batch(64, hidden_size, 512)  # load every lazy library and kernel before measuring
    for path in paths:
        m2po_step(path, *warm)
    out = []
    for vocab in vocabs:
        batch = make_batch(tokens, hidden_size, vocab)
        for path in paths:
            for leaf in batch[:2]:
                leaf.grad = None
            _reset_peak()
            base = _rss_kb()
            m2po_step(path, *batch)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out.append(dict(path=path, vocab=vocab, tokens=tokens, hidden=hidden_size, peak_mib=(peak - base) / 1024))
        del batch
    return out


def measure_in_subprocess(paths, vocabs, tokens, hidden_size):
    """``measure`` in a fresh interpreter. glibc is told to mmap every allocation of 128 KiB or
    more (MALLOC_MMAP_THRESHOLD_, which also stops it raising that threshold as it otherwise
    would), so that a freed tensor leaves the process and the next measurement starts clean."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(tokens), "--hidden", str(hidden_size),
           "--vocab", *map(str, vocabs), "--json", "--path", *paths]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results) -> str:
    vocabs = sorted({r["vocab"] for r in results})
    by = {(r["path"], r["vocab"]): r["peak_mib"] for r in results}
    r0 = results[0]
    lines = [f"{r0['tokens']} tokens, hidden {r0['hidden']}, float32; peak resident memory of forward + backward "
             "(MiB, above the inputs)", "",
             "| log-probs | " + " | ".join(f"vocab {v:,}" for v in vocabs) + " |",
             "|---|" + "---:|" * len(vocabs),
             "| one tokens x vocab float32 tensor | " + " | ".join(
                 f"{r0['tokens'] * v * 4 / 2 ** 20:,.0f}" for v in vocabs) + " |"]
    names = {"dense": "dense: `log_softmax(logits.float())`", "recipe": "README recipe (checkpointed slices)",
             "trl": "TRL `ChunkedLogProbFunction`", "liger": "Liger `chunk_forward`"}
    for p in PATHS:
        if (p, vocabs[0]) in by:
            lines.append(f"| {names[p]} | " + " | ".join(f"{by[(p, v)]:,.0f}" for v in vocabs) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", choices=PATHS, nargs="*", default=list(PATHS))
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 152064])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--json", action="store_true", help="measure in this process, print JSON")
    a = p.parse_args()
    if a.json:
        print(json.dumps(measure(a.path, a.vocab, a.tokens, a.hidden)))
        return
    print(table(measure_in_subprocess(a.path, a.vocab, a.tokens, a.hidden)))


if __name__ == "__main__":
    main()
