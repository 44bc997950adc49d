"""Manifests for `python -m simcrop.prepare`: a CSV (or TSV) or a JSONL file, one volume per row (docs/data.md).

`read_manifest(path)` -> `ManifestRow`s with canonical fields and the file line each row starts on. Column (CSV)
and key (JSONL) names match case-insensitively, CT-RATE's report columns are aliases; the CSV's delimiter
(`,` `;` tab) is taken from its header line and a UTF-8 byte-order mark (Excel's "CSV UTF-8") is read. A header
or key that is not understood stops the run at once: DataError with one line naming the file, the columns found
and the columns expected, raised before anything is written. A bad value in one row (an unparseable label, a
row with the wrong number of cells) becomes that row's `error`, with its file line.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from simcrop.data.errors import DataError

#: canonical field -> (accepted names, lower case: the canonical one first, then aliases), help text
FIELDS = {
    "volume": (("volume", "path", "volumename"),
               ".nii(.gz), .nrrd, .nhdr or a DICOM series folder\n(relative paths: to the manifest's folder)"),
    "findings": (("findings", "findings_en"), "report findings (empty: the row is rejected)"),
    "impression": (("impression", "impressions", "impressions_en"), "report impression (may be empty)"),
    "name": (("name",), "item name (default: the file name without suffix)"),
    "split": (("split",), "default train"),
    "labels": (("labels",), 'JSON object {"<label>": number} (CSV: a JSON cell)'),
    "masks": (("masks",), 'JSON object {"<mask>": path} (same grid as the volume)'),
    "mask": (("mask",), "one mask path (named 'mask')"),
}
REQUIRED = ("volume", "findings")
PREFIXES = {"label:": "labels", "mask:": "masks"}  # label:<name> = number, mask:<name> = path
#: CT-RATE report columns with no role in prepare: accepted and ignored (so its reports CSV's header passes)
IGNORED = ("clinicalinformation_en", "technique_en")
_SPELLING = {"volume": "volume", "path": "path", "volumename": "VolumeName", "findings_en": "Findings_EN",
             "impressions_en": "Impressions_EN", "impressions": "impressions"}
_ALIAS = {alias: canon for canon, (names, _) in FIELDS.items() for alias in names}
_DELIMITERS = (",", ";", "\t")
_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
SUFFIXES = (".csv", ".tsv", ".jsonl")


def expected_text() -> str:
    """The expected columns, for error messages: one line."""
    def one(canon):
        aliases = [_SPELLING.get(a, a) for a in FIELDS[canon][0][1:]]
        return f"{canon} (or {', '.join(aliases)})" if aliases else canon
    return (f"{', '.join(one(c) for c in REQUIRED)} [required]; "
            f"{', '.join(one(c) for c in FIELDS if c not in REQUIRED)}, label:<name>, mask:<name> [optional]; "
            f"case-insensitive")


@dataclass
class ManifestRow:
    line: int  # file line the row starts on (1 = the first line; CSV: the header is line 1)
    volume: str = ""
    findings: str = ""
    impression: str = ""
    name: str = ""
    split: str = ""
    labels: dict = field(default_factory=dict)  # label -> float
    masks: dict = field(default_factory=dict)  # mask name -> path (as written)
    error: str | None = None  # this row's problem (the row is rejected, the run goes on)


def _canonical(key: str) -> tuple[str, str] | None:
    """A column/key name -> (canonical field, sub-name for label:/mask:) or None when unknown; ('', '') ignored."""
    low = key.strip().lower()
    if low in _ALIAS:
        return _ALIAS[low], ""
    for prefix, canon in PREFIXES.items():
        if low.startswith(prefix) and len(low) > len(prefix):
            return canon, key.strip()[len(prefix):].strip()
    if low in IGNORED:
        return "", ""
    return None


def _map_names(names: list, where: str, what: str, found_note: str = "") -> dict[int, tuple[str, str]]:
    """Positions -> (canonical field, sub-name); DataError (one line) for unknown, duplicate or missing names."""
    mapping, seen, unknown, dups = {}, {}, [], []
    for i, n in enumerate(names):
        c = _canonical(n) if isinstance(n, str) else None
        if c is None:
            unknown.append(n)
            continue
        if c[0] and c in seen:
            dups.append(f"{seen[c]!r} and {n!r} both give {c[0]}{':' + c[1] if c[1] else ''}")
        seen.setdefault(c, n)
        mapping[i] = c
    missing = [r for r in REQUIRED if (r, "") not in seen]
    problems = []
    if unknown:
        problems.append(f"unknown {what}(s) {', '.join(repr(u) for u in unknown)}")
    if missing:
        problems.append(f"missing {what}(s) {', '.join(missing)}")
    if dups:
        problems.append("; ".join(dups))
    if problems:
        found = ", ".join(repr(n) for n in names) or "none"
        raise DataError(f"{where}: {'; '.join(problems)} ({what}s found{found_note}: {found}; "
                        f"expected: {expected_text()})")
    return mapping


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the manifest as UTF-8 "
                        f"(Excel: 'CSV UTF-8')") from None


def _row_value(row: ManifestRow, canon: str, sub: str, value, where: str) -> None:
    """Store one field of a row; a wrong type/value sets row.error (the first one wins)."""
    def bad(msg):
        row.error = row.error or f"{where}: {msg}"

    if canon in ("labels", "masks") and isinstance(value, str) and not sub:  # a CSV cell holding JSON
        if not value.strip():
            return
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return bad(f"{canon}: not a JSON object ({exc.msg}): {value[:60]!r}")
    if value is None or value == "":
        return
    if canon == "labels":
        items = {sub: value}.items() if sub else (value.items() if isinstance(value, dict) else None)
        if items is None:
            return bad(f"labels: expected an object {{label: number}}, got {type(value).__name__}")
        for k, v in items:
            try:
                if isinstance(v, bool) or not math.isfinite(float(v)):
                    raise ValueError
                row.labels[str(k)] = float(v)
            except (TypeError, ValueError):
                return bad(f"label {k!r}: {v!r} is not a number")
    elif canon in ("masks", "mask"):
        items = {sub or "mask": value}.items() if (sub or canon == "mask") else \
            (value.items() if isinstance(value, dict) else None)
        if items is None:
            return bad(f"masks: expected an object {{name: path}}, got {type(value).__name__}")
        for k, v in items:
            if not isinstance(v, str):
                return bad(f"mask {k!r}: expected a path, got {type(v).__name__}")
            if v:
                row.masks[str(k)] = v
    elif canon == "name" and isinstance(value, (int, float)) and not isinstance(value, bool):
        row.name = str(value)
    elif not isinstance(value, str):
        return bad(f"{canon}: expected text, got {type(value).__name__} {value!r}")
    else:
        setattr(row, canon, value.strip() if canon in ("volume", "name", "split") else value)


def _check_split(row: ManifestRow, where: str) -> None:
    if row.split and not _SPLIT.match(row.split):
        row.error = row.error or f"{where}: split {row.split!r} is not a plain name (letters, digits, _ or -)"


def _first_record(text: str, delimiter: str) -> list[str]:
    try:
        for rec in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            if any(c.strip() for c in rec):
                return rec
    except csv.Error:
        pass
    return []


def _delimiter(text: str) -> str:
    """The delimiter whose split of the header line gives the most known column names (ties: more columns, then
    the order , ; tab)."""
    def score(d):
        rec = _first_record(text, d)
        return sum(_canonical(c) is not None for c in rec), len(rec)
    return max(_DELIMITERS, key=lambda d: (score(d), -_DELIMITERS.index(d)))


def read_csv_manifest(path: Path) -> list[ManifestRow]:
    text = _decode(path)
    d = _delimiter(text)
    delim = "tab" if d == "\t" else repr(d)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=d)
    header, start = None, 1
    rows = []
    try:
        for rec in reader:
            line, start = start, reader.line_num + 1  # the record spans lines line .. reader.line_num
            if not any(c.strip() for c in rec):
                continue  # blank line
            if header is None:
                note = " (no , ; or tab splits the header)" if len(rec) == 1 else f" (split at {delim})"
                header, mapping = rec, _map_names(rec, f"{path}:{line}", "column", note)
                continue
            row = ManifestRow(line)
            where = f"{path}:{line}"
            if len(rec) != len(header):
                row.error = (f"{where}: {len(rec)} cells where the header has {len(header)} (an unquoted {delim} "
                             f"in a cell?)")
            for i, (canon, sub) in mapping.items():
                if canon and i < len(rec):  # (a short row: its missing cells stay empty)
                    _row_value(row, canon, sub, rec[i], where)
            _check_split(row, where)
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not a readable CSV ({exc})") from None
    if header is None:
        raise DataError(f"{path}: empty manifest (no header line; expected: {expected_text()})")
    return rows


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, dup))}")
    return dict(pairs)


def read_jsonl_manifest(path: Path) -> list[ManifestRow]:
    rows = []
    for n, line in enumerate(_decode(path).split("\n"), 1):  # not splitlines(): U+2028 may sit in a JSON string
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object {{\"volume\": ..., \"findings\": ...}}, "
                            f"got {type(obj).__name__}")
        keys = list(obj)
        mapping = _map_names(keys, where, "key")
        row = ManifestRow(n)
        for i, (canon, sub) in mapping.items():
            if canon:
                _row_value(row, canon, sub, obj[keys[i]], where)
        _check_split(row, where)
        rows.append(row)
    return rows


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """A .csv / .tsv / .jsonl manifest -> its rows (module docstring); DataError (one line) when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: a manifest must be {', '.join(SUFFIXES)}")
    rows = read_jsonl_manifest(path) if suffix == ".jsonl" else read_csv_manifest(path)
    if not rows:
        raise DataError(f"{path}: the manifest lists no volume")
    return rows


