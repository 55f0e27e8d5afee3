"""The TRL trainer (m2po_ops.integrations.trl) against the real TRL 1.16.0 (skipped where TRL is absent).

A tiny Qwen2 built from a config (random weights) and an in-memory character tokenizer
(examples/trl_grpo_m2po.py) train for a few steps on the CPU with reused data, so that ratios
differ from 1. Every call the trainer makes to ``m2po_loss`` is recorded (the wrapper only
records; the real loss runs), with a hook on the log-probs' gradient. Per optimizer step:

- the kept tokens, read from the gradient (a valid token with a non-zero advantage has a
  non-zero gradient exactly when it is kept), are bit-identical to one ``m2po_mask`` call on the
  step's whole batch (its micro-batches concatenated in order), and the mask is not trivial on
  some step, where the per-micro-batch masks differ from it (so the check has teeth);
- the gradient equals the closed form -keep * r * A / D with D TRL's normaliser,
  ``num_items_in_batch * gradient_accumulation_steps / steps_per_generation``, counted here from
  the generation batch's completion masks;
- the M2PO metrics are in the trainer's log history, with the masked fraction the test computes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration tests need trl (make test-integrations)")

from m2po_ops import m2po_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ex(example):
    return example("trl_grpo_m2po")


def _train(trainer, monkeypatch):
    """Train, recording each m2po_loss call: (optimizer step, log-probs, old, advantages as
    (B, T), mask, num_tokens, the log-probs' gradient)."""
    from m2po_ops.integrations import trl as integration

    calls = []
    real = integration.m2po_loss

    def recording(logprobs, old, advantages, mask, **kw):
        rec = dict(step=trainer.state.global_step, lp=logprobs.detach().clone(), old=old.detach().clone(),
                   adv=(advantages[:, None] if advantages.dim() == 1 else advantages).expand_as(logprobs).clone(),
                   mask=mask.bool().clone(), num_tokens=float(kw["num_tokens"]), cut=kw.get("cut"))
        if logprobs.requires_grad:
            logprobs.register_hook(lambda g: rec.__setitem__("grad", g.detach().clone()))
        calls.append(rec)
        return real(logprobs, old, advantages, mask, **kw)

    monkeypatch.setattr(integration, "m2po_loss", recording)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    drift = [str(w.message) for w in caught if "pre-pass" in str(w.message)]
    steps = defaultdict(list)
    for rec in calls:
        steps[rec["step"]].append(rec)
    return dict(steps), drift


def _whole(recs, key):
    return torch.cat([r[key] for r in recs])


def _check_steps(steps, variant, tau, denominators):
    """Per step: kept tokens (from the gradient) = m2po_mask on the whole step, and the gradient's
    closed form with TRL's normaliser (``denominators``: one per micro-batch, in order). Returns
    (steps with something masked, steps where the per-micro-batch masks differ, the expected
    masked fraction per logged step as TRL averages it)."""
    masked_steps, differs, fractions = [], [], {}
    micro = iter(denominators)
    for step, recs in sorted(steps.items()):
        lp, old, adv, mask = (_whole(recs, k) for k in ("lp", "old", "adv", "mask"))
        keep, _ = m2po_mask(lp, old, adv, mask, tau=tau, variant=variant)
        grad = _whole(recs, "grad")
        seen = mask & (adv != 0)
        assert torch.equal((grad != 0)[seen], keep[seen]), f"step {step}: the mask is not the step's"
        dens = [next(micro) for _ in recs]
        assert [r["num_tokens"] for r in recs] == pytest.approx(dens, rel=1e-6), step
        denom = torch.cat([torch.full((r["mask"].shape[0], 1), d) for r, d in zip(recs, dens)])
        expected = -(keep & mask).float() * torch.exp(lp - old) * adv / denom
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)
        if bool((mask & ~keep).any()):
            masked_steps.append(step)
        per_mb = torch.cat([m2po_mask(r["lp"], r["old"], r["adv"], r["mask"], tau=tau, variant=variant)[0]
                            for r in recs])
        if not torch.equal(per_mb, keep):
            differs.append(step)
        # TRL averages the micro-batches' entries: each micro-batch's masked / valid
        sizes = [r["mask"].shape[0] for r in recs]
        fr = [float((m & ~k).sum()) / max(float(m.sum()), 1.0) for k, m in zip(keep.split(sizes), mask.split(sizes))]
        fractions[step + 1] = sum(fr) / len(fr)  # logged under the step number after the update
    return masked_steps, differs, fractions


