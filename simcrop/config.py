"""Configuration: three flat, commented dataclasses and named presets.

Every field is overridable from the command line as `--field value` (tuples as `64,64,32`, booleans as
`--flag` / `--no-flag`); field names are unique across the three groups. Presets:
- `tiny`: CPU-sized, the paper's patch geometry, a few hundred steps in minutes on 2 cores (the default);
- `vit_b`: the paper (224 x 224 x 112 crop, patch 16 x 16 x 8, ViT-B 12 x 768, decoder 4 x 768 / 16 heads,
  6-layer text decoder, K = 32, mask ratio 0.75; AdamW lr 1.5e-4, 200 epochs of CT-RATE's 50,188 volumes at an
  effective batch of 448 = 112 iterations per epoch).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A configuration value that cannot work."""


LOG_TARGETS = ("csv", "tensorboard", "wandb")  # where a training run logs (simcrop.run_log)


@dataclass
class ModelConfig:
    # image side
    img_size: tuple[int, int, int] = (224, 224, 112)  # crop (x, y, z) voxels at 1.5 x 1.5 x 3.0 mm
    patch_size: tuple[int, int, int] = (16, 16, 8)  # voxels per patch (x, y, z)
    in_chans: int = 1
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    mlp_ratio: float = 4.0
    dec_dim: int = 768  # MIM decoder width
    dec_depth: int = 4
    dec_heads: int = 16
    mask_ratio: float = 0.75  # share of patches hidden from the encoder (MAE)
    norm_pix: bool = False  # MIM target normalised per patch (MAE's norm_pix_loss)
    mim_normalization: str = "masked"  # 'masked' (mean over hidden patches) | 'all' (the authors' code)
    # alignment (L_align)
    proj_dim: int = 768  # output of the feature heads g_v, g_t
    topk: int = 32  # K patches per sentence (inferred); a batch may carry a per-sentence K <= topk
    tau: float = 0.07
    # extension, not in the paper (docs/method.md "Sentence-volume contrast"): each sentence also contrasts its own
    # CT's top-K pool with the top-K pools IT selects in the other CTs of the (per-device) batch; 0 = SPEC's L_align
    w_align_volume: float = 0.0
    # extension, not in the paper (docs/method.md "Cross-CT soft sentence-volume contrast"): sentence j of CT b
    # softly pools every CT's visible patches (softmax over cos(s_bj, v_ci) / soft_pool_tau) and must pick its own CT
    # among ALL CTs of the global batch (all-gathered under torchrun); identifiable where SPEC's L_align is not
    w_align_soft: float = 0.0
    soft_pool_tau: float = 0.05  # temperature of the softmax over patches (small: close to hard top-1)
    align_within: bool = True  # SPEC's within-CT L_align inside the align term; False keeps only the extensions
    # masked report modelling (L_MLM) through the cross-granularity fusion layer
    text_encoder: str = "minilm"  # frozen: 'minilm' (offline all-MiniLM-L6-v2), 'tiny-bert', a path or hub name
    trust_remote_code: bool = False  # for hub text encoders that need it (CXR-BERT)
    fusion_dim: int = 768
    fusion_heads: int = 6  # word-patch cross-attention heads
    fusion_intermediate: int = 1536
    text_dec_layers: int = 6
    text_dec_heads: int = 6
    text_dec_intermediate: int = 1536
    dropout: float = 0.1  # fusion layer and text decoder
    mlm_ratio: float = 0.75  # share of report tokens replaced by [MASK] (no 80/10/10)
    mlm_loss_on: str = "masked"  # 'masked' positions only | 'all' non-pad positions (the authors' code)
    findings_max_len: int = 512  # word pieces of the findings (alignment branch)
    report_max_len: int = 512  # word pieces of findings + impression (masked-report branch)
    max_sentences: int = 32  # findings sentences used for alignment (later ones are dropped)
    # losses: L = w_mim L_MIM + w_mlm L_MLM + w_align L_align; a False switch skips the stage entirely
    use_mim: bool = True
    use_mlm: bool = True
    use_align: bool = True
    w_mim: float = 1.0
    w_mlm: float = 1.0
    w_align: float = 1.0
    kernels: str = "auto"  # operator backend: auto | fused | reference (simcrop.ops.backend)


