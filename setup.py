"""m2po-ops: fused, exact and sync-free M2PO (Second-Moment Trust Policy Optimization)."""

from setuptools import setup

setup(
    name="m2po-ops",
    version="0.1.0",
    description="Exact, sync-free M2PO loss for RL trainers: PyTorch reference and fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder of the source tree but are
    # installed as m2po_ops.kernels: a top-level `kernels` module would clash with another
    # PyPI package of that name.
    packages=["m2po_ops", "m2po_ops.kernels", "m2po_ops.integrations"],
    package_dir={"m2po_ops": "m2po_ops", "m2po_ops.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    # verl (>= 0.9) imports every module of this group at `import verl`, in the driver and in each
    # Ray worker: that registers the policy losses "m2po" and "m2po_official". Without verl
    # installed nothing reads it, so the core install stays verl-free.
    entry_points={"verl.plugins": ["m2po_ops = m2po_ops.integrations.verl"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "numpy"],
        "bench": ["pytest-benchmark", "matplotlib", "numpy"],
    },
)
