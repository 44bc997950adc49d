"""simcrop.models.flops against torch.utils.flop_counter.FlopCounterMode on real forward + backward passes.

Attention runs through SDPA's math path here (FlopCounterMode has no formula for the CPU flash kernel; the math
path is counted as its two bmm). FlopCounterMode's per-module split is exact in forward only (its backward hooks
miss modules whose inputs need no gradient), so each component is counted on its own: the model's stages one at
a time (forward, then backward from a detached leaf), the masked-report stage's pieces one by one.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from simcrop.config import make_config
from simcrop.factory import build_model
from simcrop.models.flops import TextTower, step_flops, text_lengths
from simcrop.models.losses import mlm_cross_entropy, select_label_positions
from simcrop.models.simcrop import SimCroP, mlm_label_capacity
from simcrop.models.text import FrozenTextEncoder, TextFeatures
from simcrop.models.tiny_bert import build_tiny_bert

CORPUS = [
    "The lungs are clear. There is a 7 mm nodule in the right upper lobe. No pleural effusion.",
    "Mild cardiomegaly. The trachea is patent. Small hiatal hernia. Degenerative changes of the spine.",
    "A 2.1 cm mass in the left lower lobe. Mediastinal lymph nodes are not enlarged.",
]
REL = 0.05  # the tolerance; the count is exact where it models every matmul
B = 2


def counted():
    """A FlopCounterMode whose attention is counted (SDPA math path)."""
    class Counter(FlopCounterMode):
        def __enter__(self):
            self._sdpa = sdpa_kernel(SDPBackend.MATH)
            self._sdpa.__enter__()
            return super().__enter__()

        def __exit__(self, *exc):
            out = super().__exit__(*exc)
            self._sdpa.__exit__(*exc)
            return out

    return Counter(display=False)


def close(measured: int, analytic: int, what: str) -> None:
    ratio = analytic / measured if measured else float("inf")
    assert measured > 0 and abs(ratio - 1) <= REL, f"{what}: analytic {analytic:,} vs counted {measured:,} ({ratio:.4f})"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    folder = build_tiny_bert(CORPUS, tmp_path_factory.mktemp("flops") / "bert", vocab_size=120, hidden=64,
                             layers=2, heads=2, intermediate=128, max_position=256)
    return FrozenTextEncoder(str(folder))


def text_batch(model: SimCroP, text, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and masks of a batch (findings of 37 / 29 tokens, reports of 61 / 45) + volume, noise, labels."""
    m = model.cfg
    g = torch.Generator().manual_seed(seed)
    Lf, Lr = m.findings_max_len, m.report_max_len
    f_len, r_len = [37, 29], [61, 45]
    findings_mask = torch.arange(Lf).expand(B, Lf) < torch.tensor(f_len)[:, None]
    report_mask = torch.arange(Lr).expand(B, Lr) < torch.tensor(r_len)[:, None]
    sentence_ids = torch.zeros(B, Lf, dtype=torch.long)
    for b, n in enumerate(f_len):  # sentences of 6 tokens after [CLS], [SEP] last
        sentence_ids[b, 1 : n - 1] = torch.arange(n - 2) // 6 + 1
    labels = torch.full((B, Lr), -100)
    for b, n in enumerate(r_len):
        labels[b, 1 : n - 1 : 2] = torch.randint(5, text.vocab_size, ((n - 2 + 1) // 2,), generator=g)
    return {
        "volume": torch.rand(B, 1, *m.img_size, generator=g) * 2 - 1,
        "mask_noise": torch.rand(B, model.num_patches, generator=g),
        "findings_ids": torch.randint(5, text.vocab_size, (B, Lf), generator=g) * findings_mask,
        "findings_mask": findings_mask,
        "sentence_ids": sentence_ids,
        "report_ids": torch.randint(5, text.vocab_size, (B, Lr), generator=g) * report_mask,
        "report_mask": report_mask,
        "mlm_labels": labels,
    }


def setup(text, **overrides):
    cfg = make_config("tiny", kernels="reference", **overrides)
    torch.manual_seed(0)
    model = build_model(cfg, text)
    batch = text_batch(model, text)
    f = step_flops(cfg.model, B, TextTower.of(text), *text_lengths(batch))
    return cfg, model, batch, f


def test_text_tower_forward(text):
    _, _, batch, f = setup(text)
    with counted() as fc:
        TextFeatures(text)(batch)
    close(fc.get_total_flops(), f.components["text_tower"].forward, "text tower (findings + report passes)")
    assert f.components["text_tower"].backward == 0


def test_each_component_forward_and_backward(text):
    cfg, model, batch, f = setup(text)
    c = f.components
    batch = TextFeatures(text)(batch)
    visible, mask, ids_restore, ids_keep = model.mask_patches(batch["volume"], batch["mask_noise"])

    def stage(name, forward):  # forward() -> a tensor; counted forward, then backward of a random projection
        with counted() as fwd:
            out = forward()
        with counted() as bwd:
            out.backward(torch.randn_like(out))
        close(fwd.get_total_flops(), c[name].forward, f"{name} forward")
        close(bwd.get_total_flops(), c[name].backward, f"{name} backward")
        return out

    h = stage("image_encoder", lambda: model.encode(visible, ids_keep))
    leaf = lambda: h.detach().requires_grad_(True)  # the stage's input, needing a gradient
    stage("mim_decoder", lambda: model.mim(leaf(), ids_restore, batch["volume"], mask))
    stage("alignment", lambda: model.align(leaf()[:, 1:], batch["findings_feats"], batch["sentence_ids"]))

    # the masked-report stage: the stage as a whole, then its three components one by one
    rf, rm, labels = batch["report_feats"], batch["report_mask"], batch["mlm_labels"]
    mlm = c["fusion"] + c["text_decoder"] + c["mlm_head"]
    h_vis = leaf()[:, 1:]
    with counted() as fwd:
        loss = model.mlm(h_vis, rf, rm, labels)
    with counted() as bwd:
        loss.backward()
    close(fwd.get_total_flops(), mlm.forward, "masked-report stage forward")
    close(bwd.get_total_flops(), mlm.backward, "masked-report stage backward")

    h_vis = leaf()[:, 1:]
    fused = stage("fusion", lambda: model.fusion(model.head_q(rf), rm, model.image_to_fusion(h_vis), kernels="reference"))
    fused = fused.detach().requires_grad_(True)
    hidden = stage("text_decoder", lambda: model.text_decoder(fused, rm))

    def head():
        positions, targets = select_label_positions(labels, mlm_label_capacity(cfg.model))
        hid = hidden.detach().requires_grad_(True)
        picked = torch.gather(hid, 1, positions.unsqueeze(-1).expand(-1, -1, hid.shape[-1]))
        return mlm_cross_entropy(model.text_decoder.logits(picked), targets)

    stage("mlm_head", head)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"grad_checkpointing": True}, {"w_align_volume": 0.5}, {"align_within": False, "w_align_soft": 0.5}],
    ids=["plain", "grad_checkpointing", "align_volume", "align_soft_only"],
)
def test_whole_step(text, overrides):
    """Frozen text features + forward + backward of the model, counted as one: the step's model FLOPs (plus the
    recomputed forward under grad checkpointing)."""
    cfg, model, batch, _ = setup(text, **overrides)
    gc = cfg.train.grad_checkpointing
    model.set_grad_checkpointing(gc)
    f = step_flops(cfg.model, B, TextTower.of(text), *text_lengths(batch), grad_checkpointing=gc)
    with counted() as fc:
        model(TextFeatures(text)(batch))["loss"].backward()
    close(fc.get_total_flops(), f.hardware, f"whole step {overrides}")
    assert (f.recompute > 0) == gc and f.hardware == f.total + f.recompute


