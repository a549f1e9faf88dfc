"""The figures of `gpt.inspect`, drawn from a `gpt.lens.Inspection` into PNG files.

Figures are built with matplotlib's object API (no pyplot), so drawing them changes no global
matplotlib state and needs no display. Titles say what was measured; sizes grow with the
prompt from 2 tokens up, and prompts of up to TICK_TOKENS tokens get a tick per token.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from gpt.lens import Inspection

TokenText = Callable[[int], str]  # a token id -> how to print it
LENS_POSITIONS = 24  # the logit-lens grid shows the prompt's last positions (cells stay legible)
TICK_TOKENS = 24  # prompts up to this long get token ticks; longer ones, position numbers
CELL_CHARS = 5  # longest token text printed in a grid cell
LOG_FLOOR = 1e-3  # the log colour scale's lowest attention probability
VISIBLE = {"\n": "⏎", " ": "␣", "\t": "⇥"}  # whitespace, drawn
DPI = 110


def write_plots(inspection: Inspection, token_text: TokenText, out_dir: Path,
                log_scale: bool = False) -> list[Path]:
    """Every figure of the analyses in `inspection` (`figures`), into out_dir; returns the
    paths written."""
    drawn = figures(inspection, token_text, log_scale)
    for name, figure in drawn.items():
        figure.savefig(out_dir / name, dpi=DPI)
    return [out_dir / name for name in drawn]


def figures(inspection: Inspection, token_text: TokenText,
            log_scale: bool = False) -> dict[str, Figure]:
    """file name -> figure, for every analysis in `inspection`. log_scale: attention
    patterns on a log colour scale."""
    figures = {
        "residual_stream.png": residual_stream_figure(inspection),
        "logit_lens.png": logit_lens_figure(inspection, token_text),
        "attention_patterns.png": attention_figure(inspection, token_text, log_scale),
        "direct_logit_attribution.png": direct_logit_attribution_figure(inspection),
        "direct_logit_attribution_positions.png": positions_figure(inspection, token_text),
    }
    if inspection.logit_difference is not None:
        figures["logit_difference_attribution.png"] = logit_difference_figure(
            inspection, token_text)
    if inspection.ablation is not None:
        figures["ablation.png"] = ablation_figure(inspection)
    if inspection.patching is not None:
        figures["patching.png"] = patching_figure(inspection, token_text)
    return figures


def display(text: str) -> str:
    """A token's text as a plot label: whitespace made visible, other unprintable characters
    (which fonts have no glyph for) escaped, long texts cut."""
    text = "".join(VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"


def token_ticks(ax, axis: str, tokens: list[int], token_text: TokenText, first: int = 0,
                label: str = "") -> None:
    """Ticks along `axis` ('x' or 'y') for positions first.. first + len(tokens) - 1: each
    token's text on short prompts, else every few positions' number."""
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    n = len(tokens)
    if n <= TICK_TOKENS:
        set_ticks(range(n), [display(token_text(t)) for t in tokens], fontsize=7,
                  **({"rotation": 90} if axis == "x" and n > 12 else {}))
    else:
        step = max(1, n // 8)
        set_ticks(range(0, n, step), [str(first + p) for p in range(0, n, step)], fontsize=7)
        label = f"{label} (position)"
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label, fontsize=8)


def wrapped(text: str, inches: float, fontsize: float) -> str:
    """text broken into lines that fit `inches` at `fontsize` (a character of the default
    font is about 0.55 em wide on average), so that titles fit narrow figures."""
    per_line = max(16, int(inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, per_line) for line in text.split("\n"))


def _cell(n: int) -> float:
    """Inches per position along a plot's axis: room for a token tick on short prompts."""
    return 0.32 if n <= TICK_TOKENS else 0.14


# ----------------------------------------------------------------------------- the stream

