"""The paper's staleness experiment at toy scale, on CPU, through m2po_ops.m2po_loss.

Task: n-digit addition ("a+b=", answer n+1 digits, least significant first), reward 1 only for
the exact answer. Policy: a tiny causal transformer (d=64, 2 layers, 4 heads, ~100K params),
warm-started by supervised training to ~25-35% sampled accuracy, then trained with GRPO
(group-normalised advantages, one Adam step per batch, grad-norm clip 1.0) on stale data:
a FIFO of rollout batches pre-filled with s batches from the initial policy, so update k
trains on the batch the policy of update k - s sampled, with its stored behaviour log-probs.

Methods (the competitors are written here; M2PO goes through the library's public op):
  onpolicy       s = 0, loss -r*A (r == 1 up to rounding: plain policy gradient)
  clip           PPO clipped surrogate, eps = 0.2, at s
  notr           no trust region, -r*A, at s
  m2po           m2po_ops.m2po_loss(variant="paper", tau=0.04) at s
  m2po_official  m2po_ops.m2po_loss(variant="official", tau=0.04) at s

Usage:
  python examples/stale_rl.py --quick            # ~5 min on one CPU thread
  python examples/stale_rl.py                    # 3 seeds x 5 methods, the README numbers
  python examples/stale_rl.py --methods notr --lr 5e-4 --updates 3000 --tag collapse_lr5e-4

Writes examples/results/stale_rl[_TAG].json and .png and prints a table. Warm-start
checkpoints are cached per (seed, task) under --cache-dir so every method starts from the same
weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import m2po_ops  # noqa: E402

METHODS = ("onpolicy", "clip", "notr", "m2po", "m2po_official")
LABELS = {
    "onpolicy": "on-policy (s=0)",
    "clip": "PPO clip eps=0.2",
    "notr": "no trust region (r*A)",
    "m2po": "M2PO tau=0.04 (paper)",
    "m2po_official": "M2PO tau=0.04 (official)",
}
COLORS = {"onpolicy": "k", "clip": "tab:red", "notr": "tab:orange", "m2po": "tab:blue", "m2po_official": "tab:cyan"}


# ----------------------------------------------------------------------------- task


class Task:
    """n-digit addition in base b. Tokens: digits 0..b-1, '+' = b, '=' = b + 1."""

    def __init__(self, digits: int = 4, base: int = 10):
        self.digits, self.base = digits, base
        self.plus, self.eq = base, base + 1
        self.vocab = base + 2
        self.prompt_len = 2 * digits + 2
        self.answer_len = digits + 1
        self.seq_len = self.prompt_len + self.answer_len
        self.max_operand = base**digits

    def _digits(self, x: torch.Tensor, n: int, msb_first: bool) -> torch.Tensor:
        powers = self.base ** torch.arange(n, dtype=torch.int64)
        d = (x.unsqueeze(-1) // powers) % self.base  # least significant first
        return d.flip(-1) if msb_first else d

    def prompts(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        return torch.cat(
            [
                self._digits(a, self.digits, True),
                torch.full((n, 1), self.plus, dtype=torch.int64),
                self._digits(b, self.digits, True),
                torch.full((n, 1), self.eq, dtype=torch.int64),
            ],
            1,
        )

    def answers(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._digits(a + b, self.answer_len, False)

    def key(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * self.max_operand + b

    def draw(self, n: int, gen: torch.Generator, exclude: torch.Tensor | None = None):
        """n random (a, b) pairs whose key is not in `exclude` (sorted 1-D int64)."""
        out_a, out_b, have = [], [], 0
        while have < n:
            a = torch.randint(0, self.max_operand, (2 * (n - have) + 8,), generator=gen)
            b = torch.randint(0, self.max_operand, (2 * (n - have) + 8,), generator=gen)
            if exclude is not None and exclude.numel():
                ok = ~torch.isin(self.key(a, b), exclude)
                a, b = a[ok], b[ok]
            out_a.append(a)
            out_b.append(b)
            have += a.numel()
        return torch.cat(out_a)[:n], torch.cat(out_b)[:n]


# ----------------------------------------------------------------------------- policy


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, cache=None):
        """cache: None (full causal pass) or a list that holds this block's (k, v) for decoding."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        # one new token attends to everything before it; a prefill / full pass is causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Policy(nn.Module):
    """A causal transformer; the answer distribution is a softmax over the digit logits."""

    def __init__(self, task: Task, d: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.task = task
        self.tok = nn.Embedding(task.vocab, d)
        self.pos = nn.Embedding(task.seq_len, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, task.base)  # answers are digits only

    def forward(self, idx, caches=None, start: int = 0):
        x = self.tok(idx) + self.pos(torch.arange(start, start + idx.shape[1]))
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.head(self.ln(x))

    def answer_logits(self, seqs):
        """Logits (B, answer_len, base) for the answer tokens of full sequences (teacher forcing)."""
        t = self.task
        return self(seqs[:, : t.seq_len - 1])[:, t.prompt_len - 1 :]


@torch.inference_mode()
def generate(policy: Policy, prompts: torch.Tensor, temperature: float, greedy: bool = False):
    """Autoregressive answers. Returns (answers (B, L), behaviour log-probs (B, L) at temperature)."""
    caches = [[] for _ in policy.blocks]  # KV cache: prefill the prompt, then one token a step
    inp, pos = prompts, 0
    toks, lps = [], []
    for _ in range(policy.task.answer_len):
        logits = policy(inp, caches, pos)[:, -1]
        pos += inp.shape[1]
        logp = F.log_softmax(logits / temperature, -1)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(logp.exp(), 1).squeeze(1)
        toks.append(nxt)
        lps.append(logp.gather(1, nxt[:, None]).squeeze(1))
        inp = nxt[:, None]
    return torch.stack(toks, 1), torch.stack(lps, 1)


@torch.inference_mode()
def accuracy(policy: Policy, a, b, temperature: float, greedy: bool, chunk: int = 500) -> float:
    task, correct = policy.task, 0
    for i in range(0, a.numel(), chunk):
        aa, bb = a[i : i + chunk], b[i : i + chunk]
        ans, _ = generate(policy, task.prompts(aa, bb), temperature, greedy)
        correct += (ans == task.answers(aa, bb)).all(1).sum().item()
    return correct / a.numel()


# ----------------------------------------------------------------------------- warm start


def warm_start(task: Task, seed: int, heldout_keys, args, log) -> dict:
    """Supervised training on `sft_examples` examples until sampled accuracy on a separate
    validation set reaches `sft_target`. Cached per (seed, task, sizes)."""
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    name = f"warm_d{task.digits}_b{task.base}_s{seed}_n{args.sft_examples}_t{args.sft_target}_m{args.d_model}" + (
        f"_T{args.temperature}" if args.temperature != 1.0 else ""
    ) + ".pt"
    path = cache / name
    if path.exists():
        ck = torch.load(path, weights_only=False)
        log(f"  seed {seed}: warm start from cache {path} (val acc {ck['info']['val_acc']:.3f})")
        return ck
    torch.manual_seed(10_000 + seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    va, vb = task.draw(args.sft_val, gen, heldout_keys)
    excl = torch.sort(torch.cat([heldout_keys, task.key(va, vb)])).values
    a, b = task.draw(args.sft_examples, gen, excl)
    seqs = torch.cat([task.prompts(a, b), task.answers(a, b)], 1)
    policy = Policy(task, d=args.d_model)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_lr, weight_decay=0.0)
    t0, step, acc, reached = time.time(), 0, 0.0, False
    while step < args.sft_max_steps:
        perm = torch.randperm(seqs.shape[0], generator=gen)
        for i in range(0, seqs.shape[0] - args.sft_batch + 1, args.sft_batch):
            s = seqs[perm[i : i + args.sft_batch]]
            logits = policy.answer_logits(s)
            loss = F.cross_entropy(logits.reshape(-1, task.base), s[:, task.prompt_len :].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % args.sft_check_every == 0:
                acc = accuracy(policy, va, vb, args.temperature, greedy=False)
                if acc >= args.sft_target:
                    reached = True
                    break
            if step >= args.sft_max_steps:
                break
        if reached:
            break
    info = {"seed": seed, "steps": step, "val_acc": acc, "reached": reached, "seconds": round(time.time() - t0, 1)}
    log(f"  seed {seed}: warm start {step} steps, val sampled acc {acc:.3f}, reached={reached}, {info['seconds']} s")
    ck = {"state": policy.state_dict(), "info": info}
    torch.save(ck, path)
    return ck


# ----------------------------------------------------------------------------- losses


def policy_loss(method: str, logprobs, old_logprobs, adv, mask, args):
    """The per-method objective over the answer tokens (token-mean over valid tokens)."""
    if method in ("m2po", "m2po_official"):
        variant = "paper" if method == "m2po" else "official"
        loss, met = m2po_ops.m2po_loss(logprobs, old_logprobs, adv, mask, tau=args.tau, variant=variant, backend="auto")
        return loss, met
    ratio = torch.exp(logprobs - old_logprobs)
    n = mask.sum()
    if method == "clip":
        surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - args.clip_eps, 1 + args.clip_eps) * adv)
    elif method in ("notr", "onpolicy"):
        surr = ratio * adv
    else:
        raise ValueError(method)
    return -(surr * mask).sum() / n, None


