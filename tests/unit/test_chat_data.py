"""Chat and preference data: records -> targets, templates, bad records, the example loader."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

from distrib.config import DataConfig, ModelConfig, TrainingConfig
from distrib.data.chat import (
    BadRecord,
    BadRecords,
    ChatEncoder,
    ChatTemplate,
    Record,
    parse_chat,
    parse_preference,
    parse_records,
    read_records,
)
from distrib.data.demo_pairs import PROMPT, demo_records, functions
from distrib.data.example_loader import ExampleLoader, ExampleShards, pack_rows
from distrib.data.loader import build_loaders
from distrib.data.prepare import prepare_dataset
from distrib.data.shards import write_token_dataset
from distrib.data.tokenizer import EOS_TOKEN, Tokenizer, train_bpe
from distrib.errors import ConfigError, DataError
from distrib.models.loss import IGNORE_INDEX
from distrib.train.trainer import check_dataset

VOCAB = 300
SEQ = 128
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Add 2 and 3"},
    {"role": "assistant", "content": "2 + 3 = 5"},
]


def _quiet(_: str) -> None:
    pass


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _chat_records(n: int) -> list[dict]:
    records = []
    for i in range(n):
        if i % 3 == 0:
            records.append({"prompt": f"Say {i}", "response": f"{i} " * (1 + i % 5)})
            continue
        messages = [dict(m) for m in CONVERSATION]
        messages[1]["content"] = f"Hi {i}"
        messages[2]["content"] = f"Hello {i}!"
        messages[3]["content"] = "Add " + "1 " * (i % 4)
        messages[4]["content"] = f"= {i % 4}"
        records.append({"messages": messages})
    return records


def _pair_records(n: int) -> list[dict]:
    records = []
    for i in range(n):
        if i % 2:
            records.append({"prompt": f"Name {i}", "chosen": f"Yes {i}", "rejected": f"No {i}!"})
        else:
            prompt = [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": f"N{i}"},
            ]
            chosen = [{"role": "assistant", "content": f"Sure {i}"}]
            records.append({"prompt": prompt, "chosen": chosen, "rejected": f"Never {i}"})
    return records


def _render(messages: list[dict]) -> str:
    """The default template, as its docstring documents it."""
    parts = []
    for m in messages:
        end = EOS_TOKEN if m["role"] == "assistant" else "\n"
        parts.append(f"<|{m['role']}|>\n{m['content']}{end}")
    return "".join(parts)


def _expected_targets(messages: list[dict], last_only: bool = False) -> str:
    replies = [m["content"] + EOS_TOKEN for m in messages if m["role"] == "assistant"]
    return "".join(replies[-1:] if last_only else replies)


def _tokenizer() -> Tokenizer:
    texts = [json.dumps(r) for r in _chat_records(30) + _pair_records(30)]
    return train_bpe(texts, VOCAB)


def _runs(mask: np.ndarray) -> list[slice]:
    """The maximal runs of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _encode(encoder: ChatEncoder, conversations: list, bad: BadRecords | None = None) -> list:
    """The sequences of one record standing for `conversations`; [] if it is bad."""
    items = [(Record("f:1", "1", None), conversations)]
    found = list(encoder.encode(items, bad or BadRecords("error", _quiet)))
    return found[0][1] if found else []


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return _tokenizer()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    source = _write_jsonl(root / "chat.jsonl", _chat_records(60))
    cfg = DataConfig(source=str(source), dir=str(root / "ds"), format="chat", seq_len=SEQ)
    return prepare_dataset(DataConfig(**{**vars(cfg), "val_fraction": 0.2}), VOCAB, 0, _quiet)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    source = _write_jsonl(root / "pairs.jsonl", _pair_records(40))
    cfg = DataConfig(
        source=str(source), dir=str(root / "ds"), format="preference", seq_len=64, val_fraction=0.2
    )
    return prepare_dataset(cfg, VOCAB, 0, _quiet)


# ---- records -> targets -------------------------------------------------------------------------


