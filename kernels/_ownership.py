"""One top-level name, two packages: Hugging Face's `kernels` (a dependency of
transformers 5) is also imported as `kernels`. Python imports whichever comes first on
sys.path, and the other package then fails far from the cause (transformers: "cannot
import name 'CUDAProperties' from 'kernels'"; this project's console scripts: "module
'kernels' has no attribute 'BACKENDS'"). Both sides of the clash are checked at import
time, so it fails at once with the names of both packages and the remedy:

- this package, when imported, refuses to run beside another installed distribution that
  owns the name (`check_sole_owner`);
- `gpt` (and `bench`, through it) refuses a `kernels` that is not this one, which is what
  it gets when the other package comes first on sys.path (gpt/__init__.py: that check
  cannot live here, since this module is then the one that cannot be imported).
"""
from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "gpt-kernels"  # this project, as pip knows it (pyproject.toml)
REMEDY = ("Only one package can be imported as `kernels`: remove the other one "
          "(`pip uninstall kernels`; this project pins transformers<5, which does not need "
          "it) or install this project into a virtual environment of its own (`make install`).")


def _other_owner() -> str | None:
    """'kernels <version>' when a distribution named `kernels` is installed (Hugging Face's
    package is published under that name), else None."""
    try:
        return f"kernels {importlib.metadata.version('kernels')}"
    except importlib.metadata.PackageNotFoundError:
        return None


def clash_message(ours: str, theirs: str) -> str:
    return (f"the top-level import name `kernels` is owned by two packages: {ours} and "
            f"{theirs}. {REMEDY}")


def check_sole_owner(our_path: str) -> None:
    """Raise ImportError when another installed distribution also owns `kernels`."""
    other = _other_owner()
    if other is not None:
        raise ImportError(clash_message(f"this project's kernel library ({DISTRIBUTION}, "
                                        f"{our_path})", f"Hugging Face's {other}"))

