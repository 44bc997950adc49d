"""The prepared format (written by `python -m simcrop.prepare`, see docs/data.md) and its training dataset.

A prepared folder holds:
    prepare.json                  format version, settings (spacing, HU clip, text encoder, max lengths)
    manifest.jsonl                one JSON object per prepared item (paths relative to the folder, sizes, sha256)
    rejects.jsonl                 one JSON object per rejected input: name, split, source, stage, reason
    volumes/<split>/<name>.npy    int16 [X, Y, Z] RAS+, C-order, HU clipped to [-1000, 1000]
    masks/<split>/<name>.<mask>.npy   uint8/int16 [X, Y, Z] (same grid as the volume), when the input had masks
    text/<split>/<name>.npz       findings_ids, sentence_ids, report_ids: int32 [n] without padding
    feats/<split>/<name>.npy      float16 [Lf, H]: the frozen text encoder's token features of the findings
    text_corpus.json              the report texts tiny-bert was built from (only for --text-encoder tiny-bert)

`PreparedPretrainDataset` is a drop-in for `PretrainDataset`: both make their samples with the one
`simcrop.data.sample.SampleBuilder` (same keys, shapes and per-(seed, epoch, index) randomness by construction);
here the text tensors may come from the cache, adding `findings_feats` [Lf, H] float32, when the cached tokens and
features fit the text encoder and the preset's lengths.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
import numpy as np
import torch
from torch.utils.data import Dataset

from simcrop.data.augment import check_fits
from simcrop.data.errors import DataError
from simcrop.data.sample import SampleBuilder, SampleSpec, tokenize_text

FORMAT = "simcrop-prepared"
FORMAT_VERSION = 1
INFO_FILE, MANIFEST_FILE, REJECTS_FILE, CORPUS_FILE = "prepare.json", "manifest.jsonl", "rejects.jsonl", "text_corpus.json"


# ---------------------------------------------------------------------------------------------------------------
# files: checksums and JSON lines
# ---------------------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(root: Path, rec: dict | None, full: bool = True) -> str | None:
    """None when root/rec['file'] exists with rec['bytes'] bytes (and rec['sha256'] when full), else why not."""
    if not rec or "file" not in rec:
        return "no record"
    path = root / rec["file"]
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path}: missing"
    if size != rec.get("bytes"):
        return f"{path}: {size} bytes, manifest says {rec.get('bytes')}"
    if full and sha256_file(path) != rec.get("sha256"):
        return f"{path}: checksum differs from the manifest"
    return None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {n} is not JSON ({exc.msg})") from None
    return rows


def is_prepared(path: str | Path) -> bool:
    """True for a folder written by `python -m simcrop.prepare`."""
    p = Path(path)
    return (p / INFO_FILE).is_file() and (p / MANIFEST_FILE).is_file()


def read_prepared(path: str | Path) -> tuple[dict, list[dict]]:
    """(prepare.json, manifest entries) of a prepared folder; DataError naming the folder when it is not one."""
    root = Path(path)
    if not is_prepared(root):
        raise DataError(f"{root}: not a prepared folder (no {INFO_FILE} + {MANIFEST_FILE}); "
                        f"run python -m simcrop.prepare --src ... --out {root}")
    info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise DataError(f"{root / INFO_FILE}: format {info.get('format')} v{info.get('version')}, "
                        f"this code reads {FORMAT} v{FORMAT_VERSION}; prepare the data again")
    return info, read_jsonl(root / MANIFEST_FILE)


def prepared_corpus(path: str | Path, split: str = "train") -> list[str]:
    """The report texts a tiny-bert text encoder is built from: the corpus prepare used (text_corpus.json), else
    'findings impression' of the split's prepared items in manifest order (as train.report_corpus does)."""
    root = Path(path)
    if (root / CORPUS_FILE).is_file():
        return json.loads((root / CORPUS_FILE).read_text(encoding="utf-8"))
    _, entries = read_prepared(root)
    return [f"{e['findings']} {e['impression']}".strip() for e in entries if e["split"] == split]


# ---------------------------------------------------------------------------------------------------------------
# the training dataset
# ---------------------------------------------------------------------------------------------------------------
def _pad(a: np.ndarray, n: int, value: int = 0) -> torch.Tensor:
    out = torch.full((n,), value, dtype=torch.long)
    out[: len(a)] = torch.from_numpy(np.asarray(a, dtype=np.int64))
    return out


