"""Analytic model FLOPs of one SimCroP training step (for throughput, TFLOP/s and MFU in bench/).

A matmul [m, k] x [k, n] counts 2mkn (bias adds are not counted); attention counts its two matmuls, Q K^T and
A V (2 x 2 B Lq Lk D over all heads, whatever the mask hides: the kernels compute the padded positions too).
Training = forward + backward of every matmul that runs: the backward of y = x W^T is dx = dy W (only when x
needs a gradient) plus dW = dy^T x (only when W trains); attention's backward is 2x its forward. So a layer fed
by data that needs no gradient (the patch embedding, the first Linear of the text feature heads) costs 2x its
forward, a layer inside the graph 3x, and the frozen text tower 1x (forward only, no weight gradient). The
top-K similarity of L_align runs without autograd (forward only).

Not counted: norms, softmax, GELU, dropout, residual adds, the losses' elementwise math, embedding lookups,
gathers, top-K sorting, the optimizer (elementwise), and the forward that grad checkpointing recomputes in
backward (reported apart as `recompute`: model FLOPs, as in MFU, exclude it; hardware FLOPs include it).

Shapes are those the model runs: the trainable model sees the configured lengths (findings_max_len,
report_max_len, padding included); the frozen tower sees only the columns up to the longest real sequence of the
batch (simcrop.models.text.TextFeatures), so its lengths are arguments. tests/test_flops.py checks every
component against torch.utils.flop_counter.FlopCounterMode on a real forward + backward of the tiny preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from simcrop.config import ModelConfig
from simcrop.models.simcrop import mlm_label_capacity
from simcrop.ops.reference import num_visible, patch_grid

__all__ = ["Flops", "StepFlops", "TextTower", "step_flops", "text_lengths"]


@dataclass(frozen=True)
class Flops:
    """FLOPs of one component: forward and backward (0 for what runs without autograd)."""

    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, n: int) -> Flops:
        return Flops(self.forward * n, self.backward * n)

    __rmul__ = __mul__


@dataclass(frozen=True)
class TextTower:
    """The frozen BERT-style text encoder's size: width, layers, FFN width, vocabulary, pooler or not."""

    hidden: int
    layers: int
    intermediate: int
    vocab_size: int
    pooler: bool = True  # Hugging Face BertModel's pooler (one Linear on [CLS]) runs in every forward

    @classmethod
    def of(cls, encoder) -> TextTower:
        """From a simcrop.models.text.FrozenTextEncoder (its Hugging Face config)."""
        c = encoder.model.config
        return cls(int(c.hidden_size), int(c.num_hidden_layers), int(c.intermediate_size), int(encoder.vocab_size),
                   getattr(encoder.model, "pooler", None) is not None)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training micro-step, per component (in the order of the model's stages)."""

    components: dict[str, Flops]
    recompute: int = 0  # forward FLOPs grad checkpointing runs again in backward (not model FLOPs)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def forward(self) -> int:
        return sum(c.forward for c in self.components.values())

    @property
    def backward(self) -> int:
        return sum(c.backward for c in self.components.values())

    @property
    def total(self) -> int:
        """Model FLOPs of the step (forward + backward, frozen tower forward only; no recompute)."""
        return self.forward + self.backward

    @property
    def hardware(self) -> int:
        """FLOPs the device executes: the model FLOPs plus grad checkpointing's recomputed forward."""
        return self.total + self.recompute

    def table(self) -> str:
        """A Markdown table: component, forward / backward / total GFLOP, share of the step."""
        rows = ["| component | forward GFLOP | backward GFLOP | total GFLOP | share |", "|---|---|---|---|---|"]
        for name, c in self.components.items():
            rows.append(f"| {name} | {c.forward / 1e9:.2f} | {c.backward / 1e9:.2f} | {c.total / 1e9:.2f} | "
                        f"{100 * c.total / max(self.total, 1):.1f}% |")
        rows.append(f"| **step** | {self.forward / 1e9:.2f} | {self.backward / 1e9:.2f} | {self.total / 1e9:.2f} | "
                    f"100% |")
        if self.recompute:
            rows.append(f"| (grad checkpointing recompute, not model FLOPs) | {self.recompute / 1e9:.2f} | | | |")
        return "\n".join(rows)


# -- building blocks --------------------------------------------------------------------------------------------
def linear(rows: int, d_in: int, d_out: int, grad_input: bool = True, trainable: bool = True) -> Flops:
    """x [rows, d_in] @ W^T [d_in, d_out]: forward 2 rows d_in d_out; backward dx (if grad_input) + dW (if trainable)."""
    f = 2 * rows * d_in * d_out
    return Flops(f, f * (int(grad_input) + int(trainable)))


def attention(batch: int, q_len: int, kv_len: int, dim: int, grad: bool = True) -> Flops:
    """Q K^T and A V over all heads (dim = heads x head_dim): 2 x 2 B Lq Lk D; backward 2x (dQ, dK, dA, dV)."""
    f = 4 * batch * q_len * kv_len * dim
    return Flops(f, 2 * f if grad else 0)


def batched(batch: int, m: int, k: int, n: int, grads: int) -> Flops:
    """A bmm [batch, m, k] x [batch, k, n]; `grads` = how many of its two operands need a gradient (0, 1, 2)."""
    f = 2 * batch * m * k * n
    return Flops(f, f * grads)


def transformer_layer(batch: int, tokens: int, dim: int, hidden: int, trainable: bool = True) -> Flops:
    """One transformer block (pre- or post-norm, the same matmuls): qkv, self-attention, output projection, FFN."""
    rows = batch * tokens
    return (linear(rows, dim, 3 * dim, trainable, trainable) + attention(batch, tokens, tokens, dim, trainable)
            + linear(rows, dim, dim, trainable, trainable) + linear(rows, dim, hidden, trainable, trainable)
            + linear(rows, hidden, dim, trainable, trainable))


def text_tower_forward(text: TextTower, batch: int, length: int) -> Flops:
    """One forward of the frozen BERT-style tower over [batch, length] tokens (no autograd)."""
    f = text.layers * transformer_layer(batch, length, text.hidden, text.intermediate, trainable=False)
    if text.pooler:
        f = f + linear(batch, text.hidden, text.hidden, grad_input=False, trainable=False)
    return f


def feature_head(rows: int, d_in: int, d_out: int, grad_input: bool) -> Flops:
    """simcrop.models.simcrop.FeatureHead: Linear(d_in, d_out) -> GELU -> LN -> Linear(d_out, d_out)."""
    return linear(rows, d_in, d_out, grad_input) + linear(rows, d_out, d_out)


# -- the step ---------------------------------------------------------------------------------------------------
def text_lengths(batch) -> tuple[int, int]:
    """(findings, report) tokens the frozen tower sees for a batch: its longest real sequences (TextFeatures)."""
    return int(batch["findings_mask"].sum(1).max()), int(batch["report_mask"].sum(1).max())


def step_flops(cfg: ModelConfig, batch_size: int, text: TextTower, findings_len: int | None = None,
               report_len: int | None = None, findings_pass: bool = True,
               grad_checkpointing: bool = False, world_size: int = 1) -> StepFlops:
    """Model FLOPs of one training micro-step of SimCroP on `batch_size` volumes.

    Args:
        cfg: the model config (sizes, switches, lengths).
        text: the frozen text tower's size (TextTower.of(encoder)); its vocabulary is also the text decoder's.
        findings_len, report_len: tokens per sequence the frozen tower runs on (default: the configured maximum
            lengths; a batch's own: text_lengths(batch)).
        findings_pass: False when the findings features come cached with the data (prepared data).
        grad_checkpointing: count the recomputed block forwards in `recompute`.
        world_size: data-parallel ranks (the soft cross-CT alignment term pools the patches of the global batch).
    Returns:
        StepFlops with components image_encoder, mim_decoder, text_tower (frozen: findings + report passes),
        alignment (g_v, g_t, sentence means, top-K, InfoNCE, and the extension terms switched on), fusion (g_q, Linear(H_vis), the fusion layer),
        text_decoder, mlm_head (transform + tied vocabulary projection on the gathered label positions).
    """
    B = batch_size
    N = patch_grid(cfg.img_size, cfg.patch_size)
    N = N[0] * N[1] * N[2]
    Nk = num_visible(N, cfg.mask_ratio)
    P = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] * cfg.in_chans
    D, Dd, Dp, Df = cfg.enc_dim, cfg.dec_dim, cfg.proj_dim, cfg.fusion_dim
    Lf, Lr, M, K = cfg.findings_max_len, cfg.report_max_len, cfg.max_sentences, cfg.topk
    Ht, V = text.hidden, text.vocab_size
    lf = Lf if findings_len is None else findings_len
    lr = Lr if report_len is None else report_len

    c: dict[str, Flops] = {}
    # image encoder: patch embedding (its input, the visible patches, needs no gradient), ViT on cls + visible
    He, Hd = int(D * cfg.mlp_ratio), int(Dd * cfg.mlp_ratio)
    enc_blocks = cfg.enc_depth * transformer_layer(B, 1 + Nk, D, He)
    c["image_encoder"] = linear(B * Nk, P, D, grad_input=False) + enc_blocks
    # checkpointed blocks are re-run in backward up to the last tensor backward needs (torch.utils.checkpoint's
    # early stop): all but each block's final Linear
    recompute = enc_blocks.forward - cfg.enc_depth * linear(B * (1 + Nk), He, D).forward
    if cfg.use_mim:  # MAE decoder over cls + every patch, predicting every patch
        dec_blocks = cfg.dec_depth * transformer_layer(B, 1 + N, Dd, Hd)
        c["mim_decoder"] = linear(B * (1 + Nk), D, Dd) + dec_blocks + linear(B * (1 + N), Dd, P)
        recompute += dec_blocks.forward - cfg.dec_depth * linear(B * (1 + N), Hd, Dd).forward
    tower = Flops()
    if cfg.use_align and findings_pass:
        tower = tower + text_tower_forward(text, B, lf)
    if cfg.use_mlm:
        tower = tower + text_tower_forward(text, B, lr)
    c["text_tower"] = tower
    if cfg.use_align:
        a = feature_head(B * Nk, D, Dp, grad_input=True) + feature_head(B * Lf, Ht, Dp, grad_input=False)
        a = a + batched(B, M, Lf, Dp, grads=1)  # sentence means: one-hot weights [M, Lf] @ token features
        if getattr(cfg, "align_within", True):  # SPEC's L_align: top-K within each CT, InfoNCE over its sentences
            a = a + Flops(2 * B * M * Nk * Dp)  # top-K: cosine similarities sentence x patch, no autograd
            a = a + batched(B * M, 1, K, Dp, grads=1)  # pooling the K selected patches (weights need no gradient)
            a = a + batched(B, M, Dp, M, grads=2)  # InfoNCE logits sentence x pooled patches
        if cfg.w_align_volume > 0:  # sentence-volume term: top-K over all B x B (sentence CT, patch CT) pairs
            a = a + Flops(2 * B * B * M * Nk * Dp) + batched(B * B * M, 1, K, Dp, grads=1)
            a = a + batched(B * M, 1, Dp, B, grads=2)  # logits [b, j, c] = s_bj . a_bcj
        if getattr(cfg, "w_align_soft", 0.0) > 0:  # soft pooling over the patches of all C CTs (global batch)
            C = world_size * B
            a = a + batched(1, B * M, Dp, C * Nk, grads=2)  # similarities [B*M, D] x [D, C*N]
            a = a + batched(C, B * M, Nk, Dp, grads=2)  # softmax weights x patches -> pooled [B*M, C, D]
            a = a + batched(B * M, 1, Dp, C, grads=2)  # logits [b, j, c] = s_bj . a_bjc
        c["alignment"] = a
    if cfg.use_mlm:
        fi, ti = cfg.fusion_intermediate, cfg.text_dec_intermediate
        f = feature_head(B * Lr, Ht, Df, grad_input=False) + linear(B * Nk, D, Df)  # g_q(report), Z = Linear(H_vis)
        f = f + linear(B * Lr, Df, 3 * Df) + attention(B, Lr, Lr, Df) + linear(B * Lr, Df, Df)  # word level
        f = f + linear(B * Lr, Df, Df) + linear(B * Nk, Df, 2 * Df) + linear(B, Df, Df)  # q; k, v; W_g mean(Z)
        f = f + attention(B, Lr, Nk, Df) + linear(B * Lr, Df, Df)  # word-patch attention, output projection
        f = f + linear(B * Lr, Df, fi) + linear(B * Lr, fi, Df)  # feed-forward
        c["fusion"] = f
        c["text_decoder"] = cfg.text_dec_layers * transformer_layer(B, Lr, Df, ti)
        T = mlm_label_capacity(cfg)
        c["mlm_head"] = linear(B * T, Df, Df) + linear(B * T, Df, V)  # transform, tied E^T [Df, V]
    notes = {"visible_tokens": str(Nk), "patches": str(N), "findings_len": str(lf), "report_len": str(lr),
             "mlm_positions": str(mlm_label_capacity(cfg)) if cfg.use_mlm else "0"}
    return StepFlops(c, recompute if grad_checkpointing else 0, notes)