def test_default_template_and_multi_turn_targets(tok):
    encoder = ChatEncoder(tok, ChatTemplate.build("default", tok), SEQ, "chat")
    [(ids, mask)] = _encode(encoder, [CONVERSATION])
    assert (
        tok.decode(ids.tolist())
        == _render(CONVERSATION)
        == (
            "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello! How can I help?"
            "<|endoftext|><|user|>\nAdd 2 and 3\n<|assistant|>\n2 + 3 = 5<|endoftext|>"
        )
    )
    runs = _runs(mask)
    assert [tok.decode(ids[r].tolist()) for r in runs] == [
        "Hello! How can I help?<|endoftext|>",
        "2 + 3 = 5<|endoftext|>",
    ]
    assert ids[runs[0].stop - 1] == ids[-1] == tok.eos_id  # the EOS is a target, as a token
    # a prompt/response record is one user turn and one assistant turn
    messages = parse_chat({"prompt": "Why?", "response": "Because."})
    [(ids, mask)] = _encode(encoder, [messages])
    assert tok.decode(ids.tolist()) == "<|user|>\nWhy?\n<|assistant|>\nBecause.<|endoftext|>"
    assert tok.decode(ids[mask].tolist()) == "Because.<|endoftext|>"


def test_preference_targets_are_the_response_only(tok):
    encoder = ChatEncoder(tok, ChatTemplate.build("auto", tok), SEQ, "preference")
    record = {"prompt": CONVERSATION[:4], "chosen": "Five.", "rejected": [CONVERSATION[2]]}
    [(chosen, chosen_mask), (rejected, rejected_mask)] = _encode(
        encoder, list(parse_preference(record))
    )
    prompt = _render(CONVERSATION[:4]) + "<|assistant|>\n"
    assert tok.decode(chosen.tolist()) == prompt + "Five.<|endoftext|>"
    assert tok.decode(chosen[chosen_mask].tolist()) == "Five.<|endoftext|>"
    # the earlier assistant turn of the prompt is no target
    assert tok.decode(rejected[rejected_mask].tolist()) == "Hello! How can I help?<|endoftext|>"


