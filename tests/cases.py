"""Seeded random M2PO inputs shared by the test files: the random suite.

``case_grid(layout, chunk)`` lists case settings cycling through every combination of tau,
data style and dtype; ``make_case(**settings)`` builds the inputs (ties common on the grid
styles, 0 to 100% padding, 2-D / packed / packed with cu_seqlens, per-token or per-sequence
advantages, every mask dtype).

For parametrised tests: ``BACKENDS`` (the ``backend`` parameter of a test of an op both backends
implement), ``case_param(spec)`` (a case with a readable id such as
``seed1003-2d-B3xT63-fine-fp32-tau0.04-mask-int``), ``shape_id``. Fixed batches:
``regime_batch`` (flat, in a regime: nothing to mask, some, ties) and ``batch_2d``.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

TAUS = (0.0, 0.01, 0.04, 1.0, math.inf)
STYLES = ("grid", "fine", "no_tr", "all_above")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_KINDS = ("bool", "int", "float", "none")
LAYOUTS = ("2d", "packed", "packed_cu")
VARIANTS = ("paper", "official")
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the Triton backend needs triton")
# The ``backend`` parameter of a test that checks an op both backends implement. The Triton
# backend runs where the ``device`` fixture says (conftest.py): such a test takes ``device``.
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=needs_triton)]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# --------------------------------------------------------------------------------------------
# Case generation


class Case:
    """One call's inputs plus the flat per-token view the oracles use."""

    def __init__(self, lp, olp, adv, mask, cu, valid_flat, adv_flat, desc):
        self.lp, self.olp, self.adv, self.mask, self.cu = lp, olp, adv, mask, cu
        self.valid_flat, self.adv_flat, self.desc = valid_flat, adv_flat, desc

    def kwargs(self):
        return dict(cu_seqlens=self.cu) if self.cu is not None else {}


