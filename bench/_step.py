"""The whole training step on generated tensors: shared by bench_train_step.py (test_step), bench/profile_step.py
and bench/gpu_check.sh's `step` section. Not a benchmark itself (pytest collects bench_*.py only).

One step = what simcrop.pretraining.Trainer.train_step does for one micro-batch: frozen text features of the
batch (findings + masked report), model forward under the provider's autocast, backward, gradient clipping,
AdamW. The Trainer's own train_step runs, on a Trainer assembled here without a data folder (`step_trainer`:
the model, text tower, optimizer and settings Trainer.__init__ makes; no loader, no checkpoints). The batch is
generated: a random volume in [-1, 1], MAE noise, and a realistic report (REPORTS: 12 findings sentences, about
250 findings / 330 report word pieces at the paper's shape) tokenised, with its MLM mask, by simcrop.data.text;
so nothing needs DALI, MONAI or the synthetic phantoms (the lent GPU machine has none of them).

Shapes: `paper` = the vit_b preset (224 x 224 x 112, patch 16 x 16 x 8, 686 visible tokens, K = 32) with a frozen
randomly initialised BERT-base (768 x 12, FFN 3072, vocabulary ~30.5k, built once into the cache folder by
simcrop.models.tiny_bert.build_tiny_bert); `tiny` = the tiny preset with the tiny-bert tower (dry runs, CI).
Providers: `<eager|compiled>-<reference|auto>[-bf16][-gc]` = torch.compile or not, --kernels, --amp bf16 (on
CPU; CUDA runs bf16 under amp auto anyway), --grad-checkpointing. Batch: SIMCROP_BENCH_BATCH, else 14 on CUDA
and 2 on CPU at the paper's shape, 4 at the tiny one.
"""
from __future__ import annotations

import gc
import itertools
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from simcrop.config import Config, make_config
from simcrop.data.text import mask_report_tokens, tokenize_findings, tokenize_report
from simcrop.distributed import DistInfo
from simcrop.factory import build_model
from simcrop.models.flops import StepFlops, TextTower, step_flops, text_lengths
from simcrop.models.text import TextFeatures
from simcrop.models.tiny_bert import build_tiny_bert, tiny_bert_fingerprint
from simcrop.ops.backend import describe
from simcrop.paths import cache_root
from simcrop.pretraining import ADAMW_IMPLS, Trainer, amp_dtype, param_groups, resolve_adamw_impl

