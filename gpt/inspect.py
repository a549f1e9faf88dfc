"""Look inside a trained GPT on one prompt: its residual stream, the logit lens, its attention
patterns and the direct logit attribution of every write and head, and, when asked for,
what changes when its activations are changed (ablation, patching); as plots and one JSON
record.

    python -m gpt.inspect --init_from=out-shakespeare-char --start="ROMEO:" --out_dir=inspect
    python -m gpt.inspect --init_from=path/to/hf-gpt2 --start=FILE:prompt.txt   # or gpt-inspect
    python -m gpt.inspect --init_from=... --start="When Mary and John went to the store, John \
        gave a drink to" --corrupt="When Mary and John went to the store, Mary gave a drink to" \
        --tokens="(' Mary', ' John')" --ablate=True

--init_from names our checkpoint or nanoGPT's ckpt.pt (the file, or the out dir holding it)
or a local Hugging Face GPT-2 directory; the prompts and tokens are tokenized with the
checkpoint's vocabulary, as gpt.sample does. Written into --out_dir:
    inspect.json                  the record: the model, the prompt, every number below
    residual_stream.png           the stream's norm per depth, each write's norm and cosine
    logit_lens.png                the loss and the top prediction of each depth's stream
    attention_patterns.png        every layer's and head's pattern (--log_scale=True: log colours)
    direct_logit_attribution.png  each write's and head's share of the actual next token's logit
    direct_logit_attribution_positions.png      the same per write, at each position
    logit_difference_attribution.png  with --tokens=(A, B): shares of logit(A) - logit(B)
    ablation.png                  with --ablate=True: the loss change when each head / MLP is
                                  zero- or mean-ablated
    patching.png                  with --corrupt=TEXT: the fraction of the logit difference
                                  recovered by patching the stream, per block and position
The analyses are in gpt/lens.py and gpt/interventions.py, the figures in gpt/lens_plots.py,
and all rest on `GPT.run_with_cache` and `GPT.run_with_hooks` (gpt/hooks.py).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import kernels
from gpt.configurator import ConfigError, configure, usage
from gpt.data import DataError, tokenizer_from_meta
from gpt.lens import Inspection, inspect_prompt
from gpt.lens_plots import TokenText, write_plots
from gpt.sample import check_device_and_backend, load_with_vocabulary, read_prompt
from gpt.train import default_device

RECORD_NAME = "inspect.json"


@dataclass
class InspectConfig:
    init_from: str = ""  # checkpoint file, out dir holding ckpt.pt, or HF GPT-2 directory
    start: str = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"  # or FILE:path
    out_dir: str = "inspect"  # where the record and the plots go
    device: str = field(default_factory=default_device)
    backend: str = "auto"  # kernels: torch | triton | cuda | auto
    top_k: int = 5  # tokens kept per position and depth by the logit lens
    tokens: tuple = ()  # two answer tokens (A, B): attribute logit(A) - logit(B) after --start
    ablate: bool = False  # zero- and mean-ablate every head and every MLP, one at a time
    corrupt: str = ""  # a corrupted prompt of --start's length (or FILE:path) to patch into
    log_scale: bool = False  # attention patterns on a log colour scale


def check_config(config: InspectConfig) -> None:
    if not config.init_from:
        raise ConfigError("--init_from is required: a checkpoint file, the out dir holding "
                          "ckpt.pt, or a Hugging Face GPT-2 directory")
    if config.top_k <= 0:
        raise ConfigError(f"top_k must be positive, got {config.top_k}")
    two_texts = len(config.tokens) == 2 and all(isinstance(t, str) and t for t in config.tokens)
    if config.tokens and not two_texts:
        raise ConfigError(f"tokens must be two token texts, like --tokens=\"('a', 'e')\", got "
                          f"{config.tokens!r}")
    if config.corrupt and not config.tokens:
        raise ConfigError("--corrupt measures how much of logit(A) - logit(B) patching "
                          "recovers: give the two tokens, like --tokens=\"('a', 'e')\"")
    check_device_and_backend(config.device, config.backend)


def inspect_model(config: InspectConfig) -> dict:
    """Run every analysis on config.start, write the record and the plots into
    config.out_dir, and return the record."""
    check_config(config)
    model, meta = load_with_vocabulary(config.init_from, config.backend)
    model.float().eval().to(config.device)  # fp32: the analyses compare losses exactly
    encode, decode = tokenizer_from_meta(meta)
    prompt = read_prompt(config.start)
    tokens = encode(prompt)
    if len(tokens) > model.config.block_size:
        raise ConfigError(f"the prompt is {len(tokens)} tokens, more than the model's "
                          f"block_size of {model.config.block_size}: shorten --start")
    answer = answer_tokens(config.tokens, encode) if config.tokens else None
    corrupted_prompt = read_prompt(config.corrupt) if config.corrupt else None
    corrupted = None if corrupted_prompt is None else encode(corrupted_prompt)
    inspection = inspect_prompt(model, tokens, config.top_k, answer=answer,
                                ablate=config.ablate, corrupted=corrupted)

    def token_text(token: int) -> str:
        # The model's vocabulary may be padded past the tokenizer's (GPT-2: 50304 > 50257).
        return decode([token]) if token < meta["vocab_size"] else f"<pad {token}>"

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(inspection, token_text, out_dir, config.log_scale)
    record = build_record(config, model.model_args(), prompt, inspection, token_text, plots,
                          corrupted_prompt)
    (out_dir / RECORD_NAME).write_text(json.dumps(record))
    return record


def answer_tokens(texts: tuple[str, str], encode) -> tuple[int, int]:
    """The token ids of --tokens, each of which must be exactly one token."""
    ids = []
    for text in texts:
        try:
            encoded = encode(text)
        except ValueError as exc:
            raise ConfigError(f"--tokens: {text!r}: {exc}") from None
        if len(encoded) != 1:
            raise ConfigError(f"--tokens: {text!r} is {len(encoded)} tokens in this vocabulary, "
                              f"not one")
        ids += encoded
    if ids[0] == ids[1]:
        raise ConfigError(f"--tokens: give two different tokens, got {texts!r}")
    return ids[0], ids[1]


def build_record(config: InspectConfig, model_args: dict, prompt: str, inspection: Inspection,
                 token_text: TokenText, plots: list[Path],
                 corrupted_prompt: str | None = None) -> dict:
    """The analyses with what they were run on, the text of every token they name, and
    the names of the plots drawn from them."""
    analyses = inspection.record()
    tokens = analyses.pop("tokens")
    lens = analyses["logit_lens"]
    top_text = [[[token_text(t) for t in top] for top in depth] for depth in lens["top_ids"]]
    record = {"init_from": config.init_from, "device": config.device, "model_args": model_args,
              "prompt": {"text": prompt, "tokens": tokens,
                         "token_text": [token_text(t) for t in tokens]},
              **analyses, "logit_lens": {**lens, "top_text": top_text}}
    if config.tokens:
        record["answer"] = {"text": list(config.tokens),
                            "tokens": record["logit_difference"]["answer"]}
    if corrupted_prompt is not None:
        corrupted = record["patching"]["corrupted_tokens"]
        record["corrupted_prompt"] = {"text": corrupted_prompt, "tokens": corrupted,
                                      "token_text": [token_text(t) for t in corrupted]}
    return {**record, "plots": [path.name for path in plots]}


def summary(record: dict, out_dir: Path) -> str:
    """What the record says, in a few lines for the terminal."""
    stream, lens = record["residual_stream"], record["logit_lens"]
    lines = [f"prompt: {len(record['prompt']['tokens'])} tokens, the model's loss on it "
             f"{record['model_loss']:.4f}",
             f"{'depth':<10}{'stream norm':>12}{'lens loss':>11}  top tokens after the prompt"]
    for depth, (label, norm, loss) in enumerate(zip(stream["depth"], stream["stream_norm"],
                                                    lens["loss"])):
        top = ", ".join(f"{text!r} {prob:.2f}" for text, prob
                        in zip(lens["top_text"][depth][-1], lens["top_probs"][depth][-1]))
        lines.append(f"{label:<10}{norm:>12.3f}{loss:>11.4f}  {top}")
    lines += experiment_summary(record)
    names = [RECORD_NAME] + record["plots"]
    lines.append("wrote " + ", ".join(str(out_dir / name) for name in names))
    return "\n".join(lines)


def experiment_summary(record: dict) -> list[str]:
    """A line per experiment that ran: where its largest effect is."""
    lines = []
    if "logit_difference" in record:
        difference, (a, b) = record["logit_difference"], record["answer"]["text"]
        layer, head = _largest(difference["head_logit"])
        lines.append(f"logit({a!r}) - logit({b!r}) after the prompt: "
                     f"{difference['logit_diff']:.3f}; the head adding most to it directly: "
                     f"block {layer} head {head} "
                     f"({difference['head_logit'][layer][head]:+.3f})")
    if "ablation" in record:
        ablation = record["ablation"]
        for how in ("zero", "mean"):
            layer, head = _largest(ablation[how]["head"])
            mlp = max(range(len(ablation[how]["mlp"])), key=lambda i: ablation[how]["mlp"][i])
            lines.append(f"{how} ablation: the loss ({ablation['loss']:.4f}) rises most without "
                         f"block {layer} head {head} ({ablation[how]['head'][layer][head]:+.4f})"
                         f" and, of the MLPs, block {mlp}'s ({ablation[how]['mlp'][mlp]:+.4f})")
    if "patching" in record:
        patching = record["patching"]
        layer, position = _largest(patching["recovered"])
        lines.append(f"patching: logit difference {patching['clean_logit_diff']:.3f} clean, "
                     f"{patching['corrupted_logit_diff']:.3f} corrupted; the most recovered: "
                     f"{patching['recovered'][layer][position]:.2f} by the stream entering "
                     f"block {layer} at position {position}")
    return lines


def _largest(grid: list[list[float]]) -> tuple[int, int]:
    """(row, column) of the largest value of a [row][column] list."""
    return max(((r, c) for r, row in enumerate(grid) for c in range(len(row))),
               key=lambda rc: grid[rc[0]][rc[1]])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage("gpt-inspect", InspectConfig()))
        return
    try:
        config = configure(InspectConfig(), argv, verbose=False)
        record = inspect_model(config)
    except (ConfigError, DataError, FileNotFoundError, ValueError,
            kernels.BackendUnavailableError) as exc:
        print(f"gpt-inspect: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(record, Path(config.out_dir)))


if __name__ == "__main__":
    main()
