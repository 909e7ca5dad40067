"""setuptools entry point. All metadata lives in pyproject.toml.

This file exists for the optional CUDA extension in csrc/ (not built yet): it must only ever be
built when a CUDA build of torch and nvcc are both present, so that a plain install never fails.
"""
from setuptools import setup

setup()
