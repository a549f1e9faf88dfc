"""The whole model with each kernel backend matches the `torch` backend: loss and the gradient
of every parameter. Triton runs here under the interpreter; cuda needs a GPU."""
import pytest
import torch

import kernels
from gpt.model import GPT, GPTConfig
from tolerance import assert_close

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=70, dropout=0.0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loss_and_grads(backend, dtype, idx, targets, state):
    model = GPT(GPTConfig(**TINY, backend=backend)).to(DEVICE)
    model.load_state_dict(state)
    model.to(dtype)
    _, loss = model(idx, targets)
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_model_matches_torch_backend(backend, dtype):
    status = kernels.available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} unavailable: {status.reason}")
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 whole-model check runs on a GPU; the op tests cover bf16 here")
    state = GPT(GPTConfig(**TINY)).state_dict()
    idx = torch.randint(0, 70, (2, 16), device=DEVICE)
    targets = torch.randint(0, 70, (2, 16), device=DEVICE)
    targets[1, :3] = -1  # ignored positions
    ref_loss, ref_grads = loss_and_grads("torch", dtype, idx, targets, state)
    loss, grads = loss_and_grads(backend, dtype, idx, targets, state)
    factor = 1 if dtype == torch.float32 else 2  # bf16 errors compound over the layers
    assert_close(loss, ref_loss, dtype, factor)
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, dtype, factor)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_compiles_as_one_graph(backend):
    """Every op is a registered custom op (or plain torch), so the whole model traces with
    fullgraph=True: no graph break at a kernel call. aot_eager keeps it quick on the CPU."""
    if not kernels.available_backends()[backend].available:
        pytest.skip(f"{backend} unavailable")
    model = GPT(GPTConfig(**TINY, backend=backend)).to(DEVICE)
    idx = torch.randint(0, 70, (2, 16), device=DEVICE)
    _, eager_loss = model(idx, idx)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _, loss = compiled(idx, idx)
    loss.backward()
    assert_close(loss, eager_loss)
    assert all(p.grad is not None for p in model.parameters())