@dataclass
class DataConfig:
    data: str = ""  # CT-RATE folder or a prepared folder (python -m simcrop.prepare); '' = built-in synthetic data
    loader: str = "auto"  # auto | dali | torch (simcrop.data.loader.make_loader; auto = DALI on prepared data)
    cache_dir: str = ""  # where synthetic data and tiny tokenizers go ('' = $SIMCROP_CACHE or ~/.cache/simcrop)
    synthetic_n: int = 320  # cases of the built-in synthetic dataset (80% train, 20% valid; the testbed: 60/40)
    synthetic_variant: str = "default"  # built-in data: 'default' (realistic phantoms) | 'testbed' (grounding testbed)
    batch_size: int = 14  # per device
    num_workers: int = 0
    crop_scale_min: float = 0.8  # random scaled crop: each side scaled in [min, 1] before the fixed crop
    flip_prob: float = 0.2  # per axis
    shift_prob: float = 0.1
    shift_max: float = 0.1  # intensity shift on the [-1, 1] scale


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out: str = "runs/simcrop"  # checkpoints, metrics.csv, loss.png
    steps: int = 22400  # optimizer steps (iterations)
    warmup_steps: int = -1  # linear warm-up, then half-cosine to min_lr; -1 = 10% of steps (follows the run length)
    lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05  # not applied to biases, norms, tokens and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    accum_steps: int = 8  # gradient accumulation (micro-batches per optimizer step)
    clip_grad: float = 1.0  # max global grad norm (0 = off)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    adamw_impl: str = "auto"  # auto (fused where torch has it and not under FSDP) | fused | foreach | loop
    compile: bool = False  # torch.compile the model's step
    log_every: int = 10
    ckpt_every: int = 100  # steps between checkpoints (a final one is always written)
    resume: str = ""  # '' | a checkpoint directory | 'auto' (the newest in --out)
    stop_after: int = 0  # end this run after so many steps (checkpointed) although the schedule spans `steps`
    max_bad_steps: int = 5  # stop after this many consecutive steps with a non-finite loss or gradient
    grad_checkpointing: bool = False  # recompute encoder/decoder blocks in backward (less memory, ~30% slower)
    fsdp: bool = False  # shard with FSDP2 (fully_shard) instead of DDP under torchrun
    progress: bool = True  # progress bar
    log_to: str = "csv"  # comma list: csv (metrics.csv + loss.png, always), tensorboard, wandb (offline; if installed)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "vit_b": {
        "batch_size": 14,
        "accum_steps": 8,
    },
    "tiny": {
        "img_size": (64, 64, 32),
        "enc_dim": 192,
        "enc_depth": 4,
        "enc_heads": 3,
        "dec_dim": 96,
        "dec_depth": 2,
        "dec_heads": 4,
        "proj_dim": 128,
        "topk": 4,  # 64 patches, 16 visible
        "fusion_dim": 128,
        "fusion_heads": 4,
        "fusion_intermediate": 256,
        "text_dec_layers": 2,
        "text_dec_heads": 4,
        "text_dec_intermediate": 256,
        "findings_max_len": 112,
        "report_max_len": 128,
        "max_sentences": 16,
        "batch_size": 4,
        "accum_steps": 1,
        "steps": 300,
        "lr": 5e-4,
        "ckpt_every": 100,
        "out": "runs/tiny",
    },
    # the grounding testbed (simcrop.data.synthetic.testbed; pass its folder as --data, see docs/data.md):
    # 4 x 4 x 8 mm voxels, 8 x 8 x 4-voxel patches = 32 mm cubes, an 8 x 8 x 8 grid of the 256 mm crop
    "testbed": {
        "img_size": (64, 64, 32),
        "patch_size": (8, 8, 4),
        "enc_dim": 192,
        "enc_depth": 4,
        "enc_heads": 3,
        "dec_dim": 96,
        "dec_depth": 2,
        "dec_heads": 4,
        "proj_dim": 128,
        "topk": 6,  # 512 patches, 128 visible: 6 / 128 = 4.7% (the paper's 32 / 686)
        "fusion_dim": 128,
        "fusion_heads": 4,
        "fusion_intermediate": 256,
        "text_dec_layers": 2,
        "text_dec_heads": 4,
        "text_dec_intermediate": 256,
        "findings_max_len": 128,
        "report_max_len": 160,
        "max_sentences": 16,
        "batch_size": 4,
        "accum_steps": 1,
        "synthetic_variant": "testbed",  # without --data: the grounding testbed (docs/data.md)
        "synthetic_n": 1280,  # 768 train + 512 held-out cases
        "flip_prob": 0.0,  # lesion sides are named in the reports
        "crop_scale_min": 0.9,  # 72 x 72 x 36 volumes: every scaled crop holds the 64 x 64 x 32 crop (no padding)
        "steps": 1000,
        "lr": 5e-4,
        "ckpt_every": 250,
        "out": "runs/testbed",
    },
}


