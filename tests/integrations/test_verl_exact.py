"""The exact mode (one M2PO mask per optimizer step) inside verl's own micro-batch loop.

What runs is verl 0.9.1's code: ``FSDPEngine.forward_backward_batch`` (the global token count
all-reduced over the data-parallel group, ``prepare_micro_batches``, the forward/backward loop),
verl's ``ppo_loss`` (field selection, ``no_padding_2_padding``, ``global_batch_info``) and the
data layout of verl's trainer (``left_right_2_no_padding``), with the plugin's hook installed on
the real ``FSDPEngine`` class. Two stand-ins, because they need a GPU or an FSDP-wrapped
Hugging Face model: ``forward_step`` (the model: log-probs are entries of a parameter table, so
the gradient of every token is visible) and verl's ``get_device_id`` (it asks CUDA; here "cpu").

Checks, on a dyadic grid (exact m2 ties, the cut inside a run of ties) with 4 micro-batches,
on 1 process and on 2 gloo ranks (torch.multiprocessing spawn):
- the kept tokens (a token's gradient is non-zero exactly when it is kept: advantages are
  non-zero) are bit-identical to ``m2po_mask`` on the whole mini-batch (all ranks' rows in rank
  order), and differ from the per-micro-batch masks of the plugin without the hook;
- the summed gradient (each rank's, divided by dp_size as FSDP's average does) equals the
  gradient of one ``m2po_loss`` call on the mini-batch within 1e-6 relative;
- with M2PO_CHECK_DRIFT=1 the drift check passes silently, and warns when the training forward
  gives other log-probs than the pre-pass.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("verl", reason="the verl integration tests need verl (make test-integrations)")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from verl_helpers import actor_config  # noqa: E402

from m2po_ops import m2po_loss, m2po_mask  # noqa: E402

ROWS, R, P_MAX, MICRO = 16, 8, 4, 4  # mini-batch rows, response length, prompt length, micro-batches per rank
TOL = dict(rtol=1e-6, atol=1e-12)


def make_minibatch(seed=0, rows=ROWS):
    """Rows of a mini-batch on a dyadic grid: old log-probs k/32, deltas +-1/16 .. +-1/2 (m2 on
    a grid, exact ties), one advantage per row (non-zero), prompts of 1..4 and responses of
    0..8 tokens. The first rows drift more, so per-micro-batch cuts differ from the global one."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.randint(1, 64, (rows, R), generator=g).double() / 32
    mags = torch.tensor([1 / 16, 1 / 8, 1 / 4, 1 / 2], dtype=torch.float64)
    # levels 0, 1, 2 with odds 1:1:4 (mean m2 about 0.045 > tau: the cut lands inside the run of
    # 1/16 values), and the first quarter of the rows (micro-batch 0) at levels 2 and 3
    level = torch.randint(0, 6, (rows, R), generator=g).clamp(max=2)
    level[: rows // 4] = torch.randint(2, 4, (rows // 4, R), generator=g)
    sign = torch.randint(0, 2, (rows, R), generator=g).double() * 2 - 1
    delta = mags[level] * sign
    adv = ((torch.randint(0, 2, (rows, 1), generator=g).double() * 2 - 1)
           * (1 + torch.randint(0, 4, (rows, 1), generator=g).double() / 4)).expand(rows, R).contiguous()
    prompt_lens = torch.randint(1, P_MAX + 1, (rows,), generator=g)
    resp_lens = torch.randint(1, R + 1, (rows,), generator=g)
    resp_lens[rows - 3] = 0  # an empty response
    mask = torch.arange(R) < resp_lens[:, None]
    return dict(old=old, delta=delta, adv=adv, mask=mask, prompt_lens=prompt_lens, resp_lens=resp_lens)


def theta_of(mb):
    """The policy's parameters: log-prob of row s's response token k at theta[s * R + k]; one
    extra slot for every prompt position (its log-prob is never in the loss)."""
    lp = (mb["old"] + mb["delta"]).reshape(-1)
    return torch.cat([lp, torch.zeros(1, dtype=lp.dtype)]).requires_grad_()


def verl_data(mb, rows, global_batch_size):
    """The rows as verl's trainer hands them to the actor: left-padded prompts, right-padded
    responses, then verl's own left_right_2_no_padding; input ids index theta."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    b, dummy = len(rows), mb["old"].numel()
    input_ids = torch.zeros(b, P_MAX + R, dtype=torch.long)
    attention = torch.zeros(b, P_MAX + R, dtype=torch.long)
    for i, s in enumerate(rows):
        p, n = int(mb["prompt_lens"][s]), int(mb["resp_lens"][s])
        ids = [dummy] * (p + n)
        for k in range(n):  # position p - 1 + k predicts response token k
            ids[p - 1 + k] = s * R + k
        input_ids[i, P_MAX - p:P_MAX + n] = torch.tensor(ids)
        attention[i, P_MAX - p:P_MAX + n] = 1
    td = TensorDict({
        "input_ids": input_ids, "attention_mask": attention, "position_ids": (attention.cumsum(1) - 1).clamp_min(0),
        "prompts": input_ids[:, :P_MAX], "responses": input_ids[:, P_MAX:], "response_mask": attention[:, P_MAX:],
        "old_log_probs": mb["old"][rows], "advantages": mb["adv"][rows],
    }, batch_size=[b])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=b // MICRO,
                         global_batch_size=global_batch_size)
    return td


def make_engine(theta, drift=0.0):
    """verl's FSDPEngine with the model forward replaced (see the module docstring)."""
    import verl.workers.engine.fsdp.transformer_impl as impl

    impl.get_device_id = lambda: "cpu"  # verl's platform layer assumes an accelerator

    class CPUEngine(impl.FSDPEngine):
        def forward_step(self, micro_batch, loss_function, forward_only):
            values = self.theta[micro_batch["input_ids"].values()]
            if self.drift and torch.is_grad_enabled():
                values = values + self.drift
            loss, metrics = loss_function(model_output={"log_probs": values}, data=micro_batch,
                                          dp_group=self.get_data_parallel_group())
            return loss, {"model_output": {}, "loss": loss.detach().item(), "metrics": metrics}

    engine = CPUEngine.__new__(CPUEngine)  # no FSDP model to build
    engine.theta, engine.drift = theta, drift
    engine.ulysses_sequence_parallel_size, engine.ulysses_device_mesh = 1, None
    engine.module = torch.nn.Linear(1, 1)  # not FSDP-wrapped: verl's no_sync context is a no-op
    engine.engine_config = types.SimpleNamespace()
    return engine


def run_step(mb, rows, exact, drift=0.0, loss_mode="m2po"):
    """One optimizer step's forward/backward of this rank's rows through verl's loop. Returns
    (theta.grad of the rows as (len(rows), R), the per-micro-batch metrics, warnings)."""
    import verl.workers.engine.fsdp.transformer_impl as impl
    from verl.workers.utils.losses import ppo_loss

    from m2po_ops.integrations import verl as plugin

    world = dist.get_world_size()
    theta = theta_of(mb)
    engine = make_engine(theta, drift)
    cfg = actor_config(loss_mode)
    if exact:
        plugin.install_exact_mode(impl.FSDPEngine)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = engine.forward_backward_batch(verl_data(mb, rows, len(rows) * world),
                                                functools.partial(ppo_loss, config=cfg))
    finally:
        plugin.uninstall_exact_mode(impl.FSDPEngine)
    grad = theta.grad[:-1].view(-1, R)[rows]
    # verl gathers each metric of the micro-batches into a Metric (values in loop order)
    metrics = {k: list(getattr(v, "values", v)) for k, v in out["metrics"].items()}
    return grad, metrics, [str(w.message) for w in caught]


def reference(mb, loss_mode="m2po"):
    """One call on the whole mini-batch (all rows, rank order): keep and gradient."""
    variant = {"m2po": "paper", "m2po_official": "official"}[loss_mode]
    lp = (mb["old"] + mb["delta"]).requires_grad_()
    keep, _ = m2po_mask(lp.detach(), mb["old"], mb["adv"], mb["mask"], variant=variant)
    loss, _ = m2po_loss(lp, mb["old"], mb["adv"], mb["mask"], variant=variant)
    loss.backward()
    return keep, lp.grad


def kept(grad, mb, rows):
    """Kept tokens as the gradient shows them: valid and non-zero (every advantage is non-zero)."""
    return (grad != 0) & mb["mask"][rows]


def _init_single():
    if not dist.is_initialized():
        port = _free_port()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single(monkeypatch):
    """A one-rank gloo group (verl's loop all-reduces the token count) and the drift check on."""
    for name in ("M2PO_TAU", "M2PO_BACKEND", "M2PO_VALIDATE", "M2PO_EXACT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("M2PO_CHECK_DRIFT", "1")
    _init_single()
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_mode", ["m2po", "m2po_official"])
def test_exact_mode_one_rank_four_micro_batches(single, loss_mode):
    """1 rank, 4 micro-batches: kept tokens bit-identical to the single call, gradient within
    1e-6; without the hook the per-micro-batch masks differ (so the check has teeth)."""
    mb = make_minibatch(seed=1)
    rows = list(range(ROWS))
    keep0, grad0 = reference(mb, loss_mode)
    grad, metrics, caught = run_step(mb, rows, exact=True, loss_mode=loss_mode)
    assert not [w for w in caught if "pre-pass" in w], caught
    assert metrics["actor/m2po_exact"] == [1.0] * MICRO
    assert torch.equal(kept(grad, mb, rows), keep0)
    torch.testing.assert_close(grad, grad0, **TOL)
    plain, plain_metrics, _ = run_step(mb, rows, exact=False, loss_mode=loss_mode)
    assert plain_metrics["actor/m2po_exact"] == [0.0] * MICRO
    assert not torch.equal(kept(plain, mb, rows), keep0)


@pytest.mark.parametrize("seed", [1, 3])
def test_ties_are_split_inside_the_cut(seed):
    """The data of the exact-mode tests puts the paper rule's cut inside a run of equal m2
    values (some tied tokens kept, some masked), so the tie order across micro-batches and
    ranks is exercised."""
    mb = make_minibatch(seed=seed)
    keep, _ = reference(mb)
    lp = mb["old"] + mb["delta"]
    m2 = (lp - mb["old"]) ** 2
    tr = mb["mask"] & (mb["adv"] * mb["delta"] > 0)
    cut_values = m2[tr & ~keep]
    smallest_cut = cut_values.min()
    assert bool((keep & tr & (m2 == smallest_cut)).any())


def test_drift_check_warns_when_training_log_probs_differ(single):
    """M2PO_CHECK_DRIFT=1: a training forward that differs from the pre-pass warns."""
    mb = make_minibatch(seed=2)
    _, _, caught = run_step(mb, list(range(ROWS)), exact=True, drift=1e-3)
    assert any("differ from the pre-pass" in w for w in caught), caught


def _rank_main(rank, world, port, out_dir):
    os.environ["M2PO_CHECK_DRIFT"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mb = make_minibatch(seed=3)
        per = ROWS // world
        rows = list(range(rank * per, (rank + 1) * per))
        results = {}
        for mode in ("m2po", "m2po_official"):
            grad, metrics, caught = run_step(mb, rows, exact=True, loss_mode=mode)
            plain, _, _ = run_step(mb, rows, exact=False, loss_mode=mode)
            results[mode] = dict(grad=grad, plain=plain, exact=metrics["actor/m2po_exact"],
                                 drift=[w for w in caught if "pre-pass" in w])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_exact_mode_two_gloo_ranks(tmp_path):
    """2 gloo ranks x 4 micro-batches (verl's loop on each): every rank's kept tokens are its
    rows of the single call's, bit for bit; the ranks' gradients / dp_size are the single call's
    gradient within 1e-6; the per-rank per-micro-batch masks of the plain plugin differ."""
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    mb = make_minibatch(seed=3)
    per = ROWS // world
    for mode in ("m2po", "m2po_official"):
        keep0, grad0 = reference(mb, mode)
        plain_differs = False
        for rank in range(world):
            res = torch.load(tmp_path / f"rank{rank}.pt")[mode]
            rows = list(range(rank * per, (rank + 1) * per))
            assert res["exact"] == [1.0] * MICRO and not res["drift"], (mode, rank, res["drift"])
            assert torch.equal(kept(res["grad"], mb, rows), keep0[rows]), (mode, rank)
            torch.testing.assert_close(res["grad"] / world, grad0[rows], **TOL)
            plain_differs |= not torch.equal(kept(res["plain"], mb, rows), keep0[rows])
        assert plain_differs, mode
