"""A tiny randomly initialised BERT whose WordPiece vocabulary is trained on a corpus (tests and smoke runs).

`build_tiny_bert(corpus, out_dir)` writes a Hugging Face folder (model + tokenizer) deterministically and
atomically; `tiny_bert_fingerprint` is its cache key (simcrop.models.text resolves the 'tiny-bert' alias).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["SPECIAL_TOKENS", "build_tiny_bert", "tiny_bert_fingerprint"]

#: Special tokens of the tiny BERT vocabulary, in id order ([PAD] = 0).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_missing(text) -> bool:
    """True for anything that is not a non-blank string (None, NaN from empty CSV cells, "", "  ")."""
    return not isinstance(text, str) or not text.strip()


def tiny_bert_fingerprint(corpus: Sequence[str], **kwargs) -> str:
    """Stable hex digest (16 chars) of a corpus and the tiny-BERT build arguments (used as a cache key)."""
    h = hashlib.sha256()
    h.update(json.dumps(kwargs, sort_keys=True).encode())
    for text in corpus:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


# Private-use code points marking a continuation character ("##x") during vocabulary training (see below).
_CONT_OFFSET = 0xF0000


def _train_wordpiece_vocab(texts: Sequence[str], vocab_size: int) -> dict[str, int]:
    """Texts -> WordPiece vocabulary {token: id} with SPECIAL_TOKENS at ids 0..4, learnt with `tokenizers`.

    `tokenizers`' WordPieceTrainer is not deterministic: it numbers the "##x" continuation characters in hash-map
    order, and ties between equally frequent merges are broken by those numbers. Its BpeTrainer is deterministic
    (sorted alphabet, ties broken by id), so we train BPE on words whose continuation characters are moved to a
    private-use plane (c -> chr(0xF0000 + ord(c))): a merged token starting with a plain character is a
    word-initial piece "ab", one starting with a shifted character is a continuation piece "##ab". This is the
    WordPiece trainer's own recipe (BPE merges with a continuation prefix) with a deterministic numbering.
    Characters outside the Basic Multilingual Plane are left out of the vocabulary (they become [UNK]).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    normaliser = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre = pre_tokenizers.BertPreTokenizer()

    def shifted_words(text: str) -> str:
        words = []
        for word, _span in pre.pre_tokenize_str(normaliser.normalize_str(text)):
            word = "".join(c for c in word if ord(c) < 0x10000)  # BMP only: the shifted range must stay valid
            if word:
                words.append(word[0] + "".join(chr(_CONT_OFFSET + ord(c)) for c in word[1:]))
        return " ".join(words)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(SPECIAL_TOKENS), 1), min_frequency=1, show_progress=False
    )
    bpe.train_from_iterator((shifted_words(t) for t in texts), trainer=trainer, length=len(texts))

    def unshift(token: str) -> str:
        if ord(token[0]) >= _CONT_OFFSET:
            return "##" + "".join(chr(ord(c) - _CONT_OFFSET) for c in token)
        return token[0] + "".join(chr(ord(c) - _CONT_OFFSET) for c in token[1:])

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for token, _id in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):  # BPE id order is deterministic
        vocab.setdefault(unshift(token), len(vocab))
    return vocab


def build_tiny_bert(
    corpus: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 128,
    max_position: int = 256,
    seed: int = 0,
) -> Path:
    """Corpus -> Path of a Hugging Face folder holding a randomly initialised tiny BertModel and a WordPiece
    tokenizer trained on the corpus (lowercasing BERT normaliser, BertPreTokenizer, specials [PAD] [UNK] [CLS]
    [SEP] [MASK] with ids 0..4). Loadable by AutoModel/AutoTokenizer.from_pretrained(out_dir).

    Deterministic (same corpus + args -> byte-identical vocab and weights); the global torch RNG is untouched.
    Written atomically: built in a temporary sibling folder, then moved into place (replacing an old folder).
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    texts = [t for t in corpus if not _is_missing(t)]
    if not texts:
        raise ValueError("build_tiny_bert: the corpus is empty")
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    vocab = _train_wordpiece_vocab(texts, vocab_size)  # token -> id, specials 0..4
    hf_tok = BertTokenizer(vocab=vocab, do_lower_case=True, strip_accents=None, model_max_length=max_position)

    # Randomly initialised encoder, seeded without touching the caller's RNG
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position,
        pad_token_id=vocab["[PAD]"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.eval()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        if not (tmp / "vocab.txt").exists():  # keep the plain vocabulary too (id order)
            inv = sorted(vocab.items(), key=lambda kv: kv[1])
            (tmp / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in inv), encoding="utf-8")
        if out_dir.exists():  # move the old folder aside first: os.replace cannot overwrite a non-empty folder
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