def test_hf_chat_template_from_the_tokenizer_folder(tmp_path, tok):
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(folder / "tokenizer.json")
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    raw.save(str(folder / "tokenizer.json"))
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {"eos_token": "<|im_end|>", "chat_template": chatml}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    source = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 2)
    cfg = DataConfig(
        source=str(source), dir=str(tmp_path / "ds"), format="chat", tokenizer=str(folder)
    )
    dir = prepare_dataset(DataConfig(**{**vars(cfg), "val_fraction": 0.5}), 400, 0, _quiet)
    manifest = json.loads((dir / "manifest.json").read_text())
    assert manifest["kind"] == "chat" and manifest["eos_token"] == "<|im_end|>"
    assert manifest["chat_template"]["source"] == f"tokenizer folder {folder}"
    assert (dir / "chat_template.jinja").read_text() == chatml
    shards = ExampleShards.open(dir, "train")
    ids = shards.window(0, shards.num_tokens)
    mask = shards.masks.window(0, shards.num_tokens).astype(bool)
    loaded = Tokenizer.load(dir / "tokenizer.json", "<|im_end|>")
    assert loaded.decode(ids.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # targets: each reply and its end-of-turn token, not the newline the template adds after
    runs = [loaded.decode(ids[r].tolist()) for r in _runs(mask)]
    assert runs == ["Hello! How can I help?<|im_end|>", "2 + 3 = 5<|im_end|>"]
    assert ids[mask][-1] == raw.token_to_id("<|im_end|>")
    # a template file overrides the folder's template
    file = tmp_path / "t.jinja"
    file.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    template = ChatTemplate.build(str(file), loaded, str(folder))
    assert template.source == f"file {file}"
    assert template.render(CONVERSATION[1:3]) == "[user]Hi there[assistant]Hello! How can I help?"
    assert ChatTemplate.build("auto", loaded, str(tmp_path / "elsewhere.json")).source == "default"
    with pytest.raises(DataError, match="not auto, default, nor a Jinja template file"):
        ChatTemplate.build(str(tmp_path / "missing.jinja"), loaded)


def test_bad_records_reported_with_file_and_line_and_skipped(tmp_path):
    good = _chat_records(6)
    lines = [
        json.dumps(good[0]),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "human", "content": "hi"}]}),
        json.dumps({"prompt": "q", "response": "  "}),
        "",
        json.dumps({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"prompt": "q", "response": "long " * 200}),
        json.dumps({"text": "a document"}),
        json.dumps(["not", "an", "object"]),
        *[json.dumps(r) for r in good[1:]],
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(
        source=str(source), dir=str(tmp_path / "ds"), format="chat", seq_len=SEQ, val_fraction=0.3
    )
    log: list[str] = []
    dir = prepare_dataset(cfg, VOCAB, 0, log.append)
    assert f"{source}:2: invalid JSON: Expecting property name enclosed in double quotes" in log[0]
    expected = [
        f"{source}:2: invalid JSON",
        f"{source}:3: no assistant turn; skipped",
        f"{source}:4: messages[0]: unknown role 'human' (valid: system, user, assistant)",
        f"{source}:5: empty response; skipped",
        f"{source}:7: messages[0]: no 'role'; skipped",
        f"{source}:9: neither a 'messages' list nor 'prompt' and 'response'",
        f"{source}:10: expected a JSON object, got list; skipped",
    ]
    for part in expected:
        assert any(line.startswith(part) for line in log), (part, log)
    too_long = re.compile(
        rf"{re.escape(str(source))}:8: \d+ tokens, more than data.seq_len \+ 1 = 129"
    )
    assert any(too_long.match(line) for line in log)  # found once tokenized
    assert "8 bad records skipped" in log[-1]
    manifest = json.loads((dir / "manifest.json").read_text())
    assert manifest["skipped_records"] == 8
    assert sum(i["num_examples"] for i in manifest["examples"].values()) == len(good)
    with pytest.raises(DataError, match=rf"^{re.escape(str(source))}:2: invalid JSON.*= error"):
        prepare_dataset(DataConfig(**{**vars(cfg), "bad_records": "error"}), VOCAB, 0, _quiet)


def test_json_array_records_and_max_documents(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_chat_records(3) + [{"messages": []}]))
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "b.jsonl", _chat_records(2))
    cfg = DataConfig(source=str(tmp_path), format="chat")
    records = list(read_records(cfg))
    assert [r.key for r in records] == [
        "a.json#0",
        "a.json#1",
        "a.json#2",
        "a.json#3",
        "sub/b.jsonl:1",
        "sub/b.jsonl:2",
    ]
    bad: list[str] = []
    good = list(parse_records(records, "chat", BadRecords("skip", bad.append)))
    assert len(good) == 5 and bad == [
        f"{tmp_path / 'a.json'}: record 4: no assistant turn; skipped"
    ]
    assert len(list(read_records(DataConfig(**{**vars(cfg), "max_documents": 2})))) == 2


def test_preference_records_checked():
    with pytest.raises(BadRecord, match="empty prompt"):
        parse_preference({"prompt": " ", "chosen": "a", "rejected": "b"})
    with pytest.raises(BadRecord, match="empty prompt"):
        parse_preference({"prompt": [], "chosen": "a", "rejected": "b"})
    with pytest.raises(BadRecord, match="no 'rejected'"):
        parse_preference({"prompt": "q", "chosen": "a"})
    with pytest.raises(BadRecord, match="empty chosen response"):
        parse_preference({"prompt": "q", "chosen": "", "rejected": "b"})
    with pytest.raises(BadRecord, match="the same response"):
        parse_preference({"prompt": "q", "chosen": "a", "rejected": "a"})
    with pytest.raises(BadRecord, match="rejected: role user, expected assistant"):
        parse_preference({"prompt": "q", "chosen": "a", "rejected": [CONVERSATION[1]]})
    with pytest.raises(BadRecord, match="last turn is assistant"):
        parse_preference({"prompt": CONVERSATION[:3], "chosen": "a", "rejected": "b"})
    with pytest.raises(BadRecord, match="no user turn before"):
        parse_chat({"messages": [CONVERSATION[0], CONVERSATION[2]]})


