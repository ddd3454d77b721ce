"""`distrib prepare` for chat and preference data: records -> examples -> shards + manifest.

A chat or preference dataset stores each split as three things, all written atomically with the
manifest last like a text dataset (`shards.atomic_dir`):
- the token stream `<split>-NNNNN.bin`: every sequence's token ids, one after the other;
- the mask stream `<split>_mask-NNNNN.bin`, of the same dtype: 1 where the token is a target;
- `<split>-index.npy`: int64 [sequences, 2], each sequence's length and label targets (target
  tokens after the first, which no input predicts); its sha256 is in the manifest.
A chat example is one sequence; a preference pair is two, the chosen (prompt + chosen
response) then the rejected. Train examples are stored in an order shuffled with the seed, val
examples in corpus order. Records too long for data.seq_len are dropped here, so a chat
dataset's recipe holds seq_len, unlike a text dataset's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distrib.config import DataConfig
from distrib.data.chat import (
    TEMPLATE_FILE,
    BadRecords,
    ChatEncoder,
    ChatTemplate,
    Encoded,
    Message,
    Record,
    message_texts,
    parse_records,
    read_records,
)
from distrib.data.demo_pairs import DEMO_VERSION, demo_records
from distrib.data.example_loader import index_file, index_problem
from distrib.data.prepare import build_tokenizer, holds_recipe
from distrib.data.shards import (
    DEFAULT_SHARD_TOKENS,
    ShardWriter,
    atomic_dir,
    full_digest,
    make_manifest,
    token_dtype,
    write_manifest,
)
from distrib.data.sources import SPLITS, STDLIB_FILTER_VERSION, Corpus, split_by_key
from distrib.data.tokenizer import TOKENIZER_FILE, Tokenizer
from distrib.data.verify import tidy_leftovers
from distrib.errors import DataError

# Data keys that only the loader reads: changing them needs no new dataset.
_LOADER_ONLY = ("cross_document_attention", "packing")
WRITE_BATCH_TOKENS = 1 << 20  # tokens gathered before each append to the shard writers

Parsed = list[tuple[Record, list[list[Message]]]]


def recipe(cfg: DataConfig, vocab_size: int, seed: int) -> dict[str, Any]:
    """What a chat or preference dataset is made from; a dataset with another is out of date."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _LOADER_ONLY}
    made: dict[str, Any] = {"data": data, "requested_vocab_size": vocab_size, "seed": seed}
    if cfg.source == "":
        made["stdlib_filter"] = STDLIB_FILTER_VERSION
        made["demo_pairs"] = DEMO_VERSION
    template = Path(cfg.chat_template).expanduser()
    if cfg.chat_template not in ("auto", "default") and template.is_file():
        made["chat_template_sha256"] = full_digest(template)  # edited in place, still new
    return made


def is_up_to_date(
    cfg: DataConfig, vocab_size: int, seed: int, log: Callable[[str], None] | None = None
) -> bool:
    """Whether cfg.dir holds a complete dataset of the same recipe whose shards and indexes
    pass the cheap check; damage found is reported through `log`."""
    dir = Path(cfg.dir)

    def index_problems(manifest: dict[str, Any]) -> list[str]:
        indexes = manifest.get("examples", {}).values()
        return [p for info in indexes if (p := index_problem(dir, info))]

    return holds_recipe(dir, recipe(cfg, vocab_size, seed), log, index_problems)