def _groups(cfg: Config):
    return (cfg.model, cfg.data, cfg.train)


def _field_owner(cfg: Config) -> dict[str, Any]:
    owner = {}
    for group in _groups(cfg):
        for f in fields(group):
            owner[f.name] = group
    return owner


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    owner = _field_owner(cfg)
    for name, value in overrides.items():
        if name not in owner:
            raise ConfigError(f"unknown config field {name!r}")
        setattr(owner[name], name, value)
    return cfg


def make_config(preset: str = "tiny", **overrides: Any) -> Config:
    """A validated Config from a named preset plus field overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = Config()
    cfg.train.preset = preset
    apply_overrides(cfg, dict(PRESETS[preset]))
    apply_overrides(cfg, overrides)
    if cfg.train.warmup_steps == -1:  # not given: the warm-up follows the run length
        cfg.train.warmup_steps = cfg.train.steps // 10
    validate(cfg)
    return cfg


def parse_triple(text: str, kind: type = int, positive: bool = False) -> tuple:
    """'64,64,32' or '64x64x32' -> (64, 64, 32) of `kind` (int or float): the one parser of 3-vectors on every
    command line (crop sizes, patch sizes, ROIs, voxel spacings). argparse.ArgumentTypeError when malformed."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    what = "integers" if kind is int else "numbers"
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or (positive and any(v <= 0 for v in values)):
        sign = "positive " if positive else ""
        raise argparse.ArgumentTypeError(f"expected three comma-separated {sign}{what}, got {text!r}")
    return values


