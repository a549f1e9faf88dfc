"""The CPU bf16 training path that runs a whole block as one autograd node
(`kernels.cpu.fused_block`): it calls the module path's ops in the module path's order, so
its output and every gradient must equal the module path's bit for bit, dropout masks
included; it must step aside wherever it does not apply, including every research edit
that makes the block compute something else (a subclassed or replaced module, a hook), and
it must refuse to be differentiated twice."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.model import GPT, MLP, Block, GPTConfig, KVCache
from gpt.hooks import ActivationCache, HookPoints
from kernels.cpu import attention as cpu_attention
from kernels.cpu import block as cpu_block

FUSED = "_TransformerBlockBackward"


def _config(**overrides) -> GPTConfig:
    args = dict(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=32, dropout=0.0,
                bias=True, gelu_approximate="none")
    return GPTConfig(**{**args, **overrides})


def _block_pass(config, x, fused: bool, train=True, seed=0, edit=None):
    """(output, input grad, {param: grad}, grad_fn name) of one Block, forward and backward
    under bf16 autocast, with the fused path allowed or not (GPTConfig.cpu_fused_block);
    `edit(block)` alters it first."""
    config = GPTConfig(**{**config.__dict__, "cpu_fused_block": fused})
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
def test_fused_block_equals_the_module_path(bias, gelu, dropout, shape, n_head):
    config = _config(n_embd=shape[-1], n_head=n_head, bias=bias, gelu_approximate=gelu,
                     dropout=dropout)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    module = _block_pass(config, x, fused=False)
    fused = _block_pass(config, x, fused=True)
    assert module[3] != FUSED and fused[3] == FUSED
    _assert_same(module, fused)


def test_extreme_and_strided_inputs_match():
    """A residual stream of large magnitude, and one that is a strided view."""
    config = _config(dropout=0.1)
    base = torch.randn(3, 64, 2 * 32, generator=torch.Generator().manual_seed(2)) * 300.0
    x = base[..., ::2]  # every other channel: not contiguous
    _assert_same(_block_pass(config, x, False),
                 _block_pass(config, x, True))


def test_linears_with_and_without_biases_in_one_block():
    def drop_some_biases(block):
        block.attn.c_proj.bias = None
        block.mlp.c_fc.bias = None
    config, x = _config(), torch.randn(2, 16, 32)
    module = _block_pass(config, x, False, edit=drop_some_biases)
    fused = _block_pass(config, x, True, edit=drop_some_biases)
    assert fused[3] == FUSED
    _assert_same(module, fused)


def test_each_dropout_module_keeps_its_own_probability_and_mode():
    """As the module path does: one branch's dropout changed, another put in eval mode."""
    def retune(block):
        block.mlp.dropout.p = 0.5
        block.attn.resid_dropout.eval()
    config, x = _config(dropout=0.1), torch.randn(2, 16, 32)
    module = _block_pass(config, x, False, edit=retune)
    fused = _block_pass(config, x, True, edit=retune)
    assert fused[3] == FUSED
    _assert_same(module, fused)


def test_eval_mode_with_grad_runs_without_dropout():
    config = _config(dropout=0.5)
    x = torch.randn(2, 16, 32)
    module = _block_pass(config, x, False, train=False)
    fused = _block_pass(config, x, True, train=False, seed=1)  # other masks
    assert fused[3] == FUSED
    _assert_same(module, fused)


def test_a_gpt_trains_the_same_either_way():
    """The whole model, dropout on: the same loss and gradients for every parameter."""
    def loss_and_grads(fused):
        torch.manual_seed(0)
        model = GPT(_config(dropout=0.1, cpu_fused_block=fused))
        idx = torch.randint(0, 65, (4, 64), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
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
    recording = HookPoints(2, record=None, cache=ActivationCache())
    assert _grad_fn(block, x, hooks=recording) != FUSED
    assert _grad_fn(block, x, hooks=HookPoints(2, {"blocks.0.attn_z": lambda t, n: 2 * t})) != FUSED
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


def test_the_config_key_turns_the_path_off():
    x = torch.randn(2, 8, 32)
    assert _grad_fn(Block(_config()), x) == FUSED
    assert _grad_fn(Block(_config(cpu_fused_block=False)), x) != FUSED


# ----------------------------------------------------------------------------- research edits

class LoRALinear(nn.Linear):
    """A LoRA-style Linear: W x + b + (B A) x, with A and B trained."""

    def __init__(self, linear: nn.Linear, rank: int = 2):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.lora_a = nn.Parameter(torch.randn(rank, self.in_features) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(self.out_features, rank) * 0.3)

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)


class ReLUMLP(MLP):
    def forward(self, x):
        return self.dropout(self.c_proj(F.relu(self.c_fc(x))))


def _edited_pass(edit, fused: bool, x=None):
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(4)) if x is None else x
    return _block_pass(_config(), x, fused, edit=edit)


def _lora(block):
    block.attn.c_attn = LoRALinear(block.attn.c_attn)


def _relu_mlp(block):
    mlp = ReLUMLP(_config())
    mlp.load_state_dict(block.mlp.state_dict())
    block.mlp = mlp