def prepare_examples(
    cfg: DataConfig,
    vocab_size: int,
    seed: int,
    log: Callable[[str], None] = print,
    force: bool = False,
    max_shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> Path:
    """Read the records (or make the demonstration pairs), build the tokenizer, encode the
    examples and write the dataset to cfg.dir (see the module docstring); kept as it is when
    already made from the same recipe, unless `force`."""
    if cfg.format not in ("chat", "preference"):
        raise ValueError(f"prepare_examples reads chat or preference data, not {cfg.format}")
    final = Path(cfg.dir)
    tidy_leftovers(final, log)
    if not force and is_up_to_date(cfg, vocab_size, seed, log):
        log(f"{cfg.dir} is up to date (same records, tokenizer and seed); --force rebuilds it")
        return final
    start = time.perf_counter()
    description, parsed, bad = _read(cfg, seed, log)
    splits = _split(parsed, cfg.val_fraction, description)
    log(f"records: {description}; {len(splits['train'])} train / {len(splits['val'])} val")
    texts = list(message_texts(c for _, convs in splits["train"] for c in convs))
    corpus = Corpus(description, texts, np.arange(len(texts)), np.arange(0))
    tokenizer = build_tokenizer(cfg, corpus, vocab_size)  # trained on the train messages
    template = ChatTemplate.build(cfg.chat_template, tokenizer, cfg.tokenizer)
    encoder = ChatEncoder(tokenizer, template, cfg.seq_len, cfg.format)
    dtype = token_dtype(tokenizer.vocab_size)
    examples = {}
    for split in SPLITS:
        # Held in memory in the stored dtype (about 3 bytes a token) to be written shuffled.
        encoded = encoder.encode(splits[split], bad)
        examples[split] = [[(ids.astype(dtype), mask) for ids, mask in seqs] for _, seqs in encoded]
        if not examples[split]:
            raise DataError(f"{description}: no {split} example left; see the records reported")
    manifest = _write(
        final,
        examples,
        tokenizer,
        template,
        max_shard_tokens,
        kind=cfg.format,
        seq_len=cfg.seq_len,
        skipped_records=bad.count,
        source=description,
        data_config=dataclasses.asdict(cfg),
        seed=seed,
        recipe=recipe(cfg, vocab_size, seed),
    )
    log(_summary(final, manifest, time.perf_counter() - start))
    return final


def _summary(final: Path, manifest: dict[str, Any], seconds: float) -> str:
    """The closing log line: counts per split, records left out, vocabulary, template."""
    what = "examples" if manifest["kind"] == "chat" else "pairs"
    counts = ", ".join(
        f"{split} {info['num_examples']} {what} / {info['num_tokens']:,} tokens / "
        f"{info['num_targets']:,} supervised"
        for split, info in manifest["examples"].items()
    )
    skipped = manifest["skipped_records"]
    left_out = f"{skipped} bad records skipped"
    if manifest["data_config"]["source"] == "":
        left_out = f"{skipped} functions left out (too long for data.seq_len)"
    return (
        f"prepared {final}: {counts}; {left_out}; vocab {manifest['vocab_size']}; template "
        f"{manifest['chat_template']['source']}; {seconds:.1f} s"
    )


def _read(cfg: DataConfig, seed: int, log: Callable[[str], None]) -> tuple[str, Parsed, BadRecords]:
    """A description of the records, the well-formed ones with their conversations, and where
    the bad ones went (and go, once encoding finds more)."""
    if cfg.source == "":
        description, records = demo_records(cfg, seed)
        # Made, not given: the functions too long for seq_len are left out and only counted.
        bad = BadRecords("skip", log, max_reported=0)
    else:
        description, records = f"{cfg.format} records from {cfg.source}", read_records(cfg)
        bad = BadRecords(cfg.bad_records, log)
    return description, list(parse_records(records, cfg.format, bad)), bad


def _split(parsed: Parsed, val_fraction: float, description: str) -> dict[str, Parsed]:
    """Train and val records, split by key (a stdlib file, a record's file and line)."""
    keys = sorted({record.key for record, _ in parsed})
    if len(keys) < 2:
        raise DataError(
            f"{description}: {len(parsed)} good record(s) under {len(keys)} key(s); need at "
            "least 2 to hold one out for validation"
        )
    _, val_ids = split_by_key(keys, val_fraction)
    val = {keys[i] for i in val_ids}
    return {
        "train": [item for item in parsed if item[0].key not in val],
        "val": [item for item in parsed if item[0].key in val],
    }


def _write(
    final: Path,
    examples: dict[str, list[list[Encoded]]],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_shard_tokens: int,
    seed: int,
    **extra: Any,
) -> dict[str, Any]:
    """Write the dataset; its manifest holds `extra` besides what is written."""
    dtype = token_dtype(tokenizer.vocab_size)
    streams: dict[str, list[dict[str, Any]]] = {}
    infos = {}
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        for split, found in examples.items():
            order = np.arange(len(found))
            if split == "train":
                order = np.random.default_rng(seed).permutation(len(found))
            tokens = ShardWriter(tmp, split, dtype, tokenizer.eos_id, max_shard_tokens)
            # The mask stream has no EOS: the dtype's largest value never occurs in it.
            masks = ShardWriter(tmp, f"{split}_mask", dtype, np.iinfo(dtype).max, max_shard_tokens)
            index = _write_streams([found[i] for i in order], tokens, masks)
            streams[split], streams[f"{split}_mask"] = tokens.close(), masks.close()
            np.save(tmp / index_file(split), index)
            infos[split] = {
                "index": index_file(split),
                "index_sha256": full_digest(tmp / index_file(split)),
                "num_examples": len(found),
                "num_sequences": len(index),
                "num_tokens": int(index[:, 0].sum()),
                "num_targets": int(index[:, 1].sum()),
                "max_length": int(index[:, 0].max()),
            }
        tokenizer.save(tmp / TOKENIZER_FILE)
        (tmp / TEMPLATE_FILE).write_text(template.text, encoding="utf-8")
        manifest = make_manifest(
            dtype,
            tokenizer.vocab_size,
            tokenizer.eos_id,
            streams,
            examples=infos,
            # Unlike a text dataset's, these count the token streams (not the masks) and the
            # examples; `splits` counts EOS tokens as documents.
            num_tokens=sum(info["num_tokens"] for info in infos.values()),
            num_documents=sum(info["num_examples"] for info in infos.values()),
            eos_token=tokenizer.eos_token,
            tokenizer=TOKENIZER_FILE,
            chat_template={"source": template.source, "file": TEMPLATE_FILE},
            seed=seed,
            **extra,
        )
        write_manifest(tmp, manifest)  # last: a folder with a manifest is a complete dataset
    return manifest


def _write_streams(
    examples: list[list[Encoded]], tokens: ShardWriter, masks: ShardWriter
) -> np.ndarray:
    """Append the sequences of `examples` to the two writers; their index [sequences, 2]."""
    index: list[tuple[int, int]] = []
    ids_buffer: list[np.ndarray] = []
    mask_buffer: list[np.ndarray] = []
    buffered = 0
    for sequences in examples:
        for ids, mask in sequences:
            index.append((len(ids), int(mask[1:].sum())))
            ids_buffer.append(ids)
            mask_buffer.append(mask)
            buffered += len(ids)
        if buffered >= WRITE_BATCH_TOKENS:
            tokens.append(np.concatenate(ids_buffer))
            masks.append(np.concatenate(mask_buffer).astype(masks.dtype))
            ids_buffer, mask_buffer, buffered = [], [], 0
    if ids_buffer:
        tokens.append(np.concatenate(ids_buffer))
        masks.append(np.concatenate(mask_buffer).astype(masks.dtype))
    return np.array(index, dtype=np.int64).reshape(-1, 2)
