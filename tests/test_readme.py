"""The README's code blocks marked runnable run as written: the quickstart alone, the drop-in
training loop (its memory-light log-probs included) with a tiny policy, loader, optimizer and
log standing in for the trainer's."""

from __future__ import annotations

import pathlib
import re
from types import SimpleNamespace

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _runnable_blocks():
    text = README.read_text()
    return re.findall(r"<!-- runnable[^>]*-->\n```python\n(.*?)```", text, re.S)


def test_the_readme_marks_two_runnable_blocks():
    assert len(_runnable_blocks()) == 2


def test_the_quickstart_runs_as_written(capsys):
    quickstart = _runnable_blocks()[0]
    namespace = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    assert namespace["logprobs"].grad is not None and torch.isfinite(namespace["loss"])
    printed = capsys.readouterr().out
    assert "masked_fraction" in printed


class _TinyPolicy(torch.nn.Module):
    """A causal LM stand-in laid out as Hugging Face's: ``.model`` (the backbone, returning
    ``last_hidden_state``: here embeddings) and ``.lm_head`` (no bias), logits from both."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def model(self, input_ids):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids).last_hidden_state))


def test_the_drop_in_loop_runs_with_a_trainers_objects():
    loop = _runnable_blocks()[1]
    g = torch.Generator().manual_seed(0)
    policy = _TinyPolicy()
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 11, (4, 9), generator=g)
        actions = ids[:, 1:]
        with torch.no_grad():  # the behaviour policy: the current one, a little perturbed (stale)
            old = torch.log_softmax(policy(ids).logits[:, :-1], -1).gather(-1, actions[..., None])[..., 0]
        old = old + 0.3 * torch.randn(old.shape, generator=g)
        mask = torch.arange(8)[None, :] < torch.randint(3, 9, (4, 1), generator=g)
        batches.append(SimpleNamespace(input_ids=ids, actions=actions, old_logprobs=old,
                                       advantages=torch.randn(4, generator=g), mask=mask))
    logged = []
    before = [p.detach().clone() for p in policy.parameters()]
    namespace = dict(policy=policy, loader=batches, optimizer=torch.optim.SGD(policy.parameters(), lr=0.1),
                     log=logged.append)
    exec(compile(loop, "README drop-in loop", "exec"), namespace)
    assert len(logged) == 3 and all(isinstance(v, float) for v in logged[0].values())
    assert "m2" in logged[0] and "masked_fraction" in logged[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))  # it trained


def test_the_drop_in_log_probs_are_the_dense_log_softmax():
    """The loop's chunked ``token_logprobs`` (several slices here) gives the dense
    log_softmax(logits).gather values and the same gradients on the hidden states and the head."""
    loop = _runnable_blocks()[1]
    namespace = {}
    exec(compile(loop.split("for batch in loader")[0], "README drop-in helpers", "exec"), namespace)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 100, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 50, (3, 100), generator=g)
    upstream = torch.randn(3, 100, generator=g, dtype=torch.float64)
    chunked = namespace["token_logprobs"](hidden, weight, actions)  # 300 tokens: 3 slices of 128
    (gh, gw) = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
    dense = torch.log_softmax(hidden @ weight.T, -1).gather(-1, actions[..., None])[..., 0]
    (dh, dw) = torch.autograd.grad((dense * upstream).sum(), (hidden, weight))
    # the helper computes in float32 (.float()), so float32 agreement
    torch.testing.assert_close(chunked, dense.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, dh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, dw, rtol=1e-4, atol=1e-5)
