"""The GPT model: shapes, GPT-2's init and parameter count, checkpoints (ours, nanoGPT's,
Hugging Face's), the KV cache, and clear errors."""
import math

import pytest
import torch

from gpt.checkpoint import save_checkpoint
import kernels
from gpt.model import GPT, GPTConfig, LayerNorm, split_heads
from kernels.testing import assert_close

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)


def tiny_model(**overrides):
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def test_forward_shapes_and_every_parameter_gets_a_gradient():
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None
    assert model.logits(idx).shape == (3, 16, 50)
    logits, loss = model(idx, torch.randint(0, 50, (3, 16)))
    assert logits is None and loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(50)) < 0.5  # near-uniform predictions at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_loss_is_cross_entropy_of_the_logits_with_minus_one_ignored():
    model = tiny_model()
    idx, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    targets[0, :5] = -1
    _, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(model.logits(idx).view(-1, 50), targets.view(-1),
                                                 ignore_index=-1)
    assert_close(loss, expected)


def test_loss_variants_are_config_keys_off_by_default():
    """label_smoothing, z_loss and logit_softcap reach the fused loss (its value against
    cross-entropy of the capped logits, written out), the z-loss term is kept for logging,
    and the soft cap applies to every logit the model returns."""
    assert (GPTConfig().label_smoothing, GPTConfig().z_loss, GPTConfig().logit_softcap) == (0, 0, 0)
    model = tiny_model(label_smoothing=0.1, z_loss=1e-2, logit_softcap=2.0)
    idx, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    targets[0, :5] = -1
    _, loss = model(idx, targets)
    logits = model.logits(idx)
    raw = model.lm_head(model.hidden_states(idx))
    assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    assert logits.abs().max() < 2.0
    flat, kept = logits.view(-1, 50).double(), targets.view(-1) != -1
    lse = torch.logsumexp(flat, -1)[kept]
    z_term = 1e-2 * lse.square().mean()
    smoothed = torch.nn.functional.cross_entropy(flat, targets.view(-1), ignore_index=-1,
                                                 label_smoothing=0.1)
    assert_close(loss, smoothed + z_term)
    assert_close(model.last_z_loss, z_term)
    assert not model.last_z_loss.requires_grad
    assert model(idx)[0].abs().max() < 2.0  # generation's logits too
    plain = tiny_model()
    plain(idx, targets)
    assert plain.last_z_loss is None


def test_gpt2_124m_parameter_count_and_init():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257))
    assert model.get_num_params() == 123_653_376  # nanoGPT: "number of parameters: 123.65M"
    assert model.get_num_params(non_embedding=False) == 124_439_808  # GPT-2 small, tied lm_head
    assert model.lm_head.weight is model.transformer.wte.weight
    small = GPT(GPTConfig(**{**TINY, "n_layer": 8, "n_embd": 256, "n_head": 4}))
    c_proj = small.transformer.h[0].mlp.c_proj.weight
    c_fc = small.transformer.h[0].mlp.c_fc.weight
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert abs(c_fc.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("field, value, message", [
    ("n_embd", 31, "divisible by n_head"), ("n_layer", 0, "positive int"),
    ("dropout", 1.0, "dropout"), ("backend", "tpu", "unknown backend"),
    ("label_smoothing", 1.5, "label_smoothing"), ("z_loss", -1.0, "z_loss"),
    ("logit_softcap", float("inf"), "logit_softcap"),
])
def test_bad_config_is_a_clear_error(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, field: value})


def test_bad_inputs_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=0.0)


@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 10), (5, 30)])  # 30 > block_size: window slides
def test_kv_cache_generates_the_same_tokens(prompt_len, new_tokens):
    model = tiny_model()
    prompt = torch.randint(0, 50, (2, prompt_len))
    with_cache = model.generate(prompt, new_tokens, top_k=10,
                                generator=torch.Generator().manual_seed(7))
    without = model.generate(prompt, new_tokens, top_k=10, use_kv_cache=False,
                             generator=torch.Generator().manual_seed(7))
    assert with_cache.shape == (2, prompt_len + new_tokens)
    assert torch.equal(with_cache, without)


