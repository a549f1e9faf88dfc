"""The static report's prediction for a GPU measurement, to print beside it.

For an op at a shape and dtype on a GPU of `kernels.gpus`: the roofline of its minimum
work (what no implementation can beat) and, for the `triton` backend, the estimate with
the bytes its kernels were counted to move (`bench/results/static.json`'s traffic
ratios). Both come from the same code as the static report (`bench.static.roofline`), so a GPU
run at any shape gets the prediction the report would give for it.

    python -m bench predictions bench/results/<gpu>-<date>/kernels.json
        -> kernels-vs-static.md beside it: every timed row with its prediction
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.kernels.problems import DTYPES, PROBLEMS, Shape
from bench.static import roofline
from kernels.gpus import Gpu, gpu_by_name

STATIC_JSON = Path(__file__).resolve().parents[1] / "results" / "static.json"
TIMED_PASSES = ("fwd", "fwd_bwd")  # what the kernel suite times


def load_static(path: Path = STATIC_JSON) -> dict | None:
    """The committed static report, or None when there is none."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def traffic_ratios(static: dict | None) -> dict[tuple[str, str], float]:
    """(op, pass) -> unique bytes the Triton kernels move over the minimum."""
    if static is None:
        return {}
    return {(entry["op"], name): counted["unique_bytes_ratio"]
            for entry in static["traffic"] if not entry["error"]
            for name, counted in entry["passes"].items()
            if counted["unique_bytes_ratio"] is not None}


def predict(op: str, dims: dict, dtype_name: str, gpu: Gpu,
            ratios: dict[tuple[str, str], float]) -> dict[str, dict]:
    """{"fwd", "fwd_bwd"} -> {"ideal_ms", "bound", "triton_ms" (None without a count)}."""
    problem = PROBLEMS[op]
    dtype = DTYPES[dtype_name]
    minimum = roofline.minimum_work(problem, Shape(dims), dtype)
    predicted = {}
    for name in TIMED_PASSES:
        ideal = roofline.roofline(minimum[name], gpu, dtype)
        ratio = ratios.get((op, name))
        triton = None if ratio is None else roofline.estimate(minimum[name], ratio, gpu, dtype)
        predicted[name] = {"ideal_ms": ideal.seconds * 1e3, "bound": ideal.bound,
                           "triton_ms": None if triton is None else triton.seconds * 1e3}
    return predicted


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def kernels_vs_static(doc: dict, static: dict | None) -> str:
    """Markdown: every timed row of a kernel-suite results document beside its prediction."""
    gpu = gpu_by_name(doc["meta"]["device"])
    if gpu is None:
        return f"No prediction: {doc['meta']['device']} is not in kernels.gpus.\n"
    ratios = traffic_ratios(static)
    lines = [f"# Measured vs the static report's prediction on {gpu.name}", "",
             "ideal = the roofline of the op's minimum work; Triton est. = with the bytes its "
             "Triton kernels were counted to move (bench/results/static.json). "
             "measured / ideal is how far from the roofline a run is.", "",
             "| op | shape | dtype | impl | pass | measured ms | ideal ms | bound "
             "| Triton est. ms | measured / ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        if row["fwd"] is None or row["op"] not in PROBLEMS:
            continue  # not timed: failed its check, or correctness-only
        predicted = predict(row["op"], row["shape"], row["dtype"], gpu, ratios)
        for name in TIMED_PASSES:
            measured = row[name]["median_ms"]
            p = predicted[name]
            lines.append(f"| {row['op']} | {row['shape_label']} | {row['dtype']} | {row['impl']} "
                         f"| {name} | {_fmt(measured)} | {_fmt(p['ideal_ms'])} | {p['bound']} "
                         f"| {_fmt(p['triton_ms'] if row['impl'] == 'triton' else None)} "
                         f"| {measured / p['ideal_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench predictions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernels_json", type=Path)
    args = parser.parse_args(argv)
    doc = json.loads(args.kernels_json.read_text())
    out = args.kernels_json.with_name(args.kernels_json.stem + "-vs-static.md")
    out.write_text(kernels_vs_static(doc, load_static()))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