# -- the report ---------------------------------------------------------------------------------------------------
REPORTS = [
    (
        ("The trachea and both main bronchi are patent, with no endobronchial lesion or wall thickening. "
         "The mediastinum is midline and the heart is mildly enlarged, with calcified atherosclerotic plaques in the "
         "left anterior descending and right coronary arteries. The thoracic aorta measures 3.8 cm at the level of "
         "the ascending segment and shows scattered mural calcifications without dissection or aneurysm. Several "
         "subcentimetric lymph nodes are seen in the prevascular and right lower paratracheal stations, the largest "
         "measuring 9 mm in short axis. There is no pericardial effusion or pericardial thickening. In the posterior "
         "segment of the right upper lobe there is a 14 mm solid pulmonary nodule with spiculated margins, adjacent "
         "to the major fissure. A second ground glass nodule measuring 6 mm is "
         "noted in the superior segment of the left lower lobe. Bilateral centrilobular emphysematous changes are "
         "present, predominantly in the upper zones. Linear atelectasis and mild "
         "interlobular septal thickening are seen at both lung bases. There is a small right pleural effusion with a "
         "maximum depth of 18 mm and adjacent compressive atelectasis of the right lower lobe. The imaged upper "
         "abdominal organs show a 2.1 cm hypodense lesion in the right hepatic lobe, most likely a simple cyst, and "
         "the adrenal glands are unremarkable. Degenerative changes with marginal osteophytes are present in the "
         "thoracic spine, and no lytic or sclerotic bone lesion is identified."),
        ("1. Spiculated 14 mm solid nodule in the posterior segment of the right upper lobe, suspicious for a primary "
         "lung malignancy; tissue sampling is recommended. 2. A 6 mm ground glass nodule in the "
         "left lower lobe, to be followed up. 3. Subcentimetric mediastinal lymph nodes without "
         "pathological enlargement. 4. Centrilobular emphysema, small right pleural effusion with "
         "compressive atelectasis. 5. Mild cardiomegaly and coronary artery calcifications. 6. Probable simple "
         "hepatic cyst."),
    ),
    (
        ("The central airways are patent and the tracheal calibre is normal, with no secretions in the lumen. The "
         "heart size is within normal limits and there is no pericardial effusion. Mild calcification of the aortic "
         "arch and of the aortic valve leaflets is noted, and the main pulmonary artery measures 27 mm in diameter. "
         "A few mildly enlarged lymph nodes are present in the subcarinal and left hilar regions, measuring up to "
         "12 mm in short axis. In the lateral segment of the middle lobe there is an area of consolidation with air "
         "bronchograms, surrounded by ground glass opacity, measuring approximately 4.2 x 3.1 cm. Patchy ground glass "
         "opacities with interlobular septal thickening are also seen in the lingula and in the basal segments of "
         "the left lower lobe. There are scattered bronchiectatic changes with mild bronchial wall thickening in both "
         "lower lobes. A calcified granuloma of 4 mm is incidentally noted in the apical segment of the left upper "
         "lobe. There is a moderate left pleural effusion measuring 35 mm in maximum depth, with smooth pleural "
         "surfaces and no pleural nodularity. No pneumothorax is seen. The visible portions of the liver, spleen and "
         "kidneys show no focal lesion, and a small hiatal hernia is present. Old healed fractures of the left "
         "seventh and eighth ribs are seen, with no aggressive osseous lesion."),
        ("1. Consolidation with air bronchograms in the middle lobe and patchy ground glass opacities in the lingula "
         "and left lower lobe, in keeping with multifocal pneumonia in the appropriate clinical setting; follow-up CT "
         "after treatment is advised to document resolution. 2. Moderate left pleural effusion. 3. Mildly enlarged "
         "subcarinal and left hilar lymph nodes, probably reactive. 4. Bilateral lower lobe bronchiectasis. "
         "5. Small hiatal hernia and old healed left rib fractures."),
    ),
]


def _filler_words(n: int, seed: int = 0) -> list[str]:
    """n pseudo-words (2-4 syllables, seeded): filler that gives the WordPiece vocabulary BERT's size."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
              "ch", "cl", "dr", "fl", "gr", "ph", "pl", "pr", "sc", "sh", "sp", "st", "th", "tr"]
    nuclei = ["a", "e", "i", "o", "u", "y", "ae", "ai", "ea", "ei", "ia", "io", "ou"]
    codas = ["", "", "", "l", "m", "n", "r", "s", "t", "x", "nd", "nt", "rt", "st"]
    return ["".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(rng.randint(2, 4)))
            for _ in range(n)]


@dataclass(frozen=True)
class Shape:
    preset: str
    tower: dict  # build_tiny_bert arguments of the frozen text tower
    filler: int  # pseudo-words added to the tokenizer corpus (vocabulary size)


SHAPES = {
    "tiny": Shape("tiny", {"vocab_size": 512, "hidden": 64, "layers": 2, "heads": 2, "intermediate": 128,
                           "max_position": 256}, 0),
    "paper": Shape("vit_b", {"vocab_size": 30522, "hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072,
                             "max_position": 512}, 40_000),
}


def text_corpus(shape: str) -> list[str]:
    """The tokenizer's training text: the reports (repeated: their words become whole word pieces) + filler."""
    reports = [f"{findings} {impression}" for findings, impression in REPORTS] * 20
    words = _filler_words(SHAPES[shape].filler)
    return reports + [" ".join(words[i : i + 25]) for i in range(0, len(words), 25)]


