"""The augmentation encoder and the attention-based transformation predictor.

The encoder turns a parameter vector t (24 audio / 18 visual values) into a 256-wide code. The
predictor answers "what does the clean view look like after t?": its queries are the encoded
vectors (one per t; `cen_num` of them for the invariant branch), its keys and values are the clean
view's tokens after the final norm. Per query token: mean-pooled clean tokens + cross-attention
output, then a residual MLP on a LayerNorm; the query tokens are then averaged into one vector.

Because every query token is processed independently until that average, several groups of
queries over the same tokens can share one key/value projection and one attention call
(`TransformationPredictor.forward_tokens` + a per-group mean); `EquiAVPretrain` does that for the
applied t and the `cen_num` sampled vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU (as in CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AugmentationEncoder(nn.Sequential):
    """t -> hidden -> hidden -> hidden: Linear, QuickGELU, Linear, QuickGELU, Linear (0, 2, 4)."""

    def __init__(self, in_dim: int, hidden: int = 256) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden),
            QuickGELU(),
            nn.Linear(hidden, hidden),
            QuickGELU(),
            nn.Linear(hidden, hidden),
        )
        self.in_dim = in_dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] != self.in_dim:
            raise ValueError(
                f"augmentation encoder expects parameter vectors of {self.in_dim} values, "
                f"got shape {tuple(t.shape)}"
            )
        return super().forward(t)


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens over key/value tokens, through SDPA.

    q/k/v are linear maps with bias to heads x head_dim; `to_out` maps back to the key width
    without bias.
    """

    def __init__(self, q_dim: int, kv_dim: int, num_heads: int = 8, head_dim: int = 64) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(q_dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.Linear(inner, kv_dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """queries (B, Q, q_dim), tokens (B, N, kv_dim) -> (B, Q, kv_dim)."""
        q = self._heads(self.to_q(queries))
        k = self._heads(self.to_k(tokens))
        v = self._heads(self.to_v(tokens))
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(head_dim)
        b, _, n_q, _ = x.shape
        return self.to_out(x.transpose(1, 2).reshape(b, n_q, self.num_heads * self.head_dim))


class TransformationPredictor(nn.Module):
    """Predicts the pooled embedding of the transformed view from clean tokens and encoded t."""

    def __init__(
        self,
        embed_dim: int,
        aug_dim: int = 256,
        num_heads: int = 8,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.norm_aug = nn.LayerNorm(aug_dim)
        self.attn = CrossAttention(aug_dim, embed_dim, num_heads=num_heads, head_dim=head_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = Mlp(embed_dim, hidden_features=int(embed_dim * mlp_ratio), act_layer=nn.GELU)

    def forward_tokens(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) after the final norm, encoded queries (B, Q, aug_dim) -> (B, Q, D),
        one prediction per query token (not yet averaged)."""
        x = tokens.mean(dim=1, keepdim=True) + self.attn(self.norm_aug(queries), tokens)
        return x + self.mlp(self.norm(x))

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(B, N, D), (B, Q, aug_dim) -> (B, D): the per-query predictions averaged."""
        return self.forward_tokens(tokens, queries).mean(dim=1)
