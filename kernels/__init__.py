"""Triton kernels of mmcore, installed as ``mmcore.kernels`` (never a top-level ``kernels`` package).

One kernel family per module; each module imports Triton, so import them only where Triton is installed.
Models never import this package: they call ``mmcore.ops``, which dispatches here.
"""