def text_tower_folder(shape: str, cache: str | os.PathLike | None = None) -> Path:
    """The frozen text tower's Hugging Face folder for a shape, built once into <cache>/bench-bert-<key>."""
    corpus, args = text_corpus(shape), SHAPES[shape].tower
    folder = cache_root(cache) / f"bench-bert-{shape}-{tiny_bert_fingerprint(corpus, **args)}"
    if not (folder / "config.json").is_file():
        build_tiny_bert(corpus, folder, **args)
    return folder


# -- providers ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provider:
    name: str
    compile: bool
    kernels: str  # reference | auto
    adamw_impl: str  # reference providers: 'loop' (plain PyTorch, torch's own CPU default); auto: 'auto' (fused)
    amp: str  # auto | bf16 (simcrop.pretraining.amp_dtype: auto = bf16 on CUDA, fp32 on CPU)
    grad_checkpointing: bool


def provider(name: str) -> Provider:
    """'compiled-auto-bf16-gc' -> Provider(compile, kernels auto, amp bf16, grad checkpointing)."""
    parts = name.split("-")
    if len(parts) < 2 or parts[0] not in ("eager", "compiled") or parts[1] not in ("reference", "auto") or \
            not set(parts[2:]) <= {"bf16", "gc"}:
        raise ValueError(f"step provider {name!r}: expected <eager|compiled>-<reference|auto>[-bf16][-gc]")
    return Provider(name, parts[0] == "compiled", parts[1], "loop" if parts[1] == "reference" else "auto",
                    "bf16" if "bf16" in parts else "auto", "gc" in parts)


def default_providers(device: torch.device) -> list[str]:
    """SIMCROP_BENCH_STEP_PROVIDERS (a comma list), else: fp32 and bf16 on CPU; bf16 (amp auto) with and without
    grad checkpointing on CUDA."""
    chosen = [p for p in os.environ.get("SIMCROP_BENCH_STEP_PROVIDERS", "").split(",") if p]
    if chosen:
        for name in chosen:
            provider(name)  # validates
        return chosen
    if device.type == "cuda":
        return ["eager-reference", "eager-auto", "compiled-auto", "eager-reference-gc", "compiled-auto-gc"]
    return ["eager-reference", "eager-auto", "compiled-auto", "eager-auto-bf16", "compiled-auto-bf16"]


def default_batch(shape: str, device: torch.device) -> int:
    if os.environ.get("SIMCROP_BENCH_BATCH"):
        return int(os.environ["SIMCROP_BENCH_BATCH"])
    if shape == "tiny":
        return 4
    return 14 if device.type == "cuda" else 2


# -- the step -------------------------------------------------------------------------------------------------------
def step_config(shape: str, prov: Provider, batch_size: int, text_folder: Path, device: torch.device) -> Config:
    """The run's Config: the shape's preset, one micro-batch per step, the provider's switches."""
    return make_config(
        SHAPES[shape].preset, batch_size=batch_size, accum_steps=1, steps=10_000, text_encoder=str(text_folder),
        kernels=prov.kernels, adamw_impl=prov.adamw_impl, compile=prov.compile, amp=prov.amp,
        grad_checkpointing=prov.grad_checkpointing, device=str(device), progress=False,
    )


