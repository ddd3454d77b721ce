"""Documents from a corpus, split into train / val.

The default corpus (`data.source == ""`) is the running interpreter's standard library source, one
document per `.py` file, split by file, without its generated data tables (`looks_like_table`).
Anything else goes through HF `datasets`: a local .txt/.jsonl/.json/.parquet file or folder, or a
hub dataset name, split by document index.
Both splits use a stable hash, so the val set is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distrib.config import DataConfig
from distrib.errors import DataError

SPLITS = ("train", "val")
# File extension -> HF `datasets` packaged builder.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Directories of the stdlib that are tests or third-party code, not the library itself.
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "idle_test"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Generated tables (the charmap codecs `encodings/cp*.py`, `pydoc_data/topics.py`,
# `html/entities.py`, `stringprep.py`, ...) are a fifth of the stdlib's bytes and, being
# repetitive, most of what a small model learns from it: the quick start's samples read like
# codec tables. They are recognised by their tokens: in a table, literals and the commas and
# colons between them are most of the code tokens (64% to 100% in CPython 3.11's stdlib), in
# ordinary modules a fifth (median 18%, rarely above 45%). Small files are kept whatever they
# hold: they weigh little, and a short `__init__.py` may be one docstring.
TABLE_LITERAL_SHARE = 0.6
TABLE_MIN_BYTES = 4096
# Part of the recipe of a default-corpus dataset: raise it when the filter changes, so that
# `distrib prepare` rebuilds the datasets made with the old one.
STDLIB_FILTER_VERSION = 1
# A Python tokenizer close enough for counting: comments, strings (any prefix, triple-quoted
# included), numbers, names, single characters. `tokenize` gives the same shares within 0.03
# on the stdlib but takes 6 s over it, more than the rest of `distrib prepare`; this takes 1 s.
_TOKEN = re.compile(
    r"#[^\n]*"
    r"""|[rRbBuUfF]{0,2}(?:'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\""""
    r"""|'(?:\\[\s\S]|[^'\\\n])*'|"(?:\\[\s\S]|[^"\\\n])*")"""
    r"|\d[\w.]*|\w+|[^\s\w]"
)


@dataclass
class Corpus:
    """All documents of a corpus and which of them are train and which val."""

    description: str
    texts: Sequence[str]  # a list for the default corpus, a lazy HF column otherwise
    train_ids: np.ndarray  # indices into `texts`
    val_ids: np.ndarray

    def ids(self, split: str) -> np.ndarray:
        """Indices of the documents of `split` ("train" or "val")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}': valid {SPLITS}")
        return self.train_ids if split == "train" else self.val_ids

    def batches(
        self, split: str, order: np.ndarray | None = None, batch_size: int = 1000
    ) -> Iterator[list[str]]:
        """Documents of `split` in lists of `batch_size`, in `order` (a permutation of the split)."""
        ids = self.ids(split)
        if order is not None:
            ids = ids[order]
        for i in range(0, len(ids), batch_size):
            chunk = ids[i : i + batch_size]
            if isinstance(self.texts, list):
                yield [self.texts[j] for j in chunk]
            else:
                yield list(self.texts[chunk.tolist()])  # one arrow gather per batch, not per doc


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Documents of `split` ("train" or "val") of the corpus `cfg` names, in corpus order."""
    corpus = load_corpus(cfg)
    for batch in corpus.batches(split):
        yield from batch


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus `cfg.source` names (capped at `cfg.max_documents`) and split it."""
    if cfg.source == "":
        return _stdlib_corpus(cfg)
    if cfg.source == PYTHON_DOCS:
        return _python_docs_corpus(cfg)
    return _hf_corpus(cfg)


# English prose every CPython has: the documentation of the language's keywords, statements and
# special methods that `help()` shows, shipped as the stdlib module pydoc_data.topics (left out of
# the default corpus as a data table). A second source unlike code, for mixtures on any machine.
PYTHON_DOCS = "builtin:python-docs"


def _python_docs_corpus(cfg: DataConfig) -> Corpus:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            f"data.source = {PYTHON_DOCS}: this Python has no pydoc_data module (some "
            "distributions package it apart, e.g. Debian's libpython3-stdlib)"
        ) from None
    keys = sorted(topics)
    if cfg.max_documents:
        keys = keys[: cfg.max_documents]
    texts = [topics[k] for k in keys]
    train, val = split_by_key(keys, cfg.val_fraction)
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(
        f"python {version} documentation topics, {len(keys)} documents", texts, train, val
    )


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key` (Python's hash() is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_key(keys: Sequence[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and val indices: key i is val when its stable hash is below `val_fraction`.

    At least one document goes to each side (the lowest hash to val, the highest to train), so a
    small corpus still has something to validate on.
    """
    if len(keys) < 2:
        raise DataError(
            f"the corpus has {len(keys)} document(s); need at least 2 to hold one out for "
            "validation (for one .txt file, set data.text_sample_by to paragraph or line)"
        )
    h = np.array([stable_fraction(k) for k in keys])
    is_val = h < val_fraction
    if not is_val.any():
        is_val[np.argmin(h)] = True
    if is_val.all():
        is_val[np.argmax(h)] = False
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---- the default corpus -------------------------------------------------------------------------


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files (tests and site-packages excluded), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into test and third-party trees.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test")
        )
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def literal_share(text: str) -> float:
    """The share of literals (strings, numbers) and of `,` and `:` among the code tokens of a
    Python source, comments left out: about 0.2 for code, above 0.6 for a data table."""
    code = literal = 0
    for token in _TOKEN.findall(text):
        first = token[0]
        if first == "#":
            continue
        code += 1
        # A string token ends in a quote (whatever its prefix); no other token does.
        if first.isdigit() or first in ",:" or token[-1] in "'\"":
            literal += 1
    return literal / code if code else 0.0


