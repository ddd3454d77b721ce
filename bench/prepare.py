"""Throughput of `distrib prepare`: one process against one per core, on a corpus of 200+ MB.

    python -m bench.prepare                  # ~210 MB corpus (21 copies); minutes on 2 cores
    python -m bench.prepare --copies 2       # ~20 MB, for a quick look

The corpus is assembled from the running interpreter's standard library (the default corpus's
documents, data tables left out), each document repeated `--copies` times with a distinct first
line, as a jsonl file: text every machine has, at a size where the per-part bookkeeping and the
worker start-up are small against the work. The tokenizer is trained once, beforehand, on the
standard library alone (`data.tokenizer` then names it), so the rows time the tokenizing and
writing, not BPE training. The jsonl is read once before the rows (Hugging Face datasets builds
its Arrow cache), so every row reads the same cached corpus.

Rows: `data.num_proc = 1` (one process; the tokenizers library's own threads encode each batch)
and `data.num_proc = 0` (one worker process per available core, each encoding on one thread).
Each row prepares into a fresh folder; the figure is tokens written per second of the whole
`prepare_dataset` call (planning, tokenizing every part, merging into shards, hashing). The two
datasets are compared: their shards must be identical.

Then the streaming loader (`data.streaming`) on the same corpus with the debug model's batch
(16 rows of 256 tokens, one process): tokens per second `next_step()` delivers over
`--stream-steps` steps after a warmup step, including its background tokenization, against what
training consumes (the distrib figure of the newest bench/results throughput JSON for this
device kind). Prints the tables and writes bench/results/prepare-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import environment, latest_result, table, write_result
from distrib.config import DataConfig
from distrib.data.prepare import prepare_dataset
from distrib.data.prepare_parts import available_cores
from distrib.data.sources import load_corpus

VOCAB = 4096


def build_corpus(folder: Path, copies: int) -> tuple[Path, int]:
    """The jsonl corpus; its path and size in bytes."""
    docs = load_corpus(DataConfig(val_fraction=0.05)).texts
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(copies):
            for i, text in enumerate(docs):
                f.write(json.dumps({"text": f"# copy {copy} of document {i}\n{text}"}) + "\n")
    return path, path.stat().st_size


def stream_rate(corpus: Path, tokenizer: Path, steps: int) -> dict[str, float]:
    """Tokens/s of the streaming loader over `steps` steps, after one warmup step."""
    from distrib.data.streaming import StreamingLoader, open_documents
    from distrib.data.tokenizer import Tokenizer

    data = DataConfig(source=str(corpus), tokenizer=str(tokenizer), streaming=True)
    loader = StreamingLoader(
        open_documents(data, "train"), Tokenizer.load(tokenizer), 256, 16, 8, 0, 1
    )
    loader.next_step()
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "tokens_per_s": steps * 16 * 256 / seconds}


def _training_rate() -> tuple[float | None, str]:
    found = latest_result("throughput", torch.device("cpu"))
    if found is None or "distrib" not in found[1].get("contenders", {}):
        return None, "no throughput result for this device"
    path, record = found
    return record["contenders"]["distrib"]["tokens_per_s"]["median"], path.name


def _shards(dir: Path) -> list[str]:
    manifest = json.loads((dir / "manifest.json").read_text())
    return [r["sha256"] for split in manifest["splits"].values() for r in split["shards"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=21, help="copies of the stdlib (~10 MB each)")
    parser.add_argument("--stream-steps", type=int, default=200, help="timed streaming steps")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        tokenizer = prepare_dataset(DataConfig(dir=str(work / "stdlib")), VOCAB, 0, lambda _: None)
        corpus, size = build_corpus(work, args.copies)
        base = DataConfig(source=str(corpus), tokenizer=str(tokenizer / "tokenizer.json"))
        load_corpus(base)  # the Arrow cache, built once for every row
        rows, results, outputs = (
            [["num_proc", "processes", "seconds", "tokens", "Mtokens/s", "MB/s"]],
            [],
            [],
        )
        for num_proc in (1, 0):
            out = work / f"ds-{num_proc}"
            cfg = DataConfig(**{**vars(base), "dir": str(out), "num_proc": num_proc})
            start = time.perf_counter()
            prepare_dataset(cfg, VOCAB, 0, lambda line: print(f"  {line}"))
            seconds = time.perf_counter() - start
            tokens = json.loads((out / "manifest.json").read_text())["num_tokens"]
            procs = num_proc or available_cores()
            results.append(
                {
                    "num_proc": num_proc,
                    "processes": procs,
                    "seconds": seconds,
                    "tokens": tokens,
                    "tokens_per_s": tokens / seconds,
                    "corpus_bytes_per_s": size / seconds,
                }
            )
            rows.append(
                [
                    str(num_proc),
                    str(procs),
                    f"{seconds:.1f}",
                    f"{tokens:,}",
                    f"{tokens / seconds / 1e6:.2f}",
                    f"{size / seconds / 1e6:.1f}",
                ]
            )
            outputs.append(_shards(out))
        identical = outputs[0] == outputs[1]
        stream = stream_rate(corpus, tokenizer / "tokenizer.json", args.stream_steps)
        training, where = _training_rate()
        stream["training_tokens_per_s"] = training
        stream["training_figure"] = where
        stream["ratio"] = stream["tokens_per_s"] / training if training else None
        print(f"corpus: {size / 1e6:.0f} MB ({args.copies} copies of the stdlib), vocab {VOCAB}")
        print(table(rows))
        print(f"shards identical: {identical}")
        ratio = f"{stream['ratio']:.0f}x" if stream["ratio"] else "?"
        eats = f"{training:,.0f}" if training else "?"
        print(
            f"streaming loader: {stream['tokens_per_s']:,.0f} tokens/s, {ratio} what training "
            f"consumes ({eats} tokens/s: {where})"
        )
        device = torch.device("cpu")
        path = write_result(
            "prepare",
            device,
            {
                "environment": environment(device),
                "corpus_bytes": size,
                "copies": args.copies,
                "vocab_size": VOCAB,
                "rows": results,
                "shards_identical": identical,
                "streaming": stream,
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
