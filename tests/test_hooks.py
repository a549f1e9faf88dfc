"""GPT.run_with_cache and GPT.run_with_hooks (gpt/hooks.py): the named activations of a forward
pass, read and changed, on every backend available here (Triton under the interpreter
without a GPU)."""
import copy

import pytest
import torch
from torch.nn import functional as F

import kernels
from gpt import hooks
from gpt.hooks import HookPoints, activation_names, attention_pattern
from gpt.model import GPT, GPTConfig
from kernels import reference
from kernels.testing import assert_close

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=70, dropout=0.0)
C, H = TINY["n_embd"], TINY["n_head"]
D = C // H
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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


def identity(tensor, name):
    return tensor


# ----------------------------------------------------------------------------- reading

@torch.no_grad()
def test_logits_with_and_without_the_cache_are_identical(model, idx):
    logits, cache = model.run_with_cache(idx)
    assert torch.equal(logits, model.logits(idx))
    assert list(cache) == activation_names(TINY["n_layer"])  # every name, in forward order
    assert torch.equal(cache["ln_f"], model.hidden_states(idx))
    B, T = idx.shape
    shapes = {"embed": (B, T, C), "pos_embed": (T, C), "ln_f_scale": (B, T, 1), "ln_f": (B, T, C),
              "blocks.1.q": (B, H, T, D), "blocks.1.k": (B, H, T, D), "blocks.1.v": (B, H, T, D),
              "blocks.1.attn_pattern": (B, H, T, T), "blocks.1.attn_z": (B, T, H, D),
              "blocks.1.ln_1_scale": (B, T, 1), "blocks.1.ln_2_scale": (B, T, 1),
              "blocks.1.mlp_pre": (B, T, 4 * C), "blocks.1.mlp_post": (B, T, 4 * C)}
    assert {name: tuple(cache[name].shape) for name in shapes} == shapes


@torch.no_grad()
def test_a_cache_of_some_names_records_only_those(model, idx):
    names = ["blocks.0.mlp_post", "ln_f_scale"]
    logits, cache = model.run_with_cache(idx, names=names)
    assert list(cache) == names
    assert torch.equal(logits, model.logits(idx))


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
def test_attention_pattern_and_heads_are_the_ones_the_kernel_applied(model, idx):
    """The pattern is computed from q and k, outside the (fused) kernel: applied to v, it
    must give each head's output the model recorded (attn_z), which projected by c_proj is
    the attention write."""
    _, cache = model.run_with_cache(idx)
    B, T = idx.shape
    for i, block in enumerate(model.transformer.h):
        pattern = cache[f"blocks.{i}.attn_pattern"]
        assert pattern.shape == (B, H, T, T)
        assert_close(pattern.sum(-1), torch.ones(B, H, T, device=DEVICE))
        assert (pattern.triu(diagonal=1) == 0).all()  # causal
        qkv = block.attn.c_attn(block.ln_1(cache[f"blocks.{i}.resid_pre"]))
        v = qkv.view(B, T, 3, H, D)[:, :, 2].transpose(1, 2)
        heads = (pattern @ v).transpose(1, 2)
        assert_close(heads, cache[f"blocks.{i}.attn_z"])
        assert_close(block.attn.c_proj(heads.reshape(B, T, C)), cache[f"blocks.{i}.attn_out"])


@torch.no_grad()
def test_q_k_v_and_the_mlp_hidden_activations_are_what_the_modules_compute(model, idx):
    _, cache = model.run_with_cache(idx)
    B, T = idx.shape
    for i, block in enumerate(model.transformer.h):
        def act(name):
            return cache[f"blocks.{i}.{name}"]

        qkv = block.attn.c_attn(block.ln_1(act("resid_pre"))).view(B, T, 3, H, D)
        for n, name in enumerate("qkv"):
            assert_close(act(name), qkv[:, :, n].transpose(1, 2))
        mlp = block.mlp
        assert_close(act("mlp_pre"), mlp.c_fc(block.ln_2(act("resid_mid"))))
        assert_close(act("mlp_post"), F.gelu(act("mlp_pre"), approximate=mlp.gelu_approximate))
        assert_close(mlp.c_proj(act("mlp_post")), act("mlp_out"))