def _denominators(steps, G, S, iterations):
    """TRL's normaliser for each micro-batch, computed here: num_items_in_batch (one process: the
    completion tokens of the S micro-batches of the generation that fed it, counted from the
    recorded masks of its first pass) * G / S."""
    order = [r for s in sorted(steps) for r in steps[s]]
    every = S * iterations  # micro-steps fed by one generation
    out = []
    for m in range(len(order)):
        first = m // every * every
        out.append(sum(float(r["mask"].sum()) for r in order[first:first + S]) * G / S)
    return out


@pytest.mark.parametrize("variant,config", [
    # 4 micro-batches a step; one generation (8 sequences) feeds 2 passes: steps 2 and 4 reuse data
    ("paper", dict(num_iterations=2, steps_per_generation=4, max_steps=4, tau=0.04)),
    # one generation of 8 micro-batches feeds 2 optimizer steps of 4: step 2 is one update stale
    # (on data the first update did not train on: smaller ratios, so a smaller budget); with
    # TRL's default gradient checkpointing, which the pre-pass turns off as TRL's no-grad passes do
    ("official", dict(num_iterations=1, steps_per_generation=8, max_steps=2, tau=0.02, gradient_checkpointing=True)),
], ids=["paper-num_iterations2", "official-steps_per_generation8"])
def test_exact_mask_per_step_on_a_real_trainer(ex, tmp_path, monkeypatch, variant, config):
    """Each optimizer step's mask (4 micro-batches) is bit-identical to one m2po_mask call on the
    step's whole batch, not trivial on some step (where per-micro-batch masks differ), the
    gradient is the closed form with TRL's normaliser, the pre-pass and training forwards agree
    (drift check on), and the metrics reach the log history with the masked fraction computed here."""
    G = 4
    trainer = ex.make_trainer(str(tmp_path), variant=variant, m2po_check_drift=True, gradient_accumulation_steps=G,
                              per_device_train_batch_size=2, **config)
    steps, drift = _train(trainer, monkeypatch)
    assert not drift, drift
    assert sorted(steps) == list(range(config["max_steps"])) and all(len(r) == G for r in steps.values())
    # the data is reused, so TRL computes old log-probs and every call gets the exact mode's cut
    assert all(r["cut"] is not None for recs in steps.values() for r in recs)
    S = config["steps_per_generation"]
    masked_steps, differs, fractions = _check_steps(steps, variant, config["tau"],
                                                    _denominators(steps, G, S, config["num_iterations"]))
    assert masked_steps, "no step masked anything: the test would not see a wrong mask"
    assert set(differs) & set(masked_steps), "per-micro-batch masks equal the step's: the data has no teeth"
    logs = {h["step"]: h for h in trainer.state.log_history if "m2po/masked_fraction" in h}
    assert sorted(logs) == [s + 1 for s in range(config["max_steps"])]
    for step, frac in fractions.items():
        assert logs[step]["m2po/masked_fraction"] == pytest.approx(frac, abs=1e-6), step
        assert logs[step]["m2po/exact"] == 1.0
    for key in ("m2po/m2", "m2po/m2_after", "m2po/trust_region_fraction", "m2po/ratio_max", "m2po/prepass_seconds",
                "entropy"):
        assert all(key in h for h in logs.values()), key
    stale = [s + 1 for s in masked_steps]
    if variant == "paper":  # the paper's rule keeps the trust region's second moment within budget
        assert all(logs[s]["m2po/m2_after"] <= config["tau"] * (1 + 1e-6) for s in stale)
    else:
        assert all("m2po/clip_low" in logs[s] and "m2po/clip_high" in logs[s] for s in stale)


