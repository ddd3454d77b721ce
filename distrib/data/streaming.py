"""Training on a corpus that was never prepared: documents tokenized on the fly (`data.streaming`).

Row i of every global batch (G rows) is a stream of its own: the training documents whose index
in the source is i modulo G, tokenized, each followed by EOS, and cut into windows of
seq_len + 1 tokens (consecutive windows share one token, as in a prepared dataset). Global batch
n holds window n of every row, so it depends only on the source's order, G and seq_len, not on
the layout; data-parallel rank r owns the rows of its contiguous 1/dp and tokenizes only their
documents. A row that runs out of documents starts the next epoch (the same order again).

A row's position is (epoch, the document it is in, the token in it). Positions are saved per row,
under a key of their own, by the rank that owns the row (`state_dict`), so a checkpoint holds
every row whatever the layout and a resumed run (under any data-parallel degree) re-opens each
row's document and goes on from that token: it sees exactly the tokens an uninterrupted run
would. A background thread tokenizes the next steps while the current one trains.

Documents are read from the source once per epoch by each rank (every rank skips the documents
of rows it does not own, without tokenizing them): reading is cheap next to tokenizing, and no
rank depends on another. The split into train and val follows `data.val_fraction` by a stable
hash of each document's key (its index, or its path for the default corpus), document by
document. Validation is one stream cut into consecutive windows, G per batch (a held-out split
may have fewer documents than a batch has rows); every rank reads it, a few batches deep.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from distrib.config import DataConfig, TrainingConfig
from distrib.config.rules import accumulation_steps
from distrib.data.loader import Batch, micro_batches
from distrib.data.tokenizer import Tokenizer
from distrib.errors import DataError

PREFETCH_STEPS = 4  # global batches tokenized ahead by the background thread


def open_documents(data: DataConfig, split: str) -> Callable[[], Iterator[tuple[int, str]]]:
    """A function that starts a pass over the split's documents: (index in the source, text)
    in source order, empty documents left out."""
    from distrib.data.sources import stable_fraction

    def wanted(key: str) -> bool:
        return (stable_fraction(key) < data.val_fraction) == (split == "val")

    if data.source == "" or data.source.startswith("builtin:"):
        from distrib.data.sources import load_corpus

        # Small corpora every machine has: read whole, the split as a prepared dataset's.
        corpus = load_corpus(data)
        ids = sorted(corpus.ids(split).tolist())
        return lambda: ((i, corpus.texts[i]) for i in ids)

    def records() -> Iterator[tuple[int, str]]:
        for i, record in enumerate(_stream(data)):
            if data.max_documents and i >= data.max_documents:
                return
            text = record.get(data.text_field)
            if not isinstance(text, str):
                raise DataError(f"{data.source}: record {i} has no text field '{data.text_field}'")
            if text.strip() and wanted(str(i)):
                yield i, text

    return records


# Opening a dataset is not thread-safe (datasets' progress bars create tqdm's class lock
# lazily, and two producer threads, train and val, can race on it): one opening at a time.
_OPENING = threading.Lock()


def _stream(data: DataConfig) -> Any:
    """The source as a Hugging Face IterableDataset: read as it is iterated, never cached whole."""
    with _OPENING:
        return _open_stream(data)


def _open_stream(data: DataConfig) -> Any:
    from pathlib import Path

    import datasets

    from distrib.data.sources import local_files, looks_like_hub_name

    path = Path(data.source).expanduser()
    if path.exists():
        builder, files = local_files(path)
        kwargs = {"sample_by": data.text_sample_by} if builder == "text" else {}
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs
        )
    if looks_like_hub_name(data.source):
        return datasets.load_dataset(data.source, split=data.hub_split, streaming=True)
    raise DataError(f"not found: {data.source}")


class _Pass:
    """One epoch's pass over the documents, shared by this rank's rows: each document goes to
    the queue of its row (index modulo G) if this rank owns the row."""

    def __init__(self, documents: Iterator[tuple[int, str]], rows: set[int], num_rows: int) -> None:
        self.documents = enumerate(documents)  # (position among the split's documents, (i, text))
        self.queues: dict[int, deque[tuple[int, str]]] = {r: deque() for r in rows}
        self.num_rows = num_rows
        self.done = False

    def document(self, row: int, k: int) -> str | None:
        """The k-th document of `row` in this pass, or None when the pass has no more for it."""
        q = self.queues[row]
        while True:
            while q and q[0][0] < k:  # before a resumed row's position
                q.popleft()
            if q:
                return q[0][1] if q[0][0] == k else None
            if self.done:
                return None
            try:
                position, (_, text) = next(self.documents)
            except StopIteration:
                self.done = True
                continue
            owner = position % self.num_rows
            if owner in self.queues:
                self.queues[owner].append((position // self.num_rows, text))


@dataclass
class Position:
    epoch: int = 0
    doc: int = 0  # the row's k-th document in that epoch
    token: int = 0  # where in it (EOS included)


class _Row:
    """One row's stream of windows."""

    def __init__(self, index: int, reader: _Reader) -> None:
        self.index = index
        self.reader = reader
        self.at = Position()
        self._cache: tuple[tuple[int, int], np.ndarray | None] | None = None

    def _tokens(self, epoch: int, doc: int) -> np.ndarray | None:
        if self._cache is None or self._cache[0] != (epoch, doc):
            text = self.reader.document(self.index, epoch, doc)
            ids = None
            if text is not None:
                ids = np.array([*self.reader.tokenizer.encode(text), self.reader.eos_id], np.int64)
            self._cache = ((epoch, doc), ids)
        return self._cache[1]

    def _collect(self, at: Position, n: int) -> tuple[np.ndarray, Position]:
        out, epoch, doc, token = [], at.epoch, at.doc, at.token
        while n:
            ids = self._tokens(epoch, doc)
            if ids is None:  # the epoch has no more documents for this row
                if doc == 0:  # an epoch without a document: there is none for this row
                    split = self.reader.split
                    raise DataError(
                        f"streaming: row {self.index} of the global batch gets no {split} "
                        f"document: the source has fewer {split} documents than "
                        "training.global_batch_size"
                    )
                epoch, doc, token = epoch + 1, 0, 0
                continue
            take = ids[token : token + n]
            out.append(take)
            n -= len(take)
            token += len(take)
            if token == len(ids):
                doc, token = doc + 1, 0
        return np.concatenate(out), Position(epoch, doc, token)

    def window(self, length: int) -> np.ndarray:
        """The next seq_len + 1 tokens; the position moves by seq_len."""
        head, after = self._collect(self.at, length - 1)
        last, _ = self._collect(after, 1)
        self.at = after
        return np.concatenate([head, last])


