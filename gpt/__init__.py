"""The GPT around the kernels: model, data, training, sampling, checkpoints, inspection.

`gpt` needs this project's `kernels` package; another package that owns the same import
name (Hugging Face's `kernels`, which transformers 5 installs) would be imported instead
when it comes first on sys.path, and fail far from the cause. Checked here, once.
"""
import kernels as _kernels

if getattr(_kernels, "__distribution__", None) != "gpt-kernels":
    raise ImportError(
        "the top-level import name `kernels` is owned by two packages: this project's kernel "
        "library (gpt-kernels), which `gpt` needs, and another one, at "
        f"{getattr(_kernels, '__file__', None) or 'a namespace package'}, which Python imported "
        "instead (Hugging Face's `kernels`, installed by transformers>=5?). Only one package "
        "can be imported as `kernels`: remove the other one (`pip uninstall kernels`; this "
        "project pins transformers<5, which does not need it) or install this project into a "
        "virtual environment of its own (`make install`).")