@torch.no_grad()
def test_layer_norm_scales_against_the_reference(model, idx):
    """Each scale is sqrt(var + eps) of the LayerNorm's input (fp64 here), and that
    LayerNorm's formula with it is the reference LayerNorm."""
    _, cache = model.run_with_cache(idx)
    last = TINY["n_layer"] - 1
    points = [("ln_f_scale", model.transformer.ln_f, cache[f"blocks.{last}.resid_post"])]
    for i, block in enumerate(model.transformer.h):
        points += [(f"blocks.{i}.ln_1_scale", block.ln_1, cache[f"blocks.{i}.resid_pre"]),
                   (f"blocks.{i}.ln_2_scale", block.ln_2, cache[f"blocks.{i}.resid_mid"])]
    for name, ln, x in points:
        scale = cache[name]
        assert scale.dtype == torch.float32
        expected = (x.double().var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        assert_close(scale, expected)
        assert_close(ln.with_scale(x, scale), reference.layer_norm(x, ln.weight, ln.bias, ln.eps))


def test_pattern_of_queries_after_a_kv_cache_is_aligned_bottom_right():
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    full = attention_pattern(q, k)
    assert torch.allclose(attention_pattern(q[:, :, -2:], k), full[:, :, -2:])


# ----------------------------------------------------------------------------- changing

def test_an_identity_hook_leaves_the_logits_bit_identical(model, idx):
    """At every point, one at a time and all at once, a hook that returns its input or None
    (including those computed beside a fused kernel, whose output then stands)."""
    names = activation_names(TINY["n_layer"])
    with torch.no_grad():
        plain = model.logits(idx)
        for name in names:
            assert torch.equal(model.run_with_hooks(idx, {name: identity}), plain), name
        assert torch.equal(model.run_with_hooks(idx, {n: lambda t, n: None for n in names}), plain)
    with_grad = model.run_with_hooks(idx, {name: identity for name in names})
    assert torch.equal(with_grad, plain) and with_grad.requires_grad


def _offset(generator_seed: int = 1) -> torch.Tensor:
    return torch.randn(C, generator=torch.Generator().manual_seed(generator_seed)).to(DEVICE)


def _zero_head_1(z, name):
    z = z.clone()
    z[:, :, 1] = 0.0
    return z


def _double_in_place(t, name):
    t.mul_(2.0)


def _add_in_place(t, name):
    t.add_(_offset())


# name, the hook, and the same change made to the model's weights instead: (block or None,
# edit(model or block)).
EDITS = {
    "pos_embed": (lambda t, n: t + _offset(),
                  lambda m: m.transformer.wpe.weight[:13].add_(_offset())),
    "blocks.0.ln_1_scale": (lambda t, n: 2 * t,
                            lambda m: m.transformer.h[0].ln_1.weight.div_(2)),
    "blocks.0.q": (lambda t, n: 2 * t,
                   lambda m: [p[:C].mul_(2) for p in m.transformer.h[0].attn.c_attn.parameters()]),
    "blocks.1.v": (lambda t, n: -t,
                   lambda m: [p[2 * C:].neg_()
                              for p in m.transformer.h[1].attn.c_attn.parameters()]),
    "blocks.0.attn_z": (_zero_head_1,
                        lambda m: m.transformer.h[0].attn.c_proj.weight[:, D:].zero_()),
    "blocks.1.attn_out": (lambda t, n: t + _offset(),
                          lambda m: m.transformer.h[1].attn.c_proj.bias.add_(_offset())),
    "blocks.0.resid_mid": (_add_in_place,  # in place, on the fused add + LayerNorm's output
                           lambda m: m.transformer.h[0].attn.c_proj.bias.add_(_offset())),
    "blocks.1.ln_2_scale": (lambda t, n: 2 * t,
                            lambda m: m.transformer.h[1].ln_2.weight.div_(2)),
    "blocks.0.mlp_pre": (lambda t, n: 2 * t,
                         lambda m: [p.mul_(2) for p in m.transformer.h[0].mlp.c_fc.parameters()]),
    "blocks.1.mlp_post": (_double_in_place,
                          lambda m: m.transformer.h[1].mlp.c_proj.weight.mul_(2)),
    "blocks.0.mlp_out": (lambda t, n: t + _offset(),
                         lambda m: m.transformer.h[0].mlp.c_proj.bias.add_(_offset())),
    "blocks.1.resid_pre": (lambda t, n: t + _offset(),
                           lambda m: m.transformer.h[0].mlp.c_proj.bias.add_(_offset())),
    "ln_f_scale": (lambda t, n: 2 * t, lambda m: m.transformer.ln_f.weight.div_(2)),
    "ln_f": (lambda t, n: 2 * t,
             lambda m: [p.mul_(2) for p in m.transformer.ln_f.parameters()]),
}


@torch.no_grad()
@pytest.mark.parametrize("name", EDITS)
def test_a_change_through_a_hook_is_the_same_change_made_to_the_weights(model, idx, name):
    """Scaling a LayerNorm's scale by 2 is halving its gain, doubling q is doubling its
    rows of c_attn, zeroing a head's output is zeroing its columns of c_proj, adding to a
    write is adding to its bias, ... : each hook against the model edited by hand."""
    hook, edit = EDITS[name]
    edited = copy.deepcopy(model)
    edit(edited)
    expected = edited.logits(idx)
    assert not torch.allclose(expected, model.logits(idx))  # the edit changes something
    assert_close(model.run_with_hooks(idx, {name: hook}), expected)


def test_gradients_flow_through_a_changed_activation():
    """A changed side value (mlp_post, beside the fused MLP) is recomputed with autograd:
    the weights' gradients are those of the model edited by hand."""
    model = tiny_model("torch")
    idx = torch.randint(0, TINY["vocab_size"], (2, 13), device=DEVICE)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.transformer.h[1].mlp.c_proj.weight.mul_(2)
    model.run_with_hooks(idx, {"blocks.1.mlp_post": lambda t, n: 2 * t}).square().mean().backward()
    edited.logits(idx).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), edited.parameters()):
        grad = q.grad * 2 if name == "transformer.h.1.mlp.c_proj.weight" else q.grad
        assert_close(p.grad, grad, name=name)


