"""Datasets in nanoGPT's on-disk format, and the random batches training draws from them.

A prepared dataset is a directory holding
    train.bin, val.bin   the token ids, uint16, back to back (the first 90% of the text
                         and the last 10%, split at a character boundary as nanoGPT);
    meta.pkl             char-level: {'vocab_size', 'itos', 'stoi'};
                         GPT-2 BPE:  {'vocab_size': 50257, 'tokenizer': 'gpt2'};
    prepared.json        what it was prepared from, so preparing it again is a no-op.

Sources: a text file, a URL (downloaded once, into the directory, as input.txt), or
"default", the embedded corpus of `gpt.corpus` (no network needed).

GPT-2 BPE is tiktoken's `gpt2` encoding, offline too (see `gpt.tokenizer`).

    python -m gpt.data input.txt data/mytext --tokenizer=char     # or: gpt-prepare ...
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpt.corpus import CORPUS_ID, default_corpus_text
from gpt.tokenizer import ENDOFTEXT, gpt2_encoding

TOKENIZERS = ("char", "gpt2")
SPLITS = ("train", "val")
DEFAULT_SOURCE = "default"
TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                        "tinyshakespeare/input.txt")
_TOKEN_DTYPE = np.uint16  # nanoGPT's format: every vocabulary must fit in 16 bits
_MARKER = "prepared.json"
_DOWNLOAD_NAME = "input.txt"


class DataError(RuntimeError):
    """A dataset cannot be prepared or read (bad text, no network)."""


# ----------------------------------------------------------------------------- preparing

def prepare(source, out_dir, tokenizer: str = "char", val_fraction: float = 0.1) -> Path:
    """Tokenize `source` (text file path, URL, or "default") into `out_dir` in nanoGPT's
    format and return `out_dir`. Does nothing when `out_dir` was already prepared from the
    same source (same file size and modification time), tokenizer and split."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {TOKENIZERS}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    recipe = {"source": _source_fingerprint(source), "tokenizer": tokenizer,
              "val_fraction": val_fraction}
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return out_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    text = _read_source(source, out_dir)
    # Split the text, not the tokens, as nanoGPT: the boundary is the same for every tokenizer.
    cut = int(len(text) * (1.0 - val_fraction))
    if cut == 0 or cut == len(text):
        raise DataError(f"{source}: {len(text)} characters are too few to split into train "
                        f"and val with val_fraction={val_fraction}")
    if tokenizer == "char":
        meta, encode = _char_vocabulary(text)
    else:
        encoding = gpt2_encoding()
        meta = {"vocab_size": encoding.n_vocab, "tokenizer": "gpt2"}
        encode = encoding.encode_ordinary
    for split, part in zip(SPLITS, (text[:cut], text[cut:])):
        np.asarray(encode(part), dtype=_TOKEN_DTYPE).tofile(out_dir / f"{split}.bin")
    with open(out_dir / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    marker.write_text(json.dumps(recipe))  # last: an interrupted prepare is redone
    return out_dir


def _is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def _source_fingerprint(source) -> dict:
    """What identifies the source's content without reading it."""
    if source == DEFAULT_SOURCE:
        return {"corpus": CORPUS_ID}
    if _is_url(source):
        return {"url": source}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path} (pass a text file, a URL, or "
                                f"{DEFAULT_SOURCE!r} for the embedded corpus)")
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_source(source, out_dir: Path) -> str:
    if source == DEFAULT_SOURCE:
        return default_corpus_text()
    path = out_dir / _DOWNLOAD_NAME if _is_url(source) else Path(source)
    if _is_url(source):
        _download(source, path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc


def _download(url: str, path: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DataError(f"could not download {url} ({exc}); offline? Pass the path of a "
                        f"local copy of the text instead") from exc
    path.write_bytes(data)


def _char_vocabulary(text: str) -> tuple[dict, Callable[[str], np.ndarray]]:
    """nanoGPT's char-level vocabulary: the sorted distinct characters, id = rank."""
    codepoints = np.unique(_codepoints(text))  # sorted, as Python sorts characters
    if len(codepoints) > np.iinfo(_TOKEN_DTYPE).max + 1:
        raise DataError(f"{len(codepoints)} distinct characters do not fit uint16 token ids")
    chars = [chr(c) for c in codepoints]
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {ch: i for i, ch in enumerate(chars)}}
    # A character's id is its rank among the sorted code points: one vectorized search.
    return meta, lambda part: np.searchsorted(codepoints, _codepoints(part))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


# ----------------------------------------------------------------------------- reading

def load_meta(data_dir) -> dict:
    path = Path(data_dir) / "meta.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"no meta.pkl in {data_dir}: prepare the dataset first "
                                f"(gpt.data.prepare or python -m gpt.data)")
    with open(path, "rb") as f:
        return pickle.load(f)


