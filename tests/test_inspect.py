"""gpt.lens and gpt.inspect: the residual stream, logit lens, attention and direct logit
attribution of one prompt, on our checkpoints, nanoGPT's and Hugging Face GPT-2's."""
import copy
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import gpt.data
import kernels
from gpt import inspect
from gpt.checkpoint import save_checkpoint
from gpt.lens import inspect_prompt
from gpt.model import GPT, GPTConfig
from test_data import tiny_bpe_encoding

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAR_META = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
             "stoi": {c: i for i, c in enumerate(CHARS)}}
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
PROMPT = "ROMEO:\nBut, soft! what light?"
TOKENS = [CHAR_META["stoi"][c] for c in PROMPT]
PLOTS = ["residual_stream.png", "logit_lens.png", "attention_patterns.png",
         "direct_logit_attribution.png"]
RUN = ["--device=cpu", "--backend=torch", "--top_k=3"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# On a GPU machine these tests run every backend on the GPU: `gpu`, so that the GPU runbook's
# `-m gpu` stage selects them.
pytestmark = [pytest.mark.usefixtures("one_thread")]  # see conftest.py
if torch.cuda.is_available():
    pytestmark.append(pytest.mark.gpu)


def tiny_model(backend: str = "torch") -> GPT:
    status = kernels.available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} unavailable: {status.reason}")
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, vocab_size=len(CHARS), backend=backend)).eval()


def run_inspect(capsys, out_dir: Path, *args) -> dict:
    """gpt-inspect's record, after checking what it printed and the plots it wrote."""
    inspect.main([*RUN, f"--out_dir={out_dir}", *args])
    printed = capsys.readouterr().out
    assert "the model's loss on it" in printed and str(out_dir / "inspect.json") in printed
    record = json.loads((out_dir / "inspect.json").read_text())
    assert record["plots"] == PLOTS
    for name in PLOTS:
        assert (out_dir / name).read_bytes().startswith(b"\x89PNG")
    return record


# ----------------------------------------------------------------------------- the analyses

@torch.no_grad()
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_last_depth_of_the_logit_lens_is_the_models_loss(backend):
    model = tiny_model(backend).to(DEVICE)
    inspection = inspect_prompt(model, TOKENS)
    idx = torch.tensor([TOKENS], device=DEVICE)
    unfused = F.cross_entropy(model.logits(idx)[0, :-1], idx[0, 1:]).item()
    assert inspection.logit_lens["loss"][-1] == pytest.approx(inspection.model_loss, rel=1e-6)
    assert inspection.model_loss == pytest.approx(unfused, rel=1e-6)


@torch.no_grad()
def test_each_depth_of_the_logit_lens_is_the_model_cut_after_that_block():
    model = tiny_model()
    lens = inspect_prompt(model, TOKENS).logit_lens
    idx = torch.tensor([TOKENS])
    assert len(lens["loss"]) == TINY["n_layer"] + 1
    for depth, loss in enumerate(lens["loss"]):
        cut = copy.deepcopy(model)
        cut.transformer.h = cut.transformer.h[:depth]
        _, cut_loss = cut(idx[:, :-1], idx[:, 1:])
        assert loss == pytest.approx(cut_loss.item(), rel=1e-6)
        assert sum(lens["position_loss"][depth]) / (len(TOKENS) - 1) == pytest.approx(loss)


@torch.no_grad()
def test_direct_logit_attributions_sum_to_the_actual_next_tokens_logit():
    model = tiny_model()
    attribution = inspect_prompt(model, TOKENS).direct_logit_attribution
    idx = torch.tensor([TOKENS])
    logits = model.logits(idx)[0, :-1].gather(-1, idx[0, 1:, None])
    assert attribution["target_logit"] == pytest.approx(logits.mean().item(), rel=1e-6)
    assert attribution["component"] == ["embed", "pos_embed", "block 0 attn", "block 0 mlp",
                                        "block 1 attn", "block 1 mlp"]
    total = sum(attribution["logit"]) + attribution["ln_f_bias"]
    assert total == pytest.approx(attribution["target_logit"], abs=1e-5)


