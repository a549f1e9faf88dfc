"""The figures of `gpt.inspect`, drawn from a `gpt.lens.Inspection` into PNG files.

Figures are built with matplotlib's object API (no pyplot), so drawing them changes no global
matplotlib state and needs no display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from gpt.lens import Inspection

TokenText = Callable[[int], str]  # a token id -> how to print it
LENS_POSITIONS = 24  # the logit-lens grid shows the prompt's last positions (cells stay legible)
CELL_CHARS = 5  # longest token text printed in a grid cell
VISIBLE = {"\n": "⏎", " ": "␣", "\t": "⇥"}  # whitespace, drawn
DPI = 110


def write_plots(inspection: Inspection, token_text: TokenText, out_dir: Path) -> list[Path]:
    """Every figure, into out_dir; returns the paths written."""
    figures = {
        "residual_stream.png": residual_stream_figure(inspection),
        "logit_lens.png": logit_lens_figure(inspection, token_text),
        "attention_patterns.png": attention_figure(inspection),
        "direct_logit_attribution.png": direct_logit_attribution_figure(inspection),
    }
    for name, figure in figures.items():
        figure.savefig(out_dir / name, dpi=DPI)
    return [out_dir / name for name in figures]


def display(text: str) -> str:
    """A token's text as a plot label: whitespace made visible, other unprintable characters
    (which fonts have no glyph for) escaped, long texts cut."""
    text = "".join(VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"


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
    norms.set_ylabel("L2 norm (mean over positions)")
    norms.set_title("The residual stream grows with depth")
    norms.legend()
    cosines.axhline(0.0, color="grey", linewidth=0.8)
    cosines.plot(blocks, stream["attn_write_cosine"], "o-", label="attention write · resid_pre")
    cosines.plot(blocks, stream["mlp_write_cosine"], "s-", label="MLP write · resid_mid")
    cosines.set_xticks(blocks, stream["depth"][1:], rotation=30)
    cosines.set_ylabel("cosine (mean over positions)")
    cosines.set_title("How each write aligns with the stream it joins")
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
    n = min(LENS_POSITIONS, len(inspection.tokens) - 1)
    first = len(inspection.tokens) - 1 - n  # positions first .. first + n - 1 have a target
    shown = slice(first, first + n)
    target_prob = np.exp(-np.array([losses[shown] for losses in lens["position_loss"]]))
    figure = Figure(figsize=(4 + 0.5 * n, 1.2 + 0.55 * len(depths)), layout="constrained")
    loss_ax, grid = figure.subplots(1, 2, width_ratios=[3, max(n / 2, 3)])
    loss_ax.plot(depths, lens["loss"], "o-", label="logit lens")
    loss_ax.axhline(inspection.model_loss, color="black", linestyle="--", label="model's loss")
    loss_ax.set_xticks(depths, lens["depth"], rotation=30)
    loss_ax.set_ylabel("next-token loss on the prompt (nats)")
    loss_ax.set_title("Where the prediction forms")
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
    figure.colorbar(image, ax=grid, label="probability of the actual next token")
    grid.set_title("Top prediction at each depth", fontsize=9)
    return figure


def attention_figure(inspection: Inspection) -> Figure:
    """Every head's attention pattern over the prompt (rows: queries, columns: keys)."""
    patterns = inspection.attention_patterns
    n_layer, n_head = patterns.shape[:2]
    figure = Figure(figsize=(1.6 * n_head + 1, 1.6 * n_layer + 0.4), layout="constrained")
    axes = figure.subplots(n_layer, n_head, squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            image = ax.imshow(patterns[layer, head].numpy(), cmap="magma", vmin=0,
                              vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"block {layer} head {head}", fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    figure.suptitle(f"Attention patterns on the {patterns.shape[-1]}-token prompt")
    return figure


def direct_logit_attribution_figure(inspection: Inspection) -> Figure:
    """Each write's direct contribution to the logit of the actual next token."""
    attribution = inspection.direct_logit_attribution
    names = attribution["component"] + ["ln_f bias"]
    values = attribution["logit"] + [attribution["ln_f_bias"]]
    figure = Figure(figsize=(7, 1.5 + 0.3 * len(names)), layout="constrained")
    ax = figure.subplots()
    rows = np.arange(len(names))[::-1]  # the embeddings on top, the last block at the bottom
    ax.barh(rows, values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(rows, names)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("direct contribution to the actual next token's logit (mean over positions)")
    ax.set_title(f"Direct logit attribution (sum = the logit, "
                 f"{attribution['target_logit']:.2f} on average)")
    ax.grid(axis="x", alpha=0.3)
    return figure
