"""GPT.run_with_cache (gpt/hooks.py): the named activations of a forward pass, on every
backend available here (Triton under the interpreter without a GPU)."""
import pytest
import torch

import kernels
from gpt import hooks
from gpt.hooks import attention_pattern
from gpt.model import GPT, GPTConfig
from kernels.testing import assert_close

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=70, dropout=0.0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_NAMES = ("resid_pre", "attn_pattern", "attn_out", "resid_mid", "mlp_out", "resid_post")

# On a GPU machine these tests run every backend on the GPU: `gpu`, so that the GPU runbook's
# `-m gpu` stage selects them.
pytestmark = [pytest.mark.usefixtures("one_thread")]  # see conftest.py
if torch.cuda.is_available():
    pytestmark.append(pytest.mark.gpu)


def tiny_model(backend: str) -> GPT:
    status = kernels.available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} unavailable: {status.reason}")
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, backend=backend)).to(DEVICE).eval()


@pytest.fixture(params=["torch", "triton", "cuda"])
def model(request) -> GPT:
    return tiny_model(request.param)


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 13), device=DEVICE)


@torch.no_grad()
def test_logits_with_and_without_the_cache_are_identical(model, idx):
    logits, cache = model.run_with_cache(idx)
    assert torch.equal(logits, model.logits(idx))
    expected = ["embed", "pos_embed"]
    expected += [f"blocks.{i}.{name}" for i in range(TINY["n_layer"]) for name in BLOCK_NAMES]
    assert sorted(cache) == sorted(expected + ["ln_f"])
    assert torch.equal(cache["ln_f"], model.hidden_states(idx))


@torch.no_grad()
def test_the_writes_add_up_to_the_stream(model, idx):
    _, cache = model.run_with_cache(idx)
    assert_close(cache["blocks.0.resid_pre"], cache["embed"] + cache["pos_embed"])
    for i in range(TINY["n_layer"]):
        def act(name):
            return cache[f"blocks.{i}.{name}"]

        assert_close(act("resid_mid"), act("resid_pre") + act("attn_out"))
        assert_close(act("resid_post"), act("resid_mid") + act("mlp_out"))
        if i + 1 < TINY["n_layer"]:
            assert cache[f"blocks.{i + 1}.resid_pre"] is act("resid_post")


@torch.no_grad()
def test_attention_pattern_is_the_one_the_kernel_applied(model, idx):
    """The pattern is computed from q and k, outside the (fused) kernel: applied to v and
    projected, it must give the attention output the model recorded."""
    _, cache = model.run_with_cache(idx)
    B, T = idx.shape
    for i, block in enumerate(model.transformer.h):
        pattern = cache[f"blocks.{i}.attn_pattern"]
        assert pattern.shape == (B, TINY["n_head"], T, T)
        assert_close(pattern.sum(-1), torch.ones(B, TINY["n_head"], T, device=DEVICE))
        assert (pattern.triu(diagonal=1) == 0).all()  # causal
        qkv = block.attn.c_attn(block.ln_1(cache[f"blocks.{i}.resid_pre"]))
        v = qkv.view(B, T, 3, TINY["n_head"], -1)[:, :, 2].transpose(1, 2)
        heads = (pattern @ v).transpose(1, 2).reshape(B, T, TINY["n_embd"])
        assert_close(block.attn.c_proj(heads), cache[f"blocks.{i}.attn_out"])


def test_pattern_of_queries_after_a_kv_cache_is_aligned_bottom_right():
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    full = attention_pattern(q, k)
    assert torch.allclose(attention_pattern(q[:, :, -2:], k), full[:, :, -2:])


def test_a_forward_without_a_cache_records_nothing(monkeypatch, idx):
    """The hooks cost nothing unless asked for: no recording code runs."""
    def must_not_record(*args, **kwargs):
        raise AssertionError("a forward without a cache recorded an activation")

    for method in ("record", "record_block", "record_attention"):
        monkeypatch.setattr(hooks.ActivationCache, method, must_not_record)
    model = tiny_model("torch")
    model(idx, idx)
    model.logits(idx)
    model.generate(idx[:, :4], max_new_tokens=3)


def test_an_unknown_name_says_which_are_recorded(idx):
    _, cache = tiny_model("torch").run_with_cache(idx)
    with pytest.raises(KeyError, match="no activation 'blocks.9.resid_pre'.*blocks.1.mlp_out"):
        cache["blocks.9.resid_pre"]
