"""A tiny SimCroP model and a random batch with the shapes the training loop feeds it."""
import torch

from simcrop.config import make_config
from simcrop.models.simcrop import SimCroP

TEXT_HIDDEN, VOCAB = 64, 500


def tiny_model(seed: int = 0, **overrides) -> SimCroP:
    cfg = make_config("tiny", **overrides)
    torch.manual_seed(seed)
    return SimCroP(cfg.model, text_hidden=TEXT_HIDDEN, vocab_size=VOCAB)


def random_batch(model: SimCroP, batch_size: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    m = model.cfg
    g = torch.Generator().manual_seed(seed)
    B, Lf, Lr = batch_size, m.findings_max_len, m.report_max_len
    sentence_ids = torch.zeros(B, Lf, dtype=torch.long)
    for b in range(B):  # b + 2 sentences of 5 tokens after [CLS]
        n = b + 2
        sentence_ids[b, 1 : 1 + 5 * n] = torch.arange(1, n + 1).repeat_interleave(5)
    report_mask = torch.zeros(B, Lr, dtype=torch.bool)
    report_mask[:, :40] = True
    labels = torch.full((B, Lr), -100)
    pos = torch.rand(B, 38, generator=g).argsort(1)[:, :28] + 1
    labels.scatter_(1, pos, torch.randint(0, VOCAB, (B, 28), generator=g))
    return {
        "volume": torch.rand(B, 1, *m.img_size, generator=g) * 2 - 1,
        "mask_noise": torch.rand(B, model.num_patches, generator=g),
        "findings_feats": torch.randn(B, Lf, TEXT_HIDDEN, generator=g),
        "sentence_ids": sentence_ids,
        "report_feats": torch.randn(B, Lr, TEXT_HIDDEN, generator=g),
        "report_mask": report_mask,
        "mlm_labels": labels,
    }
