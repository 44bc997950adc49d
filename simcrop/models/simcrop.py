"""The SimCroP pre-training model: named stages, encoder -> decoders -> losses.

forward(batch) runs
  1. mask_patches    volume [B, 1, X, Y, Z] + noise [B, N] -> visible patches [B, N_keep, P] (MAE masking)
  2. encode          visible patches -> H [B, 1 + N_keep, D] (patch embedding + ViT, cls first)
  3. mim             MIM decoder -> L_MIM over hidden patches
  4. align           g_v(H_vis), sentence means of g_t(text), top-K patches per sentence -> L_align
                     (+ the optional extensions: docs/method.md, the soft one over the all-gathered batch)
  5. mlm             fusion(feature-head(masked report), Linear(H_vis)) -> text decoder -> L_MLM
and returns {"loss": weighted total, "mim", "align", "mlm": the terms}. Each term is a mean over the batch's
hidden patches / valid sentences / labelled tokens; `term_counts(batch)` gives those counts, with which the
trainer re-weights the terms so that data-parallel ranks together compute the global-batch mean exactly.
Each stage runs inside a profiler range `simcrop.<stage>` (mlm as mlm.fusion and mlm.head), which
bench/profile_step.py sums into its per-stage table; simcrop.models.flops counts each stage's FLOPs.

The frozen text encoder is not part of this module: its features arrive in the batch (computed by
simcrop.models.text.FrozenTextEncoder, or read from the prepared-data cache), so the trainable graph, the
checkpoint and torch.compile cover only what trains.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from simcrop import ops
from simcrop.config import ModelConfig
from simcrop.models.fusion import CrossGranularityFusion, TextDecoder
from simcrop.distributed import all_gather_with_grad
from simcrop.models.losses import (
    mlm_cross_entropy,
    select_label_positions,
    sentence_infonce,
    sentence_volume_infonce,
    sentence_volume_soft_infonce,
)
from simcrop.models.text import sentence_mean
from simcrop.models.vit3d import MIMDecoder, ViT3DEncoder


def stage(name: str):
    """A torch.profiler range named `simcrop.<name>` around one of forward's stages (bench/profile_step.py sums
    the time under each); nothing while torch.compile traces (the compiled graph has no stage boundaries)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"simcrop.{name}")


