"""gpt.lens, gpt.interventions and gpt.inspect: the residual stream, logit lens, attention,
direct logit attribution, ablation and patching of one prompt, on our checkpoints, nanoGPT's
and Hugging Face GPT-2's."""
import copy
import json
import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from torch.nn import functional as F

import gpt.data
import kernels
from gpt import inspect, interventions, lens_plots
from gpt.checkpoint import save_checkpoint
from gpt.lens import attribute, inspect_prompt
from gpt.model import GPT, GPTConfig
from kernels.testing import assert_close
from test_data import tiny_bpe_encoding

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAR_META = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
             "stoi": {c: i for i, c in enumerate(CHARS)}}
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
PROMPT = "ROMEO:\nBut, soft! what light?"
TOKENS = [CHAR_META["stoi"][c] for c in PROMPT]
PLOTS = ["residual_stream.png", "logit_lens.png", "attention_patterns.png",
         "direct_logit_attribution.png", "direct_logit_attribution_positions.png"]
EXPERIMENT_PLOTS = ["logit_difference_attribution.png", "ablation.png", "patching.png"]
# A clean prompt and a corrupted one that differs from it in one character, and the two
# answer tokens whose logit difference after the prompt patching measures.
CORRUPTED = PROMPT.replace("soft", "sift")
ANSWER = (CHAR_META["stoi"]["e"], CHAR_META["stoi"]["a"])
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


def run_inspect(capsys, out_dir: Path, *args, plots=PLOTS) -> dict:
    """gpt-inspect's record, after checking what it printed and the plots it wrote."""
    inspect.main([*RUN, f"--out_dir={out_dir}", *args])
    printed = capsys.readouterr().out
    assert "the model's loss on it" in printed and str(out_dir / "inspect.json") in printed
    record = json.loads((out_dir / "inspect.json").read_text())
    assert record["plots"] == plots
    for name in plots:
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
def test_per_head_attributions_sum_to_the_attention_writes():
    """At every position: each block's heads and its c_proj bias add up to its attention
    write's attribution, and all writes with ln_f's bias to the logit, for the actual next
    token and for a logit difference alike."""
    model = tiny_model()
    idx = torch.tensor([TOKENS])
    logits, cache = model.run_with_cache(idx)
    positions = torch.arange(len(TOKENS) - 1)
    targets = idx[0, 1:]
    unembed = model.lm_head.weight
    for directions, expected in (
            (unembed[targets], logits[0, positions].gather(-1, targets[:, None])[:, 0]),
            (unembed[ANSWER[0]] - unembed[ANSWER[1]],
             logits[0, positions, ANSWER[0]] - logits[0, positions, ANSWER[1]])):
        attribution = attribute(model, cache, positions, directions.expand(len(positions), -1))
        for i in range(TINY["n_layer"]):
            attention = attribution.writes[attribution.component.index(f"block {i} attn")]
            by_head = attribution.heads[i].sum(0) + attribution.attn_bias[i]
            assert_close(by_head, attention)
            assert not torch.allclose(attribution.heads[i, 0], attribution.heads[i, 1])
        assert_close(attribution.total(), expected)
    inspection = inspect_prompt(model, TOKENS, answer=ANSWER)
    difference = inspection.logit_difference
    assert difference["logit_diff"] == pytest.approx(
        (logits[0, -1, ANSWER[0]] - logits[0, -1, ANSWER[1]]).item(), rel=1e-6)
    assert sum(difference["logit"]) + difference["ln_f_bias"] == pytest.approx(
        difference["logit_diff"], abs=1e-5)
    dla = inspection.direct_logit_attribution
    assert_close(torch.tensor(dla["head_position_logit"]).mean(-1), torch.tensor(dla["head_logit"]))


# ----------------------------------------------------------------------------- experiments

def _loss_with_module_hook(model, module, hook, kind="forward_pre") -> float:
    """The prompt's loss with a plain PyTorch module hook on `module`: an independent way
    of changing an activation (no named hook point involved)."""
    register = getattr(module, f"register_{kind}_hook")
    handle = register(hook)
    try:
        return interventions.prompt_loss(model.logits(torch.tensor([TOKENS])),
                                         torch.tensor([TOKENS]))
    finally:
        handle.remove()