class _Reader:
    """This rank's passes over the documents, one per epoch in use."""

    def __init__(
        self,
        open_pass: Callable[[], Iterator[tuple[int, str]]],
        rows: set[int],
        num_rows: int,
        tokenizer: Tokenizer,
        split: str,
    ) -> None:
        self.open_pass, self.rows, self.num_rows, self.split = open_pass, rows, num_rows, split
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_id
        self.passes: dict[int, _Pass] = {}

    def document(self, row: int, epoch: int, doc: int) -> str | None:
        if epoch not in self.passes:
            self.passes[epoch] = _Pass(self.open_pass(), self.rows, self.num_rows)
            for old in [e for e in self.passes if e < epoch - 1]:
                del self.passes[old]  # every row has moved on: at most two epochs in use
        return self.passes[epoch].document(row, doc)


class StreamingLoader:
    """TokenLoader's interface over a stream: `next_step`, `state_dict`, `grad_accum_steps`."""

    def __init__(
        self,
        open_pass: Callable[[], Iterator[tuple[int, str]]],
        tokenizer: Tokenizer,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        document_ids: bool = False,
        pin_memory: bool = False,
        split: str = "train",
    ) -> None:
        accumulation_steps(global_batch_size, micro_batch_size, dp_size)
        self.open_pass, self.tokenizer = open_pass, tokenizer
        self.seq_len, self.global_batch_size = seq_len, global_batch_size
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.document_ids, self.pin_memory, self.split = document_ids, pin_memory, split
        per_rank = global_batch_size // dp_size
        self.rows = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        # Validation is one stream cut into consecutive windows (G per batch, each rank keeping
        # its rows'): a held-out split may have fewer documents than a batch has rows, and it is
        # read only a few batches deep at each evaluation.
        self.single = split == "val"
        self.step = 0  # global batches handed out
        self._start(self.step, {})

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def steps_per_epoch(self) -> int:
        """Unknown for a stream: evaluation takes `training.eval_steps` batches of it."""
        return 2**31

    # ---- the background producer --------------------------------------------------------------

    def _start(self, step: int, positions: dict[int, Position]) -> None:
        self._stop_producer()
        rows, num_rows = ([0], 1) if self.single else (self.rows, self.global_batch_size)
        reader = _Reader(self.open_pass, set(rows), num_rows, self.tokenizer, self.split)
        self._streams = [_Row(r, reader) for r in rows]
        for row in self._streams:
            row.at = positions.get(row.index, Position())
        self._ready: queue.Queue = queue.Queue(maxsize=PREFETCH_STEPS)
        self._halt = threading.Event()
        self._produced = step
        self._consumed_state = self._snapshot()
        self._thread = threading.Thread(
            target=self._produce, name=f"stream-{self.split}", daemon=True
        )
        self._thread.start()

    def _snapshot(self) -> dict[int, Position]:
        return {s.index: Position(s.at.epoch, s.at.doc, s.at.token) for s in self._streams}

    def _produce(self) -> None:
        try:
            while not self._halt.is_set():
                if self.single:
                    every = [
                        self._streams[0].window(self.seq_len + 1)
                        for _ in range(self.global_batch_size)
                    ]
                    rows = np.stack([every[r] for r in self.rows])
                else:
                    rows = np.stack([s.window(self.seq_len + 1) for s in self._streams])
                self._produced += 1
                item = (self._produced, rows, self._snapshot())
                while not self._halt.is_set():
                    try:
                        self._ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the training thread, which raises it
            while not self._halt.is_set():
                try:
                    self._ready.put((None, err, None), timeout=0.1)
                    return
                except queue.Full:
                    continue

    def _stop_producer(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

    # ---- the loader interface --------------------------------------------------------------------

    def next_step(self) -> list[Batch]:
        step, rows, state = self._ready.get()
        if step is None:
            raise rows
        self.step, self._consumed_state = step, state
        # Window n of row i: unique, and the same in every layout (for the sample records).
        ids = np.array([(step - 1) * self.global_batch_size + r for r in self.rows])
        eos = self.tokenizer.eos_id if self.document_ids else None
        return micro_batches(rows, ids, self.micro_batch_size, eos, self.pin_memory)

    def reset(self) -> None:
        """Back to the start of the stream (validation sees the same batches every time)."""
        self._start(0, {})
        self.step = 0

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The order's shape (the same on every rank) and, under a key per row, the positions of
        the rows this rank owns: together, the ranks' states hold every row."""
        state: dict[str, Any] = {"streaming": json.dumps(self._order())}
        for index, at in self._consumed_state.items():
            state[f"row{index:06d}"] = json.dumps([at.epoch, at.doc, at.token])
        return state

    def _order(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "streaming" not in state:
            raise DataError(
                "the checkpoint's loader state is not a stream's: data.streaming changed"
            )
        order = json.loads(state["streaming"])
        for key in ("seq_len", "global_batch_size"):
            if order[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the stream: {key} was {order[key]}, now {getattr(self, key)} "
                    "(the rows and windows would be other ones)"
                )
        positions = {}
        for index in self.rows:
            epoch, doc, token = json.loads(state[f"row{index:06d}"])
            positions[index] = Position(epoch, doc, token)
        self.step = order["step"]
        self._start(self.step, positions)


def build_streaming_loaders(
    data: DataConfig, training: TrainingConfig, dp_rank: int, dp_size: int, pin_memory: bool
) -> tuple[StreamingLoader, StreamingLoader]:
    """The train and val streams of `data.source`, tokenized with `data.tokenizer`."""
    tokenizer = Tokenizer.load(data.tokenizer)
    common = {
        "seq_len": data.seq_len,
        "micro_batch_size": training.micro_batch_size,
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "document_ids": not data.cross_document_attention,
        "pin_memory": pin_memory,
        "global_batch_size": training.global_batch_size,
    }
    train = StreamingLoader(open_documents(data, "train"), tokenizer, split="train", **common)
    val = StreamingLoader(open_documents(data, "val"), tokenizer, split="val", **common)
    return train, val
