"""gpt.data and gpt.corpus: preparing datasets in nanoGPT's format, and drawing batches."""
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import tiktoken
import torch

import gpt.data
from gpt import data
from gpt.corpus import default_corpus_text
from gpt.data import DataError, get_batch, load_meta, load_split, prepare, tokenizer_from_meta

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def tiny_bpe_encoding() -> tiktoken.Encoding:
    """A byte-level BPE built locally (GPT-2's pre-tokenizer, 256 bytes and 4 merges), to
    stand in for GPT-2's, whose vocabulary files would need the network."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"pe", b"ea", b"eak", b" s"):
        ranks[merge] = len(ranks)
    return tiktoken.Encoding("tiny-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_char_dataset_round_trip(text_file, tmp_path):
    out = prepare(text_file, tmp_path / "char")
    meta = load_meta(out)
    chars = sorted(set(TEXT))
    assert meta["vocab_size"] == len(chars)
    assert meta["itos"] == dict(enumerate(chars))
    assert meta["stoi"] == {c: i for i, c in enumerate(chars)}
    cut = int(len(TEXT) * 0.9)  # nanoGPT's split: the first 90% of the characters train
    train, val = load_split(out, "train"), load_split(out, "val")
    assert train.dtype == np.uint16 and (len(train), len(val)) == (cut, len(TEXT) - cut)
    encode, decode = tokenizer_from_meta(meta)
    assert train.tolist() == encode(TEXT[:cut])
    assert decode(train.tolist()) + decode(val.tolist()) == TEXT


def test_gpt2_dataset_round_trip(text_file, tmp_path, monkeypatch):
    encoding = tiny_bpe_encoding()
    monkeypatch.setattr(gpt.data, "gpt2_encoding", lambda: encoding)
    out = prepare(text_file, tmp_path / "bpe", tokenizer="gpt2", val_fraction=0.25)
    meta = load_meta(out)
    assert meta == {"vocab_size": encoding.n_vocab, "tokenizer": "gpt2"}
    train, val = load_split(out, "train"), load_split(out, "val")
    encode, decode = tokenizer_from_meta(meta)
    cut = int(len(TEXT) * 0.75)
    assert train.tolist() == encode(TEXT[:cut])
    assert decode(train.tolist()) == TEXT[:cut] and decode(val.tolist()) == TEXT[cut:]
    assert len(train) + len(val) < len(TEXT.encode())  # the merges were applied
    assert encode("<|endoftext|>") == [encoding.eot_token]


def test_prepared_dataset_is_cached_until_its_source_changes(text_file, tmp_path, monkeypatch):
    out = prepare(text_file, tmp_path / "char")

    def must_not_read(*args):
        raise AssertionError("a prepared dataset was read again")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_read_source", must_not_read)
        assert prepare(text_file, out) == out
    text_file.write_text("an edited text, so the dataset is stale\n" * 10, encoding="utf-8")
    prepare(text_file, out)
    assert load_meta(out)["vocab_size"] == len(set("an edited text, so the dataset is stale\n"))
    prepare(text_file, out, val_fraction=0.5)  # another split is another dataset
    assert len(load_split(out, "val")) == len(text_file.read_text()) // 2


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text file at"):
        prepare(tmp_path / "missing.txt", tmp_path / "out")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \x80")
    with pytest.raises(DataError, match="not UTF-8"):
        prepare(tmp_path / "binary.txt", tmp_path / "out")
    (tmp_path / "tiny.txt").write_text("a")  # nothing left for train after a 10% val
    with pytest.raises(DataError, match="too few"):
        prepare(tmp_path / "tiny.txt", tmp_path / "out")
    with pytest.raises(ValueError, match="tokenizer"):
        prepare(tmp_path / "tiny.txt", tmp_path / "out", tokenizer="words")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(tmp_path / "tiny.txt", tmp_path / "out", val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="prepare the dataset first"):
        load_meta(tmp_path / "nothing")
    with pytest.raises(ValueError, match="split"):
        load_split(tmp_path, "test")


def test_url_source_is_downloaded_once(tmp_path, monkeypatch):
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(TEXT.encode())

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    url = "https://example.com/input.txt"
    out = prepare(url, tmp_path / "web")
    assert (out / "input.txt").read_text() == TEXT
    prepare(url, out)
    assert calls == [url]


def test_url_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download .* offline"):
        prepare("https://example.com/input.txt", tmp_path / "web")


def _corpus_digest_in_subprocess(hash_seed: str) -> str:
    code = ("import hashlib; from gpt.corpus import default_corpus_text; "
            "print(hashlib.sha256(default_corpus_text().encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_default_corpus_is_deterministic_and_substantial():
    text = default_corpus_text()
    assert 1_000_000 < len(text) < 3_000_000
    assert 'The "for" statement' in text  # from the language reference (pydoc topics)
    assert "Return a list of the words" in text  # from a standard-library docstring
    assert len(set(text)) > 80  # prose: letters, digits, punctuation
    # The same bytes in another process, whatever its string-hash randomization.
    assert _corpus_digest_in_subprocess("123") == hashlib.sha256(text.encode()).hexdigest()


def test_default_source_prepares_the_embedded_corpus(tmp_path):
    out = prepare("default", tmp_path / "default")
    recipe = json.loads((out / "prepared.json").read_text())
    assert recipe["source"]["corpus"].startswith("python-docs")
    assert len(load_split(out, "train")) + len(load_split(out, "val")) == len(default_corpus_text())


def test_get_batch_windows_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 16, "cpu", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x + 1, y)  # consecutive token ids: each target is the next token
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(y.max()) <= 999
    x2, _ = get_batch(tokens, 4, 16, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        get_batch(tokens[:10], 4, 16, "cpu", torch.Generator())


def test_prepare_cli(text_file, tmp_path, capsys):
    data.main([str(text_file), str(tmp_path / "cli")])
    assert "vocab_size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        data.main([str(tmp_path / "missing.txt"), str(tmp_path / "cli")])
    assert exit_info.value.code == 2
    assert "no text file" in capsys.readouterr().err


def test_char_meta_pickle_matches_nanogpt(text_file, tmp_path):
    """nanoGPT's sample.py reads exactly these keys."""
    with open(prepare(text_file, tmp_path / "char") / "meta.pkl", "rb") as f:
        assert set(pickle.load(f)) == {"vocab_size", "itos", "stoi"}