def test_our_checkpoint_round_trip_with_backend_override(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt.pt", model, iter_num=3)
    loaded = GPT.from_checkpoint(tmp_path, backend="auto").eval()
    assert loaded.config.backend == "auto"
    idx = torch.randint(0, 50, (1, 16))
    torch.testing.assert_close(loaded.logits(idx), model.logits(idx))


def test_loads_nanogpt_compiled_checkpoint(tmp_path):
    model = tiny_model()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    state["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()  # old nanoGPT buffer
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=50,
                      dropout=0.0)  # exactly nanoGPT's keys
    torch.save({"model": state, "model_args": model_args, "iter_num": 5, "best_val_loss": 1.0,
                "config": {}}, tmp_path / "ckpt.pt")
    loaded = GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(loaded.logits(idx), model.logits(idx))


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        GPT.from_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a GPT checkpoint"):  # a CheckpointError
        GPT.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no Hugging Face GPT-2"):
        GPT.from_pretrained(tmp_path / "missing")


def _save_hf_gpt2(path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=97,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def test_hugging_face_gpt2_logits_match(tmp_path):
    hf = _save_hf_gpt2(tmp_path / "hf")
    idx = torch.randint(0, 97, (2, 32))
    expected = hf(idx).logits
    for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        model = GPT.from_pretrained(source).eval()
        assert model.config.vocab_size == 97 and model.config.block_size == 32
        assert model.config.gelu_approximate == "tanh"  # HF GPT-2's "gelu_new"
        assert_close(model.logits(idx), expected)


def test_crop_block_size():
    model = tiny_model()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 1, 50)
    with pytest.raises(ValueError, match="block_size must be"):
        model.crop_block_size(9)


def test_cpu_dropout_keeps_its_rate_scales_and_replays_under_the_seed():
    """gpt.model.Dropout draws its CPU masks with numpy (seeded from torch's generator):
    each element kept with probability 1 - p, scaled by 1 / (1 - p), the same mask again
    after the same torch.manual_seed, a different one after another, and the gradient is
    the mask times the scale."""
    from gpt.model import Dropout
    drop = Dropout(0.25).train()
    x = torch.ones(64, 1024, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    torch.manual_seed(4)
    assert not torch.equal(drop(x), y)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 65536 draws: sd 0.0017
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask * scale)/dx, x being ones
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_split_heads_is_the_views_with_their_gradient_packed(dtype):
    """q, k, v are the (B, H, T, D) views of the projection, and the packed gradient is
    autograd's own for those views, bit for bit (each of q, k, v gets a different one)."""
    qkv = torch.randn(2, 5, 3 * 4 * 8, dtype=dtype, requires_grad=True)
    views = qkv.view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    heads = split_heads(qkv, 4)
    upstream = [torch.randn(2, 4, 5, 8, dtype=dtype) for _ in range(3)]
    for got, want in zip(heads, views):
        assert torch.equal(got, want) and got.data_ptr() == want.data_ptr()  # no copies
    (got,) = torch.autograd.grad(heads, qkv, upstream)
    (want,) = torch.autograd.grad(views, qkv, upstream)
    assert got.dtype == dtype and torch.equal(got, want)


# ----------------------------------------------------------------------------- research edits

BACKENDS_HERE = [b for b in ("torch", "triton") if kernels.available_backends()[b].available]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_module_hooks_on_every_submodule_fire(backend):
    """The fused ops read the MLP's Linears and ln_2 without calling them; a hook set on
    one of them must still fire (the block then runs that module itself), with the same
    logits as without the hook."""
    model = tiny_model(backend=backend)
    idx = torch.randint(0, 50, (2, 8))
    plain = model.logits(idx)
    seen = []
    block = model.transformer.h[1]
    names = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj", "mlp"]
    handles = [block.get_submodule(n).register_forward_hook(
        lambda module, args, out, n=n: seen.append(n)) for n in names]
    hooked = model.logits(idx)
    for h in handles:
        h.remove()
    assert sorted(seen) == sorted(names)
    assert_close(hooked, plain)


class DoubledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_a_subclassed_mlp_linear_runs_its_own_forward(backend):
    """A LoRA-style subclass on mlp.c_fc: the fused MLP would read its weight and ignore
    its forward; the MLP must run it instead (here: c_fc's output doubled by hand)."""
    model = tiny_model(backend=backend)
    idx = torch.randint(0, 50, (2, 8))
    mlp = model.transformer.h[0].mlp
    doubled = DoubledLinear(mlp.c_fc.in_features, mlp.c_fc.out_features)
    doubled.load_state_dict(mlp.c_fc.state_dict())
    by_hand = torch.nn.Linear(mlp.c_fc.in_features, mlp.c_fc.out_features)
    by_hand.weight.data, by_hand.bias.data = 2 * mlp.c_fc.weight.data, 2 * mlp.c_fc.bias.data
    mlp.c_fc = doubled
    edited = model.logits(idx)
    mlp.c_fc = by_hand
    assert_close(edited, model.logits(idx))


LM_HEAD_EDITS = {
    "forward hook": lambda model: model.lm_head.register_forward_hook(
        lambda module, args, out: 2.0 * out),
    "subclass": lambda model: setattr(model, "lm_head", _doubled(model.lm_head)),
    "with a bias": lambda model: setattr(model, "lm_head", _with_bias(model.lm_head)),
}


def _doubled(linear):
    doubled = DoubledLinear(linear.in_features, linear.out_features, bias=False)
    doubled.load_state_dict(linear.state_dict())
    return doubled


def _with_bias(linear):
    biased = torch.nn.Linear(linear.in_features, linear.out_features)
    biased.weight.data.copy_(linear.weight.data)
    biased.bias.data.uniform_(-1.0, 1.0)
    return biased


@pytest.mark.parametrize("edit", LM_HEAD_EDITS)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_the_training_loss_counts_a_hooked_or_replaced_lm_head(backend, edit):
    """The training loss fuses the lm_head with cross-entropy, reading its weight: a hook
    on the lm_head, a subclass with its own forward or a bias must still count, giving the
    cross-entropy of the logits the module computes (the loss variants included)."""
    model = tiny_model(backend=backend, label_smoothing=0.1, logit_softcap=4.0)
    idx, targets = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    targets[1, :3] = -1
    _, plain = model(idx, targets)
    LM_HEAD_EDITS[edit](model)
    _, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(model.logits(idx).view(-1, 50),
                                                 targets.view(-1), ignore_index=-1,
                                                 label_smoothing=0.1)
    assert_close(loss, expected)
    assert (loss - plain).abs() > 1e-3


def test_a_layer_norm_subclass_in_ln_2_runs_its_own_forward():
    """ln_2 is fused with the residual add; a subclass with its own forward (an RMSNorm,
    say) must run instead of the fused LayerNorm."""
    class RMSNorm(LayerNorm):
        def forward(self, x):
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight

    model = tiny_model()
    idx = torch.randint(0, 50, (2, 8))
    plain = model.logits(idx)
    block = model.transformer.h[0]
    rms = RMSNorm(32, bias=True, backend="torch")
    rms.load_state_dict(block.ln_2.state_dict())
    block.ln_2 = rms
    assert (model.logits(idx) - plain).abs().max() > 1e-3


def test_flops_per_token_counts_attention_causally_or_as_nanogpt_does():
    """6 N plus attention's 12 L C T over the full T x T (nanoGPT's estimate_mfu), or the
    causal half, 6 L C T."""
    config = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=50)
    model = GPT(config)
    n = model.get_num_params()
    assert n == sum(p.numel() for p in model.parameters()) - 32 * 16  # without wpe
    assert model.flops_per_token() == 6 * n + 6 * 3 * 16 * 32
    assert model.flops_per_token(8, attention="nanogpt") == 6 * n + 12 * 3 * 16 * 8
    with pytest.raises(ValueError, match="attention must be one of"):
        model.flops_per_token(attention="full")