def test_fresh_data_has_ratio_one_and_masks_nothing(ex, tmp_path, monkeypatch):
    """One step per generation and no reuse (TRL computes no old log-probs): the behaviour is the
    current policy, the ratio is exactly 1 and M2PO masks nothing; no pre-pass runs. Built through
    the mixin on a class derived from GRPOTrainer, with a plain GRPOConfig (the defaults)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from m2po_ops.integrations.trl import M2POGRPOMixin

    class Derived(GRPOTrainer):  # stands for a framework's subclass (ms-swift derives its own)
        pass

    class M2PODerived(M2POGRPOMixin, Derived):
        pass

    tok = ex.char_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      gradient_accumulation_steps=2, max_completion_length=8, max_steps=2, learning_rate=1e-2,
                      logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
                      gradient_checkpointing=False)
    trainer = M2PODerived(model=ex.tiny_qwen2(len(tok)), reward_funcs=ex.vowel_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ex.PROMPTS}), processing_class=tok)
    steps, _ = _train(trainer, monkeypatch)
    for recs in steps.values():
        for r in recs:
            assert torch.equal(r["old"], r["lp"]) and r["cut"] is None
    logs = [h for h in trainer.state.log_history if "m2po/masked_fraction" in h]
    assert len(logs) == 2
    assert all(h["m2po/masked_fraction"] == 0.0 and h["m2po/ratio_max"] == 1.0 for h in logs)
    assert not any("m2po/prepass_seconds" in h for h in logs)


def test_per_micro_batch_option_masks_each_micro_batch(ex, tmp_path, monkeypatch):
    """m2po_exact=False: no pre-pass, each micro-batch's mask is one m2po_mask call on that
    micro-batch alone (and the logs say exact 0)."""
    trainer = ex.make_trainer(str(tmp_path), exact=False, max_steps=2)
    steps, _ = _train(trainer, monkeypatch)
    masked = False
    for recs in steps.values():
        for r in recs:
            keep, _ = m2po_mask(r["lp"], r["old"], r["adv"], r["mask"], tau=0.04)
            seen = r["mask"] & (r["adv"] != 0)
            assert r["cut"] is None
            assert torch.equal((r["grad"] != 0)[seen], keep[seen])
            masked |= bool((r["mask"] & ~keep).any())
    assert masked
    logs = [h for h in trainer.state.log_history if "m2po/exact" in h]
    assert logs and all(h["m2po/exact"] == 0.0 for h in logs)


@pytest.mark.parametrize("field,value,exc", [
    ("tau", -0.1, ValueError), ("tau", float("nan"), ValueError), ("tau", "0.04", TypeError),
    ("variant", "ppo", ValueError), ("miniclip_low", 0.3, ValueError),  # the paper rule has no clip
    ("m2po_behavior", "vllm", ValueError), ("m2po_backend", "cuda", ValueError), ("m2po_exact", 1, TypeError),
    ("loss_type", "grpo", ValueError), ("beta", 0.04, ValueError),
    ("importance_sampling_level", "sequence", ValueError), ("top_entropy_quantile", 0.2, ValueError),
    ("off_policy_mask_threshold", 0.5, ValueError), ("entropy_coef", 0.1, ValueError),
])
def test_config_errors_name_the_argument(tmp_path, field, value, exc):
    """M2POGRPOConfig raises naming the argument for a bad M2PO value or a GRPO setting the M2PO
    loss does not honour."""
    from m2po_ops.integrations.trl import M2POGRPOConfig

    with pytest.raises(exc, match=field):
        M2POGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})


def test_config_defaults_and_official_floors(tmp_path):
    """The defaults (tau 0.04, paper, exact, dropout off) and the official floors accepted."""
    from m2po_ops.integrations.trl import M2POGRPOConfig, m2po_settings

    args = M2POGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    s = m2po_settings(args)
    assert (s.tau, s.variant, s.exact, s.behavior, args.disable_dropout) == (0.04, "paper", True, "auto", True)
    args = M2POGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], variant="official",
                          miniclip_low=0.3, miniclip_high=0.5)
    assert (m2po_settings(args).miniclip_low, m2po_settings(args).miniclip_high) == (0.3, 0.5)


def test_import_m2po_ops_does_not_import_trl():
    """``import m2po_ops`` (and m2po_ops.integrations) loads neither TRL nor verl."""
    code = ("import sys, m2po_ops, m2po_ops.integrations\n"
            "print(sorted(m for m in ('trl', 'verl', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def _terms_of(behavior, inputs, logps):
    """The trainer's (old, advantages, mask) for a micro-batch, without building a trainer."""
    from m2po_ops.integrations.trl import M2POGRPOTrainer, Settings

    obj = M2POGRPOTrainer.__new__(M2POGRPOTrainer)
    obj.m2po = Settings(tau=0.04, variant="paper", miniclip_low=None, miniclip_high=None, exact=True,
                        behavior=behavior, backend="auto", validate=True, check_drift=False)
    return obj._m2po_terms(inputs, logps)