def test_special_token_text_in_a_message_is_refused(tok):
    encoder = ChatEncoder(tok, ChatTemplate.build("default", tok), SEQ, "chat")
    bad: list[str] = []
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b<|endoftext|>"},
    ]
    assert _encode(encoder, [messages], BadRecords("skip", bad.append)) == []
    assert bad == [
        "f:1: messages[1] holds the text of the special token '<|endoftext|>', which "
        "would be read as that token; skipped"
    ]


# ---- storage and loader -------------------------------------------------------------------------


def _loader(dir, packing="pack", dp_rank=0, dp_size=1, global_batch=8, micro=2, **kw):
    shards = ExampleShards.open(dir, "train")
    seq = kw.pop("seq_len", SEQ if shards.kind == "chat" else 64)
    return ExampleLoader(
        shards, seq, global_batch, micro, dp_rank, dp_size, 0, packing=packing, **kw
    )


def _row_examples(inputs, labels, doc, tok) -> list[tuple[str, str]]:
    """(rendered example, decoded targets) of each example of one row: doc ids [L] tell them
    apart, padding (EOS inputs, no labels) after them; an example ends with a target EOS."""
    assert torch.all(doc[1:] >= doc[:-1]) and doc[0] == 0
    found = []
    for k in doc.unique().tolist():
        part = doc == k
        counted = labels[part] != IGNORE_INDEX
        if not counted.any():  # the padding: the last id
            assert k == doc.max() and torch.all(inputs[part] == tok.eos_id)
            continue
        end = int(np.flatnonzero(counted.numpy())[-1]) + 1
        assert not counted[end:].any() and torch.all(inputs[part][end:] == tok.eos_id)
        tokens = [*inputs[part][:end].tolist(), int(labels[part][end - 1])]
        found.append((tok.decode(tokens), tok.decode(labels[part][counted].tolist())))
    return found


def _examples_of(batch, tok) -> list[tuple[str, str]]:
    """(rendered example, decoded targets) of every example in `batch`'s rows."""
    found = []
    for row in range(len(batch.inputs)):
        inputs, labels = batch.inputs[row], batch.labels[row]
        doc = torch.zeros_like(inputs) if batch.doc_ids is None else batch.doc_ids[row]
        found += _row_examples(inputs, labels, doc, tok)
    return found


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_loader_rows_hold_whole_examples_and_their_targets(chat_dir, packing):
    tok = Tokenizer.load(chat_dir / "tokenizer.json")
    loader = _loader(chat_dir, packing)
    everything = loader.batch_of(np.arange(loader.num_samples))
    assert everything.inputs.shape == (loader.num_samples, SEQ)
    assert (everything.doc_ids is None) == (packing == "pad")
    found = _examples_of(everything, tok)
    records = {}
    for record in _chat_records(60):
        messages = (
            [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]},
            ]
            if "prompt" in record
            else record["messages"]
        )
        records[_render(messages)] = _expected_targets(messages)
    assert (
        len(found)
        == len(set(found))
        == json.loads((chat_dir / "manifest.json").read_text())["examples"]["train"]["num_examples"]
    )
    for rendered, targets in found:
        assert records[rendered] == targets
    if packing == "pack":
        assert loader.num_samples < len(found)  # some rows hold several examples
    else:
        assert loader.num_samples == len(found)


def test_pack_rows_greedy():
    assert pack_rows(np.array([5, 5, 3, 9, 2]), 8).tolist() == [0, 2, 3, 4, 5]
    assert pack_rows(np.array([], dtype=np.int64), 8).tolist() == [0]