def step_trainer(cfg: Config, text, device: torch.device) -> Trainer:
    """A Trainer holding what Trainer.__init__ builds for the step (single process, no data folder, no resume):
    its train_step is the one that runs. The attributes mirror simcrop/pretraining.py's Trainer.__init__."""
    t = cfg.train
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.dist, trainer.log, trainer.device = cfg, DistInfo(), (lambda *a, **k: None), device
    trainer.text = text
    trainer.model = build_model(cfg, text).to(device)
    trainer.model.set_grad_checkpointing(t.grad_checkpointing)
    trainer.wrapped = trainer.model
    trainer.adamw_impl = resolve_adamw_impl(t.adamw_impl, sharded=False)
    trainer.optimizer = torch.optim.AdamW(param_groups(trainer.model, t.weight_decay), lr=t.lr,
                                          betas=(t.beta1, t.beta2), **ADAMW_IMPLS[trainer.adamw_impl])
    trainer.kernels = describe(cfg.model.kernels, device)
    trainer.step, trainer.bad_steps, trainer.skipped_steps = 0, 0, 0
    trainer.features = TextFeatures(text)
    if t.compile:  # as Trainer; SIMCROP_BENCH_COMPILE_BACKEND=aot_eager lets dry runs skip code generation
        trainer.forward = torch.compile(trainer.wrapped, backend=os.environ.get("SIMCROP_BENCH_COMPILE_BACKEND", "inductor"))
    else:
        trainer.forward = trainer.wrapped
    trainer.amp = amp_dtype(cfg, device)
    return trainer


