"""M2PO in TRL's GRPOTrainer on a CPU, with nothing downloaded: a Qwen2 built from a config
(random weights), a character-level tokenizer built in memory, and a toy reward.

    python examples/trl_grpo_m2po.py                       # a few steps, the M2PO metrics per step
    python examples/trl_grpo_m2po.py --measure             # the exact mode's pre-pass cost (README)

The data is reused (``num_iterations=2``: each generation feeds two passes), so from the second
pass on the ratios differ from 1 and M2PO has something to mask. ``tests/integrations`` builds
its trainer from ``tiny_qwen2``, ``char_tokenizer`` and ``PROMPTS`` here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"
PROMPTS = ["the cat", "m2po is", "stale data", "hello", "reward me", "abc", "trust region", "xyz",
           "second moment", "a b c", "rl on cpu", "qwen"]


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` built in memory: <pad>=0, <eos>=1, then one
    id per character; left padding, as GRPOTrainer wants."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def tiny_qwen2(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM from a config (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(2, hidden // 16)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                      max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0,
                      bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def vowel_reward(completions, **kwargs):
    """A toy reward: vowels count, length costs a little (varied enough for GRPO's advantages)."""
    return [sum(c.count(v) for v in "aeiou") - 0.1 * len(c) for c in completions]


def make_trainer(output_dir: str, *, exact: bool = True, hidden: int = 32, layers: int = 2, **config):
    """An ``M2POGRPOTrainer`` on the tiny model; ``config`` overrides ``M2POGRPOConfig`` fields."""
    from datasets import Dataset

    from m2po_ops.integrations.trl import M2POGRPOConfig, M2POGRPOTrainer

    tok = char_tokenizer()
    settings = dict(output_dir=output_dir, per_device_train_batch_size=4, num_generations=4,
                    gradient_accumulation_steps=2, num_iterations=2, max_completion_length=8, max_steps=4,
                    learning_rate=1e-2, logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                    seed=0, gradient_checkpointing=False, tau=0.04, m2po_exact=exact)
    settings.update(config)
    args = M2POGRPOConfig(**settings)
    return M2POGRPOTrainer(model=tiny_qwen2(len(tok), hidden, layers), reward_funcs=vowel_reward, args=args,
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok)


def measure(steps: int, hidden: int, layers: int, completion: int, batch: int, repeats: int) -> None:
    """The exact mode's pre-pass cost on the steps that reuse data (no generation inside them):
    its own time (``m2po/prepass_seconds``) against the step's (``step_time``), and the step time
    of the per-micro-batch mode on the same data and seeds; medians over the runs, the two modes
    alternating so that the machine's noise falls on both."""
    from transformers import PrinterCallback, ProgressCallback

    times = {False: [], True: []}
    prepass = []
    for _ in range(repeats):
        for exact in (False, True):
            with tempfile.TemporaryDirectory() as d:
                tr = make_trainer(d, exact=exact, hidden=hidden, layers=layers, max_steps=steps,
                                  max_completion_length=completion, per_device_train_batch_size=batch,
                                  learning_rate=1e-3, disable_tqdm=True)
                for cb in (PrinterCallback, ProgressCallback):
                    tr.remove_callback(cb)
                tr.train()
            # skip the first generation's steps (warm-up); keep those that reuse data
            reused = [h for h in tr.state.log_history if "step_time" in h and "num_tokens" not in h][1:]
            times[exact] += [h["step_time"] for h in reused]
            if exact:
                prepass += [h["m2po/prepass_seconds"] / h["step_time"] for h in reused]
    plain, exact_t = statistics.median(times[False]), statistics.median(times[True])
    print(f"model: hidden {hidden}, {layers} layers; 2 micro-batches of {batch} x up to {completion} completion "
          f"tokens per step; {len(times[True])} steps that reuse data per mode, medians")
    print(f"per-micro-batch mask: {plain * 1e3:.0f} ms/step")
    print(f"exact (pre-pass):     {exact_t * 1e3:.0f} ms/step ({(exact_t / plain - 1) * 100:+.0f}%); "
          f"the pre-pass itself: {statistics.median(prepass) * 100:.0f}% of the step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="time the exact mode's pre-pass")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (--measure: per run; use 8 or more)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--completion", type=int, default=8, help="max_completion_length")
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.measure:
        measure(a.steps, a.hidden, a.layers, a.completion, a.batch, a.repeats)
        return
    with tempfile.TemporaryDirectory() as d:
        tr = make_trainer(d, hidden=a.hidden, layers=a.layers, max_steps=a.steps, max_completion_length=a.completion,
                          per_device_train_batch_size=a.batch)
        t0 = time.perf_counter()
        tr.train()
        print(f"{a.steps} steps in {time.perf_counter() - t0:.1f} s")
    for h in tr.state.log_history:
        if "m2po/masked_fraction" in h:
            print(f"step {h['step']}: masked {h['m2po/masked_fraction']:.3f}, m2 {h['m2po/m2']:.4f} -> "
                  f"{h['m2po/m2_after']:.4f}, ratio max {h['m2po/ratio_max']:.3f}, exact {h['m2po/exact']:.0f}")


if __name__ == "__main__":
    main()
