"""The benchmark suite: kernel timings, end-to-end training/inference throughput, and a
design-parameter sweep, generic over the `kernels` op/backend registry.

    python -m bench kernels|e2e|sweep|all [--gpu-suite] [--ops ...] [--backends ...]
    python -m bench render bench/results/<device>/kernels.json

Every number is measured after the implementation's outputs (and gradients) were checked
against `kernels.reference`; a backend that disagrees is reported as FAILED, never timed.
"""
import gpt  # noqa: F401  (refuses a `kernels` that is not this project's: gpt/__init__.py)
