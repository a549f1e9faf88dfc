"""The results file: {"meta": {...}, "rows": [...]}, one per suite, validated on write and
on read so that a renderer never meets a half-formed document.

meta: where and how it was measured (see `bench.timing.machine.describe`) plus the suite name,
the peak used for "% of peak" and the options of the run. rows: one dict per measurement,
with the keys `ROW_KEYS[suite]` (values may be null where a number does not exist, e.g.
the timings of a FAILED row, never a placeholder).
"""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA_VERSION = 1

# A row's status: measured; failed its correctness check (or crashed), so not timed;
# checked but deliberately not timed (Triton interpreter on a CPU).
OK, FAILED, CHECK_ONLY = "ok", "FAILED", "correctness-only"

META_KEYS = ("schema_version", "suite", "machine", "cpu", "device", "device_type", "python",
             "torch", "triton", "cuda", "git_commit", "date", "peak", "options")

ROW_KEYS = {
    "kernels": ("op", "impl", "dtype", "shape", "shape_label", "bound", "unit", "work_fwd",
                "work_fwd_bwd", "status", "error", "max_error", "fwd", "fwd_bwd", "fwd_rate",
                "fwd_bwd_rate", "fwd_pct_peak", "fwd_bwd_pct_peak", "fwd_mem_mb",
                "fwd_bwd_mem_mb"),
    "e2e": ("kind", "model", "impl", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
            "dtype", "status", "error", "ms_per_iter", "tokens_per_s", "mfu_pct", "loss"),
    "nanogpt": ("config", "args", "pair", "program", "wall_s", "startup_s", "iter_ms", "iters",
                "val_loss", "last_eval_step", "load_1m", "ran", "status", "error"),
    "sweep": ("param", "value", "seed", "n_layer", "n_head", "n_embd", "block_size",
              "batch_size", "dropout", "dtype", "tokens", "iters", "status", "error",
              "train_loss", "val_loss", "val_loss_se", "final_losses", "wall_s", "ms_per_iter",
              "tokens_per_s", "mfu_pct", "curve"),
}
SUITES = tuple(ROW_KEYS)


class SchemaError(ValueError):
    """A results document that does not have the shape renderers rely on."""


def document(suite: str, meta: dict, rows: list[dict]) -> dict:
    doc = {"meta": {"schema_version": SCHEMA_VERSION, "suite": suite, **meta}, "rows": rows}
    validate(doc)
    return doc


def validate(doc: dict) -> None:
    if not isinstance(doc, dict) or set(doc) != {"meta", "rows"}:
        raise SchemaError("a results document is a dict with exactly the keys 'meta' and 'rows'")
    meta, rows = doc["meta"], doc["rows"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SchemaError(f"meta lacks {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"schema_version {meta['schema_version']!r}, this code reads "
                          f"{SCHEMA_VERSION}")
    if meta["suite"] not in ROW_KEYS:
        raise SchemaError(f"unknown suite {meta['suite']!r}; one of {SUITES}")
    if not isinstance(rows, list):
        raise SchemaError("rows must be a list")
    wanted = set(ROW_KEYS[meta["suite"]])
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SchemaError(f"row {i} is a {type(row).__name__}, not a dict")
        if set(row) != wanted:
            raise SchemaError(f"row {i} of a {meta['suite']!r} document: missing "
                              f"{sorted(wanted - set(row))}, "
                              f"unexpected {sorted(set(row) - wanted)}")


def save(doc: dict, path: Path) -> Path:
    validate(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path} is not JSON: {exc}") from exc
    validate(doc)
    return doc
