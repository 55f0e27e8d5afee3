"""Trainer integrations of the M2PO loss.

Each submodule imports its trainer, so none is imported here: ``import m2po_ops`` (and
``import m2po_ops.integrations``) works without any trainer installed.

- ``m2po_ops.integrations.verl``: verl >= 0.9 policy losses ``"m2po"`` and ``"m2po_official"``,
  loaded by verl itself through the ``verl.plugins`` entry point, and the exact (one mask per
  optimizer step) hook on verl's FSDP engine. See docs/verl.md.
- ``m2po_ops.integrations.trl``: ``M2POGRPOTrainer`` / ``M2POGRPOConfig`` (TRL >= 1.16's
  ``GRPOTrainer`` with the M2PO loss, exact per optimizer step by default) and
  ``M2POGRPOMixin`` for trainers derived from ``GRPOTrainer``. See docs/trl.md.
"""
