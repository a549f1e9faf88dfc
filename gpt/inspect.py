"""Look inside a trained GPT on one prompt: its residual stream, the logit lens, its attention
patterns and the direct logit attribution of every write, as plots and one JSON record.

    python -m gpt.inspect --init_from=out-shakespeare-char --start="ROMEO:" --out_dir=inspect
    python -m gpt.inspect --init_from=path/to/hf-gpt2 --start=FILE:prompt.txt   # or gpt-inspect

--init_from names our checkpoint or nanoGPT's ckpt.pt (the file, or the out dir holding it)
or a local Hugging Face GPT-2 directory; the prompt is tokenized with the checkpoint's
vocabulary, as gpt.sample does. Written into --out_dir:
    inspect.json                  the record: the model, the prompt, every number below
    residual_stream.png           the stream's norm per depth, each write's norm and cosine
    logit_lens.png                the loss and the top prediction of each depth's stream
    attention_patterns.png        every layer's and head's pattern on the prompt
    direct_logit_attribution.png  each write's share of the actual next token's logit
The analyses are in gpt/lens.py, the figures in gpt/lens_plots.py, and both rest on
`GPT.run_with_cache` (gpt/hooks.py).
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


def check_config(config: InspectConfig) -> None:
    if not config.init_from:
        raise ConfigError("--init_from is required: a checkpoint file, the out dir holding "
                          "ckpt.pt, or a Hugging Face GPT-2 directory")
    if config.top_k <= 0:
        raise ConfigError(f"top_k must be positive, got {config.top_k}")
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
    inspection = inspect_prompt(model, tokens, config.top_k)

    def token_text(token: int) -> str:
        # The model's vocabulary may be padded past the tokenizer's (GPT-2: 50304 > 50257).
        return decode([token]) if token < meta["vocab_size"] else f"<pad {token}>"

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(inspection, token_text, out_dir)
    record = build_record(config, model.model_args(), prompt, inspection, token_text, plots)
    (out_dir / RECORD_NAME).write_text(json.dumps(record))
    return record


def build_record(config: InspectConfig, model_args: dict, prompt: str, inspection: Inspection,
                 token_text: TokenText, plots: list[Path]) -> dict:
    """The analyses with what they were run on, the text of every token they name, and
    the names of the plots drawn from them."""
    analyses = inspection.record()
    tokens = analyses.pop("tokens")
    lens = analyses["logit_lens"]
    top_text = [[[token_text(t) for t in top] for top in depth] for depth in lens["top_ids"]]
    return {"init_from": config.init_from, "device": config.device, "model_args": model_args,
            "prompt": {"text": prompt, "tokens": tokens,
                       "token_text": [token_text(t) for t in tokens]},
            **analyses, "logit_lens": {**lens, "top_text": top_text},
            "plots": [path.name for path in plots]}


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
    names = [RECORD_NAME] + record["plots"]
    lines.append("wrote " + ", ".join(str(out_dir / name) for name in names))
    return "\n".join(lines)


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
