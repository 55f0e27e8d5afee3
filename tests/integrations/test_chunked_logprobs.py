"""Memory-light log-probs (examples/chunked_logprobs.py) feeding m2po_loss, against the real TRL
1.16.0 and liger-kernel 0.8.5 (skipped where they are absent).

- Gradients: the hidden states' and the lm-head weight's gradients through each chunked head
  (the README's checkpointed slices, TRL's ``ChunkedLogProbFunction``, Liger's
  ``chunk_forward``) and ``m2po_loss`` equal those through the dense float32 log-softmax within
  1e-6 relative (norm-wise), at the same M2PO mask, with something masked.
- Memory: the peak resident memory of forward + backward of each path, measured in a
  subprocess (ru_maxrss, its high-water mark reset before each measurement) at vocabularies of
  32,768 and 152,064, 256 tokens: the dense path holds at least two tokens x vocab float32 tensors,
  the chunked ones less than the dense path at 152K, and TRL's and Liger's peaks grow with the
  vocabulary only by weight-sized buffers (their tiles are bounded). The README's table is this
  measurement.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration tests need trl (make test-integrations)")
pytest.importorskip("liger_kernel", reason="the chunked-head tests need liger-kernel (make test-integrations)")

from m2po_ops import m2po_loss, m2po_mask  # noqa: E402


@pytest.fixture(scope="module")
def cl(example):
    return example("chunked_logprobs")


def _batch(vocab=48, hidden_size=32, rows=4, T=64, seed=1):
    """Hidden states, lm-head weight, actions sampled from the policy, behaviour log-probs (the
    policy's, float64, plus noise), per-row advantages, right padding. A small vocabulary keeps
    log Z near 3.9: a float32 log-prob near -10 (log Z at a 40K vocabulary) carries ~5e-7 of
    rounding alone, the size of the tolerance, on every path alike."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T
        actions = torch.multinomial(torch.softmax(logits, -1).view(-1, vocab), 1, generator=g).view(rows, T)
        dense = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    old = (dense + 0.3 * torch.randn(rows, T, generator=g, dtype=torch.float64)).float()
    advantages = torch.randn(rows, generator=g)
    mask = torch.arange(T)[None, :] < torch.randint(T // 2, T + 1, (rows, 1), generator=g)
    return hidden, weight, actions, old, advantages, mask


def _grads(fn, batch):
    hidden, weight, actions, old, advantages, mask = batch
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs = fn(h, w, actions)
    loss, _ = m2po_loss(logprobs, old, advantages, mask, tau=0.04)
    loss.backward()
    keep, _ = m2po_mask(logprobs.detach(), old, advantages, mask, tau=0.04)
    return h.grad, w.grad, keep


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("path", ["recipe", "trl", "liger"])
def test_chunked_gradients_equal_the_dense_path(cl, monkeypatch, path):
    """Gradients of the hidden states and the lm-head weight through the chunked head and
    m2po_loss = the dense float32 path's within 1e-6 relative, at the same mask (not trivial).
    Small chunks, so each head runs several: the recipe 64 of the 256 tokens a slice, TRL 16 of
    the 48 vocabulary entries a tile, Liger 16 x 64 (its module constants, read at call time)."""
    import liger_kernel.chunked_loss.fused_linear_ppo as liger

    monkeypatch.setattr(liger, "_SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE", 16)
    monkeypatch.setattr(liger, "_SELECTIVE_LOGPROB_SEQ_CHUNK_SIZE", 64)
    heads = {"recipe": lambda h, w, t: cl.recipe_logprobs(h, w, t, chunk=64),
             "trl": lambda h, w, t: cl.trl_logprobs(h, w, t, chunk_size=16),
             "liger": cl.liger_logprobs}
    batch = _batch()
    dense_h, dense_w, dense_keep = _grads(cl.dense_logprobs, batch)
    h, w, keep = _grads(heads[path], batch)
    mask = batch[-1]
    assert bool((mask & ~dense_keep).any()), "nothing masked: the mask would not be exercised"
    assert torch.equal(keep, dense_keep)
    print(f"{path}: relative difference hidden {_rel(h, dense_h):.1e}, weight {_rel(w, dense_w):.1e}")
    assert _rel(h, dense_h) <= 1e-6, _rel(h, dense_h)
    assert _rel(w, dense_w) <= 1e-6, _rel(w, dense_w)


def test_peak_memory_at_32k_and_152k_vocabularies(cl):
    """Peak resident memory of forward + backward per path, in a subprocess (ru_maxrss), 256
    tokens, hidden 64: the dense path holds >= 2 tokens x vocab float32 tensors; at 152K every
    chunked path peaks below the dense one; from 32K to 152K the dense peak grows by >= 2 tokens x
    vocab tensors, TRL's and Liger's by <= 3 hidden x vocab ones. Prints the README table."""
    tokens, vocabs = 256, [32768, 152064]
    results = cl.measure_in_subprocess(list(cl.PATHS), vocabs, tokens, 64)
    print("\n" + cl.table(results))
    peak = {(r["path"], r["vocab"]): r["peak_mib"] for r in results}
    for v in vocabs:
        one = tokens * v * 4 / 2 ** 20
        assert peak["dense", v] >= 2 * one, (v, peak["dense", v], one)
    for p in ("recipe", "trl", "liger"):
        assert peak[p, 152064] < peak["dense", 152064], (p, peak)
    # from 32K to 152K the dense path grows by logits-sized tensors (tokens x vocab), TRL's and
    # Liger's by weight-sized ones only (hidden x vocab: the float32 weight gradient they build)
    grown = (vocabs[1] - vocabs[0]) * 4 / 2 ** 20
    assert peak["dense", 152064] - peak["dense", 32768] >= 2 * tokens * grown, peak
    for p in ("trl", "liger"):
        assert peak[p, 152064] - peak[p, 32768] <= 3 * 64 * grown, (p, peak)
