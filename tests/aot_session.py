"""One ahead-of-time compile of every Triton spec per test process, shared by
test_triton_aot.py (the machinery, and that every module's specs compile) and
test_static_report.py (no spills, shared memory within limits, at every config the
launchers accept). Compiling is most of both files' time (minutes on 2 cores), so it
happens once, whichever file asks first.
"""
from __future__ import annotations

import functools
from pathlib import Path

from kernels.triton.aot import AotReport, compile_all

# test_triton_aot.py's own kernels: a clean one, one that must spill, ones that must fail.
MACHINERY_SOURCES = {name: f"{Path(__file__).parent / 'test_triton_aot.py'}:{name}"
                     for name in ("AOT_SPECS", "SPILLING_SPECS", "FAILING_SPECS")}


@functools.cache
def project_report() -> AotReport:
    """Every kernels.triton spec and the machinery's, for sm_80 and sm_90, without SASS
    (the static report's SASS is checked on small compiles)."""
    return compile_all(extra_sources=tuple(MACHINERY_SOURCES.values()), timeout_s=3600)
