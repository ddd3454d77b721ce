"""Chat and preference records -> token ids and a per-token "is a training target" mask.

Records are JSON objects, one per line of `.jsonl` files (or in `.json` arrays, `.parquet` files,
hub datasets):
- chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`, or
  `{"prompt": str, "response": str}` (one user turn, one assistant turn);
- preference: `{"prompt": str or messages, "chosen": str or [assistant message], "rejected":
  same}`; each pair gives two sequences, prompt + chosen and prompt + rejected.

A conversation becomes text through a Jinja chat template run by `transformers`
(`apply_chat_template`): the tokenizer folder's own, a template file, or distrib's default
(`DEFAULT_CHAT_TEMPLATE`), which renders every message as

    <|ROLE|>\\n{content}\\n        for system and user messages,
    <|assistant|>\\n{content}EOS  for assistant messages (EOS: the tokenizer's EOS text,
                                   e.g. <|endoftext|>),

all concatenated, with `<|assistant|>\\n` appended to ask for a reply. For example

    <|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\nHello!<|endoftext|><|user|>\\n...

The targets are the assistant turns' text, closing EOS or end-of-turn token included (every
assistant turn for chat, the response only for preference). A turn's characters are found by
rendering prefixes: it starts where the conversation up to it, rendered with the reply prompt,
ends and it ends where the conversation through it ends (trailing whitespace left out). The
whole rendered text is then tokenized at once, special tokens parsed, and a token is a target
when its characters (the tokenizer's offsets) overlap a turn: tokenization is that of the whole
text, and every character of a reply is predicted by some target token.

A bad record (not an object, missing or unknown roles, no assistant turn, an empty response, an
empty prompt, a special token's text in a message, more than seq_len + 1 tokens, ...) is
reported as `FILE:LINE: what` and skipped, or stops preparation (`data.bad_records`).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from distrib.config import DataConfig
from distrib.data.sources import _load_hub, local_files, looks_like_hub_name
from distrib.data.tokenizer import Tokenizer
from distrib.errors import DataError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
Encoded = tuple[np.ndarray, np.ndarray]  # token ids (int64), target mask (bool), same length

# distrib's default chat template (see the module docstring for what it renders).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
TEMPLATE_FILE = "chat_template.jinja"
# Bad records logged one by one; past this many they are only counted, so that a dataset with
# many long records does not bury the rest of the output.
MAX_REPORTED = 100
ENCODE_BATCH = 1000  # rendered texts per encode_batch call


class BadRecord(Exception):
    """What is wrong with one record; reported with its place by `BadRecords`."""


@dataclass(frozen=True)
class Record:
    """One record as read: where it is, the key the train/val split hashes, its content."""

    where: str  # "FILE:LINE", or "FILE: record N" / "SOURCE: record N" when there are no lines
    key: str
    data: Any
    problem: str | None = None  # set when the record could not even be read (invalid JSON)


class BadRecords:
    """Where bad records go: logged and counted (`policy` skip) or a DataError (error)."""

    def __init__(
        self, policy: str, log: Callable[[str], None], max_reported: int = MAX_REPORTED
    ) -> None:
        if policy not in ("skip", "error"):
            raise ValueError(f"unknown bad-record policy '{policy}': valid skip, error")
        self.policy = policy
        self.log = log
        self.max_reported = max_reported
        self.count = 0

    def __call__(self, where: str, what: str) -> None:
        """Report the bad record at `where`, or raise (policy error)."""
        if self.policy == "error":
            raise DataError(
                f"{where}: {what} (data.bad_records = error; skip passes over bad records, "
                "reporting each)"
            )
        self.count += 1
        if self.count <= self.max_reported:
            self.log(f"{where}: {what}; skipped")
        elif self.count == self.max_reported + 1 and self.max_reported:
            self.log(f"more than {self.max_reported} bad records: the others are only counted")


# ---- reading records ----------------------------------------------------------------------------


def read_records(cfg: DataConfig) -> Iterator[Record]:
    """The records of `cfg.source` (local .jsonl/.json/.parquet files or folder, or a hub dataset),
    the first `cfg.max_documents` of them if set. Split keys: the file's path within the source
    and the line (or record index); a hub record's index."""
    path = Path(cfg.source).expanduser()
    if path.exists():
        builder, files = local_files(path)
        if builder == "text":
            raise DataError(
                f"{path}: data.format = {cfg.format} reads JSON records; use .jsonl, .json or "
                ".parquet files"
            )
        root = path if path.is_dir() else path.parent
        records = itertools.chain.from_iterable(
            _file_records(f, builder, f.relative_to(root).as_posix()) for f in files
        )
    elif looks_like_hub_name(cfg.source):
        dataset = _load_hub(cfg)
        records = (
            Record(f"{cfg.source}: record {i + 1}", str(i), row) for i, row in enumerate(dataset)
        )
    else:
        raise DataError(f"not found: {cfg.source} (data.source)")
    return itertools.islice(records, cfg.max_documents or None)


