"""What a GPT's residual stream holds at each depth, for one prompt: the analyses behind
`gpt.inspect`, computed from the activations `GPT.run_with_cache` records, and the
experiments of `gpt.interventions` (ablation, patching) when asked for.

Depth 0 is the stream after the embeddings, depth d > 0 the stream after block d - 1; each
block reads the stream and adds two writes to it, attention's and the MLP's. Every number
is an average over the prompt's positions (the first token of a GPT-2 prompt often has a
stream far larger than the rest, and pulls the averages up).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch.nn import functional as F

from gpt import interventions
from gpt.hooks import ActivationCache
from gpt.model import GPT

NO_TARGET = -1  # the last position's next token is not in the prompt: ignored by the losses


@dataclass
class Inspection:
    """The analyses of one prompt. `record()` is the JSON-ready part: the experiments that
    were run, without the attention patterns (n_layer, n_head, T, T), kept for the plots
    (they grow as T²)."""
    tokens: list[int]
    model_loss: float  # the model's own next-token loss on the prompt (fused lm_head + loss)
    residual_stream: dict
    logit_lens: dict
    attention: dict
    direct_logit_attribution: dict
    attention_patterns: torch.Tensor = field(repr=False)
    logit_difference: dict | None = None  # given two answer tokens
    ablation: dict | None = None  # when asked for
    patching: dict | None = None  # given a corrupted prompt (and two answer tokens)

    def record(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "attention_patterns" and getattr(self, f.name) is not None}


def depth_labels(n_layer: int) -> list[str]:
    return ["embed"] + [f"block {i}" for i in range(n_layer)]


@torch.no_grad()
def inspect_prompt(model: GPT, tokens: list[int], top_k: int = 5, *,
                   answer: tuple[int, int] | None = None, ablate: bool = False,
                   corrupted: list[int] | None = None) -> Inspection:
    """Run the analyses of this module on the prompt `tokens` (at least 2 token ids). With
    answer = (a, b): the direct attribution of logit(a) - logit(b) after the prompt; with
    ablate: every head's and MLP's ablation; with a corrupted prompt (and an answer): the
    patching of the residual stream from `tokens` into it."""
    if model.training:
        raise ValueError("inspect the model in eval mode (model.eval()): with dropout the "
                         "writes no longer add up to the stream")
    if len(tokens) < 2:
        raise ValueError(f"the prompt has {len(tokens)} token(s); at least 2 are needed, since "
                         f"each position's prediction is compared with the next token")
    if corrupted is not None:
        if answer is None:
            raise ValueError("patching measures the logit difference between two answer "
                             "tokens: give them (answer=(a, b))")
        interventions.check_same_length(len(tokens), len(corrupted))
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
        logit_difference=None if answer is None else
        logit_difference_attribution(model, cache, answer),
        ablation=interventions.ablation(model, idx) if ablate else None,
        patching=None if corrupted is None else interventions.patch_residual_stream(
            model, idx, torch.tensor([corrupted], device=device), answer),
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


@dataclass
class Attribution:
    """Direct contributions to a logit at N positions, each (..., N): of every write into the
    stream (`component`), of each head (n_layer, n_head, N) and of each attention's c_proj
    bias (n_layer, N), which together make the attention writes, and of ln_f's bias (N,)."""
    component: list[str]
    writes: torch.Tensor  # (len(component), N)
    heads: torch.Tensor
    attn_bias: torch.Tensor
    ln_f_bias: torch.Tensor

    def total(self) -> torch.Tensor:
        """The logit at each position: what the writes and ln_f's bias add up to."""
        return self.writes.sum(0) + self.ln_f_bias


