"""`distrib prepare`: corpus -> tokenizer -> pre-tokenized shards + manifest, atomically."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distrib.config import DataConfig
from distrib.data.prepare_parts import MERGE_CHUNK_TOKENS, PartsFolder, plan, tokenize_parts
from distrib.data.shards import (
    DEFAULT_SHARD_TOKENS,
    ShardWriter,
    atomic_dir,
    find_damage,
    make_manifest,
    read_manifest,
    token_dtype,
    write_manifest,
)
from distrib.data.sources import SPLITS, STDLIB_FILTER_VERSION, Corpus, load_corpus
from distrib.data.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe
from distrib.data.verify import tidy_leftovers
from distrib.errors import DataError

BATCH_DOCUMENTS = 1000  # documents per encode_batch call: enough to keep the Rust threads busy


def build_tokenizer(cfg: DataConfig, corpus: Corpus, vocab_size: int) -> Tokenizer:
    """Load `cfg.tokenizer`, or train a byte-level BPE of `vocab_size` on the train split."""
    if not cfg.tokenizer:
        return train_bpe(_texts(corpus.batches("train")), vocab_size)
    return load_tokenizer(cfg.tokenizer, vocab_size)


def load_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    """The tokenizer `data.tokenizer` names, if the model can embed its vocabulary."""
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than "
            f"model.vocab_size = {vocab_size}; set model.vocab_size to at least "
            f"{tokenizer.vocab_size}"
        )
    return tokenizer


def _texts(batches: Iterator[list[str]]) -> Iterator[str]:
    for batch in batches:
        yield from batch


def write_split(
    corpus: Corpus,
    split: str,
    tokenizer: Tokenizer,
    writer: ShardWriter,
    order: np.ndarray | None = None,
) -> None:
    """Tokenize the documents of `split` in `order` and append them, each followed by EOS."""
    for batch in corpus.batches(split, order, BATCH_DOCUMENTS):
        encoded = tokenizer.encode_batch(batch)
        # One flat buffer per batch: a numpy append per document would dominate the run time.
        flat: list[int] = []
        for ids in encoded:
            flat += ids
            flat.append(tokenizer.eos_id)
        writer.append(np.array(flat, dtype=writer.dtype))


# Data keys that do not change the shards: the loader's, and how many processes tokenize.
_LOADER_ONLY = ("seq_len", "cross_document_attention", "num_proc")


def _recipe(cfg: DataConfig, vocab_size: int, seed: int) -> dict[str, Any]:
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _LOADER_ONLY}
    recipe = {"data": data, "requested_vocab_size": vocab_size, "seed": seed}
    if cfg.source == "":  # a new filter of the default corpus makes its datasets out of date
        recipe["stdlib_filter"] = STDLIB_FILTER_VERSION
    return recipe


def is_up_to_date(
    cfg: DataConfig, vocab_size: int, seed: int, log: Callable[[str], None] | None = None
) -> bool:
    """Whether cfg.dir already holds a complete dataset made from the same recipe whose shards
    pass the cheap check (sizes, spot digests); damage found is reported through `log`."""
    return holds_recipe(Path(cfg.dir), _recipe(cfg, vocab_size, seed), log)


def holds_recipe(
    dir: Path,
    recipe: dict[str, Any],
    log: Callable[[str], None] | None = None,
    more_problems: Callable[[dict[str, Any]], list[str]] | None = None,
) -> bool:
    """Whether `dir` holds a complete dataset whose manifest records `recipe` and whose shards
    (and whatever `more_problems` checks in its manifest) pass the cheap check; damage found is
    reported through `log`, since such a dataset is rebuilt."""
    try:
        manifest = read_manifest(dir)
    except DataError:
        return False
    if manifest.get("recipe") != recipe:
        return False
    itemsize = np.dtype(manifest["dtype"]).itemsize
    records = [r for split in manifest["splits"].values() for r in split["shards"]]
    problems = find_damage(dir, records, itemsize, manifest.get("spot_check"))
    if more_problems is not None:
        problems += more_problems(manifest)
    if problems and log is not None:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        log(
            f"{dir} was made from this recipe but is damaged, so it is rebuilt: "
            f"{'; '.join(problems[:3])}{more}"
        )
    return not problems


def prepare_dataset(
    cfg: DataConfig,
    vocab_size: int,
    seed: int,
    log: Callable[[str], None] = print,
    max_shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    task: tuple[int, int] | None = None,
    tokenizer_only: bool = False,
) -> Path:
    """Read the corpus, build the tokenizer, write shards + manifest + tokenizer.json to cfg.dir.

    Train documents are shuffled with `seed` so the packed stream mixes sources; val keeps the
    corpus order. Tokenizing happens in parts (`prepare_parts`), with `cfg.num_proc` processes;
    `task = (i, n)` tokenizes only the i-th of n shares of the parts and stops (a Slurm array
    task; the tokenizer must exist: `data.tokenizer`, or a run with `tokenizer_only`), and a
    later call without it merges. The folder appears (or replaces the old one) only once
    complete. A folder already made from the same recipe, and undamaged by the cheap check, is
    kept as it is unless `force`. Working folders that interrupted preparations left next to it
    are tidied first. Chat and preference data (`cfg.format`) are prepared by
    `examples.prepare_examples`; mixtures (`cfg.sources`) by `mixture.prepare_mixture`.
    """
    if cfg.streaming:
        log("data.streaming = true: nothing to prepare, the corpus is tokenized while training")
        return Path(cfg.dir)
    if cfg.sources:
        from distrib.data.mixture import prepare_mixture  # it imports this module

        return prepare_mixture(cfg, vocab_size, seed, log, force, max_shard_tokens)
    if cfg.format != "text":
        from distrib.data.examples import prepare_examples  # it imports this module

        return prepare_examples(cfg, vocab_size, seed, log, force, max_shard_tokens)
    final = Path(cfg.dir)
    tidy_leftovers(final, log)
    if not force and is_up_to_date(cfg, vocab_size, seed, log):
        log(f"{cfg.dir} is up to date (same corpus, tokenizer and seed); --force rebuilds it")
        return final
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    log(
        f"corpus: {corpus.description}; {len(corpus.train_ids)} train / "
        f"{len(corpus.val_ids)} val documents"
    )
    parts = PartsFolder(final, _recipe(cfg, vocab_size, seed))
    tokenizer = _parts_tokenizer(cfg, corpus, vocab_size, parts, task, log)
    if tokenizer_only:
        log(f"tokenizer saved in {parts.dir}; now tokenize (distrib prepare --task I --tasks N)")
        return parts.dir
    dtype = token_dtype(tokenizer.vocab_size)
    every = plan(corpus, seed)
    todo = [p for p in every if parts.record(p) is None]
    if task is not None:
        todo = [p for p in todo if p.number % task[1] == task[0]]
    if len(todo) < len(every) and task is None:
        log(f"resuming: {len(every) - len(todo)} of {len(every)} parts already in {parts.dir}")
    tokenize_parts(cfg, corpus, tokenizer, parts, todo, dtype, cfg.num_proc, log)
    if task is not None:
        log(
            f"task {task[0]} of {task[1]}: {len(todo)} parts tokenized into {parts.dir}; "
            "`distrib prepare` (without --task) merges them once every task has run"
        )
        return parts.dir
    splits: dict[str, list[dict[str, Any]]] = {}
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        for split in SPLITS:
            writer = ShardWriter(tmp, split, dtype, tokenizer.eos_id, max_shard_tokens)
            for part in (p for p in every if p.split == split):
                tokens = parts.tokens(part, dtype)
                for i in range(0, len(tokens), MERGE_CHUNK_TOKENS):
                    writer.append(tokens[i : i + MERGE_CHUNK_TOKENS])
            splits[split] = writer.close()
        tokenizer.save(tmp / TOKENIZER_FILE)
        manifest = make_manifest(
            dtype,
            tokenizer.vocab_size,
            tokenizer.eos_id,
            splits,
            eos_token=tokenizer.eos_token,
            tokenizer=TOKENIZER_FILE,
            source=corpus.description,
            data_config=dataclasses.asdict(cfg),
            seed=seed,
            recipe=_recipe(cfg, vocab_size, seed),
        )
        write_manifest(tmp, manifest)  # last: a folder with a manifest is a complete dataset
    parts.remove()
    seconds = time.perf_counter() - start
    counts = ", ".join(
        f"{k} {v['num_documents']} docs / {v['num_tokens']:,} tokens"
        for k, v in manifest["splits"].items()
    )
    log(f"prepared {final}: {counts}; vocab {tokenizer.vocab_size}; {seconds:.1f} s")
    return final


def _parts_tokenizer(
    cfg: DataConfig,
    corpus: Corpus,
    vocab_size: int,
    parts: PartsFolder,
    task: tuple[int, int] | None,
    log: Callable[[str], None],
) -> Tokenizer:
    """The tokenizer every part is made with: the one saved with the parts, else built (loaded
    from data.tokenizer, or trained) and saved there. A task of a split preparation does not
    train one: tasks training at once could each save another."""
    saved = parts.tokenizer()
    if saved is not None:
        return saved
    if task is not None and not cfg.tokenizer:
        raise DataError(
            f"distrib prepare --task: no tokenizer in {parts.dir} yet. Train it once first "
            "(distrib prepare --tokenizer-only with the same config), or set data.tokenizer"
        )
    tokenizer = build_tokenizer(cfg, corpus, vocab_size)
    parts.save_tokenizer(tokenizer)
    return tokenizer