def _inputs(**extra):
    g = torch.Generator().manual_seed(3)
    base = dict(completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), advantages=torch.tensor([0.5, -2.0]))
    base.update(extra)
    return base, -torch.rand(2, 4, generator=g)


def test_behavior_log_probs_are_chosen_as_documented():
    """auto: old_per_token_logps when present, else the sampling log-probs (a NaN there: the
    current log-prob, ratio 1), else the current log-probs (ratio exactly 1); 'old' never takes
    the sampling ones; 'sampling' requires them."""
    old = torch.full((2, 4), -1.0)
    sampled = torch.tensor([[-0.5, float("nan"), -0.7, 0.0], [-0.2, -0.3, 0.0, 0.0]])
    inputs, lp = _inputs(old_per_token_logps=old, sampling_per_token_logps=sampled)
    assert torch.equal(_terms_of("auto", inputs, lp)[0], old)
    assert torch.equal(_terms_of("old", inputs, lp)[0], old)
    want = sampled.clone()
    want[0, 1] = lp[0, 1]
    assert torch.equal(_terms_of("sampling", inputs, lp)[0], want)
    inputs, lp = _inputs(sampling_per_token_logps=sampled)
    assert torch.equal(_terms_of("auto", inputs, lp)[0], want)
    assert torch.equal(_terms_of("old", inputs, lp)[0], lp)
    inputs, lp = _inputs()
    assert torch.equal(_terms_of("auto", inputs, lp)[0], lp)
    with pytest.raises(ValueError, match="m2po_behavior"):
        _terms_of("sampling", inputs, lp)


def test_vllm_importance_weights_scale_advantages_and_zero_weights_leave_the_mask():
    """TRL's vLLM importance-sampling ratio (per token or per sequence) multiplies each token's
    advantage; a weight of 0 (TRL's *_mask modes) takes the token out of the mask; with the
    sampling log-probs as behaviour the weights are not applied (the ratio holds them)."""
    old = torch.full((2, 4), -1.0)
    w_tok = torch.tensor([[0.5, 1.0, 0.0, 2.0], [1.5, 0.25, 1.0, 1.0]])
    inputs, lp = _inputs(old_per_token_logps=old, importance_sampling_ratio=w_tok,
                         sampling_per_token_logps=old - 0.1)
    _, adv, mask = _terms_of("auto", inputs, lp)
    assert torch.equal(adv, torch.tensor([[0.5], [-2.0]]) * w_tok)
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]]))
    w_seq = torch.tensor([[0.0], [3.0]])  # sequence_mask: the first sequence rejected
    inputs, lp = _inputs(old_per_token_logps=old, importance_sampling_ratio=w_seq)
    _, adv, mask = _terms_of("auto", inputs, lp)
    assert torch.equal(adv, torch.tensor([[0.0] * 4, [-6.0] * 4]))
    assert torch.equal(mask, torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]]))
    inputs, lp = _inputs(old_per_token_logps=old, importance_sampling_ratio=w_tok,
                         sampling_per_token_logps=old - 0.1)
    _, adv, mask = _terms_of("sampling", inputs, lp)
    assert torch.equal(adv, inputs["advantages"]) and torch.equal(mask, inputs["completion_mask"])