@torch.no_grad()
def test_residual_stream_numbers():
    model = tiny_model()
    stream = inspect_prompt(model, TOKENS).residual_stream
    n_layer = TINY["n_layer"]
    assert stream["depth"] == ["embed", "block 0", "block 1"]
    for key in ("attn_write_norm", "mlp_write_norm", "attn_write_cosine", "mlp_write_cosine"):
        assert len(stream[key]) == n_layer
    assert all(-1 <= c <= 1 for c in stream["attn_write_cosine"] + stream["mlp_write_cosine"])
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    embedded = wte[TOKENS] + wpe[:len(TOKENS)]
    assert stream["stream_norm"][0] == pytest.approx(embedded.norm(dim=-1).mean().item())


@torch.no_grad()
def test_attention_summary_of_uniform_heads():
    """With q = 0 every score is equal: query t attends 1/(t+1) to each of its t+1 keys."""
    model = tiny_model()
    C = TINY["n_embd"]
    for block in model.transformer.h:
        block.attn.c_attn.weight[:C].zero_()
        block.attn.c_attn.bias[:C].zero_()
    attention = inspect_prompt(model, TOKENS).attention
    T = len(TOKENS)
    uniform = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    entropy = sum(math.log(t + 1) for t in range(1, T)) / (T - 1)
    for key, expected in (("previous_token", uniform), ("first_token", uniform),
                          ("self", uniform), ("entropy", entropy)):
        assert torch.tensor(attention[key]) == pytest.approx(torch.full((2, 2), expected),
                                                             rel=1e-5), key


def test_the_lens_needs_eval_mode_and_two_tokens():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least 2 are needed"):
        inspect_prompt(model, TOKENS[:1])
    with pytest.raises(ValueError, match="eval mode"):
        inspect_prompt(model.train(), TOKENS)


# ----------------------------------------------------------------------------- the tool

def test_record_of_our_checkpoint(tmp_path, capsys):
    save_checkpoint(tmp_path / "out" / "ckpt.pt", tiny_model(), iter_num=0, config={},
                    meta=CHAR_META)
    record = run_inspect(capsys, tmp_path / "inspect", f"--init_from={tmp_path / 'out'}",
                         f"--start={PROMPT}")
    assert set(record) == {"init_from", "device", "model_args", "prompt", "model_loss",
                           "residual_stream", "logit_lens", "attention",
                           "direct_logit_attribution", "plots"}
    assert record["prompt"] == {"text": PROMPT, "tokens": TOKENS, "token_text": list(PROMPT)}
    assert record["model_args"]["n_layer"] == TINY["n_layer"]
    lens, depths, T = record["logit_lens"], TINY["n_layer"] + 1, len(TOKENS)
    assert lens["loss"][-1] == pytest.approx(record["model_loss"], rel=1e-6)
    for key in ("top_ids", "top_probs", "top_text"):
        assert len(lens[key]) == depths and all(len(d) == T for d in lens[key])
        assert all(len(top) == 3 for depth in lens[key] for top in depth)
    assert lens["top_text"][0][0] == [CHARS[i] for i in lens["top_ids"][0][0]]
    assert all(len(lens["position_loss"][d]) == T - 1 for d in range(depths))
    for key in ("previous_token", "first_token", "self", "entropy"):
        assert len(record["attention"][key]) == TINY["n_layer"]
        assert all(len(layer) == TINY["n_head"] for layer in record["attention"][key])


