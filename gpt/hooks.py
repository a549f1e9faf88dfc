"""Named activations of a forward pass, for looking inside the model (`GPT.run_with_cache`).

The model records into an `ActivationCache` only when it is handed one: every recording
site is behind `if activations is not None`, so a forward without one runs the same ops
as before (and traces to the same graph under torch.compile).

Names, with i the block index from 0 (B batch, T positions, C channels, H heads):
    embed                   token embeddings (B, T, C)
    pos_embed               position embeddings (T, C), the same for every sequence
    blocks.{i}.resid_pre    the residual stream entering block i (B, T, C)
    blocks.{i}.attn_pattern attention probabilities (B, H, T, T_keys), fp32
    blocks.{i}.attn_out     what attention writes into the stream (B, T, C)
    blocks.{i}.resid_mid    the stream after attention's write (B, T, C)
    blocks.{i}.mlp_out      what the MLP writes into the stream (B, T, C)
    blocks.{i}.resid_post   the stream leaving block i (B, T, C)
    ln_f                    the final LayerNorm's output, the lm_head's input (B, T, C)
so blocks.0.resid_pre = embed + pos_embed and, in eval mode (no dropout),
resid_post = resid_pre + attn_out + mlp_out.

The tensors are the forward's own (not copies), with their autograd history when the
forward had one; the attention pattern is not part of the forward (the fused kernels never
materialise it) and is computed from q and k as it is recorded.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch


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

    # ---------------------------------------------------------------- recording (the model)

    def record(self, **tensors: torch.Tensor) -> None:
        """Activations of the whole model (embed, pos_embed, ln_f)."""
        self._tensors.update(tensors)

    def record_block(self, layer: int, **tensors: torch.Tensor) -> None:
        """Activations of block `layer`, stored as blocks.{layer}.{name}."""
        for name, tensor in tensors.items():
            self._tensors[f"blocks.{layer}.{name}"] = tensor

    def record_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Block `layer`'s attention probabilities from its q (B, H, T, D) and k
        (B, H, T_keys, D): softmax(q kᵀ / √D) under the causal mask, in fp32."""
        self.record_block(layer, attn_pattern=attention_pattern(q, k))


def attention_pattern(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities (B, H, T, T_keys), as `kernels.causal_attention` computes
    them: scale D**-0.5, and with more keys than queries (a KV cache) the queries are the
    last T positions, so the mask is aligned to the bottom right."""
    t_q, t_k = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    query_pos = torch.arange(t_k - t_q, t_k, device=q.device)[:, None]
    future = torch.arange(t_k, device=q.device)[None, :] > query_pos
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)
