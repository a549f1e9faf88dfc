"""Writing a suite's results: JSON, its Markdown table, its plots, and the folder's summary."""
from __future__ import annotations

from pathlib import Path

from bench.output import plots, report, results

SUMMARY = "summary.md"
SUITE_ORDER = tuple(results.SUITES)


def write_suite(doc: dict, out_dir: Path) -> list[Path]:
    """<suite>.json, <suite>.md and the suite's plots in out_dir, then the summary."""
    out_dir = Path(out_dir)
    suite = doc["meta"]["suite"]
    json_path = results.save(doc, out_dir / f"{suite}.json")
    return [json_path, *render_json(json_path), write_summary(out_dir)]


def render_json(json_path: Path) -> list[Path]:
    """(Re-)render the Markdown and plots next to a results JSON file."""
    doc = results.load(json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(report.render(doc))
    return [md_path, *plots.plot(doc, json_path.parent)]


def write_summary(out_dir: Path) -> Path:
    """summary.md: every suite's table in the folder, in suite order."""
    parts = [(out_dir / f"{suite}.md").read_text() for suite in SUITE_ORDER
             if (out_dir / f"{suite}.md").exists()]
    path = out_dir / SUMMARY
    path.write_text("\n\n".join(parts))
    return path


def render_files(paths: list[Path]) -> list[Path]:
    written = []
    for path in paths:
        written += render_json(Path(path))
        written.append(write_summary(Path(path).parent))
    return written