def attribute(model: GPT, cache: ActivationCache, positions: torch.Tensor,
              unembed: torch.Tensor) -> Attribution:
    """Each write's direct contribution to the logit whose unembedding is unembed[n] (N, C)
    at position positions[n], in the first sequence of the cache.

    With its scale σ (recorded as ln_f_scale) held at the value it has, ln_f is linear: the
    logit is Σ_w ((w - mean w) / σ) · (γ ⊙ u) + β · u over the writes w that sum to the
    final stream (embeddings, then each block's attention and MLP), with γ, β ln_f's gain
    and bias and u the unembedding. Each term is what one write adds through the stream
    alone, not through the later blocks that read it. A head's write is its slice of attn_z
    through its columns of c_proj; the heads' writes and c_proj's bias sum to attention's."""
    ln_f = model.transformer.ln_f
    scale = cache["ln_f_scale"][0, positions]
    direction = unembed.float() * ln_f.weight.float()

    def contribution(write: torch.Tensor) -> torch.Tensor:  # (..., N, C) -> (..., N)
        write = write.float()
        return ((write - write.mean(dim=-1, keepdim=True)) / scale * direction).sum(-1)

    writes = {"embed": cache["embed"][0], "pos_embed": cache["pos_embed"]}
    heads, attn_bias = [], []
    for i, block in enumerate(model.transformer.h):
        writes[f"block {i} attn"] = cache[f"blocks.{i}.attn_out"][0]
        writes[f"block {i} mlp"] = cache[f"blocks.{i}.mlp_out"][0]
        heads.append(contribution(head_writes(block.attn.c_proj, cache[f"blocks.{i}.attn_z"][0])
                                  [:, positions]))
        bias = block.attn.c_proj.bias
        attn_bias.append(torch.zeros(len(positions), device=scale.device) if bias is None
                         else contribution(bias.expand(len(positions), -1)))
    beta = 0.0 if ln_f.bias is None else unembed.float() @ ln_f.bias.float()
    return Attribution(
        component=list(writes),
        writes=torch.stack([contribution(w[positions]) for w in writes.values()]),
        heads=torch.stack(heads), attn_bias=torch.stack(attn_bias),
        ln_f_bias=torch.as_tensor(beta, device=scale.device).expand(len(positions)))


def head_writes(c_proj: torch.nn.Linear, z: torch.Tensor) -> torch.Tensor:
    """Each head's write into the stream (H, T, C), without c_proj's bias, from its output
    z (T, H, D): c_proj's input is the heads side by side, so head h goes through columns
    h*D .. (h+1)*D of its weight."""
    T, H, D = z.shape
    weight = c_proj.weight.float().view(-1, H, D)  # (C, H, D)
    return torch.einsum("thd,chd->htc", z.float(), weight)


def direct_logit_attribution(model: GPT, cache: ActivationCache, targets: torch.Tensor) -> dict:
    """How much each write into the stream, and each head, adds directly to the logit of the
    actual next token (`attribute`): per position, and averaged over the positions that
    have a next token."""
    positions = torch.nonzero(targets != NO_TARGET).squeeze(1)
    attribution = attribute(model, cache, positions, model.lm_head.weight[targets[positions]])
    target_logits = (model.lm_head(cache["ln_f"][0, positions]).float()
                     .gather(-1, targets[positions, None]))
    return {"component": attribution.component,
            "logit": attribution.writes.mean(-1).tolist(),
            "position_logit": attribution.writes.tolist(),
            "head_logit": attribution.heads.mean(-1).tolist(),
            "head_position_logit": attribution.heads.tolist(),
            "attn_bias_logit": attribution.attn_bias.mean(-1).tolist(),
            "ln_f_bias": attribution.ln_f_bias.mean().item(),
            "target_logit": target_logits.mean().item()}


def logit_difference_attribution(model: GPT, cache: ActivationCache,
                                 answer: tuple[int, int]) -> dict:
    """How much each write into the stream, and each head, adds directly to
    logit(a) - logit(b) after the prompt (at its last position), for answer = (a, b)."""
    last = cache["ln_f"].shape[1] - 1
    unembed = model.lm_head.weight[[answer[0]]] - model.lm_head.weight[[answer[1]]]
    attribution = attribute(model, cache, torch.tensor([last], device=unembed.device), unembed)
    logits = model.lm_head(cache["ln_f"][:1, last:])
    return {"answer": list(answer), "position": last,
            "logit_diff": interventions.logit_difference(logits, answer),
            "component": attribution.component,
            "logit": attribution.writes[:, 0].tolist(),
            "head_logit": attribution.heads[..., 0].tolist(),
            "attn_bias_logit": attribution.attn_bias[:, 0].tolist(),
            "ln_f_bias": attribution.ln_f_bias[0].item()}