def generated_batch(cfg: Config, tokenizer, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """A pre-training micro-batch as the loaders give it (simcrop.data.sample keys), from generated tensors:
    volume [B, 1, X, Y, Z] uniform in [-1, 1], mask_noise [B, N], the REPORTS (sample b: REPORTS[b % 2]) tokenised
    (findings_ids / findings_mask / sentence_ids [B, Lf], report_ids with [MASK]s / report_mask / mlm_labels [B, Lr])."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    findings, reports = [], []
    for b in range(batch_size):
        f_text, impression = REPORTS[b % len(REPORTS)]
        findings.append(tokenize_findings(tokenizer, f_text, m.findings_max_len, m.max_sentences))
        reports.append(tokenize_report(tokenizer, f_text, impression, m.report_max_len))
    report_ids = torch.stack([r["input_ids"] for r in reports])  # [B, Lr]
    report_mask = torch.stack([r["attention_mask"] for r in reports])  # [B, Lr]
    masked_ids, labels = mask_report_tokens(report_ids, report_mask, list(tokenizer.all_special_ids),
                                            tokenizer.mask_token_id, m.mlm_ratio, g, m.mlm_loss_on)
    grid = [s // p for s, p in zip(m.img_size, m.patch_size)]
    batch = {
        "volume": torch.rand(batch_size, m.in_chans, *m.img_size, generator=g) * 2 - 1,
        "mask_noise": torch.rand(batch_size, grid[0] * grid[1] * grid[2], generator=g),
        "findings_ids": torch.stack([f["input_ids"] for f in findings]),
        "findings_mask": torch.stack([f["attention_mask"] for f in findings]).bool(),
        "sentence_ids": torch.stack([f["sentence_ids"] for f in findings]),
        "report_ids": masked_ids,
        "report_mask": report_mask.bool(),
        "mlm_labels": labels,
    }
    return {k: v.to(device) for k, v in batch.items()}


def text_stats(batch: dict) -> dict:
    """Word pieces of the longest findings / report (with [CLS], [SEP]), sentences, MLM labels: for extra_info."""
    f_len, r_len = text_lengths(batch)
    return {"findings_tokens": f_len, "report_tokens": r_len,
            "sentences": int(batch["sentence_ids"].amax(1).max()),
            "mlm_labels_per_report": round(float((batch["mlm_labels"] != -100).sum(1).float().mean()), 1)}


@dataclass
class StepCase:
    """Everything one benchmark case needs: config, trainer, batch, FLOPs, and `run()` = one training step."""

    shape: str
    provider: Provider
    batch_size: int
    device: torch.device
    cfg: Config
    trainer: Trainer
    batch: dict
    flops: StepFlops

    def run(self):
        return self.trainer.train_step(itertools.repeat(self.batch))

    def info(self) -> dict:
        """extra_info of the case (the timing-independent part)."""
        t = self.trainer
        tower = TextTower.of(t.text)
        return {
            "shape": self.shape, "provider": self.provider.name, "batch": self.batch_size,
            "img_size": "x".join(map(str, self.cfg.model.img_size)), "visible_tokens": t.model.num_keep,
            "amp": str(t.amp).removeprefix("torch.") if t.amp else "fp32", "compile": self.provider.compile,
            "grad_checkpointing": self.provider.grad_checkpointing, "kernels": self.provider.kernels,
            "kernel_choice": ", ".join(f"{k}={v.split(' ')[0]}" for k, v in t.kernels.items()),
            "text_tower": f"{tower.layers}x{tower.hidden} (FFN {tower.intermediate}, vocab {tower.vocab_size})",
            "model_GFLOP": round(self.flops.total / 1e9, 1), "hardware_GFLOP": round(self.flops.hardware / 1e9, 1),
            **text_stats(self.batch),
        }

    def close(self) -> None:
        """Free the model, optimizer state and compiled graphs before the next case."""
        self.trainer = self.batch = None
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


_TOWERS: dict = {}


def text_tower(shape: str, device: torch.device):
    """The shape's frozen text tower on `device` (built into the cache folder once, loaded once per process)."""
    key = (shape, str(device))
    if key not in _TOWERS:
        from simcrop.models.text import FrozenTextEncoder

        _TOWERS.clear()
        _TOWERS[key] = FrozenTextEncoder(str(text_tower_folder(shape))).to(device)
    return _TOWERS[key]


def make_case(shape: str, provider_name: str, device: torch.device | None = None,
              batch_size: int | None = None) -> StepCase:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prov = provider(provider_name)
    if device.type == "cuda" and prov.amp == "bf16":
        warnings.warn(f"{provider_name}: on CUDA amp auto is bf16 already; -bf16 changes nothing")
    batch_size = batch_size or default_batch(shape, device)
    text = text_tower(shape, device)
    cfg = step_config(shape, prov, batch_size, Path(text.path), device)
    torch.manual_seed(cfg.train.seed)
    trainer = step_trainer(cfg, text, device)
    batch = generated_batch(cfg, text.tokenizer, batch_size, device)
    flops = step_flops(cfg.model, batch_size, TextTower.of(text), *text_lengths(batch),
                       grad_checkpointing=prov.grad_checkpointing)
    return StepCase(shape, prov, batch_size, device, cfg, trainer, batch, flops)


# -- rates, MFU, host-device syncs ------------------------------------------------------------------------------------
# dense bf16 peak of a card, TFLOP/s (vendor datasheets, without sparsity); matched in order on the device name
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0)]


def peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) by torch.cuda.get_device_name; None on CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def rates(seconds: float, case: StepCase) -> dict:
    """s/step, volumes/s, achieved model TFLOP/s and MFU (model FLOPs / s over the card's dense bf16 peak)."""
    tflops = case.flops.total / seconds / 1e12
    peak = peak_tflops(case.device)
    return {"s_per_step": round(seconds, 4), "volumes_per_s": round(case.batch_size / seconds, 3),
            "TFLOP_per_s": round(tflops, 3), "mfu": round(tflops / peak, 4) if peak else None}


def host_syncs(fn) -> dict:
    """Run fn() once under torch.cuda.set_sync_debug_mode('warn') and count the host-device synchronisations it
    makes, by source line (the 8 most frequent). On CPU fn runs without the check: {'syncs': None}."""
    if not torch.cuda.is_available():
        fn()
        return {"syncs": None}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites: dict[str, int] = {}
    for w in syncs:
        where = f"{Path(w.filename).name}:{w.lineno}"
        sites[where] = sites.get(where, 0) + 1
    top = sorted(sites.items(), key=lambda kv: -kv[1])[:8]
    return {"syncs": len(syncs), "sync_sites": ", ".join(f"{k} x{v}" for k, v in top)}