def residual_stream_figure(inspection: Inspection) -> Figure:
    """Left: the stream's norm at each depth and the norms of the writes that built it.
    Right: each write's cosine with the stream it is added to."""
    stream = inspection.residual_stream
    depths = np.arange(len(stream["depth"]))
    blocks = depths[1:]  # block i's writes land at depth i + 1
    figure = Figure(figsize=(11, 4), layout="constrained")
    norms, cosines = figure.subplots(1, 2)
    norms.plot(depths, stream["stream_norm"], "o-", color="black", label="stream")
    norms.bar(blocks - 0.18, stream["attn_write_norm"], width=0.36, label="attention write")
    norms.bar(blocks + 0.18, stream["mlp_write_norm"], width=0.36, label="MLP write")
    norms.set_xticks(depths, stream["depth"], rotation=30)
    norms.set_xlabel("depth (the stream after the embeddings, then after each block)")
    norms.set_ylabel("L2 norm (mean over positions)")
    norms.set_title("Norm of the stream and of each write into it")
    norms.legend()
    cosines.axhline(0.0, color="grey", linewidth=0.8)
    cosines.plot(blocks, stream["attn_write_cosine"], "o-", label="attention write · resid_pre")
    cosines.plot(blocks, stream["mlp_write_cosine"], "s-", label="MLP write · resid_mid")
    cosines.set_xticks(blocks, stream["depth"][1:], rotation=30)
    cosines.set_ylabel("cosine (mean over positions)")
    cosines.set_title("Cosine of each write with the stream it is added to")
    cosines.legend()
    for ax in (norms, cosines):
        ax.grid(alpha=0.3)
    return figure