@torch.no_grad()
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ablation_is_what_an_independent_recomputation_gives(backend):
    """Zero-ablating a head through the named hooks changes the loss by exactly what the
    model gives with that head's slice of c_proj's input zeroed by a module hook on c_proj;
    mean ablation and the MLPs likewise."""
    model = tiny_model(backend)
    record = interventions.ablation(model, torch.tensor([TOKENS]))
    clean = interventions.prompt_loss(model.logits(torch.tensor([TOKENS])), torch.tensor([TOKENS]))
    assert record["loss"] == clean
    D = TINY["n_embd"] // TINY["n_head"]
    for i, block in enumerate(model.transformer.h):
        for head in range(TINY["n_head"]):
            columns = slice(head * D, (head + 1) * D)

            def zero(module, args):
                y = args[0].clone()
                y[..., columns] = 0.0
                return (y,)

            def mean(module, args):
                y = args[0].clone()
                y[..., columns] = y[..., columns].mean(dim=1, keepdim=True)
                return (y,)

            for how, hook in (("zero", zero), ("mean", mean)):
                expected = _loss_with_module_hook(model, block.attn.c_proj, hook) - clean
                assert record[how]["head"][i][head] == expected, (how, i, head)
        zero_mlp = _loss_with_module_hook(model, block.mlp, lambda m, a, out: torch.zeros_like(out),
                                          kind="forward")
        assert record["zero"]["mlp"][i] == zero_mlp - clean
        mean_mlp = _loss_with_module_hook(
            model, block.mlp, lambda m, a, out: out.mean(1, keepdim=True).expand_as(out),
            kind="forward")
        assert record["mean"]["mlp"][i] == pytest.approx(mean_mlp - clean, abs=1e-6)
    moved = record["zero"]["mlp"] + [change for layer in record["zero"]["head"] for change in layer]
    assert all(change != 0.0 for change in moved)  # the checks above compare numbers that move


@torch.no_grad()
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patching_a_whole_layer_reproduces_the_clean_logits_from_that_layer_on(backend):
    model = tiny_model(backend)
    clean, corrupted = torch.tensor([TOKENS]), torch.tensor([[CHAR_META["stoi"][c]
                                                             for c in CORRUPTED]])
    names = [f"blocks.{i}.resid_pre" for i in range(TINY["n_layer"])] + \
        [f"blocks.{i}.resid_mid" for i in range(TINY["n_layer"])]
    clean_logits, cache = model.run_with_cache(clean, names=names)
    assert not torch.equal(model.logits(corrupted), clean_logits)
    for name in names:
        patched = model.run_with_hooks(
            corrupted, {name: interventions.patch_positions(cache[name], slice(None))})
        assert torch.equal(patched, clean_logits), name


@torch.no_grad()
def test_patching_one_position_against_an_independent_forward():
    """Each number of the patching record is the corrupted run with the stream entering a
    block at one position replaced by a module pre-hook on that block. The prompts differ in
    one character: patching the embeddings there turns the corrupted prompt into the clean
    one (recovers all: 1), and anywhere before it changes nothing (0)."""
    model = tiny_model()
    clean, corrupted = torch.tensor([TOKENS]), torch.tensor([[CHAR_META["stoi"][c]
                                                             for c in CORRUPTED]])
    record = interventions.patch_residual_stream(model, clean, corrupted, ANSWER)
    _, cache = model.run_with_cache(clean)
    differs = CORRUPTED.index("i")
    assert record["recovered"][0][differs] == 1.0
    assert all(record["recovered"][0][t] == 0.0 for t in range(differs))
    for i, block in enumerate(model.transformer.h):
        for t in (differs, len(TOKENS) - 1):
            def patch(module, args):
                x = args[0].clone()
                x[:, t] = cache[f"blocks.{i}.resid_pre"][:, t]
                return (x, *args[1:])

            handle = block.register_forward_pre_hook(patch)
            expected = interventions.logit_difference(model.logits(corrupted), ANSWER)
            handle.remove()
            assert record["logit_diff"][i][t] == pytest.approx(expected, abs=1e-6)
            fraction = (expected - record["corrupted_logit_diff"]) / (
                record["clean_logit_diff"] - record["corrupted_logit_diff"])
            assert record["recovered"][i][t] == pytest.approx(fraction, abs=1e-5)


def test_patching_needs_prompts_of_one_length_and_a_difference_to_recover():
    model = tiny_model()
    clean = torch.tensor([TOKENS])
    with pytest.raises(ValueError, match="the clean prompt is 29 tokens and the corrupted one 28"):
        interventions.patch_residual_stream(model, clean, clean[:, 1:], ANSWER)
    with pytest.raises(ValueError, match="same logit difference.*nothing for patching"):
        interventions.patch_residual_stream(model, clean, clean, ANSWER)
    with pytest.raises(ValueError, match="two answer tokens"):
        inspect_prompt(model, TOKENS, corrupted=TOKENS)


# ----------------------------------------------------------------------------- the plots