def load_split(data_dir, split: str) -> np.memmap:
    """The token ids of a split, memory-mapped (read lazily, never copied whole)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no {split}.bin in {data_dir}: prepare the dataset first "
                                f"(gpt.data.prepare or python -m gpt.data)")
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r")


Encoder = Callable[[str], list[int]]
Decoder = Callable[[list[int]], str]


def tokenizer_from_meta(meta: dict) -> tuple[Encoder, Decoder]:
    """(encode, decode) for a dataset's meta: char-level or GPT-2 BPE."""
    if "stoi" in meta:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(text: str) -> list[int]:
            unknown = sorted(set(text) - stoi.keys())
            if unknown:
                raise ValueError(f"characters {unknown[:10]} are not in this dataset's "
                                 f"vocabulary of {len(stoi)} characters")
            return [stoi[ch] for ch in text]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    if meta.get("tokenizer") == "gpt2":
        encoding = gpt2_encoding()
        return (lambda text: encoding.encode(text, allowed_special={ENDOFTEXT}),
                encoding.decode)
    raise ValueError(f"unrecognized meta (keys {sorted(meta)}): expected a char vocabulary "
                     f"('stoi', 'itos') or tokenizer='gpt2'")


# ----------------------------------------------------------------------------- batches

def get_batch(data: np.ndarray, batch_size: int, block_size: int, device,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of the token stream: inputs x and next-token targets y,
    int64 (B, T). The offsets come from `generator` (a CPU generator), so a run that
    restores the generator's state draws the same batches."""
    if len(data) <= block_size:
        raise ValueError(f"a split of {len(data)} tokens has no window of block_size + 1 = "
                         f"{block_size + 1} tokens")
    offsets = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    return batch_at(data, offsets, block_size, device)


def batch_at(data: np.ndarray, offsets: torch.Tensor, block_size: int,
             device) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows starting at `offsets` (B,): x = data[o : o+T], y = data[o+1 : o+T+1].

    One fancy-indexed gather per tensor straight into (B, T) and one widening to int64:
    no per-row tensors to stack. On CUDA the host copy is pinned so the transfer is
    asynchronous and overlaps the GPU work already queued."""
    rows = offsets.numpy()[:, None] + np.arange(block_size)
    x = torch.from_numpy(data[rows].astype(np.int64))
    y = torch.from_numpy(data[rows + 1].astype(np.int64))
    if torch.device(device).type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    return x, y


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpt-prepare", description="Tokenize a text into "
                                     "nanoGPT's format (train.bin, val.bin, meta.pkl).")
    parser.add_argument("source", help=f"a text file, a URL, or {DEFAULT_SOURCE!r} for the "
                                       f"embedded corpus")
    parser.add_argument("out_dir", help="directory to write the dataset into")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        out = prepare(args.source, args.out_dir, args.tokenizer, args.val_fraction)
    except (DataError, FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"gpt-prepare: error: {exc}\n")
    meta = load_meta(out)
    sizes = ", ".join(f"{split} {len(load_split(out, split)):,}" for split in SPLITS)
    print(f"{out}: vocab_size {meta['vocab_size']}, tokens: {sizes}")


if __name__ == "__main__":
    main(sys.argv[1:])
