"""Demonstration data from the Python standard library: write the body of a function.

The default corpus of `data.format = chat | preference` (an empty `data.source`). Every function
with a docstring defined at module level or in a module-level class of the standard library's
files (`sources.stdlib_files`, generated data tables left out) gives one record:
- prompt: `PROMPT` followed by its `def` line(s) and docstring, dedented to column 0;
- response (chat) or chosen (preference): the rest of its body, as in the file but dedented to
  column 0;
- rejected (preference): the body of another function of the same file, one of the
  `NEAREST` nearest in length, picked with the seed: real, plausible Python that does something
  else (other names, other logic). A function with no other body in its file gives no pair.
Functions whose body is empty or only `pass`, `...` or `raise NotImplementedError`, and
examples of more than `CHARS_PER_TOKEN` x data.seq_len characters (too long for a sequence with
any tokenizer worth training), are left out; `data.max_documents` caps the number of records.
Records are keyed by file, so train and val are split by file like the text corpus.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrib.config import DataConfig
from distrib.data.chat import Record
from distrib.data.sources import looks_like_table, stdlib_files
from distrib.errors import DataError

PROMPT = "Write the body of this Python function:\n"
# Code tokenizers average 3 to 4 characters per token; an example longer than this many per
# token of data.seq_len surely does not fit, and is left out before tokenization (the others
# that do not fit are reported as bad records by the encoder).
CHARS_PER_TOKEN = 4
NEAREST = 3
# Part of the recipe of a demonstration dataset: raise it when the records change.
DEMO_VERSION = 1

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Function:
    """A function with a docstring, split where its body starts after the docstring."""

    line: int  # of its `def`
    head: str  # the def line(s) and the docstring
    body: str  # the rest of the body


def functions(source: str) -> list[Function]:
    """The functions with a non-trivial body after their docstring that `source` defines at
    module level or in a module-level class, in source order."""
    lines = source.splitlines()
    found = []
    for node in ast.parse(source).body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        for fn in members:
            if isinstance(fn, _FUNCTIONS) and (function := _split(fn, lines)) is not None:
                found.append(function)
    return found


def _split(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> Function | None:
    if ast.get_docstring(node) is None or len(node.body) < 2:
        return None
    doc, rest = node.body[0], node.body[1:]
    assert doc.end_lineno is not None and node.end_lineno is not None
    if rest[0].lineno <= doc.end_lineno or all(_trivial(s) for s in rest):
        return None  # `"""doc"""; return x` on one line, or a stub
    # Indentation is whitespace, so col_offset (in bytes) counts characters too. The body is
    # dedented to its own first statement: a reply that starts with code, not with spaces that
    # BPE would merge with the template's newline before it.
    head = _dedent(
        lines[node.lineno - 1 : doc.end_lineno], lines[node.lineno - 1][: node.col_offset]
    )
    body_indent = lines[rest[0].lineno - 1][: rest[0].col_offset]
    body = _dedent(lines[doc.end_lineno : node.end_lineno], body_indent)
    while body and not body[0].strip():
        body.pop(0)
    return Function(node.lineno, "\n".join(head), "\n".join(body))


def _dedent(lines: list[str], indent: str) -> list[str]:
    # Not textwrap.dedent: a continuation line of a string literal may start at column 0.
    return [line[len(indent) :] if line.startswith(indent) else line for line in lines]


def _trivial(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return statement.value.value is Ellipsis
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def file_records(path: Path, key: str, format: str, seed: int, max_chars: int) -> list[Record]:
    """The records of the functions of one file (see the module docstring)."""
    try:
        source = path.read_text(encoding="utf-8")
        if looks_like_table(source):
            return []
        found = functions(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):  # ValueError: a null byte
        return []
    records = []
    for fn in found:
        prompt = PROMPT + fn.head
        budget = max_chars - len(prompt)
        if len(fn.body) > budget:
            continue
        where = f"{path}:{fn.line}"
        if format == "chat":
            records.append(Record(where, key, {"prompt": prompt, "response": fn.body}))
            continue
        others = [g.body for g in found if g.body != fn.body and len(g.body) <= budget]
        if not others:
            continue
        # Stable sort: among bodies as near, the earlier in the file first.
        nearest = sorted(others, key=lambda body: abs(len(body) - len(fn.body)))[:NEAREST]
        rng = np.random.default_rng([seed, zlib.crc32(where.encode("utf-8"))])
        rejected = nearest[int(rng.integers(len(nearest)))]
        records.append(
            Record(where, key, {"prompt": prompt, "chosen": fn.body, "rejected": rejected})
        )
    return records


def demo_records(cfg: DataConfig, seed: int, root: Path | None = None) -> tuple[str, list[Record]]:
    """A description and the records of the demonstration data for `cfg.format` (chat or
    preference), the first `cfg.max_documents` of them if set, in file order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    max_chars = CHARS_PER_TOKEN * cfg.seq_len
    records: list[Record] = []
    files = 0
    for path in stdlib_files(root):
        if cfg.max_documents and len(records) >= cfg.max_documents:
            break
        found = file_records(path, path.relative_to(root).as_posix(), cfg.format, seed, max_chars)
        files += bool(found)
        records += found
    if cfg.max_documents:
        records = records[: cfg.max_documents]
    if not records:
        raise DataError(
            f"no function with a docstring found under {root} for the demonstration data"
        )
    version = ".".join(map(str, sys.version_info[:3]))
    what = "instruction pairs" if cfg.format == "chat" else "preference pairs"
    description = (
        f"python {version} stdlib ({root}): {len(records)} {what} (write a function's body) "
        f"from {files} files"
    )
    return description, records
