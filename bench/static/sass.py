"""The SASS instruction mix that decides a kernel's speed, from its opcode counts.

Counts are static: how often an instruction appears in the binary, not how often it
runs (a loop body counts once). They answer yes/no questions that decide speed — does
the kernel use tensor cores, and which instruction (HMMA is mma.sync, the only kind on
sm_80; HGMMA is sm_90's warpgroup wgmma); does it feed them through ldmatrix (LDSM); does
it copy global -> shared asynchronously (LDGSTS is cp.async, UTMALDG/UTMASTG/UBLKCP the
sm_90 Tensor Memory Accelerator); are its global loads and stores 128-bit wide; does it
touch local memory (LDL/STL: spills or local arrays) — and give a rough share of
vectorized accesses.

    opcode_mix(counts)            -> InstructionMix  (counts from kernels.triton.aot)
    extension_opcodes(library)    -> {(arch, function): counts} for a CUDA fat binary
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from kernels.triton.aot import sass_opcode_counts

TENSOR_CORE_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA")
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UTMAREDG", "UBLKCP", "UBLKRED")
GLOBAL_LOAD_OPCODES = ("LDG", "LDGSTS")  # LDGSTS reads global memory too (into shared)
GLOBAL_STORE_OPCODES = ("STG",)
LOCAL_OPCODES = ("LDL", "STL")


@dataclass(frozen=True)
class InstructionMix:
    tensor_core: dict[str, int]   # full tensor-core opcode -> count
    ldsm: int                     # ldmatrix
    ldgsts: int                   # cp.async
    tma: int                      # TMA / bulk copies
    global_loads: int
    global_loads_128: int
    global_stores: int
    global_stores_128: int
    local: int                    # LDL + STL
    instructions: int

    @property
    def tensor_core_kind(self) -> str | None:
        """The base opcode of the tensor-core instructions ("HMMA", "HGMMA", "HMMA+HGMMA")."""
        kinds = sorted({opcode.split(".")[0] for opcode in self.tensor_core})
        return "+".join(kinds) or None

    @property
    def tensor_core_shape(self) -> str | None:
        """The most frequent tensor-core instruction, e.g. "HMMA.16816.F32.BF16"."""
        if not self.tensor_core:
            return None
        return max(self.tensor_core.items(), key=lambda item: (item[1], item[0]))[0]

    @property
    def load_128_share(self) -> float | None:
        return self.global_loads_128 / self.global_loads if self.global_loads else None

    @property
    def store_128_share(self) -> float | None:
        return self.global_stores_128 / self.global_stores if self.global_stores else None

    def to_json(self) -> dict:
        return {**asdict(self), "tensor_core_kind": self.tensor_core_kind,
                "tensor_core_shape": self.tensor_core_shape,
                "load_128_share": self.load_128_share, "store_128_share": self.store_128_share}


def _base(opcode: str) -> str:
    return opcode.split(".")[0]


def _is_128_bit(opcode: str) -> bool:
    return "128" in opcode.split(".")[1:]


def opcode_mix(counts: dict[str, int]) -> InstructionMix:
    def total(bases, wide_only=False):
        return sum(n for opcode, n in counts.items()
                   if _base(opcode) in bases and (not wide_only or _is_128_bit(opcode)))

    return InstructionMix(
        tensor_core={op: n for op, n in sorted(counts.items())
                     if _base(op) in TENSOR_CORE_OPCODES},
        ldsm=total(("LDSM",)), ldgsts=total(("LDGSTS",)), tma=total(TMA_OPCODES),
        global_loads=total(GLOBAL_LOAD_OPCODES),
        global_loads_128=total(GLOBAL_LOAD_OPCODES, wide_only=True),
        global_stores=total(GLOBAL_STORE_OPCODES),
        global_stores_128=total(GLOBAL_STORE_OPCODES, wide_only=True),
        local=total(LOCAL_OPCODES), instructions=sum(counts.values()))


# `cuobjdump -sass` of a fat binary: "arch = sm_90" opens each embedded cubin's section,
# "Function : <mangled name>" each kernel's code.
_ARCH = re.compile(r"^arch = (sm_\d+)")
_FUNCTION = re.compile(r"^\s*Function : (\S+)")


def split_functions(sass: str) -> dict[tuple[str, str], str]:
    """(arch, mangled function) -> its SASS text, from a fat binary's `cuobjdump -sass`."""
    functions: dict[tuple[str, str], list[str]] = {}
    arch, current = None, None
    for line in sass.splitlines():
        if match := _ARCH.match(line):
            arch, current = match.group(1), None
        elif (match := _FUNCTION.match(line)) and arch is not None:
            current = functions.setdefault((arch, match.group(1)), [])
        elif current is not None:
            current.append(line)
    return {key: "\n".join(lines) for key, lines in functions.items()}


def extension_opcodes(library: Path, cuobjdump: str) -> dict[tuple[str, str], dict[str, int]]:
    """Opcode counts of every kernel of every arch in a fat binary (seconds for a big one)."""
    sass = subprocess.run([cuobjdump, "-sass", str(library)], check=True, capture_output=True,
                          text=True).stdout
    return {key: sass_opcode_counts(text) for key, text in split_functions(sass).items()}
