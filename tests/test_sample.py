"""gpt.sample: sampling from our checkpoints and from Hugging Face GPT-2 directories."""
import pickle

import pytest
import torch

import gpt.data
import kernels
from gpt import sample
from gpt.checkpoint import save_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.sample import SEPARATOR, SampleConfig
from test_data import tiny_bpe_encoding

CHARS = "\n !,.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAR_META = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
             "stoi": {c: i for i, c in enumerate(CHARS)}}
RUN = ["--device=cpu", "--dtype=float32", "--backend=torch", "--num_samples=3",
       "--max_new_tokens=24", "--temperature=1.0", "--top_k=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture
def char_checkpoint(tmp_path):
    out = tmp_path / "out"
    save_checkpoint(out / "ckpt.pt", tiny_model(len(CHARS)), iter_num=0, config={}, meta=CHAR_META)
    return out


def samples(capsys, argv) -> list[str]:
    sample.main(argv)
    printed = capsys.readouterr().out
    return [s.strip("\n") for s in printed.split(SEPARATOR)[:-1]]


def test_samples_from_a_checkpoint(char_checkpoint, capsys):
    texts = samples(capsys, [*RUN, f"--out_dir={char_checkpoint}", "--start=To be"])
    assert len(texts) == 3
    for text in texts:
        assert text.startswith("To be") and len(text) == len("To be") + 24
        assert set(text) <= set(CHARS)
    assert len(set(texts)) > 1  # three samples, not one repeated


def test_kv_cache_samples_the_same_tokens(char_checkpoint):
    """Past block_size (16) the window slides and the cache is refilled: that path too."""
    config = SampleConfig(out_dir=str(char_checkpoint), start="Hello", num_samples=2,
                          max_new_tokens=30, device="cpu", dtype="float32", backend="torch")
    with_cache = sample.sample(config)
    config.kv_cache = False
    assert sample.sample(config) == with_cache


def test_seed_makes_samples_reproducible(char_checkpoint):
    config = SampleConfig(out_dir=str(char_checkpoint), num_samples=1, max_new_tokens=10,
                          device="cpu", dtype="float32", backend="torch")
    assert sample.sample(config) == sample.sample(config)
    other = SampleConfig(**{**config.__dict__, "seed": 7})
    assert sample.sample(other) != sample.sample(config)


def test_prompt_from_a_file(char_checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    texts = samples(capsys, [*RUN, f"--init_from={char_checkpoint / 'ckpt.pt'}",
                             f"--start=FILE:{prompt}"])
    assert all(text.startswith("Once upon a time") for text in texts)


def test_vocabulary_of_a_nanogpt_checkpoint_comes_from_its_dataset(tmp_path):
    data_dir = tmp_path / "data" / "chars"
    data_dir.mkdir(parents=True)
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump(CHAR_META, f)
    assert sample.checkpoint_meta({"config": {"data_dir": str(data_dir)}}) == CHAR_META
    assert sample.checkpoint_meta({"config": {"dataset": "openwebtext"}}) == sample.GPT2_META


def test_samples_from_a_hugging_face_directory(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    encoding = tiny_bpe_encoding()  # stands in for GPT-2's BPE, which needs the network
    monkeypatch.setattr(gpt.data, "gpt2_encoding", lambda: encoding)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                    vocab_size=encoding.n_vocab))
    hf.save_pretrained(tmp_path / "hf")
    texts = samples(capsys, [*RUN, f"--init_from={tmp_path / 'hf'}", "--start=speak, speak"])
    assert len(texts) == 3 and all(text.startswith("speak, speak") for text in texts)


@pytest.mark.parametrize("override, message", [
    ("--temperature=0.0", "temperature must be positive"),
    ("--num_samples=0", "num_samples must be positive"),
    ("--top_k=-1", "top_k must be >= 0"),
    ("--start=", "the prompt (--start) is empty"),
    ("--start=\u00e9t\u00e9", "not in this dataset's vocabulary"),
    ("--start=FILE:no/such/prompt.txt", "prompt file no/such/prompt.txt not found"),
    ("--steps=3", "unknown config key 'steps'"),
])
def test_bad_inputs_exit_2_with_a_message(override, message, char_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*RUN, f"--out_dir={char_checkpoint}", override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unavailable_backend_is_a_clear_error(char_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if kernels.available_backends()["triton"].available:
        pytest.skip("triton runs here")
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*RUN, f"--out_dir={char_checkpoint}", "--backend=triton"])
    assert exit_info.value.code == 2
    assert "backend 'triton' is not available here" in capsys.readouterr().err


def test_top_k_beyond_the_vocabulary_keeps_every_token(char_checkpoint, capsys):
    texts = samples(capsys, [*RUN, f"--out_dir={char_checkpoint}", "--top_k=100000"])
    assert len(texts) == 3


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main([*RUN, f"--out_dir={tmp_path / 'nothing'}"])
    assert "no checkpoint at" in capsys.readouterr().err


def test_a_library_call_leaves_the_process_malloc_alone(char_checkpoint, capsys, monkeypatch):
    """glibc's malloc options are the program's to set (`python -m gpt.sample`), never a
    side effect of calling main(argv) or sample() from another program."""
    from kernels import cpu
    kept = []
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: kept.append(True))
    samples(capsys, [*RUN, f"--out_dir={char_checkpoint}"])
    assert kept == []
