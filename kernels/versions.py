"""Numbered kernel versions (llm.c's habit): when a kernel is rewritten, the version it
replaces stays selectable until a GPU record shows the new one correct and faster, so one
GPU session can measure both and nothing that worked is lost.

A kernel module declares its versions once:

    VERSIONS = declare("triton_attention", {1: "three kernels, 7 GEMMs in the backward",
                                            2: "FlashAttention-2 single-pass backward"},
                       default=2)

and its launcher asks `VERSIONS.current()`. The environment variable
GPTK_<NAME>_VERSION (here GPTK_TRITON_ATTENTION_VERSION=1), read when the module is
imported, or `kernels.versions.select(name, version)` at run time (a benchmark comparing
both in one process) picks another. `table()` lists every declared kernel, its versions
and the one in use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class KernelVersions:
    name: str
    versions: dict[int, str]  # number -> what that version is
    default: int
    selected: int = field(init=False)

    def __post_init__(self):
        if self.default not in self.versions:
            raise ValueError(f"{self.name}: default version {self.default} is not one of "
                             f"{sorted(self.versions)}")
        self.selected = self._from_environment()

    @property
    def variable(self) -> str:
        return f"GPTK_{self.name.upper()}_VERSION"

    def _from_environment(self) -> int:
        value = os.environ.get(self.variable)
        if value is None:
            return self.default
        if not value.strip().isdigit() or int(value) not in self.versions:
            raise ValueError(f"{self.variable}={value!r}: {self.name} has versions "
                             f"{self._describe()}")
        return int(value)

    def _describe(self) -> str:
        return "; ".join(f"{n}: {what}" for n, what in sorted(self.versions.items()))

    def current(self) -> int:
        return self.selected

    def select(self, version: int) -> None:
        if version not in self.versions:
            raise ValueError(f"{self.name} has versions {self._describe()}, got {version!r}")
        self.selected = version


_DECLARED: dict[str, KernelVersions] = {}


def declare(name: str, versions: dict[int, str], default: int) -> KernelVersions:
    """Register a kernel's numbered versions (once per name) and return its selector."""
    if name in _DECLARED:
        raise ValueError(f"kernel versions {name!r} are declared twice")
    _DECLARED[name] = KernelVersions(name, dict(versions), default)
    return _DECLARED[name]


def select(name: str, version: int) -> None:
    """Run `name` at `version` from now on (in this process)."""
    if name not in _DECLARED:
        raise KeyError(f"no kernel versions named {name!r}; declared: {sorted(_DECLARED)}")
    _DECLARED[name].select(version)


def table() -> list[dict]:
    """Every declared kernel: its versions, the default and the one in use."""
    return [{"name": k.name, "versions": dict(k.versions), "default": k.default,
             "selected": k.selected, "variable": k.variable} for k in _DECLARED.values()]
