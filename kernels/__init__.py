"""Fused Triton kernels of m2po-ops, installed as ``m2po_ops.kernels``."""
