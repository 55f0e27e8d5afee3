"""The verl plugin's policy losses against the real verl 0.9.1 (skipped where verl is absent).

- after a plain ``import verl`` (a fresh interpreter: verl's own entry-point discovery),
  ``get_policy_loss_fn("m2po")`` / ``("m2po_official")`` are this library's losses;
- one call on a whole mini-batch equals ``m2po_loss`` with verl's token-mean denominator
  (``batch_num_tokens / dp_size``): loss and gradient within 1e-6 relative;
- every ``loss_agg_mode`` verl 0.9.1 accepts equals verl's own ``agg_loss`` on the M2PO per-token
  terms (computed here from the single-call mask, not by the plugin), loss and gradient, for
  dp_size 1 and 2 and with / without global_batch_size and loss_scale_factor; a mode verl does
  not know raises, as verl's agg_loss does;
- ``rollout_is_weights`` multiply each token's term and gradient as in verl's vanilla loss, and a
  zero weight on a valid token raises;
- the environment variables set tau and the floors, and bad values raise naming the variable;
- metrics are ``actor/m2po_*`` floats that verl's Metric accepts;
- verl's real ``ppo_loss`` (workers/utils/losses.py) runs the plugin from an ActorConfig with
  ``policy_loss.loss_mode="m2po"``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="the verl integration tests need verl (make test-integrations)")

sys.path.insert(0, os.path.dirname(__file__))
from verl_helpers import actor_config, expected_terms, random_batch  # noqa: E402

from m2po_ops import m2po_loss  # noqa: E402
from m2po_ops.integrations import verl as plugin  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-12)
ENV = ("M2PO_TAU", "M2PO_MINICLIP_LOW", "M2PO_MINICLIP_HIGH", "M2PO_BACKEND", "M2PO_VALIDATE", "M2PO_EXACT",
       "M2PO_CHECK_DRIFT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Each test starts from the defaults, whatever the shell exported."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def _grad(loss, lp):
    (g,) = torch.autograd.grad(loss, lp)
    return g


def test_plain_import_verl_registers_the_losses():
    """A fresh interpreter that only runs ``import verl`` finds both losses through the
    ``verl.plugins`` entry point (verl swallows plugin import errors, so this is the check that
    the entry point and the module load), and with M2PO_EXACT=1 the FSDP engine is hooked."""
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "print(get_policy_loss_fn('m2po').__module__, get_policy_loss_fn('m2po').__name__)\n"
        "print(get_policy_loss_fn('m2po_official').__name__)\n"
        "from verl.workers.engine.fsdp.transformer_impl import FSDPEngine\n"
        "print(getattr(FSDPEngine.forward_backward_batch, '_m2po_exact', False))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV and k != "PYTHONPATH"}
    env["M2PO_EXACT"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split()
    assert lines == ["m2po_ops.integrations.verl", "compute_policy_loss_m2po", "compute_policy_loss_m2po_official",
                     "True"], out.stdout + out.stderr[-2000:]


def test_registry_holds_this_librarys_losses():
    """In this process, verl's registry maps the names to the plugin's functions."""
    assert get_policy_loss_fn("m2po") is plugin.compute_policy_loss_m2po
    assert get_policy_loss_fn("m2po_official") is plugin.compute_policy_loss_m2po_official


@pytest.mark.parametrize("loss_mode,variant", [("m2po", "paper"), ("m2po_official", "official")])
@pytest.mark.parametrize("dp_size,batch_num_tokens", [(1, None), (1, 40), (2, 80), (4, 123)])
def test_whole_minibatch_equals_m2po_loss(loss_mode, variant, dp_size, batch_num_tokens):
    """One plugin call on a whole mini-batch = m2po_loss with num_tokens = batch_num_tokens /
    dp_size (the call's own count when verl gives none): loss and gradient within 1e-6."""
    old, lp, adv, mask = random_batch(seed=dp_size * 7 + (batch_num_tokens or 0), scale=0.4)
    cfg = actor_config(loss_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=None)
    loss, metrics = get_policy_loss_fn(loss_mode)(old, lp, adv, mask, "token-mean", cfg)
    num_tokens = None if batch_num_tokens is None else batch_num_tokens / dp_size
    ref, _ = m2po_loss(lp, old, adv, mask, variant=variant, num_tokens=num_tokens)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(_grad(loss, lp), _grad(ref, lp), **TOL)
    assert metrics["actor/m2po_masked_fraction"] > 0  # the batch is over budget: the test sees a mask


INFOS = [
    dict(dp_size=1, batch_num_tokens=None, global_batch_size=None),
    dict(dp_size=1, batch_num_tokens=37, global_batch_size=6),
    dict(dp_size=2, batch_num_tokens=90, global_batch_size=12),
    dict(dp_size=2, batch_num_tokens=90, global_batch_size=12, loss_scale_factor=16),
    dict(dp_size=3, batch_num_tokens=101, global_batch_size=17),
]


@pytest.mark.parametrize("loss_agg_mode", plugin.VERL_LOSS_AGG_MODES)
@pytest.mark.parametrize("info", INFOS, ids=lambda i: "-".join(f"{k}{v}" for k, v in i.items()))
def test_every_mode_matches_verls_agg_loss(loss_agg_mode, info):
    """Each of verl's five aggregation modes: the plugin's loss and gradient = verl's agg_loss
    (with the same global_batch_info) of the M2PO per-token terms computed independently."""
    seed = plugin.VERL_LOSS_AGG_MODES.index(loss_agg_mode) * 10 + info["dp_size"]
    old, lp, adv, mask = random_batch(seed=seed, scale=0.4)
    info = dict(info)
    lsf = info.pop("loss_scale_factor", None)
    cfg = actor_config("m2po", loss_agg_mode=loss_agg_mode, loss_scale_factor=lsf, **info)
    loss, _ = plugin.compute_policy_loss_m2po(old, lp, adv, mask, loss_agg_mode, cfg)
    terms, keep = expected_terms(old, lp, adv, mask)
    assert not torch.equal(keep, mask)  # something is masked
    ref = agg_loss(terms, mask, loss_agg_mode, **cfg.global_batch_info)
    torch.testing.assert_close(loss.double(), ref, **TOL)
    torch.testing.assert_close(_grad(loss, lp), _grad(ref, lp), **TOL)


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_official_variant_matches_verls_agg_loss(loss_agg_mode):
    """The official rule's clipped surrogate, aggregated by verl's agg_loss (dp_size 2)."""
    old, lp, adv, mask = random_batch(seed=11, scale=0.4)
    cfg = actor_config("m2po_official", loss_agg_mode=loss_agg_mode, dp_size=2, batch_num_tokens=70,
                       global_batch_size=12)
    loss, metrics = plugin.compute_policy_loss_m2po_official(old, lp, adv, mask, loss_agg_mode, cfg)
    assert metrics["actor/m2po_clip_high"] < 100  # the bounds are constrained: the clip bites
    terms, _ = expected_terms(old, lp, adv, mask, variant="official")
    ref = agg_loss(terms, mask, loss_agg_mode, **cfg.global_batch_info)
    torch.testing.assert_close(loss.double(), ref, **TOL)
    torch.testing.assert_close(_grad(loss, lp), _grad(ref, lp), **TOL)


def test_unknown_mode_raises_like_verl():
    """A mode verl 0.9.1 does not accept raises ValueError naming loss_agg_mode (as agg_loss)."""
    old, lp, adv, mask = random_batch(seed=1)
    cfg = actor_config(dp_size=1)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        agg_loss(lp, mask, "seq-mean-token-max")
    with pytest.raises(ValueError, match="loss_agg_mode='seq-mean-token-max'"):
        plugin.compute_policy_loss_m2po(old, lp, adv, mask, "seq-mean-token-max", cfg)


@pytest.mark.parametrize("loss_agg_mode,key", [("token-mean", "batch_num_tokens"),
                                               ("seq-mean-token-mean", "global_batch_size"),
                                               ("seq-mean-token-sum", "global_batch_size")])
def test_missing_global_counts_with_dp_raise_like_verl(loss_agg_mode, key):
    """dp_size > 1 without the global count raises naming it, where verl's agg_loss raises too."""
    old, lp, adv, mask = random_batch(seed=2)
    cfg = actor_config(dp_size=2, batch_num_tokens=None, global_batch_size=None)
    with pytest.raises(ValueError):
        agg_loss(lp, mask, loss_agg_mode, **cfg.global_batch_info)
    with pytest.raises(ValueError, match=key):
        plugin.compute_policy_loss_m2po(old, lp, adv, mask, loss_agg_mode, cfg)


@pytest.mark.parametrize("loss_mode,variant", [("m2po", "paper"), ("m2po_official", "official")])
@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_rollout_is_weights_weigh_each_term_as_vanilla(loss_mode, variant, loss_agg_mode):
    """rollout_is_weights multiply each token's M2PO term and its gradient (verl's vanilla:
    pg_losses * rollout_is_weights); the mask is the unweighted call's."""
    old, lp, adv, mask = random_batch(seed=5, scale=0.4)
    w = (0.2 + torch.rand(mask.shape, dtype=old.dtype, generator=torch.Generator().manual_seed(3))) * mask
    cfg = actor_config(loss_mode, loss_agg_mode=loss_agg_mode, dp_size=2, batch_num_tokens=70, global_batch_size=12)
    loss, _ = get_policy_loss_fn(loss_mode)(old, lp, adv, mask, loss_agg_mode, cfg, rollout_is_weights=w)
    terms, _ = expected_terms(old, lp, adv, mask, variant=variant, weights=w)
    ref = agg_loss(terms, mask, loss_agg_mode, **cfg.global_batch_info)
    torch.testing.assert_close(loss.double(), ref, **TOL)
    torch.testing.assert_close(_grad(loss, lp), _grad(ref, lp), **TOL)
    unweighted, _ = get_policy_loss_fn(loss_mode)(old, lp, adv, mask, loss_agg_mode, cfg)
    assert not torch.allclose(loss, unweighted)  # the weights did something


def test_zero_rollout_weight_on_a_valid_token_raises():
    """A zero weight (verl's two-sided IS thresholds) would change the trust region: it raises
    naming rollout_is_weights; zeros on padding are fine."""
    old, lp, adv, mask = random_batch(seed=6)
    cfg = actor_config(dp_size=1)
    w = torch.ones_like(old) * mask
    plugin.compute_policy_loss_m2po(old, lp, adv, mask, "token-mean", cfg, rollout_is_weights=w)
    w[0, 0] = 0.0
    with pytest.raises(ValueError, match="rollout_is_weights"):
        plugin.compute_policy_loss_m2po(old, lp, adv, mask, "token-mean", cfg, rollout_is_weights=w)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        plugin.compute_policy_loss_m2po(old, lp, adv, mask, "token-mean", cfg, rollout_is_weights=w[:, :3])


def test_environment_sets_tau_and_floors(monkeypatch):
    """M2PO_TAU reaches the mask (a larger tau masks less); the official floors reach the clip."""
    old, lp, adv, mask = random_batch(seed=8, scale=0.4)
    cfg = actor_config(dp_size=1)
    monkeypatch.setenv("M2PO_TAU", "0.1")
    loss, metrics = plugin.compute_policy_loss_m2po(old, lp, adv, mask, "token-mean", cfg)
    ref, ref_metrics = m2po_loss(lp, old, adv, mask, tau=0.1)
    torch.testing.assert_close(loss, ref, **TOL)
    assert metrics["actor/m2po_masked_fraction"] == pytest.approx(float(ref_metrics["masked_fraction"]))
    monkeypatch.setenv("M2PO_MINICLIP_LOW", "0.3")
    monkeypatch.setenv("M2PO_MINICLIP_HIGH", "0.5")
    loss, metrics = plugin.compute_policy_loss_m2po_official(old, lp, adv, mask, "token-mean", cfg)
    ref, ref_metrics = m2po_loss(lp, old, adv, mask, tau=0.1, variant="official", miniclip_low=0.3,
                                 miniclip_high=0.5)
    torch.testing.assert_close(loss, ref, **TOL)
    assert metrics["actor/m2po_clip_high"] == pytest.approx(float(ref_metrics["clip_high"]))
    assert metrics["actor/m2po_clip_high"] >= 1.5 - 1e-6  # the high floor holds


@pytest.mark.parametrize("name,value,loss_mode", [
    ("M2PO_TAU", "abc", "m2po"), ("M2PO_TAU", "-0.1", "m2po"), ("M2PO_TAU", "nan", "m2po"),
    ("M2PO_MINICLIP_LOW", "0.3", "m2po"), ("M2PO_MINICLIP_HIGH", "x", "m2po_official"),
    ("M2PO_BACKEND", "cuda", "m2po"), ("M2PO_VALIDATE", "maybe", "m2po"), ("M2PO_EXACT", "2", "m2po"),
])
def test_bad_environment_raises_naming_the_variable(monkeypatch, name, value, loss_mode):
    """Each bad value raises ValueError whose message names the variable."""
    old, lp, adv, mask = random_batch(seed=9)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        get_policy_loss_fn(loss_mode)(old, lp, adv, mask, "token-mean", actor_config(dp_size=1))


def test_exact_env_without_hook_raises(monkeypatch):
    """M2PO_EXACT=1 with a training call that did not come through the engine hook raises
    instead of silently using a per-micro-batch mask; under no_grad (verl's forward-only
    passes) the call is allowed."""
    old, lp, adv, mask = random_batch(seed=10)
    monkeypatch.setenv("M2PO_EXACT", "1")
    with pytest.raises(RuntimeError, match="M2PO_EXACT"):
        plugin.compute_policy_loss_m2po(old, lp, adv, mask, "token-mean", actor_config(dp_size=1))
    with torch.no_grad():
        plugin.compute_policy_loss_m2po(old, lp, adv, mask, "token-mean", actor_config(dp_size=1))


def test_metrics_are_prefixed_floats_verl_accepts():
    """Every metric is an ``actor/m2po_*`` Python float, and verl's Metric.from_dict takes them."""
    from verl.utils.metric import AggregationType, Metric

    old, lp, adv, mask = random_batch(seed=12, scale=0.4)
    _, metrics = plugin.compute_policy_loss_m2po_official(old, lp, adv, mask, "token-mean", actor_config(dp_size=1))
    assert metrics and all(k.startswith("actor/m2po_") for k in metrics)
    assert all(type(v) is float for v in metrics.values())
    assert {"actor/m2po_m2", "actor/m2po_masked_fraction", "actor/m2po_cut", "actor/m2po_clip_low",
            "actor/m2po_exact"} <= set(metrics)
    Metric.from_dict(metrics, aggregation=AggregationType.MEAN)


def test_verls_ppo_loss_runs_the_plugin():
    """verl's own ppo_loss (workers/utils/losses.py) with loss_mode="m2po": it selects the
    fields, sets global_batch_info, calls the plugin; pg_loss = m2po_loss with batch_num_tokens."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    old, lp, adv, mask = random_batch(seed=13, scale=0.4, empty_row=False)
    b, t = mask.shape
    prompts = torch.ones(b, 3, dtype=torch.long)
    responses = torch.ones(b, t, dtype=torch.long)
    attention = torch.cat([torch.ones(b, 3, dtype=torch.long), mask.long()], 1)
    data = TensorDict({"prompts": prompts, "responses": responses, "attention_mask": attention,
                       "response_mask": mask.long(), "old_log_probs": old, "advantages": adv}, batch_size=[b])
    n = int(mask.sum())
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=n, global_batch_size=b)
    # the model's flat output: log_prob of token j+1 at position j (prompt and response, no padding)
    flat = []
    for i in range(b):
        k = int(mask[i].sum())
        flat += [torch.zeros(2, dtype=lp.dtype), lp[i, :k], torch.zeros(1, dtype=lp.dtype)]
    values = torch.cat(flat)
    cfg = actor_config("m2po")
    loss, metrics = ppo_loss(cfg, {"log_probs": values}, data)
    ref, _ = m2po_loss(lp, old, adv, mask, num_tokens=n)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(_grad(loss, lp), _grad(ref, lp), **TOL)
    assert "actor/m2po_masked_fraction" in metrics