@torch.no_grad()
def diagnostics(logprobs, old_logprobs, adv, mask, entropy, args) -> dict:
    """What each rule would do on this batch, whatever the method being trained."""
    delta = (logprobs - old_logprobs).float()
    ratio = delta.exp()
    valid = mask.bool()
    clipped = valid & (((adv > 0) & (ratio > 1 + args.clip_eps)) | ((adv < 0) & (ratio < 1 - args.clip_eps)))
    unclipped = valid & ~clipped
    keep, met = m2po_ops.m2po_mask(logprobs, old_logprobs, adv, mask, tau=args.tau, variant="paper")
    masked = valid & ~keep
    nan = float("nan")
    return {
        "clip_fraction": clipped.sum().item() / valid.sum().item(),
        "m2po_masked_fraction": met["masked_fraction"].item(),
        "m2": met["m2"].item(),
        "m2_after": met["m2_after"].item(),
        "trust_region_fraction": met["trust_region_fraction"].item(),
        "ratio_max": met["ratio_max"].item(),
        "kl": met["kl"].item(),
        "m2_all": (delta[valid] ** 2).mean().item(),
        "entropy_clipped": entropy[clipped].mean().item() if clipped.any() else nan,
        "entropy_unclipped": entropy[unclipped].mean().item() if unclipped.any() else nan,
        "entropy_masked": entropy[masked].mean().item() if masked.any() else nan,
        "entropy": entropy[valid].mean().item(),
    }


