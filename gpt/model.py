"""GPT-2, built only from `kernels` ops so that one setting swaps every hot path's backend.

The module tree and parameter names are nanoGPT's (and so GPT-2's, up to Conv1D's
transposed weights), so its checkpoints load as they are. Differences from nanoGPT:
- every hot path goes through `kernels` (`config.backend` picks torch / triton / cuda / auto);
- the residual add before each block's second LayerNorm is fused with it (`add_layer_norm`);
- the loss fuses the lm_head with cross-entropy (`linear_cross_entropy`), so training never
  holds the full (B*T, vocab) logits; its variants (label smoothing, z-loss, logit
  soft-capping) are config keys, off by default;
- on the CPU under bf16 autocast, each block trains as one autograd node with the same
  numbers (`kernels.cpu`), where the block is exactly this file's (`Block.runs_as_written`);
- a KV cache makes generation cost one token's work per step instead of the whole prefix;
- `run_with_cache` returns the named activations of a forward pass and `run_with_hooks`
  changes them (`gpt.hooks`).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

import kernels
from kernels import cpu
from gpt.hooks import ActivationCache, HookFn, HookPoints, attention_pattern

# Attention's training FLOPs per token, in units of L * C * T (`GPT.flops_per_token`): the
# causal half the kernels compute, or the full T x T that nanoGPT's MFU counts.
ATTENTION_FLOP_COUNTS = {"causal": 6, "nanogpt": 12}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linears and LayerNorms, as GPT-2
    backend: str = "torch"  # kernels backend for every op: torch | triton | cuda | auto
    # The MLP's GELU: "tanh" is GPT-2's approximation (Hugging Face GPT-2 uses it too),
    # "none" the exact erf form of nanoGPT's nn.GELU(). Checkpoints record it.
    gelu_approximate: str = "tanh"
    # CPU bf16 training runs each block as one autograd node (`kernels.cpu.fused_block`)
    # where that gives the module path's numbers; False always runs the modules.
    cpu_fused_block: bool = True
    # Loss variants (`kernels.losses`), 0 = off: label smoothing; the z-loss coefficient
    # (z_loss * logsumexp(logits)^2 per token; the term's value is kept in GPT.last_z_loss
    # for logging); logit soft-capping, softcap * tanh(logits / softcap) on every logit the
    # model produces (Gemma 2's final-logit capping: sampling sees it too).
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float = 0.0

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"gelu_approximate must be 'tanh' or 'none', got "
                             f"{self.gelu_approximate!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        for name in ("z_loss", "logit_softcap"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got "
                                 f"{getattr(self, name)}")
        if self.backend not in kernels.BACKENDS + (kernels.AUTO,):
            raise ValueError(f"unknown backend {self.backend!r}; choose one of "
                             f"{kernels.BACKENDS + (kernels.AUTO,)}")

    @classmethod
    def from_dict(cls, args: dict) -> "GPTConfig":
        """Build from a checkpoint's model_args, ignoring keys this config does not have."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in args.items() if k in known})


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""
    eps = 1e-5

    def __init__(self, ndim: int, bias: bool, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.backend = backend

    def forward(self, x):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def add_forward(self, x, residual):
        """(x + residual, LayerNorm(x + residual)) in one fused pass."""
        return kernels.add_layer_norm(x, residual, self.weight, self.bias, self.eps,
                                      backend=self.backend)

    def scale(self, x):
        """σ = sqrt(var(x) + eps) at each position (..., 1) in fp32: what the forward divides
        the centred x by."""
        xf = x.float()
        return (xf.var(dim=-1, unbiased=False, keepdim=True) + self.eps).sqrt()

    def with_scale(self, x, scale):
        """The forward's output with `scale` in place of x's own: (x - mean) / scale * weight
        + bias, in fp32, returned in x's dtype."""
        xf = x.float()
        y = (xf - xf.mean(dim=-1, keepdim=True)) / scale * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def scale_point(hooks: HookPoints, name: str, ln: nn.Module, x, y):
    """y = ln(x), with the hook point `name` at ln's scale, which the LayerNorm kernels never
    show: computed beside them from x, and y recomputed from a scale a hook changed. Only
    this file's LayerNorm has the point (another class may normalise differently)."""
    if not hooks.wants(name) or not is_stock(ln, LayerNorm):
        return y
    scale = hooks.edit(name, ln.scale(x))
    if scale is None:
        return y
    if not as_written(ln, LayerNorm):
        raise ValueError(f"a hook changed {hooks.full_name(name)}, so that LayerNorm's output "
                         f"is recomputed, but module hooks on that LayerNorm have seen (and may "
                         f"have replaced) the output it replaces: remove them, or hook the "
                         f"LayerNorm's input or output instead")
    return ln.with_scale(x, scale).to(y.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout whose masks are drawn ~2.5x faster on the CPU (`kernels.cpu.dropout`:
    reproducible under torch.manual_seed). GPU tensors and compiled graphs use
    nn.Dropout's own path."""

    def forward(self, x):
        if not self.training or self.p == 0.0 or x.device.type != "cpu" \
                or torch.compiler.is_compiling():
            return super().forward(x)
        return cpu.dropout(x, self.p)


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding.

    Buffers of block_size positions are allocated on first use, in the dtype the
    attention sees (the autocast dtype under autocast)."""

    def __init__(self, config: GPTConfig, batch_size: int):
        self.shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0  # number of positions cached (the same in every layer)

    def append(self, layer: int, k, v):
        """Store k, v (B, H, t, D) after the cached positions; return all keys and values."""
        if layer == len(self.keys):
            self.keys.append(k.new_empty(self.shape))
            self.values.append(v.new_empty(self.shape))
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.backend = config.backend

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0,
                hooks: HookPoints | None = None):
        B, T, C = x.shape
        q, k, v = split_heads(self.c_attn(x), self.n_head)
        if hooks is not None:
            q, k, v = hooks("q", q), hooks("k", k), hooks("v", v)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)
        if hooks is not None and hooks.wants("attn_pattern"):
            hooks.read("attn_pattern", attention_pattern(q, k))
        y = kernels.causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                     backend=self.backend)
        y = y.transpose(1, 2)  # (B, T, H, D): each head's output
        if hooks is not None:
            y = hooks("attn_z", y)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))


def split_heads(qkv: torch.Tensor, n_head: int):
    """(B, T, 3C) projection -> q, k, v (B, H, T, D): strided views, no copies."""
    return _SplitHeads.apply(qkv, n_head)


class _SplitHeads(torch.autograd.Function):
    """The views of `qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`, with a
    backward that writes dq, dk, dv straight into one (B, T, 3, H, D) gradient. Autograd's
    own backward of those views stacks the three and then copies the stack into the
    projection's layout: two strided passes instead of one (0.4-2 % of the CPU seed run's
    step, measured side by side in one process; 2-core EPYC, torch 2.14)."""

    @staticmethod
    def forward(ctx, qkv, n_head):
        B, T, C3 = qkv.shape
        ctx.dtype = qkv.dtype
        return qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        return cpu.pack_heads(dq, dk, dv, dtype=ctx.dtype), None


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.backend = config.backend
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x, hooks: HookPoints | None = None):
        if as_written(self.c_fc, nn.Linear) and as_written(self.c_proj, nn.Linear):
            # The fused op reads the weights, never calling the Linears: only for plain ones.
            y = kernels.mlp_gelu(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight,
                                 self.c_proj.bias, self.gelu_approximate, backend=self.backend)
            if hooks is not None:
                y = self._hidden_points(x, y, hooks)
        else:  # a subclassed, replaced or hooked Linear runs as itself
            hidden = self.c_fc(x)
            if hooks is not None:
                hidden = hooks("mlp_pre", hidden)
            hidden = F.gelu(hidden, approximate=self.gelu_approximate)
            if hooks is not None:
                hidden = hooks("mlp_post", hidden)
            y = self.c_proj(hidden)
        return self.dropout(y)

    def _hidden_points(self, x, y, hooks: HookPoints):
        """The fused op's output y, with the hook points mlp_pre and mlp_post at the hidden
        activation it never shows: computed beside it from x, and y recomputed from what a
        hook changed."""
        if not (hooks.wants("mlp_pre") or hooks.wants("mlp_post")):
            return y
        pre = self.c_fc(x)
        changed_pre = hooks.edit("mlp_pre", pre)
        post = F.gelu(pre if changed_pre is None else changed_pre,
                      approximate=self.gelu_approximate)
        changed_post = hooks.edit("mlp_post", post)
        if changed_pre is None and changed_post is None:
            return y
        return self.c_proj(post if changed_post is None else changed_post)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.backend)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.backend)
        self.mlp = MLP(config)
        self.cpu_fused = config.cpu_fused_block

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0,
                hooks: HookPoints | None = None):
        if kv_cache is None and hooks is None and self.cpu_fused:
            # CPU bf16 training: the same ops as below, as one autograd node (None where
            # that path does not apply).
            out = cpu.fused_block(x, self.fused_params(), n_head=self.attn.n_head,
                                  dropout=self._dropout_probabilities(),
                                  gelu_approximate=self.mlp.gelu_approximate,
                                  eps=(self.ln_1.eps, self.ln_2.eps), backend=self.ln_1.backend,
                                  as_written=self.runs_as_written)
            if out is not None:
                return out
        if hooks is not None:
            hooks = hooks.block(layer)
            x = hooks("resid_pre", x)
        h = self.ln_1(x)
        if hooks is not None:
            h = scale_point(hooks, "ln_1_scale", self.ln_1, x, h)
        attn_out = self.attn(h, kv_cache, layer, hooks)
        if hooks is not None:
            attn_out = hooks("attn_out", attn_out)
        resid_mid, h = self._add_and_normalize(attn_out, x, hooks)
        # Only this file's MLP has hook points inside: another class takes h alone.
        inner = hooks is not None and is_stock(self.mlp, MLP)
        mlp_out = self.mlp(h, hooks) if inner else self.mlp(h)
        if hooks is not None:
            mlp_out = hooks("mlp_out", mlp_out)
        resid_post = resid_mid + mlp_out
        if hooks is not None:
            resid_post = hooks("resid_post", resid_post)
        return resid_post

    def _add_and_normalize(self, attn_out, x, hooks: HookPoints | None):
        """resid_mid = attn_out + x and ln_2 of it, in one fused pass where ln_2 is this file's;
        a hook that changes resid_mid has ln_2 run again on the changed stream."""
        if as_written(self.ln_2, LayerNorm):
            resid_mid, h = self.ln_2.add_forward(attn_out, x)
            if hooks is not None:
                changed = hooks.edit("resid_mid", resid_mid)
                if changed is not None:
                    resid_mid, h = changed, self.ln_2(changed)
        else:  # the fused add would bypass ln_2's own forward and hooks
            resid_mid = attn_out + x
            if hooks is not None:
                resid_mid = hooks("resid_mid", resid_mid)
            h = self.ln_2(resid_mid)
        if hooks is not None:
            h = scale_point(hooks, "ln_2_scale", self.ln_2, resid_mid, h)
        return resid_mid, h

    def runs_as_written(self) -> bool:
        """Whether this block computes exactly what this file says, so that a shortcut
        (the CPU one-node path) may stand in for its modules: each is of this file's own
        type (a subclass, say a LoRA Linear or another MLP, may compute anything), none has
        a method replaced on the instance or the class, and no module hook would see a
        submodule run."""
        attn, mlp = self.attn, self.mlp
        return is_stock(self, Block) and all(as_written(module, cls) for module, cls in (
            (self.ln_1, LayerNorm), (self.ln_2, LayerNorm), (attn, CausalSelfAttention),
            (attn.c_attn, nn.Linear), (attn.c_proj, nn.Linear), (attn.resid_dropout, Dropout),
            (mlp, MLP), (mlp.c_fc, nn.Linear), (mlp.c_proj, nn.Linear), (mlp.dropout, Dropout)))

    def _dropout_probabilities(self) -> tuple[float, float, float]:
        """The attention's, the attention branch's and the MLP branch's dropout, as the
        module path would apply them (0 where one is in eval mode)."""
        attn = self.attn
        return (attn.dropout if attn.training else 0.0,
                *(d.p if d.training else 0.0 for d in (attn.resid_dropout, self.mlp.dropout)))

    def fused_params(self) -> list:
        """The block's parameters in `kernels.cpu.block.PARAMS` order."""
        attn, mlp = self.attn, self.mlp
        return [self.ln_1.weight, self.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias,
                attn.c_proj.weight, attn.c_proj.bias, self.ln_2.weight, self.ln_2.bias,
                mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias]


# ----------------------------------------------------------------------------- as written

# The methods a shortcut stands in for, per module type, as this file (and torch.nn, for
# nn.Linear) defines them. A fused op that reads a module's parameters instead of calling
# it, or the CPU one-node block, gives the module's answer only while these are in place.
_METHODS = ("forward", "add_forward")
_AS_WRITTEN = {cls: {name: vars(cls)[name] for name in _METHODS if name in vars(cls)}
               for cls in (Block, LayerNorm, CausalSelfAttention, MLP, Dropout)}
_AS_WRITTEN[nn.Linear] = {"forward": nn.Linear.forward}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks")


def is_stock(module: nn.Module, cls: type) -> bool:
    """module is exactly a `cls` (no subclass, no parametrization, which swaps the class)
    whose methods are this file's, replaced neither on the instance nor on the class."""
    return type(module) is cls and not any(name in vars(module) for name in _METHODS) \
        and all(getattr(cls, name) is method for name, method in _AS_WRITTEN[cls].items())


def as_written(module: nn.Module, cls: type) -> bool:
    """`is_stock`, and no module hook (its own or a global one) would see it run: a shortcut
    that does not call the module may stand in for it."""
    return is_stock(module, cls) and not any(
        getattr(module, name) or getattr(nn.modules.module, "_global" + name)
        for name in _HOOK_DICTS)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        kernels.backends.prepare(config.backend)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias, config.backend),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.last_z_loss: torch.Tensor | None = None  # the z-loss term of the last loss
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (the token embedding
        is shared with the lm_head, so it stays in), as GPT-2 reports it."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx, kv_cache: KVCache | None = None,
                      hooks: HookPoints | None = None):
        """The final-LayerNorm output (B, T, C) for token ids idx (B, T); with `hooks`, a
        forward that visits its hook points (`gpt.hooks`)."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (batch, seq) tensor of token ids, got "
                             f"{idx.dtype} of shape {tuple(idx.shape)}")
        start = kv_cache.length if kv_cache is not None else 0
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"cannot forward {start + T} positions, block_size is "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        tok_emb, pos_emb = self.transformer.wte(idx), self.transformer.wpe(pos)
        if hooks is not None:
            tok_emb, pos_emb = hooks("embed", tok_emb), hooks("pos_embed", pos_emb)
        x = self.transformer.drop(tok_emb + pos_emb)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer, hooks)
        if kv_cache is not None:
            kv_cache.length += T
        ln_f = self.transformer.ln_f
        y = ln_f(x)
        if hooks is not None:
            y = hooks("ln_f", scale_point(hooks, "ln_f_scale", ln_f, x, y))
        return y

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None):
        """Returns (logits, loss).

        With targets: loss is the mean cross-entropy (targets of -1 ignored; the config's
        loss variants applied) and logits is None, since the lm_head is fused with the loss
        and the logits never exist whole (unless the lm_head is hooked or replaced: then it
        runs as a module, and the loss is the cross-entropy of its logits). With a z-loss,
        its term (detached) is kept in `last_z_loss`. Without targets: logits of the last
        position only (B, 1, V), as generation needs.
        """
        x = self.hidden_states(idx, kv_cache)
        if targets is not None:
            cfg = self.config
            variants = dict(ignore_index=-1, label_smoothing=cfg.label_smoothing,
                            z_loss=cfg.z_loss, return_z_loss=cfg.z_loss > 0,
                            backend=cfg.backend)
            if as_written(self.lm_head, nn.Linear):  # the fused lm_head + loss reads it
                loss = kernels.linear_cross_entropy(x, self.lm_head.weight, targets,
                                                    self.lm_head.bias,
                                                    softcap=cfg.logit_softcap or None,
                                                    **variants)
            else:  # a hooked, subclassed or replaced lm_head runs as a module (its logits
                # soft-capped by `head`, so the loss caps nothing more)
                loss = kernels.cross_entropy(self.head(x), targets, **variants)
            if cfg.z_loss > 0:
                loss, self.last_z_loss = loss
            return None, loss
        return self.head(x[:, [-1], :]), None

    def head(self, x):
        """The logits of final hidden states x: the lm_head, soft-capped when the config
        says so (`logit_softcap`)."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def logits(self, idx):
        """Logits of every position (B, T, V)."""
        return self.head(self.hidden_states(idx))

    def run_with_cache(self, idx, names: Collection[str] | None = None
                       ) -> tuple[torch.Tensor, ActivationCache]:
        """Logits of every position (B, T, V), the same as `logits(idx)`, and the named
        activations of that forward pass: every one (see `gpt.hooks` for the names), or
        those in `names`."""
        cache = ActivationCache()
        return self._run(idx, HookPoints(self.config.n_layer, record=names, cache=cache)), cache

    def run_with_hooks(self, idx, hooks: Mapping[str, HookFn | Sequence[HookFn]]
                       ) -> torch.Tensor:
        """Logits of every position (B, T, V) of a forward in which each hook
        fn(tensor, name) runs at its named activation and may return a replacement (see
        `gpt.hooks`): {"blocks.1.attn_z": fn} or {name: [fn, fn2]}. Hooks that change
        nothing leave the logits bit for bit those of `logits(idx)`."""
        return self._run(idx, HookPoints(self.config.n_layer, hooks=hooks))

    def _run(self, idx, hooks: HookPoints) -> torch.Tensor:
        logits = self.head(self.hidden_states(idx, hooks=hooks))
        hooks.check_reached()
        return logits

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length (e.g. to fine-tune GPT-2 with a shorter block)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in (0, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    # ------------------------------------------------------------------ optimization

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with decoupled weight decay on the matrices (>= 2-D) only, never on biases,
        LayerNorm gains or (since it is tied) the embedding counted twice."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel (one pass over all parameters) exists for CUDA and the CPU.
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len: int | None = None, attention: str = "causal") -> int:
        """Training FLOPs per token: 6 N for the matmuls' forward and backward (N without
        the position embeddings, the tied lm_head counted once) plus attention's score and
        value matmuls, 12 L C T over a full T x T (PaLM appendix B). attention="causal"
        counts the half the causal mask keeps, 6 L C T (what the fused kernels compute);
        attention="nanogpt" counts the full 12 L C T, as nanoGPT's estimate_mfu does."""
        if attention not in ATTENTION_FLOP_COUNTS:
            raise ValueError(f"attention must be one of {tuple(ATTENTION_FLOP_COUNTS)}, "
                             f"got {attention!r}")
        T = seq_len or self.config.block_size
        cfg = self.config
        return 6 * self.get_num_params() + ATTENTION_FLOP_COUNTS[attention] * cfg.n_layer \
            * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None,
                     attention: str = "causal"):
        """Model FLOPs utilization: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token(seq_len, attention) * tokens_per_second / peak_flops

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_kv_cache: bool = True, generator: torch.Generator | None = None):
        """Sample max_new_tokens tokens after the prompt idx (B, T); returns (B, T + new).

        With the KV cache each step feeds only the newest token. Once the context is longer
        than block_size the window slides and every position's embedding changes, so the
        cache is refilled from the window: the tokens are the same with and without it.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive int or None, got {top_k}")
        block = self.config.block_size
        cache = KVCache(self.config, idx.shape[0]) if use_kv_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and 0 < cache.length < block:
                logits, _ = self(idx[:, -1:], kv_cache=cache)  # only the newest token
            else:  # no cache, an empty one, or a full one: (re)fill from the window
                if cache is not None:
                    cache.length = 0
                logits, _ = self(idx[:, -block:], kv_cache=cache)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits.float(), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", **overrides) -> "GPT":
        """Load a checkpoint of ours or nanoGPT's ckpt.pt: {'model_args', 'model', ...}."""
        from gpt.checkpoint import load_model
        return load_model(path, map_location=map_location, **overrides)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "GPT":
        """Load GPT-2 weights from a local Hugging Face directory or .safetensors file."""
        from gpt.checkpoint import load_hf_gpt2
        return load_hf_gpt2(path, **overrides)

    def model_args(self) -> dict:
        return asdict(self.config)
