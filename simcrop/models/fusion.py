"""Cross-granularity fusion layer and the BERT-style text decoder of L_MLM (SimCroP, masked report branch).

Fusion (queries: masked-report features Q0 [B, L, D]; image: visible tokens Z = Linear(H_vis) [B, N, D]):
  1. A  = LN(Q0 + SelfAttn(Q0))                                   word level, padding masked
  2. C  = CrossAttn(A -> Z)          (fusion_heads heads)           word-patch level
  3. C' = C + W_g mean_i(Z)          at every text position         instance level
  4. A' = LN(A + Dropout(Linear(C'))); out = LN(A' + Dropout(FFN(A')))   (BERT output + feed-forward)
Steps 2-3 are one operator, simcrop.ops.cross_granularity_attention (reference or fused); the word-patch attention
weights of step 2 (softmax_i(q_l . k_i / sqrt(Dh)), never stored by the fused op) are available on their own as
CrossGranularityFusion.attention_map, from the same stages and projections as forward (used by sentence grounding).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from simcrop import ops
from simcrop.models.vit3d import Attention


class FeedForward(nn.Module):
    """BERT feed-forward with post-norm: LN(x + Dropout(W2 GELU(W1 x)))."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


def word_patch_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q [B, H, L, Dh], k [B, H, N, Dh] -> attention weights [B, H, L, N] float32, each row summing to 1:
    softmax_i(q_l . k_i * scale), scale = Dh^-1/2 by default; the weights of
    simcrop.ops.reference.cross_granularity_attention (same float32 math), computed for every query (padded too)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhld,bhnd->bhln", q.float(), k.float()) * scale  # [B, H, L, N]
    return torch.softmax(scores, dim=-1)


class CrossGranularityFusion(nn.Module):
    """The fusion layer (steps 1-4 of the module docstring), as named stages: word_level -> queries /
    keys_values / instance -> cross_granularity_attention -> output. attention_map exposes step 2's weights."""

    def __init__(self, dim: int, heads: int, intermediate: int, dropout: float, self_attn_heads: int | None = None):
        super().__init__()
        self.heads = heads
        self.self_attn = Attention(dim, self_attn_heads or heads, dropout)
        self.self_drop = nn.Dropout(dropout)
        self.self_norm = nn.LayerNorm(dim, eps=1e-12)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.w_g = nn.Linear(dim, dim)  # instance-level: projects the pooled image token
        self.out = nn.Linear(dim, dim)
        self.out_drop = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = FeedForward(dim, intermediate, dropout)

    # -- stages ---------------------------------------------------------------------------------------------
    def word_level(self, q0: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Step 1: q0 [B, L, D], text_mask [B, L] bool -> A = LN(Q0 + SelfAttn(Q0)) [B, L, D]."""
        return self.self_norm(q0 + self.self_drop(self.self_attn(q0, key_padding=text_mask)))

    def queries(self, a: torch.Tensor) -> torch.Tensor:
        """A [B, L, D] -> cross-attention queries q [B, H, L, Dh]."""
        B, L, D = a.shape
        return self.q(a).reshape(B, L, self.heads, D // self.heads).transpose(1, 2)  # [B, H, L, Dh]

    def keys_values(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z [B, N, D] -> keys, values [B, H, N, Dh] each."""
        B, N, D = z.shape
        k, v = self.kv(z).reshape(B, N, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, N, Dh]
        return k, v

    def instance(self, z: torch.Tensor) -> torch.Tensor:
        """Z [B, N, D] -> g = W_g mean_i(Z) split into heads [B, H, Dh]."""
        B, _, D = z.shape
        return self.w_g(z.mean(dim=1)).reshape(B, self.heads, D // self.heads)  # [B, H, Dh]

    # -- the layer ------------------------------------------------------------------------------------------
    def forward(self, q0: torch.Tensor, text_mask: torch.Tensor, z: torch.Tensor, kernels: str = "auto"):
        """q0 [B, L, D], text_mask [B, L] bool, z [B, N, D] -> [B, L, D]."""
        B, L, D = q0.shape
        a = self.word_level(q0, text_mask)  # [B, L, D]
        q = self.queries(a)  # [B, H, L, Dh]
        k, v = self.keys_values(z)  # [B, H, N, Dh] each
        g = self.instance(z)  # [B, H, Dh]
        c = ops.cross_granularity_attention(q, k, v, g, text_mask, backend=kernels)  # [B, H, L, Dh]
        c = c.transpose(1, 2).reshape(B, L, D)
        a = self.out_norm(a + self.out_drop(self.out(c)))
        return self.ffn(a)

    def attention_map(self, q0: torch.Tensor, text_mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The word-patch attention weights forward uses (step 2), per head.

        Args:
            q0: [B, L, D] text features (as forward's q0), text_mask: [B, L] bool (True = real token),
            z: [B, N, D] image tokens (as forward's z).
        Returns:
            [B, H, L, N] float32, softmax over the N image tokens (rows of padded queries are computed too; forward
            zeroes those queries' outputs). Dropout applies as in forward: call in eval mode for a deterministic map.
        """
        q = self.queries(self.word_level(q0, text_mask))  # [B, H, L, Dh]
        k, _ = self.keys_values(z)  # [B, H, N, Dh]
        return word_patch_attention(q, k)  # [B, H, L, N]


class BertLayer(nn.Module):
    """Post-norm BERT encoder layer: LN(x + Attn(x)), then LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, intermediate: int, dropout: float):
        super().__init__()
        self.attn = Attention(dim, heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = FeedForward(dim, intermediate, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.drop(self.attn(x, key_padding=mask)))
        return self.ffn(x)


class TextDecoder(nn.Module):
    """BERT-style text decoder fed by embeddings, with an MLM head whose output matrix is the (tied) word
    embedding matrix: logits = Transform(h) @ E^T + b, E [V, D]. E is initialised from the frozen text
    encoder's word embeddings when the widths match (else N(0, 0.02)) and is trained."""

    def __init__(self, vocab_size, dim, layers, heads, intermediate, dropout, max_len, word_embeddings=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=1e-12)
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([BertLayer(dim, heads, intermediate, dropout) for _ in range(layers)])
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if word_embeddings is not None and tuple(word_embeddings.shape) == (vocab_size, dim):
            with torch.no_grad():
                self.word_embeddings.weight.copy_(word_embeddings)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] fused features, mask [B, L] bool -> hidden states [B, L, D]."""
        x = x + self.position_embeddings.weight[: x.shape[1]]
        x = self.embed_drop(self.embed_norm(x))
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V] through the tied output matrix."""
        return self.transform(h) @ self.word_embeddings.weight.t() + self.bias
