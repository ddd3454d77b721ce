"""Byte-level BPE: training, exact round trips, save/load as a file or an HF folder, the EOS."""

import json

import pytest
import tokenizers

from distrib.data.tokenizer import EOS_TOKEN, Tokenizer, train_bpe
from distrib.errors import DataError

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x = x\n\t\tself.y = y\n",
    "# comment with unicode: naïve café 日本語\nprint('hello world')\n",
] * 20
TRICKY = [
    "",
    " leading and trailing spaces  ",
    "\ttabs\tand\r\nCRLF\n\n\n",
    "emoji 🎉🐍, accents é, CJK 中文, RTL שלום, combining e\u0301",
    "null \x00 and DEL \x7f and form feed \x0c",
    f"a literal {EOS_TOKEN} inside the text",
    "    if x:\n        return {'k': [1, 2.5e-3, None]}  # done\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(iter(CORPUS), vocab_size=300)


def test_train_vocab_and_eos(tok):
    assert 257 < tok.vocab_size <= 300
    assert tok.eos_id == tok._tok.token_to_id(EOS_TOKEN)
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    # merges were learned: common code compresses below one token per byte
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode())


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_literal_eos_text_is_not_the_eos_token(tok):
    assert tok.eos_id not in tok.encode(f"x {EOS_TOKEN} y")


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_save_load_file_and_folder(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    for path in (tmp_path / "tokenizer.json", tmp_path):
        loaded = Tokenizer.load(path)
        assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
        assert loaded.encode(TRICKY[3]) == tok.encode(TRICKY[3])


def test_folder_eos_from_tokenizer_config(tmp_path):
    vocab = {"a": 0, "</s>": 1, EOS_TOKEN: 2, "[UNK]": 3}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.load(tmp_path).eos_id == 2  # no config: the known end-of-text token
    config = {"eos_token": {"content": "</s>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(tmp_path).eos_id == 1
    assert Tokenizer.load(tmp_path, eos_token=EOS_TOKEN).eos_id == 2


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path)  # a folder without tokenizer.json
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_vocab_too_small():
    with pytest.raises(DataError, match="at least 257"):
        train_bpe(CORPUS, vocab_size=100)
