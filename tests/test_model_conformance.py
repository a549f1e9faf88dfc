"""The whole model on every backend, judged like the ops (kernels.testing): a training
step's loss and the gradient of every parameter, in fp32 and under bf16 autocast (the
mixed dtypes a real run makes: bf16 matmuls and attention, an fp32 residual stream, fp32
LayerNorms), against the same step in fp64 on the `torch` backend, with the `torch`
backend's own step in the same precision as the allowance (the `torch` backend itself gets
the fixed budget instead: never judged against itself); and decoding with the KV cache
under autocast, step by step, against the fp64 model's logits. Triton runs under the
interpreter here; cuda on a GPU (CUDA autocast there)."""
import contextlib

import pytest
import torch

import kernels
from gpt.model import GPT, GPTConfig, KVCache
from kernels.testing import compare

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=70, dropout=0.0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in kernels.BACKENDS if kernels.available_backends()[b].available]


def model_on(backend, state, dtype=torch.float32):
    model = GPT(GPTConfig(**TINY, backend=backend)).to(DEVICE)
    model.load_state_dict(state)
    return model.to(dtype)


def allowance(backend, results):
    """Eager's results as the allowance, except for the torch backend (see kernels.testing)."""
    return None if backend == "torch" else results


def working_dtype(autocast):
    return torch.bfloat16 if autocast else torch.float32


def precision(autocast):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16) if autocast else \
        contextlib.nullcontext()


def training_step(model, idx, targets, autocast):
    with precision(autocast):
        _, loss = model(idx, targets)
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad for name, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    state = GPT(GPTConfig(**TINY)).state_dict()
    idx = torch.randint(0, 70, (2, 16), device=DEVICE)
    targets = torch.randint(0, 70, (2, 16), device=DEVICE)
    targets[1, :3] = -1  # ignored positions
    expected = training_step(model_on("torch", state, torch.float64), idx, targets, False)
    return state, idx, targets, expected


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_matches_fp64(backend, autocast, batch):
    state, idx, targets, expected = batch
    eager = allowance(backend, training_step(model_on("torch", state), idx, targets, autocast))
    actual = training_step(model_on(backend, state), idx, targets, autocast)
    assert set(actual) == set(expected)
    failed = [str(v) for name in expected
              if not (v := compare(name, actual[name], expected[name],
                                   None if eager is None else eager[name],
                                   precision=working_dtype(autocast))).passed]
    assert not failed, failed


def decode(model, idx, prompt, autocast):
    """The logits of every position from `prompt` on, one token at a time through the KV
    cache (the prompt in one call first), as generation computes them: (B, T - prompt + 1, V)."""
    cache = KVCache(model.config, idx.shape[0])
    steps = []
    with torch.no_grad(), precision(autocast):
        logits, _ = model(idx[:, :prompt], kv_cache=cache)
        steps.append(logits)
        for t in range(prompt, idx.shape[1]):
            logits, _ = model(idx[:, t:t + 1], kv_cache=cache)
            steps.append(logits)
    return torch.cat(steps, 1).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_decoding_under_autocast_matches_fp64(backend, batch):
    state, idx, _, _ = batch
    with torch.no_grad():
        expected = model_on("torch", state, torch.float64).logits(idx)[:, 4:]
    eager = allowance(backend, decode(model_on("torch", state), idx, 5, True))
    actual = decode(model_on(backend, state), idx, 5, True)
    verdict = compare("decoded logits", actual, expected, eager, precision=torch.bfloat16)
    assert verdict.passed, str(verdict)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "triton")])
def test_model_compiles_as_one_graph(backend, autocast):
    """Every op is a registered custom op (or plain torch), so the whole model traces with
    fullgraph=True: no graph break at a kernel call, under autocast too (the mixed dtypes,
    and bf16 attention, which the torch backend leaves to SDPA when compiled). aot_eager
    keeps it quick on the CPU."""
    torch.manual_seed(0)
    state = GPT(GPTConfig(**TINY)).state_dict()
    model = model_on(backend, state)
    idx = torch.randint(0, 70, (2, 16), device=DEVICE)
    with torch.no_grad():
        _, expected = model_on("torch", state, torch.float64)(idx, idx)
    with precision(autocast):
        _, eager_loss = model(idx, idx)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        _, loss = compiled(idx, idx)
    loss.backward()
    verdict = compare("loss", loss, expected, allowance(backend, eager_loss),
                      precision=working_dtype(autocast))
    assert verdict.passed, str(verdict)
    assert all(p.grad is not None for p in model.parameters())