def _forward_on_the_instance(block):
    c_fc = block.mlp.c_fc
    c_fc.forward = lambda x: F.linear(x, c_fc.weight, c_fc.bias) * 2.0


def _ln2_eps(block):
    block.ln_2.eps = 1e-1  # ln_1 keeps the default: each LayerNorm has its own


@pytest.mark.parametrize("edit", [_lora, _relu_mlp, _forward_on_the_instance],
                         ids=["lora_subclass", "mlp_subclass", "forward_on_instance"])
def test_a_replaced_module_runs_its_own_forward(edit):
    """A subclass (LoRA on c_attn, an MLP with ReLU) or a forward set on an instance
    computes something else: the block must run its modules, whatever the config says."""
    module, fused = _edited_pass(edit, fused=False), _edited_pass(edit, fused=True)
    assert fused[3] != FUSED
    _assert_same(module, fused)
    stock = _edited_pass(None, fused=False)
    assert not torch.equal(stock[0], fused[0])  # the edit changed the output
    if edit is _lora:
        assert fused[2]["attn.c_attn.lora_a"] is not None
        assert fused[2]["attn.c_attn.lora_b"].abs().sum() > 0


def test_a_forward_replaced_on_the_class_sends_the_block_back(monkeypatch):
    monkeypatch.setattr(MLP, "forward", lambda self, x: self.dropout(
        self.c_proj(F.silu(self.c_fc(x)))))
    assert _edited_pass(None, fused=True)[3] != FUSED


def test_each_layer_norm_uses_its_own_eps():
    module, fused = _edited_pass(_ln2_eps, fused=False), _edited_pass(_ln2_eps, fused=True)
    assert fused[3] == FUSED
    _assert_same(module, fused)
    assert not torch.equal(_edited_pass(None, fused=False)[0], fused[0])


# ----------------------------------------------------------------------------- frozen layers

FROZEN = {
    "attention": ("ln_1.", "attn.c_attn."),
    "mlp_weights": ("mlp.c_fc.weight", "mlp.c_proj.weight"),
    "all_but_ln_2": ("ln_1.", "attn.", "mlp."),
    "everything": ("",),
}


@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_frozen"])
@pytest.mark.parametrize("frozen", list(FROZEN))
def test_frozen_parameters_get_no_gradient_and_the_rest_the_module_paths(frozen, x_grad):
    def freeze(block):
        for name, p in block.named_parameters():
            if name.startswith(FROZEN[frozen]):
                p.requires_grad_(False)

    def run(fused):
        config = _config(cpu_fused_block=fused)
        torch.manual_seed(0)
        block = Block(config)
        freeze(block)
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
        x.requires_grad_(x_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        if out.requires_grad:
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)))
        return out, x.grad, {n: p.grad for n, p in block.named_parameters()}

    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = run(False), run(True)
    assert out_a.requires_grad == out_b.requires_grad
    assert torch.equal(out_a, out_b)
    assert (dx_a is None) == (dx_b is None) and (dx_a is None or torch.equal(dx_a, dx_b))
    for name in grads_a:
        assert (grads_a[name] is None) == (grads_b[name] is None), name
        if grads_a[name] is not None:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_a_frozen_stage_costs_no_backward(monkeypatch):
    """ctx.needs_input_grad: nothing below the MLP needs a gradient, so the attention's
    backward and the weight gradients of frozen Linears are never computed."""
    calls = []
    real = cpu_block.attention.backward
    monkeypatch.setattr(cpu_block.attention, "backward",
                        lambda *args: calls.append("attention") or real(*args))
    block = Block(_config())
    for name, p in block.named_parameters():
        p.requires_grad_(name.startswith("mlp."))
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert type(out.grad_fn).__name__ == FUSED
    out.sum().backward()
    assert calls == [] and block.attn.c_attn.weight.grad is None
    assert block.mlp.c_fc.weight.grad is not None
    for p in block.parameters():
        p.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x).sum().backward()
    assert calls == ["attention"]


# ----------------------------------------------------------------------------- twice

def test_differentiating_twice_raises_instead_of_a_wrong_answer():
    """The hand-written backward computes first derivatives only: a gradient penalty
    (create_graph, then a backward through the gradient) must raise, naming the way out."""
    block = Block(_config())
    x = torch.randn(2, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert type(out.grad_fn).__name__ == FUSED
    (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="cpu_fused_block=False"):
        dx.square().sum().backward()


def test_differentiating_the_cpu_attention_twice_raises():
    q, k, v = (torch.randn(2, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    assert cpu_attention.applies(q, k)
    out = cpu_attention.causal_attention(q, k, v, 0.25)
    (dq,) = torch.autograd.grad(out.float().square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="kernels.cpu.attention"):
        dq.float().sum().backward()


def test_split_heads_differentiates_twice():
    """The model's other hand-written backward (q, k, v packed in one pass) is made of
    differentiable ops, so its second derivative is autograd's own."""
    from gpt.model import split_heads
    qkv = torch.randn(2, 5, 3 * 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: split_heads(t, 2), (qkv,))
    assert torch.autograd.gradgradcheck(lambda t: [h.square() for h in split_heads(t, 2)],
                                        (qkv,))