@pytest.mark.parametrize("length, log_scale", [(2, False), (5, True), (24, False), (30, True)])
def test_every_plot_draws_from_two_tokens_up(length, log_scale, tmp_path):
    """Every figure, with every experiment, draws without a layout warning (matplotlib
    warns when the axes do not fit the figure) and with every text inside it; short prompts
    get token ticks, and the lens grid says which positions it shows."""
    model = tiny_model()
    tokens = (TOKENS * 2)[:length]
    corrupted = [CHAR_META["stoi"]["z"]] + tokens[1:]
    with torch.no_grad():
        inspection = inspect_prompt(model, tokens, answer=ANSWER, ablate=True,
                                    corrupted=corrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = lens_plots.write_plots(inspection, CHARS.__getitem__, tmp_path, log_scale)
    assert [p.name for p in paths] == PLOTS + EXPERIMENT_PLOTS
    for name, figure in lens_plots.figures(inspection, CHARS.__getitem__, log_scale).items():
        assert not _sticks_out(figure), name
    attention = lens_plots.attention_figure(inspection, CHARS.__getitem__, log_scale)
    bottom_left = attention.axes[(TINY["n_layer"] - 1) * TINY["n_head"]]
    assert bottom_left.get_xlabel().startswith("key")
    assert bottom_left.get_ylabel().startswith("query")
    ticks = [label.get_text() for label in bottom_left.get_xticklabels()]
    short = length <= lens_plots.TICK_TOKENS
    assert ticks[:2] == ([lens_plots.display(CHARS[t]) for t in tokens[:2]] if short
                         else ["0", str(length // 8)])
    image = bottom_left.get_images()[0]
    assert isinstance(image.norm, LogNorm) == log_scale
    lens_title = lens_plots.logit_lens_figure(inspection, CHARS.__getitem__).axes[1].get_title()
    lens_title = lens_title.replace("\n", " ")
    n = min(lens_plots.LENS_POSITIONS, length - 1)
    expected = ("the one position" if n == 1 else f"all {n} positions" if n == length - 1
                else f"the last {n} of the {length - 1} with a next token")
    assert expected in lens_title


def _sticks_out(figure) -> bool:
    """Whether anything drawn (a title, a label, a tick) sticks out of the figure: the
    figure's tight bounding box, the union of what is drawn, is larger than the figure."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    drawn, page = figure.get_tightbbox(canvas.get_renderer()), figure.bbox_inches
    return not (page.padded(0.01).contains(*drawn.min) and page.padded(0.01).contains(*drawn.max))


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


def test_record_of_the_experiments(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt.pt", tiny_model(), iter_num=0, config={}, meta=CHAR_META)
    record = run_inspect(capsys, tmp_path / "inspect", f"--init_from={tmp_path / 'ckpt.pt'}",
                         f"--start={PROMPT}", "--tokens=('e', 'a')", "--ablate=True",
                         f"--corrupt={CORRUPTED}", "--log_scale=True",
                         plots=PLOTS + EXPERIMENT_PLOTS)
    assert record["answer"] == {"text": ["e", "a"], "tokens": list(ANSWER)}
    assert record["corrupted_prompt"]["text"] == CORRUPTED
    assert record["corrupted_prompt"]["token_text"] == list(CORRUPTED)
    n_layer, n_head, T = TINY["n_layer"], TINY["n_head"], len(TOKENS)
    patching = record["patching"]
    assert len(patching["recovered"]) == n_layer and len(patching["recovered"][0]) == T
    for how in ("zero", "mean"):
        assert len(record["ablation"][how]["head"]) == n_layer
        assert len(record["ablation"][how]["head"][0]) == n_head
        assert len(record["ablation"][how]["mlp"]) == n_layer
    assert len(record["logit_difference"]["head_logit"]) == n_layer
    dla = record["direct_logit_attribution"]
    assert len(dla["position_logit"]) == len(dla["component"])
    assert len(dla["position_logit"][0]) == T - 1
    assert len(dla["head_position_logit"][0][0]) == T - 1


@pytest.mark.parametrize("override, message", [
    ("--tokens=('e', '\u00e9')", "--tokens: '\u00e9': characters ['\u00e9'] are not in this "
                                 "dataset's vocabulary"),
    ("--tokens=('e', 'ab')", "--tokens: 'ab' is 2 tokens in this vocabulary, not one"),
    ("--tokens=('e', 'e')", "give two different tokens"),
    ("--tokens=('e',)", "tokens must be two token texts"),
    ("--tokens=e", "tokens must be of type tuple"),
    (f"--corrupt={CORRUPTED}", "--corrupt measures how much of logit(A) - logit(B)"),
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
                      f"--start={PROMPT}", override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "i" / "inspect.json").exists()


@pytest.mark.parametrize("corrupt, message", [
    (PROMPT[:-1], "the clean prompt is 29 tokens and the corrupted one 28; make them the same"),
    (PROMPT, "the clean and corrupted prompts give the same logit difference"),
])
def test_bad_patching_exits_2_with_a_message(corrupt, message, char_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect.main([*RUN, f"--init_from={char_checkpoint}", f"--out_dir={tmp_path / 'i'}",
                      f"--start={PROMPT}", "--tokens=('e', 'a')", f"--corrupt={corrupt}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


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
    for key in ("init_from", "start", "out_dir", "device", "backend", "top_k", "tokens", "ablate",
                "corrupt", "log_scale"):
        assert f"--{key}=" in printed


def test_top_k_beyond_the_vocabulary_keeps_every_token(char_checkpoint, tmp_path, capsys):
    record = run_inspect(capsys, tmp_path / "i", f"--init_from={char_checkpoint}",
                         f"--start={PROMPT}", "--top_k=1000")
    assert len(record["logit_lens"]["top_ids"][0][0]) == len(CHARS)  # depth 0, position 0