def test_runs_on_a_checkpoint_written_by_nanogpt(tmp_path, monkeypatch, capsys):
    """nanoGPT's ckpt.pt: compiled-model key prefixes, causal-mask buffers, model_args without
    a backend, and the vocabulary in data/<dataset>/meta.pkl beside where it runs."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    state = {f"_orig_mod.{key}": value for key, value in model.state_dict().items()}
    mask = torch.tril(torch.ones(TINY["block_size"], TINY["block_size"])).view(
        1, 1, TINY["block_size"], TINY["block_size"])
    for i in range(TINY["n_layer"]):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = mask
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True,
                      vocab_size=len(CHARS), dropout=0.0)
    Path("out-shakespeare-char").mkdir()
    torch.save({"model": state, "model_args": model_args, "optimizer": {}, "iter_num": 2000,
                "best_val_loss": torch.tensor(1.47),
                "config": {"dataset": "shakespeare_char", "out_dir": "out-shakespeare-char"}},
               "out-shakespeare-char/ckpt.pt")
    Path("data/shakespeare_char").mkdir(parents=True)
    with open("data/shakespeare_char/meta.pkl", "wb") as f:
        pickle.dump(CHAR_META, f)
    record = run_inspect(capsys, tmp_path / "inspect", "--init_from=out-shakespeare-char",
                         f"--start={PROMPT}")
    assert record["prompt"]["tokens"] == TOKENS
    # The embeddings alone (depth 0) do not depend on the MLP's flavour of GELU: the same
    # weights as `model` must give the same numbers there.
    ours = inspect_prompt(model, TOKENS)
    assert record["logit_lens"]["loss"][0] == pytest.approx(ours.logit_lens["loss"][0])
    assert record["logit_lens"]["loss"][-1] == pytest.approx(record["model_loss"], rel=1e-6)


def test_runs_on_a_hugging_face_directory(tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    encoding = tiny_bpe_encoding()  # stands in for GPT-2's BPE, to keep the model tiny
    monkeypatch.setattr(gpt.data, "gpt2_encoding", lambda: encoding)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32,
                               vocab_size=encoding.n_vocab)).save_pretrained(tmp_path / "hf")
    record = run_inspect(capsys, tmp_path / "inspect", f"--init_from={tmp_path / 'hf'}",
                         "--start=speak, speak")
    assert record["prompt"]["tokens"] == encoding.encode("speak, speak")
    assert record["logit_lens"]["loss"][-1] == pytest.approx(record["model_loss"], rel=1e-6)


@pytest.fixture
def char_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", tiny_model(), iter_num=0, config={}, meta=CHAR_META)
    return tmp_path / "ckpt.pt"


@pytest.mark.parametrize("override, message", [
    ("--top_k=0", "top_k must be positive"),
    ("--start=R", "at least 2 are needed"),
    ("--start=" + "a" * 33, "the prompt is 33 tokens, more than the model's block_size of 32"),
    ("--start=FILE:no/such/prompt.txt", "prompt file no/such/prompt.txt not found"),
    ("--start=\u00e9t\u00e9", "not in this dataset's vocabulary"),
    ("--backend=fastest", "backend must be one of"),
    ("--device=gpu0", "device 'gpu0' is not a torch device"),
    ("--steps=3", "unknown config key 'steps'"),
    ("--top_k=many", "top_k must be of type int"),
])
def test_bad_inputs_exit_2_with_a_message(override, message, char_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect.main([*RUN, f"--init_from={char_checkpoint}", f"--out_dir={tmp_path / 'i'}",
                      override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "i" / "inspect.json").exists()


@pytest.mark.parametrize("init_from, message", [
    (None, "--init_from is required"),
    ("no/such/out", "no checkpoint at no/such/out"),
])
def test_a_missing_model_is_a_clear_error(init_from, message, tmp_path, capsys):
    args = [] if init_from is None else [f"--init_from={init_from}"]
    with pytest.raises(SystemExit) as exit_info:
        inspect.main([*RUN, f"--out_dir={tmp_path}", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_key(capsys):
    inspect.main(["--help"])
    printed = capsys.readouterr().out
    for key in ("init_from", "start", "out_dir", "device", "backend", "top_k"):
        assert f"--{key}=" in printed


def test_top_k_beyond_the_vocabulary_keeps_every_token(char_checkpoint, tmp_path, capsys):
    record = run_inspect(capsys, tmp_path / "i", f"--init_from={char_checkpoint}",
                         f"--start={PROMPT}", "--top_k=1000")
    assert len(record["logit_lens"]["top_ids"][0][0]) == len(CHARS)  # depth 0, position 0
