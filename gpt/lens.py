"""What a GPT's residual stream holds at each depth, for one prompt: the analyses behind
`gpt.inspect`, computed from the activations `GPT.run_with_cache` records.

Depth 0 is the stream after the embeddings, depth d > 0 the stream after block d - 1; each
block reads the stream and adds two writes to it, attention's and the MLP's. Every number
is an average over the prompt's positions (the first token of a GPT-2 prompt often has a
stream far larger than the rest, and pulls the averages up).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch.nn import functional as F

from gpt.hooks import ActivationCache
from gpt.model import GPT

NO_TARGET = -1  # the last position's next token is not in the prompt: ignored by the losses
LN_EPS = 1e-5  # the epsilon of the model's LayerNorms (gpt/model.py)


@dataclass
class Inspection:
    """The analyses of one prompt. `record()` is the JSON-ready part; the attention patterns
    (n_layer, n_head, T, T) are kept out of it, for the plots (they grow as T²)."""
    tokens: list[int]
    model_loss: float  # the model's own next-token loss on the prompt (fused lm_head + loss)
    residual_stream: dict
    logit_lens: dict
    attention: dict
    direct_logit_attribution: dict
    attention_patterns: torch.Tensor = field(repr=False)

    def record(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "attention_patterns"}


def depth_labels(n_layer: int) -> list[str]:
    return ["embed"] + [f"block {i}" for i in range(n_layer)]


@torch.no_grad()
def inspect_prompt(model: GPT, tokens: list[int], top_k: int = 5) -> Inspection:
    """Run the analyses of this module on the prompt `tokens` (at least 2 token ids)."""
    if model.training:
        raise ValueError("inspect the model in eval mode (model.eval()): with dropout the "
                         "writes no longer add up to the stream")
    if len(tokens) < 2:
        raise ValueError(f"the prompt has {len(tokens)} token(s); at least 2 are needed, since "
                         f"each position's prediction is compared with the next token")
    device = model.lm_head.weight.device
    idx = torch.tensor([tokens], device=device)
    targets = torch.tensor(tokens[1:] + [NO_TARGET], device=device)
    _, cache = model.run_with_cache(idx)
    _, model_loss = model(idx, targets[None])
    n_layer = model.config.n_layer
    patterns = torch.cat([cache[f"blocks.{i}.attn_pattern"] for i in range(n_layer)])
    return Inspection(
        tokens=list(tokens),
        model_loss=model_loss.item(),
        residual_stream=residual_stream(cache, n_layer),
        logit_lens=logit_lens(model, cache, targets, top_k),
        attention=attention_summary(patterns),
        direct_logit_attribution=direct_logit_attribution(model, cache, targets),
        attention_patterns=patterns.cpu(),
    )


def streams_by_depth(cache: ActivationCache, n_layer: int) -> list[torch.Tensor]:
    """The stream (T, C) of the first sequence at depths 0..n_layer."""
    return [cache["blocks.0.resid_pre"][0]] + [cache[f"blocks.{i}.resid_post"][0]
                                               for i in range(n_layer)]


def residual_stream(cache: ActivationCache, n_layer: int) -> dict:
    """How large the stream is at each depth, how large each write into it is, and how each
    write is aligned with the stream it is added to (cosine > 0: it reinforces the stream's
    direction, < 0: it erases part of it, ~0: it adds a new direction)."""
    def block(i, name):
        return cache[f"blocks.{i}.{name}"][0]

    blocks = range(n_layer)
    return {
        "depth": depth_labels(n_layer),
        "stream_norm": [_mean_norm(s) for s in streams_by_depth(cache, n_layer)],
        "attn_write_norm": [_mean_norm(block(i, "attn_out")) for i in blocks],
        "mlp_write_norm": [_mean_norm(block(i, "mlp_out")) for i in blocks],
        "attn_write_cosine": [_mean_cosine(block(i, "attn_out"), block(i, "resid_pre"))
                              for i in blocks],
        "mlp_write_cosine": [_mean_cosine(block(i, "mlp_out"), block(i, "resid_mid"))
                             for i in blocks],
    }


def _mean_norm(x: torch.Tensor) -> float:
    return x.float().norm(dim=-1).mean().item()


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def logit_lens(model: GPT, cache: ActivationCache, targets: torch.Tensor, top_k: int) -> dict:
    """The stream at each depth read out as the model reads its last one, through ln_f and
    lm_head: the next-token loss on the prompt (at the last depth, the model's own loss), the
    loss at each position, and the top_k tokens with their probabilities at each position."""
    lens = {"depth": depth_labels(model.config.n_layer), "loss": [], "position_loss": [],
            "top_ids": [], "top_probs": []}
    has_target = targets != NO_TARGET
    for stream in streams_by_depth(cache, model.config.n_layer):
        logits = model.lm_head(model.transformer.ln_f(stream)).float()
        position_loss = F.cross_entropy(logits, targets, ignore_index=NO_TARGET, reduction="none")
        probs, ids = logits.softmax(dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        lens["loss"].append(position_loss[has_target].mean().item())
        lens["position_loss"].append(position_loss[has_target].tolist())
        lens["top_ids"].append(ids.tolist())
        lens["top_probs"].append(probs.tolist())
    return lens


def attention_summary(patterns: torch.Tensor) -> dict:
    """Per layer and head ([layer][head]), averaged over the query positions 1..T-1 (position
    0 can only attend to itself): the attention paid to the previous token, to the first token
    and to the query's own position, and the pattern's entropy in nats."""
    after_first = patterns[:, :, 1:]
    query = torch.arange(1, patterns.shape[-1])
    return {
        "previous_token": patterns[:, :, query, query - 1].mean(-1).tolist(),
        "first_token": after_first[..., 0].mean(-1).tolist(),
        "self": patterns[:, :, query, query].mean(-1).tolist(),
        "entropy": torch.special.entr(after_first).sum(-1).mean(-1).tolist(),
    }


def direct_logit_attribution(model: GPT, cache: ActivationCache, targets: torch.Tensor) -> dict:
    """How much each write into the stream adds, directly, to the logit of the actual next
    token (averaged over the positions that have one).

    With its scale σ (the final stream's standard deviation) held at the value it has,
    ln_f is linear: the logit of token t is Σ_w ((w - mean w) / σ) · (γ ⊙ u_t) + β · u_t over
    the writes w that sum to the final stream (embeddings, then each block's attention and
    MLP), with γ, β ln_f's gain and bias and u_t t's lm_head row. Each term is what one write
    adds through the stream alone, not through the later blocks that read it; with the
    bias term they sum to the logit exactly."""
    n_layer = model.config.n_layer
    has_target = targets != NO_TARGET
    ln_f = model.transformer.ln_f
    final = cache[f"blocks.{n_layer - 1}.resid_post"][0][has_target].float()
    scale = (final.var(dim=-1, unbiased=False, keepdim=True) + LN_EPS).sqrt()
    unembed = model.lm_head.weight[targets[has_target]].float()  # (N, C)
    direction = unembed * ln_f.weight.float()

    def contribution(write: torch.Tensor) -> float:
        write = write[has_target].float()
        centred = write - write.mean(dim=-1, keepdim=True)
        return (centred / scale * direction).sum(-1).mean().item()

    writes = {"embed": cache["embed"][0], "pos_embed": cache["pos_embed"]}
    for i in range(n_layer):
        writes[f"block {i} attn"] = cache[f"blocks.{i}.attn_out"][0]
        writes[f"block {i} mlp"] = cache[f"blocks.{i}.mlp_out"][0]
    bias = 0.0 if ln_f.bias is None else (unembed @ ln_f.bias.float()).mean().item()
    target_logits = (model.lm_head(cache["ln_f"][0][has_target]).float()
                     .gather(-1, targets[has_target, None]))
    return {"component": list(writes), "logit": [contribution(w) for w in writes.values()],
            "ln_f_bias": bias, "target_logit": target_logits.mean().item()}
