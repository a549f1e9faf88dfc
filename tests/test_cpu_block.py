"""The CPU bf16 training path that runs a whole block as one autograd node
(`kernels.cpu_block`): it calls the module path's ops in the module path's order, so its
output and every gradient must equal the module path's bit for bit, dropout masks included;
and it must step aside wherever it does not apply."""
import pytest
import torch

from gpt import model as gpt_model
from gpt.model import GPT, Block, GPTConfig, KVCache
from gpt.hooks import ActivationCache
from kernels import cpu_attention, cpu_block

FUSED = "_TransformerBlockBackward"


def _config(**overrides) -> GPTConfig:
    args = dict(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=32, dropout=0.0,
                bias=True, gelu_approximate="none")
    return GPTConfig(**{**args, **overrides})


def _block_pass(config, x, fused: bool, monkeypatch, train=True, seed=0, edit=None):
    """(output, input grad, {param: grad}, grad_fn name) of one Block, forward and backward
    under bf16 autocast, with the fused path allowed or not; `edit(block)` alters it first."""
    if not fused:
        monkeypatch.setattr(gpt_model.cpu_block, "applies", lambda *args: False)
    torch.manual_seed(0)
    block = Block(config).train(train)
    if edit is not None:
        edit(block)
    torch.nn.init.normal_(block.ln_1.weight, 1.0, 0.2)  # gains and biases that matter
    for name, p in block.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, 0.0, 0.1)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad_out)
    monkeypatch.undo()
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}, \
        type(out.grad_fn).__name__


def _assert_same(a, b):
    out_a, dx_a, grads_a, _ = a
    out_b, dx_b, grads_b, _ = b
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(dx_b, dx_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("gelu", ["none", "tanh"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("shape,n_head", [((3, 64, 32), 4), ((1, 1, 32), 4), ((2, 7, 24), 1),
                                          ((5, 13, 48), 6)],
                         ids=["seed_like", "one_token", "odd_one_head", "odd_six_heads"])
def test_fused_block_equals_the_module_path(bias, gelu, dropout, shape, n_head, monkeypatch):
    config = _config(n_embd=shape[-1], n_head=n_head, bias=bias, gelu_approximate=gelu,
                     dropout=dropout)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    module = _block_pass(config, x, fused=False, monkeypatch=monkeypatch)
    fused = _block_pass(config, x, fused=True, monkeypatch=monkeypatch)
    assert module[3] != FUSED and fused[3] == FUSED
    _assert_same(module, fused)


def test_extreme_and_strided_inputs_match(monkeypatch):
    """A residual stream of large magnitude, and one that is a strided view."""
    config = _config(dropout=0.1)
    base = torch.randn(3, 64, 2 * 32, generator=torch.Generator().manual_seed(2)) * 300.0
    x = base[..., ::2]  # every other channel: not contiguous
    _assert_same(_block_pass(config, x, False, monkeypatch),
                 _block_pass(config, x, True, monkeypatch))


def test_linears_with_and_without_biases_in_one_block(monkeypatch):
    def drop_some_biases(block):
        block.attn.c_proj.bias = None
        block.mlp.c_fc.bias = None
    config, x = _config(), torch.randn(2, 16, 32)
    module = _block_pass(config, x, False, monkeypatch, edit=drop_some_biases)
    fused = _block_pass(config, x, True, monkeypatch, edit=drop_some_biases)
    assert fused[3] == FUSED
    _assert_same(module, fused)


def test_each_dropout_module_keeps_its_own_probability_and_mode(monkeypatch):
    """As the module path does: one branch's dropout changed, another put in eval mode."""
    def retune(block):
        block.mlp.dropout.p = 0.5
        block.attn.resid_dropout.eval()
    config, x = _config(dropout=0.1), torch.randn(2, 16, 32)
    module = _block_pass(config, x, False, monkeypatch, edit=retune)
    fused = _block_pass(config, x, True, monkeypatch, edit=retune)
    assert fused[3] == FUSED
    _assert_same(module, fused)


def test_eval_mode_with_grad_runs_without_dropout(monkeypatch):
    config = _config(dropout=0.5)
    x = torch.randn(2, 16, 32)
    module = _block_pass(config, x, False, monkeypatch, train=False)
    fused = _block_pass(config, x, True, monkeypatch, train=False, seed=1)  # other masks
    assert fused[3] == FUSED
    _assert_same(module, fused)


def test_a_gpt_trains_the_same_either_way(monkeypatch):
    """The whole model, dropout on: the same loss and gradients for every parameter."""
    def loss_and_grads(fused):
        if not fused:
            monkeypatch.setattr(gpt_model.cpu_block, "applies", lambda *args: False)
        torch.manual_seed(0)
        model = GPT(_config(dropout=0.1))
        idx = torch.randint(0, 65, (4, 64), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(False), loss_and_grads(True)
    assert loss_a.item() == loss_b.item()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def _grad_fn(block, x, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, **kwargs)
    return type(out.grad_fn).__name__ if out.grad_fn is not None else None


def test_the_path_steps_aside_where_it_does_not_apply(monkeypatch):
    block = Block(_config())
    x = torch.randn(2, 8, 32)
    assert _grad_fn(block, x) == FUSED
    with torch.no_grad():
        assert _grad_fn(block, x) is None  # evaluation: the module path, no graph
    assert _grad_fn(block, x, activations=ActivationCache()) != FUSED  # recording
    assert _grad_fn(block, x, kv_cache=KVCache(_config(), 2)) != FUSED  # decoding
    bf16_block = Block(_config()).to(torch.bfloat16)  # a bf16 model and residual stream
    assert _grad_fn(bf16_block, x.bfloat16()) != FUSED
    with torch.autocast("cpu", dtype=torch.float16):
        assert type(block(x).grad_fn).__name__ != FUSED  # fp16: not this path's dtype
    assert type(block(x).grad_fn).__name__ != FUSED  # no autocast: fp32 throughout
    seen = []  # a module hook on a submodule (or on every module) must still see it run
    handle = block.attn.c_attn.register_forward_hook(lambda *args: seen.append("c_attn"))
    assert _grad_fn(block, x) != FUSED and seen == ["c_attn"]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert _grad_fn(block, x) != FUSED
    handle.remove()
    assert _grad_fn(block, x) == FUSED
    long = torch.randn(1, cpu_attention.MAX_SEQ + 1, 32)
    assert _grad_fn(Block(_config(block_size=2 * cpu_attention.MAX_SEQ)), long) != FUSED
    params = block.fused_params()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_block.applies(x, params, "torch")
        assert cpu_block.applies(x, params, "auto")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # then "triton" runs on the CPU
        assert not cpu_block.applies(x, params, "triton")