def format_help() -> str:
    """The manifest format for `prepare --help` (an argparse epilog; keep its line breaks)."""
    lines = ["manifest (--src a .csv, .tsv or .jsonl file, one volume per row):",
             f"  {'column':<12}{'also accepted (any case)':<29}meaning"]
    for canon, (names, meaning) in FIELDS.items():
        aliases = ", ".join(_SPELLING.get(a, a) for a in names[1:])
        first, *more = (("required: " if canon in REQUIRED else "") + meaning).split("\n")
        lines.append(f"  {canon:<12}{aliases:<29}{first}")
        lines += [f"  {'':<12}{'':<29}{m}" for m in more]
    lines += [
        f"  {'label:<x>':<12}{'':<29}one column per label: a number",
        f"  {'mask:<x>':<12}{'':<29}one column per mask: a path",
        "  CSV: UTF-8 (with or without a byte-order mark), header line first, delimiter , ; or tab (detected",
        "  from the header). JSONL: one JSON object per line with the same keys. An unknown or missing column",
        "  stops the run at once (exit 2) before anything in --out changes; CT-RATE's ClinicalInformation_EN",
        "  and Technique_EN are ignored. Errors name the file and its line (file:line).",
        "  example CSV:",
        "    volume,findings,impression,split,label:nodule",
        '    scans/case001.nii.gz,"Nodule in the right upper lobe. Heart normal.",Nodule.,train,1',
        "  example JSONL line:",
        '    {"volume": "scans/case001.nii.gz", "findings": "Nodule in the right upper lobe.", "labels": {"nodule": 1}}',
        "",
        "voxel size: a volume whose header gives a zero or missing spacing is rejected (\"missing spacing\" in",
        "rejects.jsonl) unless --assume-spacing X,Y,Z states it; nothing is read as 1 mm silently.",
        "",
        "exit codes: 0 done; 1 --strict and some input was rejected; 2 fatal (one line: simcrop.prepare: error: ...)",
    ]
    return "\n".join(lines)
