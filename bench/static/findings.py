"""What the static report's numbers say needs work, as a short list a kernel engineer reads
first. Every rule is generic over the rows (no kernel is named here): a new kernel or
config is judged by the same rules as soon as its spec or binary exists.

    findings(doc) -> [{"title": ..., "details": [...]}]   only the rules that fire
"""
from __future__ import annotations

from collections import defaultdict

# Issue 10's target for the memory-bound ops: >= 85 % of HBM bandwidth at GPT-2 shapes.
HBM_TARGET_PCT = 85.0
LOW_OCCUPANCY_WARPS = 16           # a quarter of the SM's 64 warps
EXTRA_BYTES_RATIO = 1.10           # counted unique bytes over the minimum
REREAD_RATIO = 1.5                 # requested bytes over unique bytes
EXTRA_FLOPS_RATIO = 1.10           # tensor-core FLOPs over the model's


def _family(row: dict) -> str:
    """The kernel without its namespaces and template arguments: what its variants share."""
    name = row["kernel"].split("<", 1)[0]
    return f"{row['backend']} {name.rsplit('::', 1)[-1]}"


def _variant(row: dict) -> str:
    """What tells a family's variants apart: the Triton config, the CUDA template args."""
    if row["backend"] == "triton":
        return f"[{row['config']}] {row['arch']}"
    args = row["kernel"][len(row["kernel"].split("<", 1)[0]):]
    return f"{args} {row['arch']}".strip()


def _where(row: dict) -> str:
    return f"{_family(row)} {_variant(row)}"


