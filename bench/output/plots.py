"""Plots of results documents (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and GPU machines have no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.output.results import OK  # noqa: E402


def plot_kernels(doc: dict, out_dir: Path) -> list[Path]:
    """One figure per op: % of peak (or ms when the peak is unknown) of forward+backward
    against shape, one line per implementation, one panel per dtype."""
    rows = [r for r in doc["rows"] if r["status"] == OK]
    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        dtypes = list(dict.fromkeys(r["dtype"] for r in op_rows))
        has_peak = all(r["fwd_bwd_pct_peak"] is not None for r in op_rows)
        fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes):
            shapes = list(dict.fromkeys(r["shape_label"] for r in op_rows if r["dtype"] == dtype))
            for impl in dict.fromkeys(r["impl"] for r in op_rows):
                points = [(shapes.index(r["shape_label"]),
                           r["fwd_bwd_pct_peak"] if has_peak else r["fwd_bwd"]["median_ms"])
                          for r in op_rows if r["impl"] == impl and r["dtype"] == dtype]
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl)
            ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(f"fwd+bwd % of peak {op_rows[0]['unit']}" if has_peak
                          else "fwd+bwd ms")
            ax.set_title(f"{op} {dtype}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(doc["meta"]["device"], fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"kernels-{op}.png"))
    return paths


def plot_sweep(doc: dict, out_dir: Path) -> list[Path]:
    """Val loss against training tokens and against training time (evals excluded), one
    panel per swept parameter, one curve per value (seed 1337)."""
    rows = [r for r in doc["rows"] if r["status"] == OK and r["curve"] and r["param"] != "seed"]
    params = list(dict.fromkeys(r["param"] for r in rows))
    if not params:
        return []
    paths = []
    for x_key, x_label, name in (("tokens", "training tokens", "sweep-loss-vs-tokens.png"),
                                 ("wall_s", "training time (s)", "sweep-loss-vs-time.png")):
        cols = min(3, len(params))
        n_rows = -(-len(params) // cols)
        fig, axes = plt.subplots(n_rows, cols, figsize=(4.4 * cols, 3.4 * n_rows),
                                 squeeze=False)
        for ax in axes.flat[len(params):]:
            ax.set_visible(False)
        for ax, param in zip(axes.flat, params):
            for r in sorted((r for r in rows if r["param"] == param), key=lambda r: r["value"]):
                xs = [point[x_key] for point in r["curve"]]
                ys = [point["val_loss"] for point in r["curve"]]
                ax.plot(xs, ys, marker="o", markersize=3, label=f"{param}={r['value']}")
            ax.set_xlabel(x_label)
            ax.set_ylabel("val loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"design-parameter sweep, {doc['meta']['options']['tokens']:,} tokens "
                     f"per config — {doc['meta']['device']}", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / name))
    return paths


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTTERS = {"kernels": plot_kernels, "sweep": plot_sweep}


def plot(doc: dict, out_dir: Path) -> list[Path]:
    plotter = PLOTTERS.get(doc["meta"]["suite"])
    return plotter(doc, Path(out_dir)) if plotter else []