def _file_records(path: Path, builder: str, name: str) -> Iterator[Record]:
    if builder == "parquet":
        import datasets  # slow to import; only preparation needs it

        rows = datasets.load_dataset("parquet", data_files=[str(path)], split="train")
        for i, row in enumerate(rows):
            yield Record(f"{path}: row {i + 1}", f"{name}#{i}", row)
        return
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # a .json file holding one array, not JSON lines
        try:
            records = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a valid JSON array: {err}") from None
        for i, data in enumerate(records):
            yield Record(f"{path}: record {i + 1}", f"{name}#{i}", data)
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where, key = f"{path}:{number}", f"{name}:{number}"
            try:
                yield Record(where, key, json.loads(line.decode("utf-8")))
            except UnicodeDecodeError as err:
                yield Record(where, key, None, f"not valid UTF-8 (column {err.start + 1})")
            except json.JSONDecodeError as err:
                yield Record(where, key, None, f"invalid JSON: {err.msg}")


# ---- checking records ---------------------------------------------------------------------------


def parse_chat(data: Any) -> list[Message]:
    """The messages of a chat record; BadRecord saying what is wrong with it."""
    record = _object(data)
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
    elif "prompt" in record and "response" in record:
        prompt = _text(record, "prompt", "empty prompt")
        response = _text(record, "response", "empty response")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise BadRecord(
            f"neither a 'messages' list nor 'prompt' and 'response'; fields: {sorted(record)[:10]}"
        )
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise BadRecord("no assistant turn")
    if not any(m["role"] == "user" for m in messages[:first]):
        raise BadRecord(f"no user turn before the first assistant turn (messages[{first}])")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord(f"messages[{i}]: empty assistant content")
    return messages


def parse_preference(data: Any) -> tuple[list[Message], list[Message]]:
    """The chosen and the rejected conversation (the prompt's turns, then the response) of a
    preference record; BadRecord saying what is wrong with it."""
    record = _object(data)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise BadRecord(f"no {', '.join(repr(k) for k in missing)}; fields: {sorted(record)[:10]}")
    if isinstance(record["prompt"], str):
        prompt = [{"role": "user", "content": _text(record, "prompt", "empty prompt")}]
    else:
        prompt = _messages(record["prompt"], "prompt")
        if not prompt or not any(m["content"].strip() for m in prompt):
            raise BadRecord("empty prompt")
        if prompt[-1]["role"] != "user":
            raise BadRecord(f"the prompt's last turn is {prompt[-1]['role']}, not user")
    chosen, rejected = _response(record, "chosen"), _response(record, "rejected")
    if chosen == rejected:
        raise BadRecord("chosen and rejected are the same response")
    return prompt + [chosen], prompt + [rejected]


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRecord(f"expected a JSON object, got {type(data).__name__}")
    return data