def logit_lens_figure(inspection: Inspection, token_text: TokenText) -> Figure:
    """Left: the next-token loss of the stream read out at each depth. Right: over the last
    positions, each depth's top prediction (text) and the probability it gives the actual
    next token (colour)."""
    lens = inspection.logit_lens
    depths = np.arange(len(lens["depth"]))
    with_target = len(inspection.tokens) - 1  # positions 0 .. with_target - 1 have a target
    n = min(LENS_POSITIONS, with_target)
    first = with_target - n
    shown = slice(first, first + n)
    target_prob = np.exp(-np.array([losses[shown] for losses in lens["position_loss"]]))
    width, grid_share = max(8.0, 6 + 0.5 * n), max(n / 2, 2)
    figure = Figure(figsize=(width, 1.6 + 0.55 * len(depths)), layout="constrained")
    loss_ax, grid = figure.subplots(1, 2, width_ratios=[3, grid_share])
    loss_ax.plot(depths, lens["loss"], "o-", label="logit lens")
    loss_ax.axhline(inspection.model_loss, color="black", linestyle="--", label="model's loss")
    loss_ax.set_xticks(depths, lens["depth"], rotation=30)
    loss_ax.set_xlabel("depth of the stream read out")
    loss_ax.set_ylabel("next-token loss on the prompt (nats)")
    loss_ax.set_title("Loss of each depth's stream\nthrough ln_f and lm_head", fontsize=10)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    image = grid.imshow(target_prob, origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for depth in depths:
        for column, position in enumerate(range(first, first + n)):
            top1 = token_text(lens["top_ids"][depth][position][0])
            grid.text(column, depth, display(top1), ha="center", va="center", fontsize=7,
                      color="white" if target_prob[depth, column] > 0.6 else "black")
    grid.set_yticks(depths, lens["depth"])
    grid.set_xticks(range(n), [display(token_text(t)) for t in inspection.tokens[shown]],
                    fontsize=7)
    grid.set_xlabel("input token")
    actual = grid.secondary_xaxis("top")
    actual.set_xticks(range(n), [display(token_text(t)) for t in inspection.tokens[first + 1:]],
                      fontsize=7)
    actual.set_xlabel("actual next token")
    figure.colorbar(image, ax=grid, label="probability of the\nactual next token")
    which = ("the one position with a next token" if with_target == 1 else
             f"all {n} positions with a next token" if n == with_target else
             f"positions {first}–{first + n - 1}: the last {n} of the {with_target} "
             f"with a next token")
    grid.set_title(wrapped(f"Top prediction at each depth (text) on {which}",
                           (width - 1.5) * grid_share / (3 + grid_share), 9), fontsize=9)
    return figure


# ----------------------------------------------------------------------------- attention

def attention_figure(inspection: Inspection, token_text: TokenText,
                     log_scale: bool = False) -> Figure:
    """Every head's attention pattern over the prompt: rows are queries, columns keys; the
    keys a query cannot see (later positions) are grey."""
    patterns = inspection.attention_patterns.numpy()
    n_layer, n_head, T = patterns.shape[0], patterns.shape[1], patterns.shape[-1]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    panel = max(1.6, 0.6 + 0.12 * T) if T <= TICK_TOKENS else 1.8
    width = panel * n_head + 1.6
    figure = Figure(figsize=(width, panel * n_layer + 0.9), layout="constrained")
    axes = figure.subplots(n_layer, n_head, squeeze=False)
    norm = LogNorm(LOG_FLOOR, 1.0, clip=True) if log_scale else Normalize(0.0, 1.0)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            pattern = np.ma.masked_array(patterns[layer, head], mask=future)
            image = ax.imshow(pattern, cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(f"block {layer} head {head}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if head == 0:
                token_ticks(ax, "y", inspection.tokens, token_text, label="query")
            if layer == n_layer - 1:
                token_ticks(ax, "x", inspection.tokens, token_text, label="key")
    scale = f"log colour scale, from {LOG_FLOOR:g}" if log_scale else "linear colour scale"
    figure.colorbar(image, ax=axes, shrink=0.6, label=f"attention probability ({scale})")
    figure.suptitle(wrapped(f"Attention probability of each query over the keys, per block and "
                            f"head ({T}-token prompt)", width, 10), fontsize=10)
    return figure


# ----------------------------------------------------------------------------- attribution

def direct_logit_attribution_figure(inspection: Inspection) -> Figure:
    """Each write's and each head's direct contribution to the actual next token's logit,
    averaged over the positions."""
    attribution = inspection.direct_logit_attribution
    n = len(inspection.tokens) - 1
    return _attribution_figure(
        attribution, f"Direct contribution to the actual next token's logit (mean over the "
        f"{n} positions with one; the bars sum to the mean logit, "
        f"{attribution['target_logit']:.2f})",
        "direct contribution to the logit (mean over positions)")


def logit_difference_figure(inspection: Inspection, token_text: TokenText) -> Figure:
    """Each write's and each head's direct contribution to logit(a) - logit(b) after the
    prompt."""
    difference = inspection.logit_difference
    a, b = (repr(token_text(t)) for t in difference["answer"])
    return _attribution_figure(
        difference, f"Direct contribution to logit({a}) − logit({b}) after the prompt (the bars "
        f"sum to it, {difference['logit_diff']:.2f})",
        f"direct contribution to logit({a}) − logit({b})")


def _attribution_figure(attribution: dict, title: str, measure: str) -> Figure:
    """Left: a bar per write into the stream and ln_f's bias. Right: the heads (layer x
    head), whose contributions and their c_proj bias make each attention bar."""
    names = attribution["component"] + ["ln_f bias"]
    values = attribution["logit"] + [attribution["ln_f_bias"]]
    heads = np.array(attribution["head_logit"])
    n_layer, n_head = heads.shape
    width = 7.5 + 0.6 * n_head
    figure = Figure(figsize=(width, 2 + max(0.3 * len(names), 0.5 * n_layer)),
                    layout="constrained")
    bars, grid = figure.subplots(1, 2, width_ratios=[3, max(1.2, 0.35 * n_head)])
    rows = np.arange(len(names))[::-1]  # the embeddings on top, the last block at the bottom
    bars.barh(rows, values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    bars.set_yticks(rows, names)
    bars.axvline(0.0, color="grey", linewidth=0.8)
    bars.set_xlabel(measure, fontsize=8)
    bars.grid(axis="x", alpha=0.3)
    image = _diverging_grid(grid, heads, annotate=n_layer * n_head <= 256)
    grid.set_xticks(range(n_head), [str(h) for h in range(n_head)])
    grid.set_yticks(range(n_layer), [f"block {i}" for i in range(n_layer)])
    grid.set_xlabel("head")
    grid.set_title("per head (without c_proj's bias)", fontsize=8)
    figure.colorbar(image, ax=grid, shrink=0.8, label="direct contribution")
    figure.suptitle(wrapped(title, width, 10), fontsize=10)
    return figure


def positions_figure(inspection: Inspection, token_text: TokenText) -> Figure:
    """Each write's direct contribution to the actual next token's logit, at each position."""
    attribution = inspection.direct_logit_attribution
    values = np.array(attribution["position_logit"])  # (component, position)
    names = attribution["component"]
    n = values.shape[1]
    width = max(7.0, 3.5 + _cell(n) * n)
    figure = Figure(figsize=(width, 1.8 + 0.3 * len(names)), layout="constrained")
    ax = figure.subplots()
    image = _diverging_grid(ax, values, annotate=False)
    ax.set_yticks(range(len(names)), names)
    token_ticks(ax, "x", inspection.tokens[1:], token_text, first=1, label="actual next token")
    figure.colorbar(image, ax=ax, label="direct contribution to its logit")
    ax.set_title(wrapped("Direct contribution of each write to the actual next token's logit, "
                         "per position", width - 2, 10), fontsize=10)
    return figure


# ----------------------------------------------------------------------------- experiments

def ablation_figure(inspection: Inspection) -> Figure:
    """The change in the prompt's loss when each head's or MLP's output is replaced, one at a
    time, by zero (left) or by its mean over the prompt's positions (right)."""
    ablation = inspection.ablation
    grids = {how: np.column_stack([np.array(ablation[how]["head"]), ablation[how]["mlp"]])
             for how in ("zero", "mean")}
    n_layer, columns = grids["zero"].shape
    bound = max(float(np.abs(g).max()) for g in grids.values()) or 1.0
    panel = 0.55 * columns + 1.2
    width = 2.5 + 2 * panel
    figure = Figure(figsize=(width, 1.8 + 0.5 * n_layer), layout="constrained")
    axes = figure.subplots(1, 2)
    labels = [str(h) for h in range(columns - 1)] + ["MLP"]
    for ax, (how, grid) in zip(axes, grids.items()):
        image = _diverging_grid(ax, grid, annotate=grid.size <= 256, bound=bound)
        ax.axvline(columns - 1.5, color="black", linewidth=1.5)  # heads | MLP
        ax.set_xticks(range(columns), labels)
        ax.set_yticks(range(n_layer), [f"block {i}" for i in range(n_layer)])
        ax.set_xlabel("head (and the block's MLP)")
        ax.set_title(wrapped("zero ablation" if how == "zero" else
                             "mean ablation (mean over the prompt's positions)", panel, 9),
                     fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8, label="change in loss (nats)")
    figure.suptitle(wrapped(f"Change in the prompt's next-token loss ({ablation['loss']:.3f} "
                            f"nats unablated) when one head's or one MLP's output is replaced",
                            width, 10), fontsize=10)
    return figure


def patching_figure(inspection: Inspection, token_text: TokenText) -> Figure:
    """The fraction of the logit difference recovered by patching each block's input stream at
    each position from the clean run into the corrupted one."""
    patching = inspection.patching
    recovered = np.array(patching["recovered"])  # (layer, position)
    n_layer, T = recovered.shape
    clean, corrupted = inspection.tokens, patching["corrupted_tokens"]
    width = max(7.0, 4 + _cell(T) * T)
    figure = Figure(figsize=(width, 2.2 + 0.45 * n_layer), layout="constrained")
    ax = figure.subplots()
    bound = max(1.0, float(np.abs(recovered).max()))
    image = _diverging_grid(ax, recovered, annotate=T <= TICK_TOKENS and n_layer <= 16,
                            bound=bound)
    ax.set_yticks(range(n_layer), [f"block {i}" for i in range(n_layer)])
    ax.set_ylabel("stream entering")
    if T <= TICK_TOKENS:
        labels = [display(token_text(c)) if c == x else
                  f"{display(token_text(c))}/{display(token_text(x))}"
                  for c, x in zip(clean, corrupted)]
        ax.set_xticks(range(T), labels, fontsize=7, rotation=90 if T > 12 else 0)
        ax.set_xlabel("position (clean token, or clean/corrupted where they differ)", fontsize=8)
    else:
        token_ticks(ax, "x", clean, token_text, label="clean token")
    figure.colorbar(image, ax=ax, label="fraction recovered")
    a, b = (repr(token_text(t)) for t in patching["answer"])
    ax.set_title(wrapped(f"Fraction of logit({a}) − logit({b}) recovered by patching one "
                         f"position of the clean stream into the corrupted run\n(clean "
                         f"{patching['clean_logit_diff']:.2f}, corrupted "
                         f"{patching['corrupted_logit_diff']:.2f})", width - 2, 9), fontsize=9)
    return figure


def _diverging_grid(ax, values: np.ndarray, annotate: bool, bound: float | None = None):
    """values as a grid of cells on a colour scale symmetric about 0, blue above it and red
    below (as the bars), optionally with each value written in its cell."""
    bound = bound or float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu", norm=TwoSlopeNorm(0.0, -bound, bound),
                      aspect="auto", interpolation="nearest")
    if annotate:
        for (row, column), value in np.ndenumerate(values):
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(value) > 0.6 * bound else "black")
    return image