class FeatureHead(nn.Sequential):
    """SimCroP's feature head g: Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int | None = None):
        hidden = hidden or dim_out
        super().__init__(nn.Linear(dim_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, dim_out))


def mlm_label_capacity(cfg: ModelConfig) -> int:
    """Most labelled positions one report can carry (fixed-size gather before the vocabulary projection)."""
    if cfg.mlm_loss_on == "all":
        return cfg.report_max_len
    return min(cfg.report_max_len, math.ceil(cfg.mlm_ratio * cfg.report_max_len) + 1)


class SimCroP(nn.Module):
    def __init__(self, cfg: ModelConfig, text_hidden: int, vocab_size: int, word_embeddings=None):
        """text_hidden: width of the frozen text encoder; vocab_size / word_embeddings: its vocabulary."""
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT3DEncoder(
            cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio
        )
        self.num_patches = self.encoder.num_patches
        self.num_keep = ops.num_visible(self.num_patches, cfg.mask_ratio)
        if cfg.use_mim:
            self.decoder = MIMDecoder(
                self.encoder.grid, cfg.enc_dim, self.encoder.patch_dim, cfg.dec_dim, cfg.dec_depth, cfg.dec_heads,
                cfg.mlp_ratio,
            )
        if cfg.use_align:
            self.head_v = FeatureHead(cfg.enc_dim, cfg.proj_dim)
            self.head_t = FeatureHead(text_hidden, cfg.proj_dim)
        if cfg.use_mlm:
            self.head_q = FeatureHead(text_hidden, cfg.fusion_dim)
            self.image_to_fusion = nn.Linear(cfg.enc_dim, cfg.fusion_dim)
            self.fusion = CrossGranularityFusion(cfg.fusion_dim, cfg.fusion_heads, cfg.fusion_intermediate, cfg.dropout)
            self.text_decoder = TextDecoder(
                vocab_size, cfg.fusion_dim, cfg.text_dec_layers, cfg.text_dec_heads, cfg.text_dec_intermediate,
                cfg.dropout, cfg.report_max_len, word_embeddings,
            )

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpointing = enabled
        if self.cfg.use_mim:
            self.decoder.grad_checkpointing = enabled

    # -- stages ---------------------------------------------------------------------------------------------
    def mask_patches(self, volume: torch.Tensor, noise: torch.Tensor):
        """MAE masking: volume [B, C, X, Y, Z] + noise [B, N] -> (visible [B, N_keep, P] patches, mask [B, N]
        (1 = hidden), ids_restore [B, N], ids_keep [B, N_keep]); the N_keep lowest-noise patches stay visible."""
        if tuple(volume.shape[1:]) != (self.cfg.in_chans, *self.cfg.img_size):
            raise ValueError(
                f"volume batch has shape {tuple(volume.shape)}, the model expects [B, {self.cfg.in_chans}, "
                f"{', '.join(map(str, self.cfg.img_size))}]"
            )
        return ops.masked_patchify(volume, self.cfg.patch_size, noise, self.num_keep, backend=self.cfg.kernels)

    def encode(self, visible: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """visible [B, N_keep, P] patches at positions ids_keep [B, N_keep] -> H [B, 1 + N_keep, D] (cls first)."""
        return self.encoder(visible, ids_keep)

    def mim(self, h, ids_restore, volume, mask):
        pred = self.decoder(h, ids_restore)  # [B, N, P]
        return ops.masked_mse(
            pred, volume, mask, self.cfg.patch_size, self.cfg.norm_pix, self.cfg.mim_normalization,
            backend=self.cfg.kernels,
        )

    def align(self, h_vis, findings_feats, sentence_ids, k_per_sentence=None):
        """L_align (SPEC's within-CT InfoNCE) + the optional extensions; every part is a mean over this batch's
        valid sentences (term_counts' sentence count)."""
        cfg = self.cfg
        v = self.head_v(h_vis)  # [B, N_keep, Dp]
        u = self.head_t(findings_feats)  # [B, Lf, Dp]
        s, valid = sentence_mean(u, sentence_ids, cfg.max_sentences)  # [B, M, Dp], [B, M]
        loss = h_vis.new_zeros((), dtype=torch.float32)
        if cfg.align_within:
            a, _, _ = ops.topk_align(v, s, valid, cfg.topk, k_per_sentence, backend=cfg.kernels)
            loss = sentence_infonce(s, a, valid, cfg.tau)
        if cfg.w_align_volume > 0:
            loss = loss + cfg.w_align_volume * sentence_volume_infonce(
                v, s, valid, cfg.topk, k_per_sentence, cfg.tau, cfg.kernels
            )
        if cfg.w_align_soft > 0:
            # negatives: the patches of every CT of the GLOBAL batch (gradient flows back to this rank's slice)
            v_all, offset = all_gather_with_grad(v)  # [W * B, N_keep, Dp], this rank's CTs at offset..offset+B
            loss = loss + cfg.w_align_soft * sentence_volume_soft_infonce(
                v_all, s, valid, cfg.tau, cfg.soft_pool_tau, cfg.kernels, offset
            )
        return loss

    def mlm(self, h_vis, report_feats, report_mask, mlm_labels):
        with stage("mlm.fusion"):  # fusion + text decoder
            q0 = self.head_q(report_feats)  # [B, Lr, Df]
            z = self.image_to_fusion(h_vis)  # [B, N_keep, Df]
            fused = self.fusion(q0, report_mask, z, kernels=self.cfg.kernels)  # [B, Lr, Df]
            hidden = self.text_decoder(fused, report_mask)  # [B, Lr, Df]
        with stage("mlm.head"):  # the MLM head on the labelled positions
            positions, targets = select_label_positions(mlm_labels, mlm_label_capacity(self.cfg))  # [B, T]
            picked = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, T, Df]
            return mlm_cross_entropy(self.text_decoder.logits(picked), targets)

    # -- the whole step -------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        volume = batch["volume"]
        with stage("mask_patches"):
            visible, mask, ids_restore, ids_keep = self.mask_patches(volume, batch["mask_noise"])
        with stage("encode"):
            h = self.encode(visible, ids_keep)  # [B, 1 + N_keep, D]
        h_vis = h[:, 1:]
        zero = h.new_zeros((), dtype=torch.float32)
        terms = {"mim": zero, "align": zero, "mlm": zero}
        if cfg.use_mim:
            with stage("mim"):
                terms["mim"] = self.mim(h, ids_restore, volume, mask)
        if cfg.use_align:
            with stage("align"):
                terms["align"] = self.align(
                    h_vis, batch["findings_feats"], batch["sentence_ids"], batch.get("k_per_sentence")
                )
        if cfg.use_mlm:
            terms["mlm"] = self.mlm(h_vis, batch["report_feats"], batch["report_mask"], batch["mlm_labels"])
        loss = cfg.w_mim * terms["mim"] + cfg.w_align * terms["align"] + cfg.w_mlm * terms["mlm"]
        return {"loss": loss, **terms}

    def term_counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[3] float64: how many hidden patches, valid sentences and labelled tokens the terms average over.

        Every part of the align term (the extensions included) is a mean over the local valid sentences; the
        cross-CT soft term's negatives are global (all-gathered), its anchors local, so this count re-weights it too.
        """
        B = batch["volume"].shape[0]
        n_hidden = B * (self.num_patches - self.num_keep)
        # sentence ids are 1..S per sample; sentences past max_sentences are not pooled
        n_sent = batch["sentence_ids"].amax(dim=1).clamp(max=self.cfg.max_sentences).sum()
        n_tok = (batch["mlm_labels"] != -100).sum()
        return torch.stack([torch.tensor(float(n_hidden)), n_sent.double().cpu(), n_tok.double().cpu()]).double()