def _text(record: dict[str, Any], field: str, empty: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise BadRecord(f"'{field}' is {type(value).__name__}, expected a string")
    if not value.strip():
        raise BadRecord(empty)
    return value


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise BadRecord(f"'{field}' is {type(value).__name__}, expected a list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRecord(f"{field}[{i}]: expected an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise BadRecord(f"{field}[{i}]: no 'role'")
        if role not in ROLES:
            raise BadRecord(f"{field}[{i}]: unknown role {role!r} (valid: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadRecord(f"{field}[{i}]: 'content' is {type(content).__name__}, not a string")
        messages.append({"role": role, "content": content})  # other keys are not rendered
    return messages


def _response(record: dict[str, Any], field: str) -> Message:
    value = record[field]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        message = _messages([value], field)[0]
        if message["role"] != "assistant":
            raise BadRecord(f"{field}: role {message['role']}, expected assistant")
        value = message["content"]
    if not isinstance(value, str):
        raise BadRecord(f"'{field}': expected a string or a list holding one assistant message")
    if not value.strip():
        raise BadRecord(f"empty {field} response")
    return {"role": "assistant", "content": value}


def conversations(data: Any, format: str) -> list[list[Message]]:
    """The conversations a record stands for: one for chat, chosen and rejected for preference."""
    if format == "chat":
        return [parse_chat(data)]
    if format == "preference":
        return list(parse_preference(data))
    raise ValueError(f"unknown record format '{format}': valid chat, preference")


def parse_records(
    records: Iterable[Record], format: str, bad: BadRecords
) -> Iterator[tuple[Record, list[list[Message]]]]:
    """The well-formed records with their conversations (`conversations`); each other one goes
    to `bad`."""
    for record in records:
        try:
            if record.problem is not None:
                raise BadRecord(record.problem)
            convs = conversations(record.data, format)
        except BadRecord as err:
            bad(record.where, str(err))
            continue
        yield record, convs


def message_texts(convs: Iterable[list[Message]]) -> Iterator[str]:
    """The contents of every message (what a tokenizer trained for these records learns from)."""
    for conv in convs:
        for m in conv:
            yield m["content"]


# ---- templates and targets ----------------------------------------------------------------------


def parsing_special_tokens(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """A copy of `tokenizer`'s Rust tokenizer that reads special tokens' text as those tokens:
    a template writes its end-of-turn and EOS tokens as text. (`Tokenizer` itself reads them
    as plain text, so that a document holding "<|endoftext|>" is not cut in two.)"""
    raw = tokenizers.Tokenizer.from_str(tokenizer._tok.to_str())
    raw.encode_special_tokens = False
    return raw


def template_folder(tokenizer_path: str) -> Path | None:
    """The HF tokenizer folder of `data.tokenizer` (a folder, or a tokenizer.json in one)."""
    if not tokenizer_path:
        return None
    path = Path(tokenizer_path).expanduser()
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "tokenizer_config.json").is_file() else None


def folder_has_template(folder: Path | None) -> bool:
    """Whether an HF tokenizer folder carries a chat template."""
    if folder is None:
        return False
    if (folder / TEMPLATE_FILE).is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


class ChatTemplate:
    """A Jinja chat template, rendered by `transformers` the way HF models see their chats."""

    def __init__(self, text: str, source: str, hf_tokenizer: Any) -> None:
        self.text = text
        self.source = source  # "default", "tokenizer folder PATH" or "file PATH"
        self._hf = hf_tokenizer

    @classmethod
    def build(cls, choice: str, tokenizer: Tokenizer, tokenizer_path: str = "") -> ChatTemplate:
        """The template `data.chat_template` names (auto, default or a Jinja file) for the
        tokenizer loaded from `tokenizer_path` (data.tokenizer; empty for a trained one)."""
        from transformers import AutoTokenizer  # slow to import; only preparation needs it

        folder = template_folder(tokenizer_path)
        if choice == "auto" and folder_has_template(folder):
            hf = AutoTokenizer.from_pretrained(str(folder))
            return cls(hf.get_chat_template(), f"tokenizer folder {folder}", hf)
        if choice in ("auto", "default"):
            return cls(DEFAULT_CHAT_TEMPLATE, "default", _wrap(tokenizer))
        path = Path(choice).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.chat_template = {choice!r}: not auto, default, nor a Jinja template file"
            )
        hf = AutoTokenizer.from_pretrained(str(folder)) if folder else _wrap(tokenizer)
        return cls(path.read_text(encoding="utf-8"), f"file {path}", hf)

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The text of `messages`; with `add_generation_prompt`, followed by the reply prompt."""
        try:
            return self._hf.apply_chat_template(
                messages,
                chat_template=self.text,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as err:  # a user template can fail in any way (raise_exception, ...)
            raise BadRecord(f"the chat template failed on it: {err}") from None

    def target_spans(self, messages: list[Message], last_only: bool) -> tuple[str, list[range]]:
        """The rendered conversation and the character ranges of its assistant turns (the last
        one only if `last_only`), found by rendering prefixes (see the module docstring)."""
        full = self.render(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []
        for i in turns[-1:] if last_only else turns:
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1]).rstrip()
            if not full.startswith(before) or not full.startswith(through):
                raise BadRecord(
                    f"messages[{i}]: the chat template renders the conversation before or "
                    "through this turn differently once later turns follow, so its text cannot "
                    "be found"
                )
            if len(through) <= len(before):
                raise BadRecord(f"messages[{i}]: the chat template renders no text for it")
            spans.append(range(len(before), len(through)))
        return full, spans


def _wrap(tokenizer: Tokenizer) -> Any:
    """An HF tokenizer around `tokenizer`, to render templates with (its EOS as eos_token)."""
    from transformers import PreTrainedTokenizerFast

    raw = parsing_special_tokens(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=tokenizer.eos_token)


class ChatEncoder:
    """Records -> sequences of token ids with target masks, at most `seq_len + 1` tokens each."""

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int, format: str
    ) -> None:
        if format not in ("chat", "preference"):
            raise ValueError(f"unknown record format '{format}': valid chat, preference")
        self.template = template
        self.max_tokens = seq_len + 1
        self.format = format
        self.names = ("",) if format == "chat" else ("chosen: ", "rejected: ")
        self._raw = parsing_special_tokens(tokenizer)
        specials = [t.content for t in self._raw.get_added_tokens_decoder().values() if t.special]
        # Longest first, so that the message names the whole token when one holds another.
        alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special = re.compile(alternatives) if specials else None

    def encode(
        self,
        parsed: Iterable[tuple[Record, list[list[Message]]]],
        bad: BadRecords,
        batch_size: int = ENCODE_BATCH,
    ) -> Iterator[tuple[Record, list[Encoded]]]:
        """The records (with their conversations, from `parse_records`) that fit, each with its
        sequences (one for chat, chosen and rejected for preference), in order; each bad one
        goes to `bad`."""
        items = iter(parsed)
        while batch := list(itertools.islice(items, batch_size)):
            rendered: list[tuple[Record, list[tuple[str, list[range]]]]] = []
            for record, convs in batch:
                try:
                    rendered.append((record, self._render(convs)))
                except BadRecord as err:
                    bad(record.where, str(err))
            # One encode_batch over the batch's texts: the Rust side runs them in parallel.
            texts = [text for _, parts in rendered for text, _ in parts]
            encodings = iter(self._raw.encode_batch(texts, add_special_tokens=False))
            for record, parts in rendered:
                sequences = [_masked(next(encodings), spans) for _, spans in parts]
                try:
                    self._check(sequences)
                except BadRecord as err:
                    bad(record.where, str(err))
                    continue
                yield record, sequences

    def _render(self, convs: list[list[Message]]) -> list[tuple[str, list[range]]]:
        if self._special is not None:
            for name, m in _named_messages(convs, self.format):
                found = self._special.search(m["content"])
                if found:
                    raise BadRecord(
                        f"{name} holds the text of the special token {found[0]!r}, which "
                        "would be read as that token"
                    )
        return [self.template.target_spans(c, self.format == "preference") for c in convs]

    def _check(self, sequences: list[Encoded]) -> None:
        for name, (ids, mask) in zip(self.names, sequences, strict=True):
            if len(ids) > self.max_tokens:
                raise BadRecord(
                    f"{name}{len(ids)} tokens, more than data.seq_len + 1 = {self.max_tokens}"
                )
            if not mask[1:].any():  # the first token is never a label
                raise BadRecord(f"{name}no assistant token to train on")


def _named_messages(convs: list[list[Message]], format: str) -> list[tuple[str, Message]]:
    """Each message of a record once, with the name an error message gives it."""
    if format == "chat":
        return [(f"messages[{i}]", m) for i, m in enumerate(convs[0])]
    chosen, rejected = convs
    prompt = [(f"prompt[{i}]", m) for i, m in enumerate(chosen[:-1])]
    return [*prompt, ("chosen", chosen[-1]), ("rejected", rejected[-1])]


def _masked(encoding: Any, spans: list[range]) -> Encoded:
    """Token ids and, for each token, whether its characters overlap one of `spans`."""
    ids = np.array(encoding.ids, dtype=np.int64)
    offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for span in spans:
        mask |= (offsets[:, 0] < span.stop) & (offsets[:, 1] > span.start)
    return ids, mask
