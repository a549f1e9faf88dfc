"""Named activations of a forward pass: read them (`GPT.run_with_cache`) or change them
(`GPT.run_with_hooks`).

The model visits its hook points only when it is handed a `HookPoints`: every site is behind
`if hooks is not None`, so a forward without one runs the same ops as before (and traces to
the same graph under torch.compile).

Names, in the order a forward reaches them, with i the block index from 0 (B batch,
T positions, C channels, H heads, D = C / H channels per head):
    embed                   token embeddings (B, T, C)
    pos_embed               position embeddings (T, C), the same for every sequence
    blocks.{i}.resid_pre    the residual stream entering block i (B, T, C)
    blocks.{i}.ln_1_scale   ln_1's scale σ = sqrt(var + eps) at each position (B, T, 1), fp32
    blocks.{i}.q, .k, .v    each head's queries, keys and values (B, H, T, D)
    blocks.{i}.attn_pattern attention probabilities (B, H, T, T_keys), fp32; read only
    blocks.{i}.attn_z       each head's output, before c_proj mixes the heads (B, T, H, D)
    blocks.{i}.attn_out     what attention writes into the stream (B, T, C)
    blocks.{i}.resid_mid    the stream after attention's write (B, T, C)
    blocks.{i}.ln_2_scale   ln_2's scale (B, T, 1), fp32
    blocks.{i}.mlp_pre      the MLP's hidden activation before GELU (B, T, 4C)
    blocks.{i}.mlp_post     the MLP's hidden activation after GELU (B, T, 4C)
    blocks.{i}.mlp_out      what the MLP writes into the stream (B, T, C)
    blocks.{i}.resid_post   the stream leaving block i (B, T, C)
    ln_f_scale              the final LayerNorm's scale (B, T, 1), fp32
    ln_f                    the final LayerNorm's output, the lm_head's input (B, T, C)
so blocks.0.resid_pre = embed + pos_embed and, in eval mode (no dropout),
resid_post = resid_pre + attn_out + mlp_out.

A hook is a function fn(tensor, name) that may return a replacement (same shape and dtype)
or None to keep the tensor (which it may have changed in place); the rest of the forward
uses what the hooks leave. Most points are tensors the forward computes anyway. Four kinds
are not, because a fused kernel never materialises them: the LayerNorm scales, the MLP's
hidden activations, and the attention pattern. Where one is hooked or recorded it is
computed beside the kernel from the kernel's input; when a hook changes it (returns another
tensor or writes into it), the model recomputes what follows from the changed value (the
LayerNorm's output; the MLP's c_proj of the GELU); unchanged, the kernel's own output
stands, so an identity hook leaves the logits bit for bit as they were (except under
torch.inference_mode, whose tensors keep no version counter that would show a change in
place: there a hooked one always counts as changed). The attention pattern can be read,
not changed. Through autograd, the logits depend on such a tensor
only where a hook changed it.

The recorded tensors are the forward's own (not copies), with their autograd history when
the forward had one.
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import torch

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

MODEL_START = ("embed", "pos_embed")
BLOCK_NAMES = ("resid_pre", "ln_1_scale", "q", "k", "v", "attn_pattern", "attn_z",
               "attn_out", "resid_mid", "ln_2_scale", "mlp_pre", "mlp_post", "mlp_out",
               "resid_post")
MODEL_END = ("ln_f_scale", "ln_f")


def activation_names(n_layer: int) -> list[str]:
    """Every hook point of a model with n_layer blocks, in the order a forward reaches them."""
    blocks = [f"blocks.{i}.{name}" for i in range(n_layer) for name in BLOCK_NAMES]
    return [*MODEL_START, *blocks, *MODEL_END]


class ActivationCache(Mapping):
    """A read-only mapping from activation names to tensors, filled by one forward pass."""

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no activation {name!r} was recorded; recorded: "
                           f"{', '.join(self._tensors) or 'none'}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class HookPoints:
    """What one forward does at its hook points: the hooks to run at each name and the
    names to record into a cache. The model calls it; users call `GPT.run_with_hooks` and
    `GPT.run_with_cache`, which build one."""

    def __init__(self, n_layer: int, hooks: Mapping[str, HookFn | Sequence[HookFn]] = (),
                 record: Collection[str] | None = (), cache: ActivationCache | None = None):
        """hooks: name -> a hook or a list of hooks, run in order; record: the names to store
        into `cache` (None: every name)."""
        known = activation_names(n_layer)
        self._hooks = {check_name(name, known, n_layer): _hook_list(name, fns)
                       for name, fns in dict(hooks).items()}
        named = set() if record is None else {check_name(name, known, n_layer)
                                              for name in record}
        self._record = set(known) if record is None else named
        if self._record and cache is None:
            raise ValueError("names to record need a cache to record them into")
        self._cache = cache
        # What the forward must reach: the names asked for by name (recording every name
        # records what the model's modules have).
        self._required = set(self._hooks) | named
        self._reached: set[str] = set()
        self._prefix = ""

    def block(self, layer: int) -> "HookPoints":
        """The same hook points seen from inside block `layer`, with names relative to it
        (a shallow copy: the hooks, the cache and what was reached are shared)."""
        view = copy.copy(self)
        view._prefix = f"blocks.{layer}."
        return view

    # ------------------------------------------------------------------- the model's side

    def full_name(self, name: str) -> str:
        return self._prefix + name

    def wants(self, name: str) -> bool:
        """Whether anything happens at `name` (a hook or a recording): the model computes a
        tensor that the forward would not otherwise need only where this is True."""
        name = self.full_name(name)
        return name in self._hooks or name in self._record

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Run the hooks on a tensor of the forward; returns what the forward goes on with."""
        return self._visit(self.full_name(name), tensor)

    def edit(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """Like calling it, for a tensor computed beside a fused kernel: None when the hooks
        left it as it was (the same tensor, not written into), so that the kernel's output
        may stand; else the changed tensor, for the model to recompute from."""
        inference = tensor.is_inference()  # inference tensors keep no version counter
        version = None if inference else tensor._version
        result = self(name, tensor)
        if result is tensor and not inference and tensor._version == version:
            return None
        return result

    def read(self, name: str, tensor: torch.Tensor) -> None:
        """A read-only point (the attention pattern): its hooks may look at the tensor, not
        change it."""
        if self.edit(name, tensor) is not None:
            raise ValueError(f"a hook changed {self.full_name(name)}, which is computed beside "
                             f"the fused attention kernel (it never materialises the pattern) "
                             f"and can only be read: to change what a head attends to, hook its "
                             f"q or k; to change what it writes, its slice of attn_z")

    def check_reached(self) -> None:
        """Every hooked or recorded name was reached by the forward, else an error: a hook
        that never ran must not pass for one that changed nothing."""
        missed = self._required - self._reached
        if missed:
            raise ValueError(
                f"the forward never reached {', '.join(sorted(missed))}: these points "
                f"are inside the model's own attention, MLP and LayerNorm modules, and a "
                f"module replaced by another class (or a subclass) has none of them")

    def _visit(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self._reached.add(name)
        for fn in self._hooks.get(name, ()):
            returned = fn(tensor, name)
            if returned is not None:
                _check_replacement(name, returned, tensor)
                tensor = returned
        if name in self._record:
            self._cache._tensors[name] = tensor
        return tensor


def check_name(name: str, known: list[str], n_layer: int) -> str:
    """name itself if the model has that hook point, else an error that says what it has."""
    if name in known:
        return name
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() \
            and parts[2] in BLOCK_NAMES:
        raise ValueError(f"unknown activation {name!r}: the model has {n_layer} blocks, "
                         f"blocks.0 to blocks.{n_layer - 1}")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown activation {name!r}{hint} The names are "
                     f"{', '.join(MODEL_START)}, blocks.{{i}}.{{{', '.join(BLOCK_NAMES)}}} "
                     f"for i in 0..{n_layer - 1}, {', '.join(MODEL_END)} (see gpt.hooks)")


def _hook_list(name: str, fns) -> list[HookFn]:
    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    for fn in fns:
        if not callable(fn):
            raise TypeError(f"the hook on {name!r} must be a function fn(tensor, name), "
                            f"got {type(fn).__name__}")
    return fns


def _check_replacement(name: str, returned, given: torch.Tensor) -> None:
    if not isinstance(returned, torch.Tensor):
        raise TypeError(f"the hook on {name!r} returned {type(returned).__name__}: a hook "
                        f"returns a tensor to replace the activation, or None to keep it")
    if returned.shape != given.shape or returned.dtype != given.dtype \
            or returned.device != given.device:
        raise ValueError(f"the hook on {name!r} returned a {returned.dtype} tensor of shape "
                         f"{tuple(returned.shape)} on {returned.device}; the activation is "
                         f"{given.dtype} of shape {tuple(given.shape)} on {given.device}, "
                         f"and its replacement must be too")


def attention_pattern(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities (B, H, T, T_keys), as `kernels.causal_attention` computes
    them: scale D**-0.5, and with more keys than queries (a KV cache) the queries are the
    last T positions, so the mask is aligned to the bottom right."""
    t_q, t_k = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    query_pos = torch.arange(t_k - t_q, t_k, device=q.device)[:, None]
    future = torch.arange(t_k, device=q.device)[None, :] > query_pos
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)
