"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load one from a path."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from distrib.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# End-of-text markers of common pretrained tokenizers, tried when no config names the EOS.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the end-of-document token that separates packed documents."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN) -> None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"the tokenizer has no EOS token '{eos_token}'")
        # Text that happens to contain "<|endoftext|>" must encode as plain text, or a document
        # would be cut in two inside the packed stream (and decode(encode(s)) would still hold,
        # but document counts and document masks would not).
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.eos_token = eos_token
        self._eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the embedding needs at least this many)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id of the token appended after every document."""
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once, in parallel in Rust."""
        # encode_batch_fast skips offset tracking (tokenizers >= 0.20); fall back on older ones.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept so byte-level round trips are exact."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as a `tokenizer.json` file at `path`."""
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path, eos_token: str | None = None) -> Tokenizer:
        """Load a `tokenizer.json` file or an HF tokenizer folder holding one.

        The EOS is `eos_token` when given, else the one tokenizer_config.json or
        special_tokens_map.json names, else the first known end-of-text token in the vocabulary.
        """
        path = Path(path).expanduser()
        folder = path if path.is_dir() else path.parent
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"tokenizer not found: {path} is neither a tokenizer.json file nor a folder "
                "holding one (data.tokenizer)"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"{file}: not a valid tokenizer.json: {err}") from None
        if eos_token is None and path.is_dir():
            eos_token = _configured_eos(folder)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos_token is None:
            raise DataError(
                f"{file}: no end-of-text token found (tried tokenizer_config.json, "
                f"special_tokens_map.json and {', '.join(_EOS_CANDIDATES)})"
            )
        return cls(tok, eos_token)


def _configured_eos(folder: Path) -> str | None:
    """The EOS token an HF tokenizer folder's config files name, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise DataError(f"{file}: not a valid JSON object: {err}") from None
        if isinstance(eos, dict):  # AddedToken form: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (EOS included) on `texts`.

    Every byte is in the initial alphabet, so any text encodes without an unknown token and
    decode(encode(s)) == s exactly.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise DataError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: need at least "
            f"{len(alphabet) + 1} (256 bytes + EOS)"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would be added on encode and kept on decode.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # Batches of texts cross into Rust far less often than single strings.
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    return Tokenizer(tok, EOS_TOKEN)