def test_same_global_batch_for_every_dp_size_and_loss_denominator(chat_dir):
    def step_rows(dp_size):
        inputs, labels, ids, terms = [], [], [], []
        for rank in range(dp_size):
            loader = _loader(chat_dir, dp_rank=rank, dp_size=dp_size, micro=8 // (2 * dp_size) or 1)
            for _ in range(2):
                batches = loader.next_step()
            for b in batches:
                inputs.append(b.inputs)
                labels.append(b.labels)
                ids.append(b.sample_ids)
                # a stand-in per-token loss: the label value, summed per micro-batch
                counted = b.labels != IGNORE_INDEX
                terms.append(float(b.labels[counted].double().sum()) / b.loss_denominator)
            micro_batches = len(batches)
        mean = sum(terms) / (micro_batches * dp_size)
        return torch.cat(inputs), torch.cat(labels), torch.cat(ids), mean

    one = step_rows(1)
    counted = one[1] != IGNORE_INDEX
    assert one[3] == pytest.approx(float(one[1][counted].double().mean()), rel=1e-12)
    for dp in (2, 4):
        other = step_rows(dp)
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])
        assert torch.equal(one[2], other[2])
        assert other[3] == pytest.approx(one[3], rel=1e-12)


def test_exact_resume_across_epochs(chat_dir):
    a = _loader(chat_dir)
    for _ in range(a.steps_per_epoch - 1):
        a.next_step()
    b = _loader(chat_dir)
    b.load_state_dict(a.state_dict())
    for _ in range(3):  # crosses into the next epoch
        for x, y in zip(a.next_step(), b.next_step(), strict=True):
            assert torch.equal(x.inputs, y.inputs) and torch.equal(x.doc_ids, y.doc_ids)
            assert x.loss_denominator == y.loss_denominator
    assert a.epoch == 1
    with pytest.raises(DataError, match="num_samples is"):
        _loader(chat_dir, packing="pad").load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="seed is 0 now but 5"):
        b.load_state_dict({**a.state_dict(), "seed": 5})


def test_loader_refusals(chat_dir):
    with pytest.raises(DataError, match="more than data.seq_len \\+ 1 = 17: prepare it again"):
        _loader(chat_dir, seq_len=16)
    with pytest.raises(DataError, match="has .* rows \\(pad\\), but one global batch needs 512"):
        _loader(chat_dir, "pad", global_batch=512)
    loader = _loader(chat_dir)
    loader.shards.vocab_size = 40  # as if the shards held ids past the vocabulary
    with pytest.raises(DataError, match="is not below the vocabulary size 40"):
        loader.next_step()


def test_preference_batches(pair_dir):
    tok = Tokenizer.load(pair_dir / "tokenizer.json")
    loader = _loader(pair_dir, global_batch=4, micro=2)
    assert (
        loader.num_samples
        == json.loads((pair_dir / "manifest.json").read_text())["examples"]["train"]["num_examples"]
    )
    batches = loader.next_step()
    assert len(batches) == 2
    for b in batches:
        assert b.inputs.shape == b.labels.shape == (4, 64)
        assert b.doc_ids is None and b.loss_denominator is None and b.sample_ids.shape == (2,)
        rows = [
            _row_examples(b.inputs[r], b.labels[r], torch.zeros(64, dtype=torch.int64), tok)[0]
            for r in range(4)
        ]
        for (chosen, chosen_targets), (rejected, rejected_targets) in zip(
            rows[:2], rows[2:], strict=True
        ):
            prompt = chosen.split("<|assistant|>\n")[0]
            assert rejected.startswith(prompt + "<|assistant|>\n") and chosen != rejected
            assert re.fullmatch(rf"(Yes|Sure) (\d+){re.escape(EOS_TOKEN)}", chosen_targets)
            assert re.fullmatch(rf"(No|Never) (\d+)!?{re.escape(EOS_TOKEN)}", rejected_targets)
            number = re.findall(r"\d+", chosen_targets)
            assert number == re.findall(r"\d+", rejected_targets) == re.findall(r"\d+", prompt)
    same = loader.batch_of(batches[0].sample_ids.numpy())
    assert torch.equal(same.inputs, batches[0].inputs)