def _grouped(rows: list[dict], describe) -> list[str]:
    """One line per kernel family: how many of its variants the rule caught, on which
    archs, and `describe` of those variants (typically the worst one's numbers)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[_family(row)].append(row)
    lines = []
    for family, members in groups.items():
        archs = "/".join(sorted({row["arch"] for row in members}))
        lines.append(f"{family} ({len(members)} variant{'s' if len(members) != 1 else ''}, "
                     f"{archs}): {describe(members)}")
    return lines


def _compile_failures(doc):
    failed = [row for row in doc["kernels"] if row["error"]]
    return [f"{_where(row)}: {row['error'].splitlines()[0][:160]}" for row in failed]


def _spills(doc):
    spilling = [row for row in doc["kernels"] if row["spills"]]

    def worst(rows):
        row = max(rows, key=lambda r: r["spill_stores"] or r["stack_bytes"] or 0)
        amount = (f"{row['spill_stores']} B/thread spill stores" if row["spill_stores"]
                  is not None else f"{row['stack_bytes']} B/thread stack (local memory)")
        return f"worst {_variant(row)}: {amount} at {row['registers']} registers"
    return _grouped(spilling, worst)


def _shared_over_limit(doc):
    return [f"{_where(row)}: {row['shared_bytes']} B > {row['shared_limit']} B per block"
            for row in doc["kernels"] if row["shared_fits"] is False]


def _used_rows(doc):
    """The configs GPT-2's shapes run (`AotSpec.gpt2`): speed findings are about these;
    every config is checked for spills and limits."""
    return [row for row in doc["kernels"] if row["gpt2"] and not row["error"]]


def _tensor_core_rows(doc, arch=None):
    return [row for row in _used_rows(doc) if row["sass"] and row["sass"]["tensor_core"]
            and (arch is None or row["arch"] == arch)]


def _mma_sync_without_ldmatrix(doc):
    # mma.sync (HMMA) takes its operands from registers, best loaded from shared memory
    # with ldmatrix; wgmma (HGMMA) reads shared memory itself, so the rule is HMMA's.
    rows = [row for row in _tensor_core_rows(doc)
            if "HMMA" in row["sass"]["tensor_core_kind"] and not row["sass"]["ldsm"]]
    return _grouped(rows, lambda members: f"{members[0]['sass']['tensor_core_shape']} with "
                                          "fragments built by plain shared-memory loads")


def _no_async_copies(doc):
    rows = [row for row in _tensor_core_rows(doc)
            if not row["sass"]["ldgsts"] and not row["sass"]["tma"]]
    return _grouped(rows, lambda members: "global -> registers -> shared synchronously "
                                          "(no LDGSTS, no TMA): no multi-stage pipeline")


def _hmma_on_hopper(doc):
    # Any mma.sync on sm_90 is a product off wgmma's path, also beside wgmma ones (Triton
    # falls back to mma.sync for a product of fewer than 64 rows per warpgroup).
    rows = [row for row in _tensor_core_rows(doc, "sm_90")
            if "HMMA" in row["sass"]["tensor_core_kind"].split("+")]

    def describe(members):
        row = members[0]
        hmma = sum(n for opcode, n in row["sass"]["tensor_core"].items()
                   if opcode.startswith("HMMA"))
        beside = " beside HGMMA" if "HGMMA" in row["sass"]["tensor_core_kind"] else ""
        return (f"e.g. {_variant(row)}: {hmma} HMMA (mma.sync){beside} where sm_90 has "
                "wgmma (HGMMA)")
    return _grouped(rows, describe)


def _no_tma_on_hopper(doc):
    rows = [row for row in _tensor_core_rows(doc, "sm_90") if not row["sass"]["tma"]]
    return _grouped(rows, lambda members: "no TMA (UTMALDG/UTMASTG)")


def _no_wide_loads(doc):
    # Static counts include the scalar loads every kernel has (a target, a row's
    # statistics), so a low share alone says little; a kernel none of whose variants has a
    # 128-bit load moves its data in narrow accesses (a scalar fallback variant beside
    # vectorized siblings is by design, and not reported).
    # A kernel whose tiles come in by TMA (bulk copies, wider than any LDG) keeps only its
    # scalar loads on LDG: not a narrow kernel.
    families: dict[str, list[dict]] = defaultdict(list)
    for row in _used_rows(doc):
        if row["sass"] and row["sass"]["global_loads"] and not row["sass"]["tma"]:
            families[_family(row)].append(row)
    rows = [row for members in families.values()
            if not any(r["sass"]["global_loads_128"] for r in members) for row in members]

    def describe(members):
        row = max(members, key=lambda r: r["sass"]["global_loads"])
        return (f"e.g. {_variant(row)}: none of its {row['sass']['global_loads']} global "
                "loads is 128-bit")
    return _grouped(rows, describe)


def _low_occupancy(doc):
    # Tensor-core kernels hide latency with software pipelining at 1-2 blocks per SM by
    # design; a memory-bound kernel needs many warps in flight to keep HBM busy.
    rows = [row for row in _used_rows(doc) if row["occupancy"]
            and row["occupancy"]["warps_per_sm"] < LOW_OCCUPANCY_WARPS
            and not (row["sass"] and row["sass"]["tensor_core"])]

    def describe(members):
        row = min(members, key=lambda r: r["occupancy"]["warps_per_sm"])
        occ = row["occupancy"]
        blocks = f"{occ['blocks_per_sm']} block{'s' if occ['blocks_per_sm'] != 1 else ''}"
        return (f"lowest {_variant(row)}: {occ['warps_per_sm']} warps/SM ({blocks}), "
                f"limited by {occ['limited_by']}")
    return _grouped(rows, describe)


def _unknown_occupancy(doc):
    rows = [row for row in _used_rows(doc) if row["backend"] == "cuda" and row["occupancy"] is None]

    def describe(members):
        row = members[0]
        return ("dynamic shared memory, sized at launch" if row["dynamic_shared"]
                else "no __launch_bounds__, so the block size is not in the binary")
    return _grouped(rows, describe)


def _traffic(doc):
    lines = []
    for entry in doc["traffic"]:
        if entry["error"]:
            lines.append(f"{entry['op']}: not counted ({entry['error'][:160]})")
            continue
        for name, counted in entry["passes"].items():
            where = f"{entry['op']} {name} ({entry['shape']}, {entry['dtype']})"
            ratio = counted["unique_bytes_ratio"]
            if ratio is not None and ratio > EXTRA_BYTES_RATIO:
                lines.append(f"{where}: Triton kernels move {ratio:.2f}x the minimum bytes")
            reread = counted["requested_per_unique"]
            if reread is not None and reread > REREAD_RATIO:
                lines.append(f"{where}: {reread:.2f}x more bytes requested than distinct "
                             "(re-reads that only L2 can absorb)")
            flops = counted["dot_flops_ratio"]
            if flops is not None and flops > EXTRA_FLOPS_RATIO:
                lines.append(f"{where}: tensor-core FLOPs {flops:.2f}x the model's "
                             "(recomputation and masked tiles, at the interpreter's tiles)")
    return lines


def _below_hbm_target(doc):
    lines = []
    for row in doc["roofline"]:
        if (row["headline"] and row["dtype"] == "bf16" and row["ideal"]["bound"] == "memory"
                and row["estimate_pct_of_peak"] is not None
                and row["estimate_pct_of_peak"] < HBM_TARGET_PCT):
            lines.append(f"{row['op']} {row['pass']} ({row['shape']}) on {row['gpu']}: at most "
                         f"{row['estimate_pct_of_peak']:.0f}% of HBM bandwidth with the bytes "
                         "its Triton kernels move")
    return lines


RULES = (
    ("Compile failures", _compile_failures),
    ("Register spills (local memory)", _spills),
    ("Shared memory over the per-block limit", _shared_over_limit),
    ("mma.sync (HMMA) fed without ldmatrix (LDSM)", _mma_sync_without_ldmatrix),
    ("Tensor cores without asynchronous copies", _no_async_copies),
    ("sm_90 kernels on mma.sync (HMMA) instead of wgmma (HGMMA)", _hmma_on_hopper),
    ("sm_90 tensor-core kernels without TMA", _no_tma_on_hopper),
    ("Kernels with no 128-bit global load", _no_wide_loads),
    (f"Kernels without tensor cores under {LOW_OCCUPANCY_WARPS} warps per SM", _low_occupancy),
    ("CUDA kernels whose occupancy the binary cannot tell", _unknown_occupancy),
    ("Traffic beyond the minimum (interpreter count)", _traffic),
    (f"Memory-bound passes below the {HBM_TARGET_PCT:.0f}% HBM target at GPT-2 124M",
     _below_hbm_target),
)


def findings(doc: dict) -> list[dict]:
    found = []
    for title, rule in RULES:
        details = rule(doc)
        if details:
            found.append({"title": f"{title}: {len(details)}", "details": details})
    return found