# ----------------------------------------------------------------------------- GRPO


def sample_batch(policy, task, gen, heldout_keys, args):
    a, b = task.draw(args.prompts, gen, heldout_keys)
    a, b = a.repeat_interleave(args.group), b.repeat_interleave(args.group)
    prompts = task.prompts(a, b)
    ans, old_lp = generate(policy, prompts, args.temperature)
    reward = (ans == task.answers(a, b)).all(1).float()
    r = reward.view(args.prompts, args.group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
    return {"seqs": torch.cat([prompts, ans], 1), "old_lp": old_lp, "adv": adv, "reward": reward.mean().item()}


def nanmean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def train(method: str, seed: int, warm: dict, task: Task, heldout, args, log) -> dict:
    staleness = 0 if method == "onpolicy" else args.staleness
    torch.manual_seed(1_000 * seed + 7)
    gen = torch.Generator().manual_seed(30_000 + seed)  # same prompt stream for every method
    policy = Policy(task, d=args.d_model)
    policy.load_state_dict(warm["state"])
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    ha, hb, hkeys = heldout
    eval_n = args.eval_prompts
    mask = torch.ones(args.prompts * args.group, task.answer_len)

    fifo = deque(sample_batch(policy, task, gen, hkeys, args) for _ in range(staleness))
    curve, window = [], []
    t0 = time.time()

    def evaluate(k):
        n = eval_n if k < args.updates else ha.numel()  # interim evals may use fewer prompts
        row = {
            "update": k,
            "acc_sampled": accuracy(policy, ha[:n], hb[:n], args.temperature, greedy=False),
            "acc_greedy": accuracy(policy, ha[:n], hb[:n], args.temperature, greedy=True),
            "eval_prompts": n,
            "seconds": round(time.time() - t0, 1),
        }
        if window:
            for key in window[0]:
                row[key] = nanmean([w[key] for w in window])
            row["ratio_max_window"] = max(w["ratio_max"] for w in window)
            window.clear()
        curve.append(row)
        return row

    evaluate(0)
    nonfinite = 0
    for k in range(args.updates):
        fifo.append(sample_batch(policy, task, gen, hkeys, args))
        batch = fifo.popleft()
        logits = policy.answer_logits(batch["seqs"]) / args.temperature
        logp_all = F.log_softmax(logits, -1)
        answer = batch["seqs"][:, task.prompt_len :]
        logprobs = logp_all.gather(2, answer[..., None]).squeeze(2)
        loss, met = policy_loss(method, logprobs, batch["old_lp"], batch["adv"][:, None].expand_as(logprobs), mask, args)
        if not torch.isfinite(loss):
            nonfinite += 1
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            d = diagnostics(logprobs.detach(), batch["old_lp"], batch["adv"][:, None].expand_as(logprobs), mask, entropy, args)
        d["loss"] = loss.item()
        d["grad_norm"] = gnorm.item()
        d["train_reward"] = batch["reward"]
        if met is not None:
            d["op_masked_fraction"] = met["masked_fraction"].item()
            d["op_m2_after"] = met["m2_after"].item()
        window.append(d)
        if (k + 1) % args.log_every == 0 or k + 1 == args.updates:
            row = evaluate(k + 1)
            log(
                f"    {method:14s} seed {seed} upd {k + 1:5d} acc {row['acc_sampled']:.3f}/{row['acc_greedy']:.3f} "
                f"clip {row.get('clip_fraction', 0):.3f} mask {row.get('m2po_masked_fraction', 0):.3f} "
                f"m2 {row.get('m2', 0):.3f}->{row.get('m2_after', 0):.3f} rmax {row.get('ratio_max_window', 0):.2f} "
                f"H(clip/unclip) {row.get('entropy_clipped', 0):.2f}/{row.get('entropy_unclipped', 0):.2f} "
                f"[{row['seconds']:.0f}s]"
            )
    final = curve[-1]
    return {
        "method": method,
        "seed": seed,
        "staleness": staleness,
        "curve": curve,
        "final_acc_sampled": final["acc_sampled"],
        "final_acc_greedy": final["acc_greedy"],
        "best_acc_sampled": max(r["acc_sampled"] for r in curve),
        "nonfinite_losses": nonfinite,
        "seconds": round(time.time() - t0, 1),
    }


# ----------------------------------------------------------------------------- summary, plot


def stats(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(runs, methods):
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        diag = {}
        for key in ("clip_fraction", "m2po_masked_fraction", "m2", "m2_after", "entropy_clipped", "entropy_unclipped", "ratio_max"):
            diag[key] = stats([nanmean([row.get(key, float("nan")) for row in r["curve"][1:]]) for r in rs])
        out[m] = {
            "final_acc_sampled": stats([r["final_acc_sampled"] for r in rs]),
            "final_acc_greedy": stats([r["final_acc_greedy"] for r in rs]),
            "best_acc_sampled": stats([r["best_acc_sampled"] for r in rs]),
            "run_diagnostics_mean_over_updates": diag,
            "seconds_per_run": stats([r["seconds"] for r in rs]),
            "per_seed_final_acc_sampled": {str(r["seed"]): r["final_acc_sampled"] for r in rs},
        }
    return out


def table(summary, warm_acc) -> str:
    head = (
        "| method | s | sampled acc | greedy acc | clip frac (eps=0.2) | M2PO masked frac | m2 -> m2 after mask | "
        "entropy clipped / unclipped |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for m, s in summary.items():
        d = s["run_diagnostics_mean_over_updates"]

        def f(x, p=3):
            return f"{x['mean']:.{p}f} ± {x['std']:.{p}f}"

        lines.append(
            f"| {LABELS.get(m, m)} | {s['staleness']} | {f(s['final_acc_sampled'])} | {f(s['final_acc_greedy'])} | "
            f"{100 * d['clip_fraction']['mean']:.2f}% | {100 * d['m2po_masked_fraction']['mean']:.2f}% | "
            f"{d['m2']['mean']:.3f} -> {d['m2_after']['mean']:.3f} | "
            f"{d['entropy_clipped']['mean']:.2f} / {d['entropy_unclipped']['mean']:.2f} |"
        )
    lines.append(f"\nWarm start (sampled acc on the held-out prompts): {f'{warm_acc:.3f}' if warm_acc == warm_acc else 'n/a'}")
    return "\n".join(lines)


def mean_curve(rs, key):
    xs = [row["update"] for row in rs[0]["curve"]]
    ys = [[r["curve"][i].get(key, float("nan")) for r in rs] for i in range(len(xs))]
    mean = [nanmean(y) for y in ys]
    lo = [min([v for v in y if v == v], default=float("nan")) for y in ys]
    hi = [max([v for v in y if v == v], default=float("nan")) for y in ys]
    return xs, mean, lo, hi


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, methods = result["runs"], result["config"]["methods"]
    s = result["config"]["staleness"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [
        (ax[0, 0], "acc_sampled", "held-out accuracy (sampled, T=%.1f)" % result["config"]["temperature"], methods, False),
        (ax[0, 1], "acc_greedy", "held-out accuracy (greedy)", methods, False),
        (ax[0, 2], "clip_fraction", "tokens eps=0.2 would clip (fraction)", methods, False),
        (ax[1, 0], "m2po_masked_fraction", "tokens M2PO (paper, tau=0.04) would mask", methods, False),
        (ax[1, 1], "m2", "m2 over trust region: before (solid) / after mask (dashed)", methods, True),
        (ax[1, 2], "entropy_clipped", "entropy: eps-clipped (solid) / unclipped (dashed)", methods, False),
    ]
    for a, key, title, ms, log_y in panels:
        for m in ms:
            rs = [r for r in runs if r["method"] == m]
            if not rs or (key in ("m2", "clip_fraction", "m2po_masked_fraction", "entropy_clipped") and m == "onpolicy"):
                continue  # on-policy: ratios are 1, nothing to clip or mask
            xs, mean, lo, hi = mean_curve(rs, key)
            if key not in ("acc_sampled", "acc_greedy"):
                xs, mean, lo, hi = xs[1:], mean[1:], lo[1:], hi[1:]
            a.plot(xs, mean, color=COLORS.get(m), label=LABELS.get(m, m))
            a.fill_between(xs, lo, hi, color=COLORS.get(m), alpha=0.15)
            if key == "m2":
                x2, m2a, _, _ = mean_curve(rs, "m2_after")
                a.plot(x2[1:], m2a[1:], color=COLORS.get(m), ls="--")
            if key == "entropy_clipped":
                x2, eu, _, _ = mean_curve(rs, "entropy_unclipped")
                a.plot(x2[1:], eu[1:], color=COLORS.get(m), ls="--")
        if key == "m2":
            a.axhline(result["config"]["tau"], color="gray", lw=0.8, ls=":")
        if log_y:
            a.set_yscale("log")
        a.set_title(title, fontsize=10)
        a.set_xlabel("update")
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=8, loc="lower right")
    seeds = sorted({r["seed"] for r in runs})
    fig.suptitle(
        f"Stale GRPO on {result['config']['digits']}-digit addition: s={s}, lr={result['config']['lr']}, "
        f"seeds {seeds} (line: mean, band: min-max)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 400 updates, s=128, 300-prompt interim evals (~5 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--staleness", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables the gradient-norm clip")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tau", type=float, default=0.04)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--digits", type=int, default=4)
    p.add_argument("--base", type=int, default=10)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heldout", type=int, default=1000, help="held-out prompts per seed (final evaluation)")
    p.add_argument("--eval-prompts", type=int, default=1000, help="held-out prompts for the interim evaluations")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sft-examples", type=int, default=50_000)
    p.add_argument("--sft-target", type=float, default=0.25)
    p.add_argument("--sft-batch", type=int, default=128)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-val", type=int, default=500)
    p.add_argument("--sft-check-every", type=int, default=10)
    p.add_argument("--sft-max-steps", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--out-dir", default=str(ROOT / "examples" / "results"))
    p.add_argument("--cache-dir", default=os.environ.get("STALE_RL_CACHE", str(Path.home() / ".cache" / "m2po_stale_rl")))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a results JSON")
    p.add_argument("--collapse-plot", nargs="+", metavar="JSON", help="only draw accuracy curves of several results JSONs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds if argv and "--seeds" in argv else [0]
        args.updates, args.staleness, args.eval_prompts = 400, 128, 300
        args.tag = args.tag or "quick"
    return args


def collapse_plot(paths, out):
    """Held-out sampled accuracy vs update, one panel per results JSON (the collapse attempts):
    colour = method, line style = seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(paths))
    rows = -(-len(paths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for a, path in zip(axes.flat, paths):
        res = json.loads(Path(path).read_text())
        c = res["config"]
        for r in res["runs"]:
            xs = [row["update"] for row in r["curve"]]
            a.plot(
                xs,
                [row["acc_sampled"] for row in r["curve"]],
                color=COLORS.get(r["method"]),
                ls=styles[r["seed"] % len(styles)],
                label=f"{r['method']} seed {r['seed']}",
            )
        a.set_title(
            f"s={c['staleness']} lr={c['lr']:g} gradclip={'off' if c['grad_clip'] <= 0 else c['grad_clip']:} "
            f"T={c['temperature']:g} {c['digits']}-digit",
            fontsize=9,
        )
        a.set_ylim(-0.02, 1.02)
        a.set_xlabel("update", fontsize=8)
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    for a in list(axes.flat)[len(paths) :]:
        a.axis("off")
    fig.suptitle("collapse attempts: held-out sampled accuracy (black on-policy, orange no-TR, blue M2PO)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)


def _git_head() -> str:
    """The repository commit the run used (best effort; a dirty tree is marked)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "m2po_ops"], cwd=ROOT, capture_output=True, text=True).stdout
        return head + ("+dirty(m2po_ops)" if dirty.strip() else "")
    except Exception:
        return "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        plot(res, Path(args.replot).with_suffix(".png"))
        return res
    if args.collapse_plot:
        out = Path(args.out_dir) / f"stale_rl_{args.tag or 'collapse'}.png"
        collapse_plot(args.collapse_plot, out)
        print(f"wrote {out}")
        return {}
    torch.set_num_threads(args.threads)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    task = Task(args.digits, args.base)
    backend = m2po_ops.resolve_backend("auto", torch.device("cpu"))
    n_params = sum(p.numel() for p in Policy(task, d=args.d_model).parameters())
    log(f"task: {args.digits}-digit base-{args.base} addition, policy {n_params} params, m2po backend on CPU: {backend}")
    t_start = time.time()
    runs, warm_infos = [], []
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(40_000 + seed)
        ha, hb = task.draw(args.heldout, gen)
        hkeys = torch.sort(torch.unique(task.key(ha, hb))).values
        warm = warm_start(task, seed, hkeys, args, log)
        info = dict(warm["info"])
        policy = Policy(task, d=args.d_model)
        policy.load_state_dict(warm["state"])
        torch.manual_seed(seed)
        info["heldout_acc_sampled"] = accuracy(policy, ha, hb, args.temperature, greedy=False)
        info["heldout_acc_greedy"] = accuracy(policy, ha, hb, args.temperature, greedy=True)
        warm_infos.append(info)
        if not info["reached"]:
            log(f"  seed {seed}: warm start never reached {args.sft_target}; EXCLUDED")
            continue
        for m in args.methods:
            runs.append(train(m, seed, warm, task, (ha, hb, hkeys), args, log))
            r = runs[-1]
            log(f"  {m:14s} seed {seed}: final sampled {r['final_acc_sampled']:.3f} greedy {r['final_acc_greedy']:.3f} ({r['seconds']:.0f} s)")
    summary = summarize(runs, args.methods)
    for m in summary:
        summary[m]["staleness"] = 0 if m == "onpolicy" else args.staleness
    included = [w for w in warm_infos if w["reached"]]
    warm_acc = nanmean([w["heldout_acc_sampled"] for w in included])
    config = {k: v for k, v in vars(args).items() if k not in ("quiet", "no_plot", "out_dir", "cache_dir")}
    config.update(params=n_params, backend=backend, torch=torch.__version__, library_commit=_git_head())
    result = {
        "config": config,
        "warm_start": warm_infos,
        "excluded_seeds": [w["seed"] for w in warm_infos if not w["reached"]],
        "summary": summary,
        "runs": runs,
        "total_seconds": round(time.time() - t_start, 1),
    }
    tab = table(summary, warm_acc)
    log("\n" + tab + f"\n\ntotal {result['total_seconds']:.0f} s")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "stale_rl" + (f"_{args.tag}" if args.tag else "")
    result["table_markdown"] = tab
    with open(out / f"{stem}.json", "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    if not args.no_plot:
        plot(result, out / f"{stem}.png")
    log(f"wrote {out / stem}.json" + ("" if args.no_plot else f" and {stem}.png"))
    return result


if __name__ == "__main__":
    main()
