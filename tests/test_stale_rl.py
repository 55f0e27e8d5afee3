"""Fast CI check of examples/stale_rl.py: the staleness loop end to end at tiny sizes, and the
M2PO path of the example masking tokens of stale data through the library's op."""

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def srl(example):
    return example("stale_rl")


def test_task_encoding(srl):
    task = srl.Task(4, 10)
    a, b = torch.tensor([1234, 9999]), torch.tensor([8766, 1])
    assert task.prompts(a, b)[0].tolist() == [1, 2, 3, 4, 10, 8, 7, 6, 6, 11]
    assert task.answers(a, b).tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]  # 10000, LSB first
    gen = torch.Generator().manual_seed(0)
    ha, hb = task.draw(50, gen)
    excl = torch.sort(task.key(ha, hb)).values
    a2, b2 = task.draw(2000, gen, excl)
    assert not torch.isin(task.key(a2, b2), excl).any()


def test_kv_cache_logprobs_match_teacher_forcing(srl):
    torch.manual_seed(0)
    task = srl.Task(3, 10)
    pol = srl.Policy(task, d=32)
    gen = torch.Generator().manual_seed(0)
    a, b = task.draw(16, gen)
    ans, lp = srl.generate(pol, task.prompts(a, b), temperature=1.0)
    seqs = torch.cat([task.prompts(a, b), ans], 1)
    with torch.no_grad():
        lp2 = torch.log_softmax(pol.answer_logits(seqs), -1).gather(2, ans[..., None]).squeeze(2)
    torch.testing.assert_close(lp, lp2, atol=1e-5, rtol=0)


def test_m2po_path_masks_stale_tokens(srl):
    torch.manual_seed(0)
    task = srl.Task(3, 10)
    args = srl.parse_args(["--prompts", "8", "--group", "4", "--d-model", "32"])
    pol = srl.Policy(task, d=32)
    batch = srl.sample_batch(pol, task, torch.Generator().manual_seed(1), None, args)
    with torch.no_grad():  # the policy moved a lot since it sampled the batch
        for p in pol.parameters():
            p.add_(0.3 * torch.randn_like(p))
    answer = batch["seqs"][:, task.prompt_len :]
    logprobs = torch.log_softmax(pol.answer_logits(batch["seqs"]), -1).gather(2, answer[..., None]).squeeze(2)
    # a random policy earns no reward yet; give the sequences +-1 advantages instead
    seq_adv = torch.randint(0, 2, (logprobs.shape[0],), generator=torch.Generator().manual_seed(2)) * 2.0 - 1
    adv = seq_adv[:, None].expand_as(logprobs)
    mask = torch.ones_like(logprobs)
    loss, met = srl.policy_loss("m2po", logprobs, batch["old_lp"], adv, mask, args)
    assert torch.isfinite(loss)
    assert met["m2"].item() > args.tau  # stale enough that the budget binds
    assert 0 < met["masked_fraction"].item() < 1
    assert met["m2_after"].item() <= args.tau + 1e-6
    keep, _ = srl.m2po_ops.m2po_mask(logprobs, batch["old_lp"], adv, mask, tau=args.tau)
    ratio = torch.exp(logprobs - batch["old_lp"])
    expect = -(keep * ratio * adv).sum() / mask.sum()
    torch.testing.assert_close(loss, expect, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in pol.parameters() if p.grad is not None)
    # the competitors written in the example: no-TR is -mean(r A); clip is never above it
    l_notr, _ = srl.policy_loss("notr", logprobs.detach(), batch["old_lp"], adv, mask, args)
    l_clip, _ = srl.policy_loss("clip", logprobs.detach(), batch["old_lp"], adv, mask, args)
    torch.testing.assert_close(l_notr, -(ratio * adv).mean().detach())
    assert l_clip.item() >= l_notr.item() - 1e-6


def test_loop_end_to_end(srl, tmp_path):
    argv = [
        "--seeds", "0", "--updates", "6", "--staleness", "3", "--lr", "1e-2",
        "--prompts", "8", "--group", "4", "--digits", "2", "--d-model", "32",
        "--heldout", "32", "--eval-prompts", "16", "--log-every", "3", "--sft-lr", "3e-3",
        "--sft-examples", "512", "--sft-target", "0.2", "--sft-val", "64", "--sft-check-every", "10", "--sft-max-steps", "800",
        "--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--tag", "ci", "--quiet",
    ]  # fmt: skip
    result = srl.main(argv)
    data = json.loads((tmp_path / "stale_rl_ci.json").read_text())
    assert (tmp_path / "stale_rl_ci.png").stat().st_size > 0
    assert set(data) >= {"config", "warm_start", "excluded_seeds", "summary", "runs", "table_markdown"}
    assert data["excluded_seeds"] == []
    assert [r["method"] for r in data["runs"]] == list(srl.METHODS)
    assert set(data["summary"]) == set(srl.METHODS)
    for run in result["runs"]:
        assert run["nonfinite_losses"] == 0
        assert [row["update"] for row in run["curve"]] == [0, 3, 6]
        assert run["curve"][-1]["eval_prompts"] == 32  # the final evaluation uses every held-out prompt
        for row in run["curve"][1:]:
            assert 0 <= row["acc_sampled"] <= 1 and 0 <= row["acc_greedy"] <= 1
            assert 0 <= row["clip_fraction"] <= 1 and 0 <= row["m2po_masked_fraction"] <= 1
            assert math.isfinite(row["loss"]) and math.isfinite(row["m2_all"])
        stale = run["staleness"] > 0
        assert run["staleness"] == (0 if run["method"] == "onpolicy" else 3)
        last = run["curve"][-1]
        if stale:  # updates 3..5 train on batches sampled 3 updates (at lr 1e-2) earlier
            assert last["m2_all"] > 1e-6
        else:  # on-policy: behaviour log-probs are the current ones
            assert last["m2_all"] < 1e-8 and abs(last["ratio_max_window"] - 1) < 1e-3
        if run["method"] in ("m2po", "m2po_official"):
            assert "op_masked_fraction" in last