def looks_like_table(text: str) -> bool:
    """Whether a Python source is a generated data table rather than code (see TABLE_*)."""
    return len(text) >= TABLE_MIN_BYTES and literal_share(text) > TABLE_LITERAL_SHARE


def stdlib_documents(root: Path, max_documents: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Keys (paths relative to `root`) and texts of the non-empty stdlib files that are not data
    tables, the first `max_documents` of them if set; and the keys of the tables left out."""
    keys, texts, tables = [], [], []
    for path in stdlib_files(root):
        if max_documents and len(texts) == max_documents:
            break
        text = _decode(path.read_bytes(), path)
        key = path.relative_to(root).as_posix()
        if looks_like_table(text):
            tables.append(key)
        elif text.strip():
            keys.append(key)
            texts.append(text)
    return keys, texts, tables


def _stdlib_corpus(cfg: DataConfig) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    keys, texts, tables = stdlib_documents(root, cfg.max_documents)
    if not texts:
        raise DataError(f"no Python source files found under {root}")
    train, val = split_by_key(keys, cfg.val_fraction)
    version = ".".join(map(str, sys.version_info[:3]))
    description = (
        f"python {version} stdlib ({root}), {len(texts)} files "
        f"({len(tables)} generated data tables left out)"
    )
    return Corpus(description, texts, train, val)


# ---- local files and hub datasets through HF datasets -------------------------------------------


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); convert the file to UTF-8"
        ) from None


def looks_like_hub_name(source: str) -> bool:
    """`owner/name` or `name`: no file extension, no leading ./ or /, at most one slash."""
    if source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if Path(source).suffix.lower() in BUILDERS:
        return False
    return bool(_HUB_NAME.match(source))


def local_files(path: Path) -> tuple[str, list[Path]]:
    """The HF builder name and the data files of a local file or folder (searched recursively)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"{path}: no {'/'.join(BUILDERS)} files found in this folder")
    kinds = {BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        examples = {BUILDERS[p.suffix.lower()]: p for p in files}
        listing = ", ".join(f"{k}: {p}" for k, p in sorted(examples.items()))
        raise DataError(f"{path}: mixed file kinds ({listing}); put one kind per folder")
    return kinds.pop(), files


def _hf_corpus(cfg: DataConfig) -> Corpus:
    path = Path(cfg.source).expanduser()
    if path.exists():
        builder, files = local_files(path)
        for f in files:
            validate_file(f, builder, cfg.text_field)
        dataset = _load_local(builder, files, cfg)
        where = f"{builder} files at {path}"
        field = "text" if builder == "text" else cfg.text_field  # the text builder's one column
    elif looks_like_hub_name(cfg.source):
        dataset = _load_hub(cfg)
        where = f"hub dataset {cfg.source} (split {cfg.hub_split})"
        field = cfg.text_field
    else:
        raise DataError(f"not found: {cfg.source}")
    texts, keep = _text_column(dataset, field, where)
    if cfg.max_documents:
        keep = keep[keep < cfg.max_documents]
    if len(keep) == 0:
        raise DataError(f"empty corpus: {where} holds no non-empty documents")
    # Split by the document's index in the source (before dropping empty ones), so adding or
    # cleaning blank records elsewhere does not move documents between train and val.
    train, val = split_by_key([str(i) for i in keep], cfg.val_fraction)
    return Corpus(f"{where}, {len(keep)} documents", texts, keep[train], keep[val])


def _load_local(builder: str, files: list[Path], cfg: DataConfig) -> Any:
    import datasets  # imported here: the training path never needs it and it is slow to import

    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["sample_by"] = cfg.text_sample_by
    elif builder == "parquet":
        kwargs["columns"] = [cfg.text_field]  # the other columns are never read
    data_files = [str(f) for f in files]
    return datasets.load_dataset(builder, data_files=data_files, split="train", **kwargs)


def _load_hub(cfg: DataConfig) -> Any:
    import datasets

    split = cfg.hub_split
    if cfg.max_documents:
        split = f"{split}[:{cfg.max_documents}]"
    try:
        return datasets.load_dataset(cfg.source, split=split)
    except Exception as err:  # network, auth and not-found errors all land here
        raise DataError(f"could not load hub dataset '{cfg.source}': {err}") from err


def _text_column(dataset: Any, field: str, where: str) -> tuple[Sequence[str], np.ndarray]:
    """The text column (lazy) and the indices of its non-empty documents."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if field not in dataset.column_names:
        raise DataError(
            f"{where}: no field '{field}' (data.text_field); fields: {dataset.column_names}"
        )
    column = dataset.data.column(field)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise DataError(f"{where}: field '{field}' holds {column.type}, not text")
    non_empty = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(column), ""), False)
    keep = np.flatnonzero(non_empty.to_numpy(zero_copy_only=False))
    return dataset[field], keep


def validate_file(path: Path, builder: str, text_field: str) -> None:
    """Check a local file before HF reads it, and name the file and line of the first problem.

    HF `datasets` reports bad UTF-8 or a bad JSON line without saying where it is, which is
    useless on a corpus of millions of lines; a streaming pass costs one read of the file.
    """
    if builder == "text":
        _validate_text(path)
    elif builder == "json":
        _validate_json(path, text_field)
    else:
        _validate_parquet(path, text_field)


def _validate_text(path: Path) -> None:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: line {number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                    f"column {err.start + 1}); convert the file to UTF-8"
                ) from None


def _check_record(record: Any, field: str, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise DataError(
            f"{where}: no field '{field}' (data.text_field); fields: {sorted(record)[:10]}"
        )
    if not isinstance(record[field], str):
        raise DataError(
            f"{where}: field '{field}' is {type(record[field]).__name__}, expected a string"
        )


def _validate_json(path: Path, field: str) -> None:
    _validate_text(path)
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # a .json file holding one array of records, not JSON lines
        try:
            records = json.loads(path.read_bytes())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
        for i, record in enumerate(records):
            _check_record(record, field, f"{path}: record {i}")
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: invalid JSON: {err.msg}") from None
            _check_record(record, field, f"{path}: line {number}")


def _validate_parquet(path: Path, field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file: {err}") from None
    if field not in schema.names:
        raise DataError(f"{path}: no field '{field}' (data.text_field); fields: {schema.names}")
    kind = schema.field(field).type
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        raise DataError(f"{path}: field '{field}' holds {kind}, not text")