def test_a_change_in_place_counts_under_inference_mode(idx):
    """Inference tensors keep no version counter: a hooked side value is recomputed as if
    changed, so that a change in place is never lost."""
    model = tiny_model("torch")
    hook, edit = EDITS["blocks.1.mlp_post"]
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edit(edited)
    with torch.inference_mode():
        assert_close(model.run_with_hooks(idx, {"blocks.1.mlp_post": hook}), edited.logits(idx))
        assert_close(model.run_with_hooks(idx, {"blocks.1.mlp_post": identity}), model.logits(idx))


@torch.no_grad()
def test_hooks_at_one_name_run_in_order_and_see_what_the_previous_left(idx):
    model = tiny_model("torch")
    seen = []

    def record(tensor, name):
        seen.append(tensor.clone())

    model.run_with_hooks(idx, {"blocks.0.attn_out": [record, lambda t, n: t + 1, record]})
    assert torch.equal(seen[1], seen[0] + 1)


@torch.no_grad()
def test_named_hooks_see_what_module_hooks_left(idx):
    """A module hook on mlp.c_fc runs as c_fc runs, before the named point mlp_pre: the
    named hook sees the module hook's output, and both changes reach the logits."""
    model = tiny_model("torch")
    mlp = model.transformer.h[0].mlp
    handle = mlp.c_fc.register_forward_hook(lambda module, args, out: 2 * out)
    seen = {}
    logits = model.run_with_hooks(idx, {"blocks.0.mlp_pre": [
        lambda t, n: seen.setdefault("pre", t), lambda t, n: t + 1]})
    handle.remove()
    edited = copy.deepcopy(model)
    edited.transformer.h[0].mlp.c_fc.weight.mul_(2)
    edited.transformer.h[0].mlp.c_fc.bias.mul_(2).add_(1)
    _, cache = edited.run_with_cache(idx)
    assert_close(seen["pre"] + 1, cache["blocks.0.mlp_pre"])
    assert_close(logits, edited.logits(idx))


# ----------------------------------------------------------------------------- no cost

