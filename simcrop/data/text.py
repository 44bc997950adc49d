"""Radiology report text processing: sentence splitting, tokenisation with sentence ids, report masking.

Pure functions; nothing here loads or builds a model (`simcrop.models.text` is the frozen text tower,
`simcrop.models.tiny_bert` the tiny randomly initialised BERT for tests and smoke runs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "split_sentences",
    "tokenize_findings",
    "tokenize_report",
    "mask_report_tokens",
]

# A zero-width split point right after a '.' whose two neighbours are not digits:
# "(?<=(?<!\d)\.)" = the previous char is a '.' that is not preceded by a digit; "(?!\d)" = no digit follows.
_SENTENCE_END = re.compile(r"(?<=(?<!\d)\.)(?!\d)")
_WS = re.compile(r"\s+")


def _is_missing(text) -> bool:
    """True for anything that is not a non-blank string: None, NaN / pandas.NA (empty CSV cells), "", "  "."""
    return not isinstance(text, str) or not text.strip()


def _normalise_ws(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines) into one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """str -> list of sentences.

    Splits on '.' except where a neighbour character of the '.' is a digit ("1.5 cm", "3.2x2.1 cm" stay whole;
    note that this also keeps "at T4. The heart" together, as the paper's rule does). The '.' stays with its
    sentence, whitespace (incl. newlines) is collapsed to single spaces, pieces without any letter or digit
    (e.g. "." or "..") are dropped, and a trailing fragment without a final '.' is a sentence too.
    Missing text (None / NaN / empty) gives [].
    """
    if _is_missing(text):
        return []
    text = _normalise_ws(text)
    pieces = (p.strip() for p in _SENTENCE_END.split(text))
    return [p for p in pieces if any(c.isalnum() for c in p)]


def _special_ids(tokenizer) -> tuple[int, int, int]:
    """(cls_id, sep_id, pad_id) of a Hugging Face tokenizer; raises when one is missing."""
    ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    if any(i is None for i in ids):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} lacks a CLS, SEP or PAD token "
            f"(cls={ids[0]}, sep={ids[1]}, pad={ids[2]})"
        )
    return ids  # type: ignore[return-value]


def _encode_pieces(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids of each text, without special tokens."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def tokenize_findings(tokenizer, findings: str, max_len: int, max_sentences: int) -> dict:
    """Findings -> {input_ids [max_len] long, attention_mask [max_len] long, sentence_ids [max_len] long,
    n_sentences int}.

    Layout: [CLS] s_1 ... s_S [SEP] [PAD]...; every word-piece of sentence j carries sentence id j (1..S),
    CLS/SEP/PAD carry 0. Each sentence is tokenised on its own (no special tokens) so the ids align exactly.
    Truncation keeps whole sentences only: sentences beyond `max_sentences` are dropped, and so is the first
    sentence that does not fit entirely into `max_len` together with every sentence after it.
    Raises ValueError when the findings are empty or no sentence is left (the caller adds the file name).
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (CLS + one token + SEP), got {max_len}")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    if _is_missing(findings):
        raise ValueError("findings text is empty")
    sentences = split_sentences(findings)
    if not sentences:
        raise ValueError(f"findings text yields no sentence: {findings[:80]!r}")
    cls_id, sep_id, pad_id = _special_ids(tokenizer)

    budget = max_len - 2  # room between CLS and SEP
    ids: list[int] = [cls_id]
    sids: list[int] = [0]
    kept = 0
    for j, pieces in enumerate(_encode_pieces(tokenizer, sentences[:max_sentences]), start=1):
        if not pieces:  # a sentence with no word-piece (cannot carry a sentence id): skip, keep ids contiguous
            continue
        if len(pieces) > budget:
            break  # never half a sentence: drop this one and all after it
        kept += 1
        ids.extend(pieces)
        sids.extend([kept] * len(pieces))
        budget -= len(pieces)
    if kept == 0:
        raise ValueError(
            f"findings yield no sentence that fits max_len={max_len} "
            f"({len(sentences)} sentence(s); the first is too long or has no word-piece)"
        )
    ids.append(sep_id)
    sids.append(0)
    n = len(ids)
    pad = max_len - n
    return {
        "input_ids": torch.tensor(ids + [pad_id] * pad, dtype=torch.long),  # [max_len]
        "attention_mask": torch.tensor([1] * n + [0] * pad, dtype=torch.long),  # [max_len]
        "sentence_ids": torch.tensor(sids + [0] * pad, dtype=torch.long),  # [max_len]
        "n_sentences": kept,
    }


def tokenize_report(tokenizer, findings: str, impression: str | None, max_len: int) -> dict:
    """(findings, impression) -> {input_ids [max_len] long, attention_mask [max_len] long} for the masked-report
    branch: ONE sequence [CLS] findings impression [SEP] [PAD]...

    The impression is dropped when absent/empty/NaN. Too long sequences are cut at max_len keeping the final
    [SEP]. Raises ValueError when the findings are empty.
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (CLS + one token + SEP), got {max_len}")
    if _is_missing(findings):
        raise ValueError("findings text is empty")
    parts = [_normalise_ws(findings)]
    if not _is_missing(impression):
        parts.append(_normalise_ws(impression))
    cls_id, sep_id, pad_id = _special_ids(tokenizer)
    pieces = _encode_pieces(tokenizer, [" ".join(parts)])[0][: max_len - 2]
    if not pieces:
        raise ValueError(f"report text yields no token: {findings[:80]!r}")
    ids = [cls_id, *pieces, sep_id]
    pad = max_len - len(ids)
    return {
        "input_ids": torch.tensor(ids + [pad_id] * pad, dtype=torch.long),  # [max_len]
        "attention_mask": torch.tensor([1] * len(ids) + [0] * pad, dtype=torch.long),  # [max_len]
    }


def mask_report_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special: torch.Tensor | Iterable[int],
    mask_token_id: int,
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    loss_on: str = "masked",
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B,L] long, attention_mask [B,L] -> (masked_ids [B,L] long, labels [B,L] long).

    `special` is either a special-tokens mask [B,L] (bool/int, 1 = special) or an iterable of special token ids
    (e.g. `tokenizer.all_special_ids`). Maskable = attended and not special. Per sample exactly
    round(ratio * n_maskable) maskable positions (at least 1 when n_maskable >= 1) are chosen uniformly at random
    (torch.rand with `generator`, then rank: deterministic for a given generator state) and replaced by
    `mask_token_id` (no 80/10/10). labels: loss_on='masked' -> original id at masked positions, -100 elsewhere;
    loss_on='all' -> original id at every maskable position (reconstruct the whole report), -100 at pad/special.
    Rounding is Python's round() (half to even).
    """
    if loss_on not in ("masked", "all"):
        raise ValueError(f"loss_on must be 'masked' or 'all', got {loss_on!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    device = input_ids.device
    if isinstance(special, torch.Tensor) and special.shape == input_ids.shape:
        is_special = special.to(device=device, dtype=torch.bool)  # [B,L]
    else:
        special_ids = torch.as_tensor(list(special) if not isinstance(special, torch.Tensor) else special,
                                      dtype=torch.long, device=device).flatten()  # [K]
        is_special = torch.isin(input_ids, special_ids)  # [B,L]
    maskable = attention_mask.to(device).bool() & ~is_special  # [B,L]

    n_maskable = maskable.sum(dim=1)  # [B]
    n_mask = torch.round(n_maskable.double() * float(ratio)).long()  # [B], half to even like round()
    n_mask = torch.minimum(torch.clamp(n_mask, min=1), n_maskable)  # [B]; >= 1 when anything is maskable

    gen_device = generator.device if generator is not None else device
    scores = torch.rand(input_ids.shape, generator=generator, device=gen_device).to(device)  # [B,L] in [0,1)
    scores = scores.masked_fill(~maskable, 2.0)  # non-maskable ranked last
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B,L]: rank of each position within its row
    masked = maskable & (ranks < n_mask[:, None])  # [B,L]

    masked_ids = input_ids.masked_fill(masked, int(mask_token_id))
    keep = masked if loss_on == "masked" else maskable
    labels = input_ids.masked_fill(~keep, -100)
    return masked_ids, labels
