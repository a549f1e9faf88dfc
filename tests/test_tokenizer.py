"""gpt.tokenizer: GPT-2's BPE with no network, from tiktoken's cache or openai-whisper's copy
of the merge ranks (installed by `make install`)."""
import hashlib
import socket
import sys

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from gpt import data, tokenizer
from gpt.data import load_split, prepare, tokenizer_from_meta
from gpt.tokenizer import GPT2VocabularyNotFound, encoding_from_ranks_file, gpt2_encoding
from gpt.train import TINY_SHAKESPEARE_FILE

RANKS_FILE = tokenizer.whisper_ranks_file()
needs_ranks_file = pytest.mark.skipif(
    RANKS_FILE is None, reason="openai-whisper is not installed (make install installs it)")

# tiktoken's own test vectors for `gpt2` (tests/test_encoding.py), and the issue's.
TIKTOKEN_VECTORS = {
    "hello world": [31373, 995],
    "Hello world": [15496, 995],
    "0": [15], "00": [405], "000": [830], "0000": [2388], "00000": [20483],
    "000000": [10535], "0000000": [24598], "00000000": [8269], "000000000": [10535, 830],
    "0000000000": [8269, 405], "0000000000000000": [25645],
    "00000000000000000": [8269, 10535, 830],
    "": [],
}
VARIED_TEXT = """First Citizen:
Before we proceed any further, hear me speak.
I'm sure they'll say it's "fine" -- we've done what we'd planned; you're right.
    def f(x):\treturn x ** 2  # indented code, a tab, operators
Numbers: 3.14159, 1,000,000 and 2024-11-27; emails: someone@example.org
Café, naïve, Zürich, Ελληνικά, русский, 日本語のテキスト, 请考试我的软件！12345 🙂👍🏽
Trailing spaces   \n\n\n  multiple blank lines, and <|endoftext|> as plain text.
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and an empty tiktoken cache: a fresh machine with no internet."""
    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture
def tiktoken_r50k_base(tmp_path, monkeypatch):
    """tiktoken's own r50k_base encoding — GPT-2's: the same ranks, split pattern and
    <|endoftext|> — built by tiktoken from a 'download' served from the local ranks file,
    whose sha256 tiktoken checks against the one it expects of the real file."""
    def serve_locally(blobpath):
        assert blobpath.endswith("/r50k_base.tiktoken"), blobpath
        return RANKS_FILE.read_bytes()

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "r50k-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", serve_locally)
    return tiktoken.Encoding(**openai_public.r50k_base())


@needs_ranks_file
@pytest.mark.usefixtures("offline")
def test_offline_gpt2_encoding_gives_tiktoken_test_vectors():
    encoding = gpt2_encoding()
    assert encoding.n_vocab == 50257 and encoding.eot_token == 50256
    for text, ids in TIKTOKEN_VECTORS.items():
        assert encoding.encode(text) == ids, text
    assert encoding.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, 50256]
    assert encoding.decode([31373, 995]) == "hello world"


@needs_ranks_file
def test_ids_equal_tiktokens_own_encoding_on_a_varied_text(tiktoken_r50k_base):
    encoding = encoding_from_ranks_file(RANKS_FILE)
    assert encoding.encode_ordinary(VARIED_TEXT) == tiktoken_r50k_base.encode_ordinary(VARIED_TEXT)
    assert (encoding.encode(VARIED_TEXT, allowed_special="all")
            == tiktoken_r50k_base.encode(VARIED_TEXT, allowed_special="all"))
    assert encoding.decode(encoding.encode_ordinary(VARIED_TEXT)) == VARIED_TEXT


@needs_ranks_file
@pytest.mark.usefixtures("offline")
@pytest.mark.skipif(not TINY_SHAKESPEARE_FILE.is_file(), reason="no Tiny Shakespeare text here")
def test_shakespeare_split_has_nanogpts_documented_token_counts(tmp_path):
    """nanoGPT's data/shakespeare/prepare.py: 'train has 301,966 tokens, val has 36,059'."""
    out = prepare(TINY_SHAKESPEARE_FILE, tmp_path / "shakespeare", tokenizer="gpt2")
    assert (len(load_split(out, "train")), len(load_split(out, "val"))) == (301_966, 36_059)


def test_tiktokens_cache_comes_first(tmp_path, monkeypatch):
    """When tiktoken's cache holds the `gpt2` files, tiktoken's own encoding is used."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert not tokenizer.tiktoken_has_gpt2_cached()
    for url in tokenizer.TIKTOKEN_GPT2_FILES:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("cached")
    assert tokenizer.tiktoken_has_gpt2_cached()
    own = object()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: own)
    assert gpt2_encoding() is own


@needs_ranks_file
@pytest.mark.usefixtures("offline")
def test_whispers_copy_comes_before_any_download(monkeypatch):
    """Without tiktoken's cache, the shipped ranks are used: tiktoken's download (which has
    no timeout) is never attempted while they are there."""
    def download(name):
        raise AssertionError("tiktoken was asked to download")
    monkeypatch.setattr(tiktoken, "get_encoding", download)
    assert gpt2_encoding().encode("Hello world") == [15496, 995]


def test_ranks_file_is_found_without_importing_whisper():
    """whisper's import needs numba, which is not installed: it must never be imported."""
    tokenizer.whisper_ranks_file()
    assert "whisper" not in sys.modules


@pytest.mark.usefixtures("offline")
def test_without_any_vocabulary_the_error_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tokenizer, "WHISPER_DISTRIBUTION", "no-such-distribution")
    with pytest.raises(GPT2VocabularyNotFound,
                       match=r"pip install --no-deps no-such-distribution.*TIKTOKEN_CACHE_DIR"):
        tokenizer_from_meta({"vocab_size": 50257, "tokenizer": "gpt2"})
    text = tmp_path / "input.txt"
    text.write_text("some text to tokenize\n" * 10)
    with pytest.raises(SystemExit) as exit_info:
        data.main([str(text), str(tmp_path / "bpe"), "--tokenizer=gpt2"])
    assert exit_info.value.code == 2
    assert "GPT-2 BPE needs tiktoken's 'gpt2' vocabulary files" in capsys.readouterr().err


def test_a_file_that_is_not_gpt2s_ranks_is_refused(tmp_path):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_bytes(b"IQ== 0\nIg== 1\n")
    with pytest.raises(GPT2VocabularyNotFound, match="does not hold GPT-2's merge ranks"):
        encoding_from_ranks_file(fake)