def _layout(rng, layout, max_tokens=300, per_seq=False):
    """Shape, sequence offsets and, per token, sequence id (-1 outside every sequence)."""
    if layout == "2d":
        b = int(rng.integers(0, 7))
        t = int(rng.integers(0, max_tokens // max(b, 1) + 1))
        seq = np.repeat(np.arange(b), t)
        return (b, t), None, seq, b
    if layout == "packed":
        n = int(rng.integers(0, max_tokens + 1))
        return (n,), None, np.zeros(n, dtype=np.int64), 0
    # packed with cu_seqlens, sometimes with tokens before the first / after the last sequence
    lead = int(rng.integers(0, 4)) if rng.random() < 0.3 else 0
    tail = int(rng.integers(0, 4)) if rng.random() < 0.3 else 0
    s = int(rng.integers(0, 9))
    body = int(rng.integers(0, max_tokens - lead - tail + 1))
    cuts = np.sort(rng.integers(0, body + 1, size=max(s - 1, 0))) if s > 0 else np.array([], dtype=np.int64)
    lengths = np.diff(np.concatenate([[0], cuts, [body]])) if s > 0 else np.array([], dtype=np.int64)
    if s == 0:
        body = 0
    cu = [lead] + list(lead + np.cumsum(lengths)) if s > 0 else [lead]
    if per_seq and lead + body + tail == s and s > 0:
        # (N,) advantages for N tokens and N sequences read as per-token (ambiguous): avoid
        tail += 1
    n = lead + body + tail
    seq = np.full(n, -1, dtype=np.int64)
    for i in range(s):
        seq[cu[i] : cu[i + 1]] = i
    return (n,), [int(c) for c in cu], seq, s


def make_case(seed, layout, per_seq, mask_kind, dtype, style, tau, max_tokens=300):
    rng = np.random.default_rng(seed)
    shape, cu, seq, num_seqs = _layout(rng, layout, max_tokens, per_seq)
    n = int(np.prod(shape))

    # mask: 0 to 100% padding
    p = rng.choice([0.0, 1.0, rng.random()], p=[0.1, 0.2, 0.7])
    valid = rng.random(n) < p
    if mask_kind == "none":
        valid[:] = True

    # advantages (per token, or per sequence broadcast to tokens)
    def draw_adv(k):
        if style == "fine":
            return rng.normal(size=k)
        return rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=k)

    if per_seq:
        adv_seq = draw_adv(num_seqs)
        adv_tok = np.where(seq >= 0, adv_seq[np.clip(seq, 0, None)] if num_seqs > 0 else 0.0, 0.0)
    else:
        adv_tok = draw_adv(n)

    # log-probs: on a coarse grid (ties common) or not
    if style == "fine":
        olp = -rng.exponential(1.0, size=n)
        delta = rng.normal(size=n) * rng.choice([0.05, 0.2, 0.5, 1.5])
        delta[rng.random(n) < 0.05] = 0.0
    else:
        olp = -rng.integers(0, 64, size=n) / 16.0
        k_max = int(rng.choice([2, 3, 6]))  # few distinct values: large tie classes
        if 0 < tau < math.inf and rng.random() < 0.7:
            # a power-of-two step putting the mean m2 near tau: the cut falls inside a tie class
            scale = 2.0 ** round(math.log2(math.sqrt(tau) / (k_max / 2)))
        else:
            scale = rng.choice([1 / 16, 1 / 8, 1 / 2])
        delta = rng.integers(-k_max, k_max + 1, size=n) * scale
        if style == "no_tr":
            # every token has A == 0, or delta of the opposite sign of A (or 0)
            if rng.random() < 0.3:
                adv_tok = np.zeros(n)
                if per_seq:
                    adv_seq = np.zeros(num_seqs)
            delta = -np.sign(adv_tok) * np.abs(delta)
        elif style == "all_above":
            # every trust-region token has m2 > tau (tau = inf cannot have any)
            floor = 2.0 * math.sqrt(tau) if 0 < tau < math.inf else 0.5
            floor = max(0.5, math.ceil(floor * 8) / 8)
            mag = floor + rng.integers(0, 9, size=n) / 8.0
            agree = rng.random(n) < 0.7
            delta = np.where(agree, 1.0, -1.0) * np.sign(adv_tok) * mag
    lp = olp + delta

    lp_t = torch.tensor(lp, dtype=torch.float64).reshape(shape).to(dtype)
    olp_t = torch.tensor(olp, dtype=torch.float64).reshape(shape).to(dtype)
    if per_seq:
        adv_t = torch.tensor(adv_seq, dtype=torch.float64).to(dtype)
        adv_flat = torch.tensor(adv_tok, dtype=torch.float64).to(dtype)
    else:
        adv_t = torch.tensor(adv_tok, dtype=torch.float64).reshape(shape).to(dtype)
        adv_flat = adv_t.reshape(-1)
    valid_t = torch.tensor(valid, dtype=torch.bool).reshape(shape)
    if mask_kind == "bool":
        mask = valid_t
    elif mask_kind == "int":
        mask = valid_t.to([torch.int64, torch.int32, torch.uint8][seed % 3])
    elif mask_kind == "float":
        mask = valid_t.to([torch.float32, torch.bfloat16, torch.float64][seed % 3])
    else:
        mask = None
    valid_flat = valid_t.reshape(-1) & torch.tensor(seq >= 0 if cu is not None else np.ones(n, dtype=bool))
    desc = f"seed={seed} layout={layout} shape={shape} cu={cu} per_seq={per_seq} mask={mask_kind} dtype={dtype} style={style} tau={tau}"
    return Case(lp_t, olp_t, adv_t, mask, cu, valid_flat, adv_flat, desc)


def case_grid(layout, chunk, count=60):
    """count cases cycling tau (5) x style (4) x dtype (3): all 60 combinations per 60 cases."""
    out = []
    per_seq = layout != "packed" and chunk % 2 == 1
    for j in range(count):
        i = chunk * count + j
        seed = 1000 * (["2d", "packed", "packed_cu"].index(layout) + 1) + i
        out.append(
            dict(
                seed=seed,
                layout=layout,
                per_seq=per_seq,
                mask_kind=MASK_KINDS[(j // 5) % 4],
                dtype=DTYPES[j % 3],
                style=STYLES[j % 4],
                tau=TAUS[j % 5],
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Readable ids for parametrised cases


def shape_id(seed, layout, per_seq=False, max_tokens=300):
    """The case's layout as make_case draws it: ``B3xT63`` (2-D), ``N250`` (packed), ``N250-S4``
    (packed with 4 sequences in cu_seqlens; ``-with-empty-seq`` when one of them has no token)."""
    shape, cu, _, num_seqs = _layout(np.random.default_rng(seed), layout, max_tokens, per_seq)
    if layout == "2d":
        return f"B{shape[0]}xT{shape[1]}"
    if layout == "packed":
        return f"N{shape[0]}"
    empty = "-with-empty-seq" if any(b == a for a, b in zip(cu, cu[1:])) else ""
    return f"N{shape[0]}-S{num_seqs}{empty}"


def case_id(spec):
    """``seed1003-2d-B3xT63-fine-fp32-tau0.04-mask-int[-per-seq]`` for make_case(**spec)."""
    layout = spec["layout"]
    parts = [f"seed{spec['seed']}", "cu" if layout == "packed_cu" else layout,
             shape_id(spec["seed"], layout, spec["per_seq"], spec.get("max_tokens", 300)), spec["style"],
             DTYPE_IDS[spec["dtype"]], f"tau{spec['tau']:g}", f"mask-{spec['mask_kind']}"]
    if spec["per_seq"]:
        parts.append("per-seq")
    return "-".join(parts)


def case_param(spec, *extra_values, suffix=""):
    """pytest.param(spec, *extra_values) with the case's readable id (plus ``suffix``)."""
    return pytest.param(spec, *extra_values, id=case_id(spec) + suffix)


def regime_batch(regime, n=3000, seed=0, device="cpu"):
    """Flat (N,) inputs in a regime: "none" (|delta| ~ 0.01: nothing to mask at tau 0.04), "some"
    (|delta| ~ 0.2) or "ties" (delta on a 0.5 grid), per-token advantages, ~10% padding."""
    g = torch.Generator().manual_seed(seed)
    olp = -torch.rand(n, generator=g) * 3
    noise = {"none": 0.01, "some": 0.2, "ties": 0.0}[regime]
    delta = torch.randn(n, generator=g) * noise
    if regime == "ties":
        delta = torch.randint(-2, 3, (n,), generator=g).float() * 0.5
    adv = torch.randn(n, generator=g)
    return tuple(x.to(device) for x in ((olp + delta), olp, adv, torch.rand(n, generator=g) < 0.9))


def batch_2d(device, b=4, t=50, seed=0):
    """A (B, T) float32 batch: |delta| ~ 0.4, per-token advantages, ~10% padding."""
    g = torch.Generator().manual_seed(seed)
    olp = -torch.rand(b, t, generator=g) * 3
    lp = olp + torch.randn(b, t, generator=g) * 0.4
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.9
    return tuple(x.to(device) for x in (lp, olp, adv, mask))
