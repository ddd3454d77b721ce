"""A weighted mixture's datasets: one tokenizer for all sources, one ordinary dataset per source.

    <data.dir>/tokenizer.json                  the shared tokenizer (what runs copy)
    <data.dir>/tokenizer-<sha256[:16]>.json    the same file, named by its content: each source
                                               dataset's recipe names it, so a new tokenizer
                                               makes every source dataset out of date
    <data.dir>/sources/<name>/                 an ordinary dataset (manifest, shards), made by
                                               `prepare_dataset` with that tokenizer
    <data.dir>/mixture.json                    written last: the mixture's recipe and sources

The tokenizer (unless `data.tokenizer` names one) is a byte-level BPE trained on the training
documents of every source, in the order the sources are listed, so that no source is split into
tokens made for another. Sources whose recipe did not change are not prepared again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.config import DataConfig
from distrib.config.mixture import MixtureSource, parse_sources
from distrib.data.shards import DEFAULT_SHARD_TOKENS, TokenShards
from distrib.data.tokenizer import TOKENIZER_FILE, train_bpe
from distrib.errors import DataError

MIXTURE_FILE = "mixture.json"


def source_dir(data: DataConfig, name: str) -> Path:
    return Path(data.dir) / "sources" / name


def source_config(data: DataConfig, source: MixtureSource, tokenizer: str) -> DataConfig:
    """The DataConfig that prepares (and opens) one source as an ordinary dataset."""
    return dataclasses.replace(
        data,
        source=source.source,
        text_field=source.text_field,
        dir=str(source_dir(data, source.name)),
        tokenizer=tokenizer,
        sources=[],
        weight_schedule=[],
    )


def _recipe(data: DataConfig, vocab_size: int, seed: int) -> dict[str, Any]:
    keys = ("text_sample_by", "hub_split", "tokenizer", "val_fraction", "max_documents")
    return {
        # Weights and caps are the loader's: changing them needs no new datasets.
        "sources": [[s.name, s.source, s.text_field] for s in parse_sources(data.sources)],
        "data": {k: getattr(data, k) for k in keys},
        "requested_vocab_size": vocab_size,
        "seed": seed,
    }


def _texts(data: DataConfig, sources: list[MixtureSource]) -> Iterator[str]:
    from distrib.data.sources import load_corpus

    for source in sources:
        corpus = load_corpus(source_config(data, source, ""))
        for batch in corpus.batches("train"):
            yield from batch


def _shared_tokenizer(
    data: DataConfig, sources: list[MixtureSource], vocab_size: int, log: Callable[[str], None]
) -> Path:
    """Build (or load) the tokenizer; write it under its content name; returns that path."""
    from distrib.data.prepare import load_tokenizer  # it imports this module

    folder = Path(data.dir)
    folder.mkdir(parents=True, exist_ok=True)
    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer, vocab_size)
    else:
        log(
            f"training a {vocab_size}-token BPE on the training documents of {len(sources)} sources"
        )
        tokenizer = train_bpe(_texts(data, sources), vocab_size)
    tmp = folder / f"{TOKENIZER_FILE}.tmp{os.getpid()}"
    tokenizer.save(tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]
    named = folder / f"tokenizer-{digest}.json"
    os.replace(tmp, named)
    (folder / f"{TOKENIZER_FILE}.tmp").write_bytes(named.read_bytes())
    os.replace(folder / f"{TOKENIZER_FILE}.tmp", folder / TOKENIZER_FILE)
    return named


def is_up_to_date(
    data: DataConfig, vocab_size: int, seed: int, log: Callable[[str], None] | None = None
) -> bool:
    """Whether data.dir holds this mixture, complete, with every source dataset undamaged."""
    from distrib.data.prepare import is_up_to_date as dataset_up_to_date

    try:
        doc = json.loads((Path(data.dir) / MIXTURE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if doc.get("recipe") != _recipe(data, vocab_size, seed):
        return False
    return all(
        dataset_up_to_date(
            source_config(data, s, str(Path(data.dir) / doc["tokenizer"])), vocab_size, seed, log
        )
        for s in parse_sources(data.sources)
    )


def prepare_mixture(
    data: DataConfig,
    vocab_size: int,
    seed: int,
    log: Callable[[str], None] = print,
    force: bool = False,
    max_shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> Path:
    """Prepare every source of the mixture in `data.dir` (see the module docstring)."""
    from distrib.data.prepare import prepare_dataset  # it imports this module

    folder = Path(data.dir)
    if not force and is_up_to_date(data, vocab_size, seed, log):
        log(f"{folder} is up to date (same sources, tokenizer and seed); --force rebuilds it")
        return folder
    sources = parse_sources(data.sources)
    (folder / MIXTURE_FILE).unlink(missing_ok=True)  # incomplete until written again
    tokenizer = _shared_tokenizer(data, sources, vocab_size, log)
    for source in sources:
        log(f"source {source.name}:")
        prepare_dataset(
            source_config(data, source, str(tokenizer)),
            vocab_size,
            seed,
            log,
            max_shard_tokens,
            force,
        )
    doc = {
        "recipe": _recipe(data, vocab_size, seed),
        "tokenizer": tokenizer.name,
        "sources": {s.name: str(source_dir(data, s.name)) for s in sources},
    }
    tmp = folder / f"{MIXTURE_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MIXTURE_FILE)  # last: a folder with it is a complete mixture
    log(f"prepared the mixture {folder}: sources {', '.join(s.name for s in sources)}")
    return folder


@dataclass
class MixtureShards:
    """One split of every source of a prepared mixture."""

    split: str
    sources: dict[str, TokenShards]

    @property
    def vocab_size(self) -> int:
        return max(s.vocab_size for s in self.sources.values())

    @property
    def eos_id(self) -> int:
        return next(iter(self.sources.values())).eos_id

    @classmethod
    def open(cls, data: DataConfig, split: str) -> MixtureShards:
        """Open `split` of each configured source; DataError if the mixture is not prepared."""
        path = Path(data.dir) / MIXTURE_FILE
        if not path.is_file():
            raise DataError(
                f"{data.dir} holds no prepared mixture ({MIXTURE_FILE} missing): run distrib "
                "prepare with this config"
            )
        doc = json.loads(path.read_text(encoding="utf-8"))
        names = [s.name for s in parse_sources(data.sources)]
        if sorted(doc["sources"]) != sorted(names):
            raise DataError(
                f"{path} was prepared for sources {sorted(doc['sources'])}, the config names "
                f"{sorted(names)}: run distrib prepare with this config"
            )
        shards = {n: TokenShards.open(source_dir(data, n), split) for n in names}
        if len({s.eos_id for s in shards.values()}) > 1:
            raise DataError(
                f"the sources of {data.dir} do not share one tokenizer: distrib prepare --force"
            )
        return cls(split, shards)


def verify_mixture(data: DataConfig, log: Callable[[str], None] = print) -> None:
    """`distrib prepare --verify` of a mixture: every source dataset's full hashes."""
    from distrib.data.verify import verify_dataset

    for source in parse_sources(data.sources):
        verify_dataset(source_dir(data, source.name), log)
