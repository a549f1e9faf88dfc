"""One ahead-of-time compile of every Triton spec per test process, shared by
test_triton_aot.py (the machinery, and that every module's specs compile) and
test_static_report.py (no spills, shared memory within limits, at every config the
launchers accept). Compiling is most of both files' time (minutes on 2 cores), so it
happens once, whichever file asks first. The few specs a test disassembles (the attention
backward's sm_90 tiles, for test_triton_attention.py) are listed here too.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from kernels.triton import attention
from kernels.triton.aot import AotReport, compile_all

# test_triton_aot.py's own kernels: a clean one, one that must spill, ones that must fail,
# one compiled for sm_90 only.
MACHINERY_SOURCES = {name: f"{Path(__file__).parent / 'test_triton_aot.py'}:{name}"
                     for name in ("AOT_SPECS", "SPILLING_SPECS", "FAILING_SPECS",
                                   "ARCH_SPECS")}


@functools.cache
def project_report() -> AotReport:
    """Every kernels.triton spec and the machinery's, for sm_80 and sm_90, without SASS
    (the static report's SASS is checked on small compiles)."""
    return compile_all(extra_sources=tuple(MACHINERY_SOURCES.values()), timeout_s=3600)


def _sm90_single_pass_specs() -> list:
    """The single-pass attention backward's sm_90 specs at D = 64 in bf16 (with and without
    TMA), and one control: sm_80's 32-query tile compiled for sm_90, whose dQ product is
    mma.sync. Compiled with SASS by test_triton_attention.py."""
    hopper = [spec for spec in attention.AOT_SPECS
              if spec.name.startswith(("attention_dkdv_dq[bf16,D=64,",
                                       "attention_dkdv_dq_tma[bf16,D=64,"))
              and spec.compiles_for(90)]
    control = next(spec for spec in attention.AOT_SPECS
                   if spec.name == "attention_dkdv_dq[bf16,D=64,BLOCK_M=32,BLOCK_N=128,warps=8,"
                                   "stages=3]")
    return hopper + [dataclasses.replace(control, name="control: sm_80 tile on sm_90",
                                         archs=None)]


SM90_SINGLE_PASS_SPECS = _sm90_single_pass_specs()
SM90_SINGLE_PASS_SOURCE = f"{__file__}:SM90_SINGLE_PASS_SPECS"