@pytest.mark.parametrize("preset", ["tiny", "vit_b"])
def test_model_on_meta_tensors(preset):
    """The trainable model at its full size (the paper's vit_b too), counted on meta tensors: shapes only, no
    memory, no arithmetic. Text features stand in for the tower (BERT-base width, vocabulary 30522)."""
    cfg = make_config(preset, kernels="reference").model
    with torch.device("meta"):
        model = SimCroP(cfg, 768, 30522)
        Lf, Lr = cfg.findings_max_len, cfg.report_max_len
        batch = {
            "volume": torch.empty(B, 1, *cfg.img_size), "mask_noise": torch.empty(B, model.num_patches),
            "findings_feats": torch.empty(B, Lf, 768), "sentence_ids": torch.zeros(B, Lf, dtype=torch.long),
            "report_feats": torch.empty(B, Lr, 768), "report_mask": torch.ones(B, Lr, dtype=torch.bool),
            "mlm_labels": torch.zeros(B, Lr, dtype=torch.long),
        }
        with counted() as fc:
            model(batch)["loss"].backward()
    f = step_flops(cfg, B, TextTower(768, 12, 3072, 30522))
    close(fc.get_total_flops(), f.total - f.components["text_tower"].total, f"{preset} model on meta")
    if preset == "vit_b":
        assert f.notes["visible_tokens"] == "686" and f.notes["patches"] == "2744"