class PreparedPretrainDataset(Dataset):
    """A prepared folder's split -> pre-training samples, indexed by (index, epoch) like `PretrainDataset`.

    Sample keys: volume [1, X, Y, Z] float32 in [-1, 1] (+ shift), mask_noise [N], findings_ids / findings_mask /
    sentence_ids [Lf], report_ids / report_mask / mlm_labels [Lr], index [], and findings_feats [Lf, H] float32
    when cached features are used. Cached tokens and features are used when `encoder_name` (FrozenTextEncoder.name)
    is the one prepare recorded and the spec's findings_max_len / report_max_len / max_sentences are the prepared
    ones; otherwise the reports are tokenised here (use_cache='require' raises instead, 'off' never uses them).
    """

    def __init__(self, prepared_dir: str | Path, tokenizer, spec: SampleSpec, train: bool = True,
                 split: str | None = None, encoder_name: str | None = None, use_cache: str = "auto", log=None):
        if use_cache not in ("auto", "require", "off"):
            raise ValueError(f"use_cache must be auto, require or off, got {use_cache!r}")
        self.root = Path(prepared_dir)
        self.info, entries = read_prepared(self.root)
        self.split = split or ("train" if train else "valid")
        self.items = [e for e in entries if e["split"] == self.split]
        if not self.items:
            raise DataError(f"{self.root / MANIFEST_FILE}: no prepared item in split {self.split!r}")
        self.tokenizer, self.spec, self.train = tokenizer, spec, train
        self.builder = SampleBuilder(tokenizer, spec)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        for e in self.items:
            reason = check_fits(tuple(e["volume"]["shape"]), spec.img_size)
            if reason:
                raise DataError(f"{self.root / e['volume']['file']}: shape does not fit the preset: {reason}")
        why = self.cache_mismatch(encoder_name)
        if use_cache == "require" and why:
            raise DataError(f"{self.root}: cached text cannot be used: {why}")
        self.use_cache = use_cache != "off" and why is None
        if log is not None:
            log(f"prepared data {self.root} ({self.split}, {len(self.items)} volumes): "
                + ("cached tokens + findings features" if self.use_cache else f"tokenising here ({why or 'off'})"))
        if not self.use_cache:
            self._tokenise()

    def cache_mismatch(self, encoder_name: str | None) -> str | None:
        """None when cached tokens + features fit this encoder and spec, else the reason."""
        text = self.info.get("text") or {}
        if not text.get("encoder_id"):
            return "the folder was prepared without a text encoder"
        if encoder_name != text["encoder_id"]:
            return f"text encoder {encoder_name!r} is not the prepared {text['encoder_id']!r}"
        s = self.spec
        for key in ("findings_max_len", "report_max_len", "max_sentences"):
            if getattr(s, key) != text.get(key):
                return f"{key} {getattr(s, key)} differs from the prepared {text.get(key)}"
        missing = [e["name"] for e in self.items if not e.get("text") or not e.get("feats")]
        if missing:
            return f"{len(missing)} item(s) lack cached text (e.g. {missing[0]})"
        return None

    def _tokenise(self) -> None:
        self.texts = []  # per item: the unmasked text tensors (simcrop.data.sample.tokenize_text)
        for e in self.items:
            try:
                self.texts.append(tokenize_text(self.tokenizer, e["findings"], e["impression"], self.spec))
            except ValueError as exc:
                raise DataError(f"{self.root / MANIFEST_FILE}: {e['name']}: {exc}") from None

    def __len__(self) -> int:
        return len(self.items)

    def volume_path(self, index: int) -> Path:
        return self.root / self.items[index]["volume"]["file"]

    def load_volume(self, index: int) -> torch.Tensor:
        """The prepared volume int16 [X, Y, Z] (HU)."""
        path = self.volume_path(index)
        try:
            return torch.from_numpy(np.load(path))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read prepared volume ({exc})") from exc

    def text(self, index: int) -> dict[str, torch.Tensor]:
        """Unmasked text tensors: findings_ids, findings_mask, sentence_ids [Lf]; report_ids, report_mask [Lr];
        findings_feats [Lf, H] float32 when cached."""
        s, e = self.spec, self.items[index]
        if not self.use_cache:
            return self.texts[index]
        with np.load(self.root / e["text"]["file"]) as z:
            fid, sid, rid = z["findings_ids"], z["sentence_ids"], z["report_ids"]
        feats = np.load(self.root / e["feats"]["file"])  # [n, H] float16
        out = {
            "findings_ids": _pad(fid, s.findings_max_len, self.pad_id),  # [Lf]
            "findings_mask": torch.arange(s.findings_max_len) < len(fid),
            "sentence_ids": _pad(sid, s.findings_max_len),
            "report_ids": _pad(rid, s.report_max_len, self.pad_id),  # [Lr]
            "report_mask": torch.arange(s.report_max_len) < len(rid),
        }
        ff = torch.zeros(s.findings_max_len, feats.shape[1], dtype=torch.float32)  # [Lf, H], zero padding
        ff[: len(feats)] = torch.from_numpy(feats.astype(np.float32))
        out["findings_feats"] = ff
        return out

    def text_sample(self, index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Everything but the volume, drawing (after the volume's draws) MAE noise then the MLM mask from gen
        (SampleBuilder.text; the DALI loader pairs it with the volumes it makes)."""
        return self.builder.text(self.text(index), index, gen)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """(index, epoch) -> the sample (keys and shapes: simcrop.data.sample)."""
        index, epoch = key
        return self.builder(self.load_volume(index), self.text(index), index, epoch, self.train)


def build_prepared_data(cfg, text_encoder, root: str | Path, split: str = "train", log=None,
                        use_cache: str = "auto") -> PreparedPretrainDataset:
    """train.build_data for a prepared folder: the split's dataset, cached text used when it fits `text_encoder`
    (a FrozenTextEncoder: its tokenizer and name)."""
    return PreparedPretrainDataset(root, text_encoder.tokenizer, SampleSpec.from_config(cfg), train=split == "train",
                                   split=split, encoder_name=text_encoder.name, use_cache=use_cache, log=log)
