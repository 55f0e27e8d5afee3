"""M2PO in TRL (tested: TRL 1.16.0): ``M2POGRPOTrainer``, ``M2POGRPOConfig`` and ``M2POGRPOMixin``.

    from m2po_ops.integrations.trl import M2POGRPOConfig, M2POGRPOTrainer
    args = M2POGRPOConfig(output_dir="out", tau=0.04, num_iterations=2)
    trainer = M2POGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)
    trainer.train()

TRL has no loss registry: the trainer overrides ``GRPOTrainer._compute_loss``. Full account:
docs/trl.md. What shapes the design (TRL 1.16.0):

- **The behaviour policy.** ``_compute_loss`` gets ``old_per_token_logps`` when TRL computed
  them at generation time (with the generating parameters: when the data outlives an optimizer
  step, or with vLLM's importance-sampling correction), ``sampling_per_token_logps`` when vLLM or a
  ``rollout_func`` returned the engine's own log-probs, and neither otherwise. Without either,
  the data is fresh: TRL takes the current log-probs (detached) as the old ones, the ratio is
  exactly 1, and M2PO masks nothing. ``m2po_behavior`` picks the source (``_behavior``).
- **The optimizer step.** The Trainer fetches one step's micro-batches at once
  (``get_batch_samples``) and then runs ``training_step`` on each. TRL's ``_prepare_inputs``
  turns each into a slice of its buffered generation batch (``steps_per_generation`` slices,
  regenerated every ``steps_per_generation * num_iterations`` micro-steps). The exact mode
  (the default) hooks both: at the step's first micro-batch it prepares every micro-batch of
  the step through TRL's own ``_prepare_inputs`` (so generation happens when, and as, TRL would
  do it), runs a no-grad forward over them into an ``M2POStats``, solves one cut across the
  processes, and each micro-batch's loss then uses its slice of that cut. The mask is then the
  mask of one ``m2po_mask`` call on the whole step (every process's micro-batches, in process
  then micro-batch order), bit for bit.
- **Normalisation.** TRL's own (``loss_type="dapo"``, TRL's default): the loss of a micro-batch
  is its summed per-token terms divided by ``num_items_in_batch / num_processes *
  gradient_accumulation_steps / steps_per_generation`` (``num_items_in_batch`` counts the
  generation batch's tokens over all processes). M2PO's own normalisation is this token mean.
- **Metrics** go to TRL's metric store (``self._metrics``), so TRL's ``log`` averages them over
  the logging window with its own: ``m2po/masked_fraction`` and the rest (``_log_metrics``).

``import m2po_ops`` does not import this module (nor TRL).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from ..api import m2po_loss
from ..config import BACKENDS, M2POConfig
from ..constants import DEFAULT_TAU
from ..microbatch import M2POStats

#: where the behaviour log-probs come from (see ``_behavior``)
BEHAVIORS = ("auto", "old", "sampling")

#: the M2PO settings a config may carry, with the defaults a plain ``GRPOConfig`` gets
_DEFAULTS = dict(tau=DEFAULT_TAU, variant="paper", miniclip_low=None, miniclip_high=None, m2po_exact=True,
                 m2po_behavior="auto", m2po_backend="auto", m2po_validate=True, m2po_check_drift=False)

# The logged metrics: M2PO's own, under TRL's "group/name" convention
_PREFIX = "m2po/"


@dataclass(frozen=True)
class Settings:
    """The M2PO settings of a trainer, read from its config (``m2po_settings``)."""

    tau: float
    variant: str
    miniclip_low: Optional[float]
    miniclip_high: Optional[float]
    exact: bool
    behavior: str
    backend: str
    validate: bool
    check_drift: bool


def m2po_settings(args) -> Settings:
    """The M2PO settings of ``args`` (an ``M2POGRPOConfig``, or any ``GRPOConfig``: missing fields
    take their defaults), validated: every bad value raises ``ValueError`` or ``TypeError``
    naming the argument."""
    get = {name: getattr(args, name, default) for name, default in _DEFAULTS.items()}
    # the loss's hyperparameters, checked by the library's own config (its errors name them)
    M2POConfig(tau=get["tau"], variant=get["variant"], miniclip_low=get["miniclip_low"],
               miniclip_high=get["miniclip_high"])
    for name in ("m2po_exact", "m2po_validate", "m2po_check_drift"):
        if not isinstance(get[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(get[name]).__name__}")
    if get["m2po_behavior"] not in BEHAVIORS:
        raise ValueError(f"m2po_behavior must be one of {BEHAVIORS}, got {get['m2po_behavior']!r}")
    if get["m2po_backend"] not in BACKENDS:
        raise ValueError(f"m2po_backend must be one of {BACKENDS}, got {get['m2po_backend']!r}")
    if get["m2po_check_drift"] and not get["m2po_exact"]:
        raise ValueError("m2po_check_drift=True compares the training forward with the exact mode's pre-pass: "
                         "it needs m2po_exact=True")
    return Settings(tau=float(get["tau"]), variant=get["variant"], miniclip_low=get["miniclip_low"],
                    miniclip_high=get["miniclip_high"], exact=get["m2po_exact"], behavior=get["m2po_behavior"],
                    backend=get["m2po_backend"], validate=get["m2po_validate"], check_drift=get["m2po_check_drift"])


def check_compatible(args) -> None:
    """Raise ``ValueError`` naming the argument for a GRPO setting the M2PO loss does not honour.

    M2PO replaces the policy term of ``_compute_loss``; what TRL would add to or multiply into
    that term has no M2PO counterpart here, and silently dropping it would train something else
    than the config says. ``epsilon``, ``epsilon_high`` and ``delta`` (PPO's clip) are not read:
    M2PO's mask replaces the clip.
    """
    loss_type = getattr(args, "loss_type", "dapo")
    if loss_type != "dapo":
        raise ValueError(f"loss_type={loss_type!r}: the M2PO trainer normalises as TRL's 'dapo' (a token mean over "
                         "the generation batch's tokens, num_items_in_batch), which is M2PO's own token mean; set "
                         "loss_type='dapo' (TRL's default)")
    level = getattr(args, "importance_sampling_level", "token")
    if level != "token":
        raise ValueError(f"importance_sampling_level={level!r}: M2PO's ratio and mask are per token; set 'token'")
    checks = [
        ("beta", getattr(args, "beta", 0.0), lambda v: v == 0.0,
         "the KL penalty to a reference model is not part of the M2PO loss here; set beta=0.0 (TRL's default)"),
        ("top_entropy_quantile", getattr(args, "top_entropy_quantile", 1.0), lambda v: v == 1.0,
         "a high-entropy token mask would multiply M2PO's terms; set 1.0"),
        ("off_policy_mask_threshold", getattr(args, "off_policy_mask_threshold", None), lambda v: v is None,
         "TRL's off-policy sequence mask is another trust region; M2PO's mask replaces it: leave it None"),
        ("entropy_coef", getattr(args, "entropy_coef", 0.0), lambda v: v == 0.0,
         "the entropy bonus is not supported with the M2PO loss; set 0.0"),
        ("use_adaptive_entropy", getattr(args, "use_adaptive_entropy", False), lambda v: not v,
         "the adaptive entropy bonus is not supported with the M2PO loss"),
    ]
    for name, value, ok, why in checks:
        if not ok(value):
            raise ValueError(f"{name}={value!r}: {why}")


@dataclass
class M2POGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the M2PO settings (docs/trl.md). Validated at construction; every bad
    value raises naming the argument, and GRPO settings M2PO does not honour raise too
    (``check_compatible``)."""

    tau: float = field(default=DEFAULT_TAU, metadata={
        "help": "M2PO's second-moment budget (the paper's tau, 0.04). inf masks nothing."})
    variant: str = field(default="paper", metadata={
        "help": "'paper' (Algorithm 1 of the paper) or 'official' (the authors' released code)."})
    miniclip_low: Optional[float] = field(default=None, metadata={
        "help": "The official variant's lower clip floor (the authors' 0.3; off by default)."})
    miniclip_high: Optional[float] = field(default=None, metadata={
        "help": "The official variant's upper clip floor (the authors' 0.5; off by default)."})
    m2po_exact: bool = field(default=True, metadata={
        "help": "One mask per optimizer step (its micro-batches on every process), from a no-grad pre-pass: the "
                "paper's rule. False: each micro-batch's own mask (no pre-pass)."})
    m2po_behavior: str = field(default="auto", metadata={
        "help": "The behaviour log-probs: 'auto' (old_per_token_logps when TRL computed them, else the sampling "
                "log-probs when the generator returned them, else the current ones: ratio 1), 'old' or 'sampling'."})
    m2po_backend: str = field(default="auto", metadata={
        "help": "m2po-ops backend: 'auto' (Triton on CUDA tensors, PyTorch otherwise), 'torch' or 'triton'."})
    m2po_validate: bool = field(default=True, metadata={
        "help": "The library's input checks (host reads; TRL syncs on every micro-batch anyway)."})
    m2po_check_drift: bool = field(default=False, metadata={
        "help": "Warn when a training forward's log-probs differ from the pre-pass's (a host sync; debugging)."})
    # The exact mode needs the pre-pass forward and the training forward to give the same
    # log-probs bit for bit, which dropout breaks: on by default here (TRL's default is off).
    disable_dropout: bool = field(default=True, metadata={
        "help": "Disable dropout (on by default for M2PO: the exact mode's two forwards must agree)."})

    def __post_init__(self):
        super().__post_init__()
        m2po_settings(self)
        check_compatible(self)


@dataclass
class _Step:
    """One optimizer step of one process: its raw micro-batches (as the Trainer fetched them),
    then their prepared inputs and the step's cuts."""

    start: int  # TRL's micro-step counter (self._step) at the step's first micro-batch
    raw: List[Any]
    prepared: Optional[List[Any]] = None
    cuts: Any = None  # M2POCuts, or None when no micro-batch carries behaviour log-probs (ratio 1)


class M2POGRPOMixin:
    """M2PO for ``GRPOTrainer`` and trainers derived from it. List it first:

        class MyM2POTrainer(M2POGRPOMixin, MyGRPOTrainer): pass

    It overrides ``_compute_loss`` (the loss), ``get_batch_samples``, ``training_step`` and
    ``_prepare_inputs`` (the exact mode's pre-pass), each calling the next class's method. The
    settings come from ``self.args`` (``M2POGRPOConfig`` fields; a plain ``GRPOConfig`` gets the
    defaults). A derived trainer that changes how ``_compute_loss`` computes log-probs, or what
    ``_prepare_inputs`` returns, must keep ``_m2po_logps`` and ``_m2po_terms`` in step with it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.m2po = m2po_settings(self.args)
        check_compatible(self.args)
        if self.m2po.behavior == "sampling" and not (self.args.use_vllm or getattr(self, "rollout_func", None)):
            raise ValueError("m2po_behavior='sampling' needs the generator's log-probs (use_vllm=True or a "
                             "rollout_func); with TRL's own generation there are none")
        self._m2po_step: Optional[_Step] = None
        self._m2po_model = None

    # -- the exact mode: one optimizer step's micro-batches ----------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The Trainer calls this once per optimizer step, just before the step's micro-batches:
        # the one place that knows which micro-batches (and how many) make the step.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._m2po_step = _Step(start=self._step, raw=list(batch_samples)) if self.m2po.exact else None
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._m2po_model = model  # the wrapped model (DDP, FSDP, ...), for the pre-pass
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._m2po_model = None

    def _prepare_inputs(self, generation_batch):
        step = self._m2po_step
        if step is None or not self.model.training:
            return super()._prepare_inputs(generation_batch)
        k = self._step - step.start
        if step.prepared is None and k == 0:
            # (called inside training_step, so TRL's step_time includes the pre-pass)
            self._m2po_prepass(step)
        if step.prepared is not None and 0 <= k < len(step.prepared):
            return step.prepared[k]
        return super()._prepare_inputs(generation_batch)

    def _m2po_prepass(self, step: _Step) -> None:
        """Prepare the step's micro-batches through TRL's ``_prepare_inputs`` (generating where TRL
        would: the parameters do not change inside a step, so the data is the same), then one
        no-grad forward per micro-batch into an ``M2POStats``, and one cut across the processes."""
        saved = self._step
        prepared = []
        try:
            for k, raw in enumerate(step.raw):
                self._step = step.start + k  # what TRL's buffering reads
                prepared.append(super()._prepare_inputs(raw))
        finally:
            self._step = saved
        step.prepared = prepared
        if not any(self._behavior(p) != "current" for p in prepared):
            return  # fresh data: the ratio is exactly 1 and M2PO masks nothing; no pre-pass needed
        began = time.perf_counter()  # the pre-pass proper: generation (if any) is TRL's own cost
        s = self.m2po
        stats = M2POStats(tau=s.tau, variant=s.variant, backend=s.backend, miniclip_low=s.miniclip_low,
                          miniclip_high=s.miniclip_high, validate=s.validate, check_drift=s.check_drift)
        model = self._m2po_model if self._m2po_model is not None else self.model_wrapped
        from trl.models.utils import disable_gradient_checkpointing

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for inputs in prepared:
                with self.compute_loss_context_manager():  # as training_step wraps compute_loss
                    logps, _, _ = self._m2po_logps(model, inputs)
                old, advantages, mask = self._m2po_terms(inputs, logps)
                stats.update(logps, old, advantages, mask)
        step.cuts = stats.solve(group=self._m2po_group())
        self._metrics["train"][_PREFIX + "prepass_seconds"].append(time.perf_counter() - began)

    def _m2po_group(self):
        """The processes the cut is solved over: every process of the run, which TRL treats as
        data-parallel replicas (its normaliser divides by num_processes). None for one process."""
        if self.accelerator.num_processes == 1:
            return None
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "non_data_parallel_size", 1) > 1:
            raise NotImplementedError("m2po_exact with tensor / context parallelism: the cut must be solved over the "
                                      "data-parallel group only, which this trainer does not resolve; use "
                                      "m2po_exact=False or data parallelism only")
        return torch.distributed.group.WORLD

    # -- the loss ----------------------------------------------------------------------------

    def _m2po_logps(self, model, inputs):
        """(per-token log-probs, entropies, MoE aux loss): the call TRL's ``_compute_loss`` makes."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=getattr(self, "aux_loss_enabled", False),
            **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                          "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                          "mm_token_type_ids", "image_position_ids")},
        )

    def _behavior(self, inputs) -> str:
        """Which behaviour log-probs a micro-batch uses: "old" (``old_per_token_logps``),
        "sampling" (``sampling_per_token_logps``) or "current" (none: TRL's fresh-data case,
        ratio exactly 1)."""
        has_old = inputs.get("old_per_token_logps") is not None
        has_sampling = inputs.get("sampling_per_token_logps") is not None
        if self.m2po.behavior == "sampling":
            if not has_sampling:
                raise ValueError("m2po_behavior='sampling' but the inputs carry no sampling_per_token_logps (the "
                                 "generator returned no log-probs)")
            return "sampling"
        if has_old:
            return "old"
        if self.m2po.behavior == "auto" and has_sampling:
            return "sampling"
        return "current"

    def _m2po_terms(self, inputs, logps: Tensor):
        """(behaviour log-probs, advantages, mask) of a micro-batch, for M2PO."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        advantages = inputs["advantages"]  # (B,) per sequence, or (B, T) from a subclass
        source = self._behavior(inputs)
        if source == "old":
            old = inputs["old_per_token_logps"]
        elif source == "sampling":
            sampled = inputs["sampling_per_token_logps"]
            # vLLM gives NaN for a token it could not score; TRL gives such a token an
            # importance ratio of 1. Here: the current log-prob, so its M2PO ratio is 1 (never masked).
            old = torch.where(torch.isnan(sampled), logps.detach(), sampled)
        else:
            old = logps.detach()  # as TRL: the ratio is exactly 1
        weights = inputs.get("importance_sampling_ratio")
        if weights is not None and source != "sampling":
            # TRL's vLLM importance-sampling correction, a per-token (or per-sequence) weight on the
            # policy term, as in TRL's loss: applied to the advantages (the M2PO terms are linear in
            # A, and a weight > 0 keeps A's sign, so the trust region and the mask stay the
            # unweighted ones). A weight of 0 (TRL's *_mask modes reject the token or sequence)
            # takes the token out of M2PO's mask: a rejected token neither trains nor enters the
            # statistics; it still counts in TRL's denominator, as in TRL's own loss. With the
            # sampling log-probs as behaviour the ratio already holds the correction: not applied.
            weights = weights.expand_as(logps)
            mask = mask * (weights != 0).to(mask.dtype)
            adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            advantages = adv * weights
        return old, advantages, mask

    def _m2po_normaliser(self, inputs, mode: str):
        # TRL's "dapo" normaliser (GRPOTrainer._compute_loss), the same operations in the same order
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":  # in eval the batch is neither split across steps nor accumulated
            normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normaliser

    def _m2po_cut(self, inputs, mode: str):
        """The exact mode's cut for this micro-batch, or None (its own mask)."""
        step = self._m2po_step
        if mode != "train" or step is None or step.prepared is None:
            if mode == "train" and self.m2po.exact:
                raise RuntimeError("m2po_exact: a training micro-batch arrived outside an optimizer step the pre-pass "
                                   "saw (the Trainer's get_batch_samples was not called for it)")
            return None
        k = self._step - step.start
        if not (0 <= k < len(step.prepared)) or step.prepared[k] is not inputs:
            raise RuntimeError(f"m2po_exact: training micro-batch {k} of the step is not the one the pre-pass "
                               "prepared; the mask would not be the step's")
        return None if step.cuts is None else step.cuts[k]

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        logps, entropies, aux_loss = self._m2po_logps(model, inputs)
        old, advantages, mask = self._m2po_terms(inputs, logps)
        cut = self._m2po_cut(inputs, mode)
        s = self.m2po
        loss, metrics = m2po_loss(
            logps, old, advantages, mask, tau=s.tau, variant=s.variant, loss_agg_mode="token-mean",
            num_tokens=self._m2po_normaliser(inputs, mode), backend=s.backend, miniclip_low=s.miniclip_low,
            miniclip_high=s.miniclip_high, validate=s.validate, cut=cut,
        )
        if aux_loss is not None:
            # as TRL: the MoE load-balancing loss, scaled for gradient accumulation
            normaliser = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normaliser
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        exact = mode == "train" and s.exact  # with no cut: fresh data, nothing can be masked anywhere
        self._log_metrics(mode, metrics, mask, entropies, inputs, exact)
        return loss

    def _log_metrics(self, mode: str, metrics: dict, mask: Tensor, entropies: Optional[Tensor], inputs,
                     exact: bool) -> None:
        """Append this micro-batch's M2PO metrics, over all processes, to TRL's metric store (one
        gather and one host read, as TRL's own metrics cost): fractions and means over every
        process's valid tokens; ``m2``, ``m2_after`` and ``cut`` as the cut reports them (the
        step's in the exact mode; otherwise each process's, averaged); ``cut`` is NaN where
        nothing was masked (TRL's log leaves NaN out of its averages)."""
        valid = (mask != 0).sum().to(torch.float32)
        trl_mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs[
            "tool_mask"]
        ent = (entropies * trl_mask).sum().float() if entropies is not None else valid.new_zeros(())
        cut = metrics["cut"]
        cols = [valid, metrics["masked_fraction"] * valid, metrics["trust_region_fraction"] * valid,
                metrics["kl"] * valid, metrics["ratio_mean"] * valid, metrics["ratio_max"], metrics["m2"],
                metrics["m2_after"], torch.where(torch.isinf(cut), torch.nan, cut), trl_mask.sum().float(), ent]
        if self.m2po.variant == "official":
            cols += [metrics["clip_low"], metrics["clip_high"]]
        local = torch.stack([c.reshape(()).float() for c in cols])
        rows = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, local.numel()).tolist()
        tot = [sum(col) for col in zip(*rows)]
        n = max(tot[0], 1.0)
        store = self._metrics[mode]
        store[_PREFIX + "masked_fraction"].append(tot[1] / n)
        store[_PREFIX + "trust_region_fraction"].append(tot[2] / n)
        store[_PREFIX + "kl"].append(tot[3] / n)
        store[_PREFIX + "ratio_mean"].append(tot[4] / n)
        store[_PREFIX + "ratio_max"].append(max(r[5] for r in rows))
        store[_PREFIX + "m2"].append(tot[6] / len(rows))
        store[_PREFIX + "m2_after"].append(tot[7] / len(rows))
        cuts = [r[8] for r in rows if not math.isnan(r[8])]
        store[_PREFIX + "cut"].append(sum(cuts) / len(cuts) if cuts else math.nan)
        store[_PREFIX + "exact"].append(1.0 if exact else 0.0)
        store["entropy"].append(tot[10] / max(tot[9], 1.0))  # TRL's own entropy metric, kept
        if self.m2po.variant == "official":
            store[_PREFIX + "clip_low"].append(sum(r[11] for r in rows) / len(rows))
            store[_PREFIX + "clip_high"].append(sum(r[12] for r in rows) / len(rows))


class M2POGRPOTrainer(M2POGRPOMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the M2PO loss (see the module docstring and docs/trl.md).
    Pass an ``M2POGRPOConfig`` as ``args``."""

    _tag_names = ["trl", "grpo", "m2po"]
    _name = "M2PO-GRPO"


__all__ = ["M2POGRPOConfig", "M2POGRPOTrainer", "M2POGRPOMixin", "m2po_settings", "check_compatible", "BEHAVIORS",
           "Settings"]