def test_build_loaders_and_check_dataset(chat_dir, tmp_path):
    data = DataConfig(dir=str(chat_dir), format="chat", seq_len=SEQ, packing="pad")
    training = TrainingConfig(global_batch_size=8, micro_batch_size=2)
    shards = check_dataset(data, ModelConfig(vocab_size=VOCAB))
    assert isinstance(shards, ExampleShards)
    train, val = build_loaders(data, training, dp_rank=1, dp_size=2, train_shards=shards)
    assert isinstance(train, ExampleLoader) and isinstance(val, ExampleLoader)
    assert train.shuffle and not val.shuffle and val.global_batch_size <= 8
    assert val.global_batch_size % 4 == 0 and val.num_samples >= val.global_batch_size
    with pytest.raises(ConfigError, match="model.vocab_size \\(299\\) is smaller"):
        check_dataset(data, ModelConfig(vocab_size=VOCAB - 1))
    text_dir = write_token_dataset(tmp_path / "text", {"train": np.arange(99)}, VOCAB, 0)
    with pytest.raises(DataError, match=f"data.format is chat, but data.dir = {text_dir} holds a "):
        check_dataset(DataConfig(dir=str(text_dir), format="chat"), ModelConfig(vocab_size=VOCAB))
    with pytest.raises(DataError, match="data.format is text, but .* holds a chat dataset"):
        check_dataset(DataConfig(dir=str(chat_dir)), ModelConfig(vocab_size=VOCAB))


def test_prepare_is_kept_or_rebuilt_by_recipe(chat_dir):
    manifest = json.loads((chat_dir / "manifest.json").read_text())
    cfg = DataConfig(**manifest["data_config"])
    log: list[str] = []
    prepare_dataset(DataConfig(**{**vars(cfg), "packing": "pad"}), VOCAB, 0, log.append)
    assert log == [
        f"{chat_dir} is up to date (same records, tokenizer and seed); --force rebuilds it"
    ]
    assert (
        manifest["recipe"]["data"].get("seq_len") == SEQ
        and "packing" not in manifest["recipe"]["data"]
    )


# ---- the demonstration pairs --------------------------------------------------------------------

SOURCE = '''
def top(a, b):
    """Add.

    Really.
    """
    # the sum
    return a + b


def stub():
    """Nothing."""
    ...


class Box:
    def method(self):
        """The box's value."""
        if self.x:
            return 1
        return 2

    class Inner:
        def hidden(self):
            """Not module level."""
            return 0


def no_doc():
    return 3
'''


def test_functions_split_at_the_docstring():
    found = functions(SOURCE)
    assert [f.line for f in found] == [2, 17]
    assert found[0].head == 'def top(a, b):\n    """Add.\n\n    Really.\n    """'
    assert found[0].body == "# the sum\nreturn a + b"
    assert found[1].head == 'def method(self):\n    """The box\'s value."""'
    assert found[1].body == "if self.x:\n    return 1\nreturn 2"


def test_demo_pairs_from_the_stdlib():
    cfg = DataConfig(format="preference", max_documents=40)
    description, records = demo_records(cfg, seed=3)
    assert len(records) == 40 and "40 preference pairs" in description
    assert [r.data for r in records] == [r.data for r in demo_records(cfg, seed=3)[1]]
    assert len({r.key for r in records}) >= 2  # keyed by file: split by file
    for r in records:
        assert r.data["prompt"].startswith(PROMPT + "def ") or r.data["prompt"].startswith(
            PROMPT + "async def "
        )
        assert r.data["chosen"] != r.data["rejected"]
        assert r.where.startswith("/") and r.where.split(":")[-1].isdigit()
    _, chat = demo_records(DataConfig(format="chat", max_documents=5), seed=3)
    assert len(chat) == 5 and set(chat[0].data) == {"prompt", "response"}