def test_a_forward_without_hooks_runs_no_hook_code(monkeypatch, idx):
    """Hook points cost nothing unless asked for: no method of HookPoints runs."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("a forward without hooks visited a hook point")

    for method in ("__call__", "edit", "read", "wants", "block", "full_name"):
        monkeypatch.setattr(hooks.HookPoints, method, must_not_run)
    model = tiny_model("torch")
    model(idx, idx)
    model.logits(idx)
    model.train()(idx, idx)[1].backward()
    model.generate(idx[:, :4], max_new_tokens=3)


def test_the_compiled_forward_is_the_same_graph_before_and_after_hooked_runs(idx):
    """torch.compile traces the hook-free forward in one graph (fullgraph), and hooked runs
    leave nothing behind in the model that would change it."""
    model = tiny_model("torch")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    torch.compile(model.logits, backend=capture, fullgraph=True)(idx)
    model.run_with_hooks(idx, {name: identity for name in activation_names(TINY["n_layer"])})
    model.run_with_cache(idx)
    torch._dynamo.reset()
    torch.compile(model.logits, backend=capture, fullgraph=True)(idx)
    assert len(graphs) == 2 and graphs[0] == graphs[1]


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("hooks_arg, error, message", [
    ({"blocks.1.atn_out": identity}, ValueError,
     r"unknown activation 'blocks.1.atn_out'; did you mean 'blocks.1.attn_out'\?"),
    ({"blocks.2.resid_pre": identity}, ValueError,
     "unknown activation 'blocks.2.resid_pre': the model has 2 blocks, blocks.0 to blocks.1"),
    ({"logits": identity}, ValueError, r"unknown activation 'logits'.*blocks\.\{i\}\.\{resid_pre"),
    ({"ln_f": "zero"}, TypeError, "the hook on 'ln_f' must be a function"),
    ({"ln_f": lambda t, n: t[:, :-1]}, ValueError,
     r"the hook on 'ln_f' returned a torch.float32 tensor of shape \(2, 12, 32\).*\(2, 13, 32\)"),
    ({"ln_f": lambda t, n: t.double()}, ValueError, "returned a torch.float64 tensor"),
    ({"ln_f": lambda t, n: 0.0}, TypeError, "the hook on 'ln_f' returned float"),
    ({"blocks.0.attn_pattern": lambda t, n: t.flip(-1)}, ValueError,
     "a hook changed blocks.0.attn_pattern, which is computed beside the fused attention"),
])
def test_bad_hooks_are_clear_errors(idx, hooks_arg, error, message):
    with pytest.raises(error, match=message):
        tiny_model("torch").run_with_hooks(idx, hooks_arg)


def test_an_unknown_name_in_a_cache_says_which_are_recorded(idx):
    _, cache = tiny_model("torch").run_with_cache(idx)
    with pytest.raises(KeyError, match="no activation 'blocks.9.resid_pre'.*blocks.1.mlp_out"):
        cache["blocks.9.resid_pre"]
    with pytest.raises(ValueError, match="unknown activation 'blocks.1.mlp'"):
        tiny_model("torch").run_with_cache(idx, names=["blocks.1.mlp"])


class OwnMLP(torch.nn.Module):
    """A replacement MLP of another class: it has no hook points inside."""

    def forward(self, x):
        return torch.zeros_like(x)


@torch.no_grad()
def test_a_point_inside_a_replaced_module_is_never_reached_and_says_so(idx):
    model = tiny_model("torch")
    model.transformer.h[1].mlp = OwnMLP()
    message = "the forward never reached blocks.1.mlp_post.*replaced by another class"
    with pytest.raises(ValueError, match=message):
        model.run_with_hooks(idx, {"blocks.1.mlp_post": identity})
    with pytest.raises(ValueError, match=message):
        model.run_with_cache(idx, names=["blocks.1.mlp_post"])
    _, cache = model.run_with_cache(idx)  # every name: what the model's modules have
    assert "blocks.0.mlp_post" in cache and "blocks.1.mlp_post" not in cache
    assert "blocks.1.mlp_out" in cache


@torch.no_grad()
def test_a_changed_scale_refuses_to_overrule_module_hooks_on_its_layer_norm(idx):
    model = tiny_model("torch")
    model.transformer.h[0].ln_1.register_forward_hook(lambda module, args, out: out)
    assert torch.equal(model.run_with_hooks(idx, {"blocks.0.ln_1_scale": identity}),
                       model.logits(idx))
    with pytest.raises(ValueError, match="a hook changed blocks.0.ln_1_scale.*module hooks"):
        model.run_with_hooks(idx, {"blocks.0.ln_1_scale": lambda t, n: 2 * t})


def test_hook_points_need_a_cache_to_record_into():
    with pytest.raises(ValueError, match="need a cache"):
        HookPoints(2, record=["ln_f"])
