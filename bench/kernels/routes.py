"""`auto`'s routes (kernels/routes.json) derived from the committed GPU records.

    python -m bench routes            # rewrites kernels/routes.json from bench/results/*/
    python -m bench routes --check    # exits 1 when the committed table is not what the
                                      # records give

The rule, per op and GPU architecture (`kernels.gpus`: the record's device -> its arch):
- the record: the newest (by its date) of the records under bench/results with bf16 rows
  of that op (training's dtype), its kernel-suite and headline files together;
- the candidates: every implementation `auto` can run (a backend at its default kernel
  version, or the torch backend with one SDPA kernel preferred: the "sdpa-*" rows); other
  rows (torch.compile, eager baselines, non-default kernel versions) are not routes;
- correct only: an implementation with any FAILED row for the op in that record is left
  out (and the route says why);
- fastest first: by the total forward+backward time over the shapes every remaining
  candidate was timed at.
`kernels.routing` appends the `torch` backend to every route that lacks it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.timing.machine import REPO_ROOT
from kernels.gpus import gpu_by_name
from kernels.routing import ROUTES_PATH
from kernels.torch_backend import SDPA_KERNELS

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RECORD_FILES = ("kernels.json", "headline-*.json")
DTYPE = "bf16"
# A record's implementation name -> the route implementation `auto` runs for it.
IMPLEMENTATIONS = {"torch": "torch", "triton": "triton", "cuda": "cuda",
                   **{name: f"torch:{name}" for name in SDPA_KERNELS}}


def record_files(results_dir: Path = RESULTS_DIR) -> list[Path]:
    return sorted(path for pattern in RECORD_FILES for path in results_dir.glob(f"*/{pattern}"))


def _rows_by_route(paths: list[Path]) -> dict[tuple[str, str], dict]:
    """(op, arch) -> the newest record's bf16 rows for it: {"record": folder, "date",
    "device", "rows"}."""
    found: dict[tuple[str, str], dict] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        gpu = gpu_by_name(doc["meta"]["device"])
        if gpu is None:
            continue  # a CPU record, or a GPU the table does not know
        for row in doc["rows"]:
            if row["dtype"] != DTYPE:
                continue
            key = (row["op"], gpu.arch.name)
            folder = path.parent
            entry = found.get(key)
            if entry is None or (entry["record"] != folder and doc["meta"]["date"] > entry["date"]):
                entry = found[key] = {"record": folder, "date": doc["meta"]["date"],
                                      "device": doc["meta"]["device"], "files": set(),
                                      "rows": []}
            if entry["record"] == folder:
                entry["files"].add(path.name)
                entry["rows"].append(row)
    return found


def _timing_method(rows: list[dict]) -> str:
    methods = {(row["fwd_bwd"] or {}).get("method", "events around one call") for row in rows
               if row["status"] == "ok"}
    return ", ".join(sorted(methods))


def route(op: str, arch: str, entry: dict, root: Path = REPO_ROOT) -> dict:
    """One route from one record's rows (see the module docstring)."""
    rows = [r for r in entry["rows"] if r["impl"] in IMPLEMENTATIONS]
    failed = {r["impl"]: f"FAILED at {r['shape_label']}: {r['error']}" for r in rows
              if r["status"] != "ok"}
    timed: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["impl"] not in failed and r["status"] == "ok" and r["fwd_bwd"]:
            timed.setdefault(r["impl"], {})[r["shape_label"]] = r["fwd_bwd"]["median_ms"]
    shapes = sorted(set.intersection(*(set(t) for t in timed.values()))) if timed else []
    totals = {impl: sum(times[s] for s in shapes) for impl, times in timed.items()}
    ranked = sorted(totals, key=totals.get)
    record = entry["record"]
    shown = record.relative_to(root) if record.is_relative_to(root) else record
    return {"op": op, "arch": arch, "order": [IMPLEMENTATIONS[impl] for impl in ranked],
            "records": [f"{shown}/{name}" for name in sorted(entry["files"])],
            "device": entry["device"], "date": entry["date"], "dtype": DTYPE,
            "timing": _timing_method(rows), "shapes": shapes,
            "fwd_bwd_ms": {IMPLEMENTATIONS[impl]: round(totals[impl], 4) for impl in ranked},
            "excluded": {IMPLEMENTATIONS[impl]: why for impl, why in sorted(failed.items())}}


def derive(paths: list[Path] | None = None, root: Path = REPO_ROOT) -> dict:
    """The routes document for the given record files (default: every committed one)."""
    found = _rows_by_route(record_files() if paths is None else paths)
    routes = [route(op, arch, entry, root) for (op, arch), entry in sorted(found.items())]
    return {"derived_by": "python -m bench routes (bench/kernels/routes.py), from the "
                          "records under bench/results; read by kernels/routing.py",
            "rule": "per op and GPU arch: the newest record's bf16 rows; implementations "
                    "auto can run, none that FAILED; fastest total fwd+bwd time over the "
                    "shapes all were timed at first; torch appended where absent",
            "routes": [r for r in routes if r["order"]]}


def render(document: dict) -> str:
    return json.dumps(document, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench routes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="compare the committed table with the records; write nothing")
    args = parser.parse_args(argv)
    text = render(derive())
    if args.check:
        current = ROUTES_PATH.read_text() if ROUTES_PATH.is_file() else ""
        if current != text:
            print(f"{ROUTES_PATH} is not what the records give: run python -m bench routes")
            return 1
        print(f"{ROUTES_PATH} is up to date")
        return 0
    ROUTES_PATH.write_text(text)
    for r in json.loads(text)["routes"]:
        print(f"{r['op']:<22} {r['arch']}  {' > '.join(r['order'])}   "
              f"({', '.join(r['records'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
