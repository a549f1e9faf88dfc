"""GPT-2's byte-level BPE, on a machine with no network too.

tiktoken builds GPT-2's encoding from vocabulary files it downloads once into its cache
(TIKTOKEN_CACHE_DIR). Offline and without them, the same 50,256 merge ranks come from the
copy the `openai-whisper` package ships as whisper/assets/gpt2.tiktoken: byte for byte
tiktoken's r50k_base.tiktoken, which tiktoken's own GPT-2 encoding equals. `make install`
installs that package without its dependencies (`pip install --no-deps openai-whisper`),
since only the file is needed; whisper itself is never imported (its import needs numba).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

import tiktoken

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257  # 50,256 merge ranks + <|endoftext|>
# GPT-2's pre-tokenizer as first released (tiktoken's r50k pattern is an equivalent rewrite).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tiktoken's expected sha256 of r50k_base.tiktoken: a file with it holds exactly GPT-2's ranks.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_DISTRIBUTION = "openai-whisper"
WHISPER_RANKS_FILE = "whisper/assets/gpt2.tiktoken"


class GPT2VocabularyNotFound(FileNotFoundError):
    """Neither tiktoken nor an installed openai-whisper could provide GPT-2's vocabulary."""


def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE: tiktoken's own `gpt2` encoding when its cache has the files, else the
    same encoding built from openai-whisper's copy of the ranks, else tiktoken's download
    (online only), else a clear error. The download comes last because tiktoken gives it
    no timeout: on a network that drops packets silently it would hang."""
    if tiktoken_has_gpt2_cached():
        return tiktoken.get_encoding("gpt2")
    ranks_file = whisper_ranks_file()
    if ranks_file is not None:
        return encoding_from_ranks_file(ranks_file)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken raises whatever its download raised
        raise GPT2VocabularyNotFound(
            f"GPT-2 BPE needs tiktoken's 'gpt2' vocabulary files, which could not be loaded "
            f"({type(exc).__name__}: {exc}), and openai-whisper's copy of them "
            f"({WHISPER_RANKS_FILE}) is not installed. Install it with `pip install --no-deps "
            f"{WHISPER_DISTRIBUTION}` (make install does), fetch tiktoken's files once online, "
            f"or point TIKTOKEN_CACHE_DIR at a directory holding them") from exc


# The files tiktoken's `gpt2` encoding reads, and where its cache keeps them: a file named
# by the sha1 of its URL in TIKTOKEN_CACHE_DIR (or DATA_GYM_CACHE_DIR, or
# <tmp>/data-gym-cache). Should a tiktoken release move them, the check below finds
# nothing and the identical encoding is built from whisper's copy instead.
TIKTOKEN_GPT2_FILES = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                       "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
                       "encoder.json")


def tiktoken_has_gpt2_cached() -> bool:
    """Whether tiktoken can build `gpt2` from its cache alone, with no download."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR",
                               os.environ.get("DATA_GYM_CACHE_DIR",
                                              os.path.join(tempfile.gettempdir(),
                                                           "data-gym-cache")))
    if not cache_dir:
        return False  # an empty value switches tiktoken's cache off
    return all((Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()).is_file()
               for url in TIKTOKEN_GPT2_FILES)


def whisper_ranks_file() -> Path | None:
    """openai-whisper's gpt2.tiktoken, located through the installed distribution's metadata
    (importing whisper would need numba; a top-level `whisper` module may be another project)."""
    try:
        distribution = importlib.metadata.distribution(WHISPER_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(WHISPER_RANKS_FILE))
    return path if path.is_file() else None


@functools.cache
def encoding_from_ranks_file(path: Path) -> tiktoken.Encoding:
    """GPT-2's encoding from a file of merge ranks in tiktoken's format ("base64-token rank"
    per line), after checking that it holds exactly GPT-2's ranks."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise GPT2VocabularyNotFound(f"{path} does not hold GPT-2's merge ranks (sha256 "
                                     f"{digest}, expected {GPT2_RANKS_SHA256})")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)},
                             explicit_n_vocab=GPT2_VOCAB_SIZE)