def _parse_value(kind, text: str):
    if kind is bool:
        raise AssertionError("booleans use BooleanOptionalAction")
    if kind in (int, float, str):
        return kind(text)
    return parse_triple(text, int)  # tuple[int, int, int]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset` plus one `--field` option per config field (default: the preset's value)."""
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    for group in _groups(Config()):
        hints = get_type_hints(type(group))
        title = parser.add_argument_group(type(group).__name__)
        for f in fields(group):
            if f.name == "preset":
                continue
            kind = hints[f.name]
            flag = "--" + f.name.replace("_", "-")
            if kind is bool:
                title.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                base = kind if kind in (int, float, str) else tuple
                title.add_argument(
                    flag, dest=f.name, default=None, metavar=base.__name__.upper(),
                    type=lambda text, k=base: _parse_value(k, text),
                )


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k != "preset" and k in _field_owner(Config())
    }
    return make_config(args.preset, **overrides)


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line) for values that cannot work."""
    m, d, t = cfg.model, cfg.data, cfg.train
    from simcrop.ops.reference import num_visible, patch_grid

    try:
        gx, gy, gz = patch_grid(m.img_size, m.patch_size)
    except ValueError as exc:
        raise ConfigError(f"img_size / patch_size: {exc}") from None
    n_patches = gx * gy * gz
    if not 0.0 <= m.mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {m.mask_ratio}")
    n_vis = num_visible(n_patches, m.mask_ratio)
    if n_vis < 1:
        raise ConfigError(f"mask_ratio {m.mask_ratio} leaves no visible patch of {n_patches}")
    if m.use_align and not 1 <= m.topk <= n_vis:
        raise ConfigError(
            f"topk K = {m.topk} is larger than the {n_vis} visible patches "
            f"({n_patches} patches x (1 - mask_ratio {m.mask_ratio})); lower --topk or --mask-ratio"
        )
    for name, dim in (("enc_dim", m.enc_dim), ("dec_dim", m.dec_dim)):
        if dim % 6:
            raise ConfigError(f"{name} = {dim} must be divisible by 6 (3D sin-cos position embedding)")
    for dim_name, heads_name in (
        ("enc_dim", "enc_heads"), ("dec_dim", "dec_heads"), ("fusion_dim", "fusion_heads"),
        ("fusion_dim", "text_dec_heads"),
    ):
        if getattr(m, dim_name) % getattr(m, heads_name):
            raise ConfigError(f"{dim_name} = {getattr(m, dim_name)} is not divisible by {heads_name} = {getattr(m, heads_name)}")
    for name in ("mim_normalization",):
        if m.mim_normalization not in ("masked", "all"):
            raise ConfigError(f"{name} must be 'masked' or 'all', got {m.mim_normalization!r}")
    if m.mlm_loss_on not in ("masked", "all"):
        raise ConfigError(f"mlm_loss_on must be 'masked' or 'all', got {m.mlm_loss_on!r}")
    if not 0.0 < m.mlm_ratio <= 1.0:
        raise ConfigError(f"mlm_ratio must be in (0, 1], got {m.mlm_ratio}")
    if m.kernels not in ("auto", "fused", "reference"):
        raise ConfigError(f"kernels must be auto, fused or reference, got {m.kernels!r}")
    if not (m.use_mim or m.use_mlm or m.use_align):
        raise ConfigError("every loss is switched off (use_mim, use_mlm, use_align): nothing to train")
    if m.w_align_volume < 0:
        raise ConfigError(f"w_align_volume must be >= 0, got {m.w_align_volume}")
    if m.w_align_soft < 0:
        raise ConfigError(f"w_align_soft must be >= 0, got {m.w_align_soft}")
    if m.soft_pool_tau <= 0:
        raise ConfigError(f"soft_pool_tau must be > 0, got {m.soft_pool_tau}")
    if m.w_align_soft > 0 and not m.use_align:
        raise ConfigError("w_align_soft > 0 needs the alignment stage (its feature heads): drop --no-use-align")
    if m.use_align and not m.align_within and m.w_align_volume == 0 and m.w_align_soft == 0:
        raise ConfigError("--no-align-within leaves the align term empty: set --w-align-soft or --w-align-volume > 0, "
                          "or --no-use-align")
    if m.tau <= 0:
        raise ConfigError(f"tau must be > 0, got {m.tau}")
    if d.batch_size < 1 or t.accum_steps < 1 or t.steps < 1:
        raise ConfigError("batch_size, accum_steps and steps must be >= 1")
    if d.synthetic_variant not in ("default", "testbed"):
        raise ConfigError(f"synthetic_variant must be default or testbed, got {d.synthetic_variant!r}")
    if d.loader not in ("auto", "dali", "torch"):
        raise ConfigError(f"loader must be auto, dali or torch, got {d.loader!r}")
    if not 0 < d.crop_scale_min <= 1:
        raise ConfigError(f"crop_scale_min must be in (0, 1], got {d.crop_scale_min}")
    if t.adamw_impl not in ("auto", "fused", "foreach", "loop"):
        raise ConfigError(f"adamw_impl must be auto, fused, foreach or loop, got {t.adamw_impl!r}")
    if t.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"amp must be auto, bf16 or off, got {t.amp!r}")
    if t.max_bad_steps < 1:
        raise ConfigError(f"max_bad_steps must be >= 1, got {t.max_bad_steps}")
    if t.stop_after < 0:
        raise ConfigError(f"stop_after must be >= 0, got {t.stop_after}")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        raise ConfigError(f"warmup_steps must be in 0..steps ({t.steps}), got {t.warmup_steps}")
    unknown = sorted(set(filter(None, t.log_to.split(","))) - set(LOG_TARGETS))
    if unknown:
        raise ConfigError(f"log_to: unknown {', '.join(unknown)} (known: {', '.join(LOG_TARGETS)})")
