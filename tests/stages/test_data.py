import json
import random
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import processors

from kdcache.stages.capture.sources import (
    Document,
    iter_documents,
    render_chat,
    source_fingerprint,
    tokenize,
)
from kdcache.stages.models.tokenizer import make_tokenizer_info, train_builtin_tokenizer
from kdcache.storage.errors import ConfigError

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
)
WORDS = "the quick brown fox jumps over a lazy dog hello world why how what answer is".split()


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    tokenizer = train_builtin_tokenizer(texts, vocab_size=300)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer):
    return make_tokenizer_info(tokenizer, chat_template=CHATML)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def docs(data, **kwargs):
    return list(iter_documents(data, **kwargs))


# ----------------------------------------------------------------------------- sources


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    [doc] = docs(tmp_path / "a.txt")
    assert (doc.source, doc.index, doc.text) == ("a.txt", 0, "hello\nworld\n")
    assert doc.token_ids is None and doc.messages is None


def test_folder_is_walked_sorted_recursively_skipping_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "z.md").write_text("zed", encoding="utf-8")
    (tmp_path / "b" / "notes").write_text("no extension", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    (tmp_path / ".git" / "HEAD").write_bytes(b"\0binary")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "one"}, {"text": "two"}])
    got = [(d.source, d.index, d.text) for d in docs(tmp_path)]
    assert got == [
        ("a.txt", 0, "first"),
        ("b/c.jsonl", 0, "one"),
        ("b/c.jsonl", 1, "two"),
        ("b/notes", 0, "no extension"),
        ("z.md", 0, "zed"),
    ]
    assert [(d.source, d.index, d.text) for d in docs(tmp_path)] == got  # deterministic


def test_jsonl_text_chat_ids_and_text_field(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    file = tmp_path / "d.jsonl"
    file.write_text(
        json.dumps({"text": "plain", "id": 1})
        + "\n\n"  # blank lines are skipped and do not count as documents
        + json.dumps({"messages": chat})
        + "\n"
        + json.dumps({"input_ids": [5, 6, 7]})
        + "\n",
        encoding="utf-8",
    )
    plain, conversation, pretokenized = docs(file)
    assert (plain.index, plain.text) == (0, "plain")
    assert (conversation.index, conversation.messages) == (1, chat)
    assert pretokenized.index == 2 and pretokenized.token_ids.dtype == np.int64
    assert pretokenized.token_ids.tolist() == [5, 6, 7]

    write_jsonl(tmp_path / "e.jsonl", [{"body": "b1", "text": "not me"}])
    assert [d.text for d in docs(tmp_path / "e.jsonl", text_field="body")] == ["b1"]


def test_json_array_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]), encoding="utf-8")
    assert [(d.index, d.text) for d in docs(tmp_path / "d.json")] == [(0, "x"), (1, "y")]


def test_jsonl_missing_field_names_the_fields_found(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"text": "ok"}, {"text": "ok"}, {"id": 3, "body": "b"}])
    with pytest.raises(ConfigError) as e:
        docs(tmp_path / "data.jsonl")
    assert str(e.value) == (
        "data.jsonl line 3: expected a 'text' field (or --text-field) or a 'messages' list; "
        "found fields ['body', 'id']; pass --text-field body"
    )
    with pytest.raises(ConfigError, match=r"line 1: expected a 'content' field \(--text-field\)"):
        docs(tmp_path / "data.jsonl", text_field="content")


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "ok"}\n{"text": "no\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^data.jsonl line 2: .*invalid JSON"):
        docs(tmp_path / "data.jsonl")


def test_wrong_value_types_are_config_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": 3}])
    with pytest.raises(ConfigError, match="'text' to be a string, found int"):
        docs(tmp_path / "a.jsonl")
    write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(ConfigError, match="b.jsonl line 1: expected 'messages'"):
        docs(tmp_path / "b.jsonl")
    write_jsonl(tmp_path / "c.jsonl", [{"token_ids": [1, 2.5]}])
    with pytest.raises(ConfigError, match="list of token ids"):
        docs(tmp_path / "c.jsonl")


def test_parquet_text_and_ids_columns_in_batches(tmp_path):
    n = 2500  # more than one record batch
    texts = [f"doc {i}" for i in range(n)]
    pq.write_table(pa.table({"id": list(range(n)), "text": texts}), tmp_path / "t.parquet")
    got = docs(tmp_path / "t.parquet")
    assert [d.text for d in got] == texts and [d.index for d in got] == list(range(n))

    ids = [[i, i + 1, i + 2] for i in range(10)]
    table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "n": list(range(10))})
    pq.write_table(table, tmp_path / "ids.parquet")
    auto = docs(tmp_path / "ids.parquet")
    assert [d.token_ids.tolist() for d in auto] == ids
    assert all(d.token_ids.dtype == np.int64 and d.text is None for d in auto)

    table = pa.table({"toks": pa.array(ids, pa.list_(pa.int64())), "body": ["b"] * 10})
    pq.write_table(table, tmp_path / "named.parquet")
    assert [d.token_ids.tolist() for d in docs(tmp_path / "named.parquet", ids_field="toks")] == ids
    with pytest.raises(
        ConfigError, match=r"found fields \['body', 'toks'\]; pass --text-field body"
    ):
        docs(tmp_path / "named.parquet")


def test_datasets_folder_without_datasets_installed(tmp_path, monkeypatch):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
    (folder / "state.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    for data in (folder, tmp_path):  # the dataset itself, or a folder holding it
        with pytest.raises(ConfigError, match=r"my_dataset .*install kdcache\[datasets\]"):
            docs(data)
    assert source_fingerprint(tmp_path)["files"] == 2  # both files of the dataset folder


def test_binary_and_non_utf8_files_are_config_errors(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"abc\0def")
    with pytest.raises(ConfigError, match=r"model.bin is not a UTF-8 text file \(binary\?\)"):
        docs(tmp_path)
    (tmp_path / "model.bin").unlink()
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.txt is not a UTF-8 text file"):
        docs(tmp_path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="found nothing at .*nope"):
        docs(tmp_path / "nope")
    with pytest.raises(ConfigError, match="found nothing at .*nope"):
        source_fingerprint(tmp_path / "nope")
    with pytest.raises(ConfigError, match="found none"):
        docs(tmp_path)


def test_source_fingerprint(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "beta"}])
    size = (tmp_path / "sub" / "b.jsonl").stat().st_size
    base = source_fingerprint(tmp_path)
    assert base["root"] == tmp_path.name and base["files"] == 2 and base["bytes"] == 5 + size
    assert len(base["sha256"]) == 64 and source_fingerprint(tmp_path) == base

    (tmp_path / ".cache").write_text("ignored", encoding="utf-8")  # not read: no effect
    assert source_fingerprint(tmp_path) == base
    (tmp_path / "a.txt").write_text("alphA", encoding="utf-8")  # one byte changed
    changed = source_fingerprint(tmp_path)
    assert changed["sha256"] != base["sha256"] and changed["bytes"] == base["bytes"]
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    assert source_fingerprint(tmp_path) == base
    (tmp_path / "a.txt").rename(tmp_path / "c.txt")  # same bytes, another name
    assert source_fingerprint(tmp_path)["sha256"] != base["sha256"]


# ----------------------------------------------------------------------------- tokenization


def test_bos_once_and_eos_appended(tok):
    plain = tok.tokenizer.encode("hello world", add_special_tokens=False).ids
    out = tokenize(Document("s", 0, text="hello world"), tok)
    assert out.ids.dtype == np.int64 and out.target_mask.dtype == np.uint8
    assert out.ids.tolist() == [tok.bos_id, *plain, tok.eos_id]
    assert out.target_mask.tolist() == [1] * len(out.ids)

    starts_with_bos = tokenize(Document("s", 0, text="<|endoftext|>hello world"), tok)
    assert starts_with_bos.ids.tolist() == out.ids.tolist()  # never two BOS

    ids = np.array([tok.bos_id, *plain, tok.eos_id])
    assert tokenize(Document("s", 0, token_ids=ids), tok).ids.tolist() == ids.tolist()
    no_special = tokenize(Document("s", 0, token_ids=ids[1:-1]), tok, add_bos=False, add_eos=False)
    assert no_special.ids.tolist() == plain


def test_tokenizer_post_processor_is_not_applied(tokenizer):
    # A tokenizer whose post-processor adds BOS: add_special_tokens=False keeps it out.
    copy = type(tokenizer).from_str(tokenizer.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    info = make_tokenizer_info(copy, add_bos=False)
    out = tokenize(Document("s", 0, text="hello"), info)
    assert out.ids[0] != info.bos_id and out.ids[-1] == info.eos_id
    assert (out.ids == info.bos_id).sum() == 1  # only the EOS (same token here)


def test_pretokenized_ids_out_of_vocab(tok):
    with pytest.raises(ConfigError, match=r"token ids in \[0, \d+\) for s #4"):
        tokenize(Document("s", 4, token_ids=np.array([1, 99999])), tok)


def test_missing_bos_or_eos_token(tokenizer):
    info = make_tokenizer_info(tokenizer, bos_token=None, eos_token=None, add_bos=False)
    assert tokenize(Document("s", 0, text="hi"), info, add_eos=False).ids.size > 0
    with pytest.raises(ConfigError, match="EOS token for add_eos=True"):
        tokenize(Document("s", 0, text="hi"), info)


CHAT = [
    {"role": "system", "content": "how is the answer"},
    {"role": "user", "content": "why the fox"},
    {"role": "assistant", "content": "the quick brown fox jumps"},
    {"role": "user", "content": "what is a dog"},
    {"role": "assistant", "content": "a lazy dog"},
]


def labels_of(out):
    """Token ids that the masked-in rows predict."""
    return out.ids[1:][out.target_mask[:-1].astype(bool)]


def test_chat_assistant_only_mask(tok):
    doc = Document("chat.jsonl", 0, messages=CHAT)
    full = tokenize(doc, tok)
    assert full.target_mask.tolist() == [1] * len(full.ids)  # no masking unless asked

    out = tokenize(doc, tok, assistant_only=True)
    assert out.ids.tolist() == full.ids.tolist()
    assert out.ids[0] == tok.bos_id and out.ids[-1] == tok.eos_id and out.target_mask[-1] == 0
    decoded = tok.tokenizer.decode(labels_of(out).tolist(), skip_special_tokens=False)
    assert decoded == "the quick brown fox jumps<|im_end|>a lazy dog<|im_end|>"
    # No label of a masked-in row lies in a system/user content (by character offsets).
    text = render_chat(CHAT, tok)
    offsets = tok.tokenizer.encode(text, add_special_tokens=False).offsets
    # row t predicts ids[t + 1], which is token t of the encoding (ids[0] is the added BOS)
    label_positions = np.flatnonzero(out.target_mask[:-1])
    assert out.ids[1:-1].tolist() == tok.tokenizer.encode(text, add_special_tokens=False).ids
    others = [
        (text.find(m["content"]), len(m["content"])) for m in CHAT if m["role"] != "assistant"
    ]
    for j in label_positions:
        a, b = offsets[j]
        assert not any(a < s + n and b > s for s, n in others), text[a:b]
    rows = np.flatnonzero(out.target_mask)
    im_start = tok.tokenizer.token_to_id("<|im_start|>")
    text_before = tok.tokenizer.decode(out.ids[: rows[0] + 1].tolist(), skip_special_tokens=False)
    assert text_before.endswith("<|im_start|>assistant\n")  # first trained row: right after
    assert im_start not in labels_of(out)


def test_chat_without_prefix_stable_template(tokenizer):
    # The header counts the turns, so a prefix renders differently: content search fallback.
    template = "turns={{ messages | length }}\n" + CHATML
    info = make_tokenizer_info(tokenizer, chat_template=template)
    out = tokenize(Document("c", 0, messages=CHAT), info, assistant_only=True)
    decoded = info.tokenizer.decode(labels_of(out).tolist(), skip_special_tokens=False)
    assert decoded == "the quick brown fox jumpsa lazy dog"  # content only, no end marker


def test_chat_template_that_trims_content(tokenizer):
    # Like Llama 3: content | trim, so padded content is not rendered verbatim.
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}<|im_end|>{% endfor %}"
    info = make_tokenizer_info(tokenizer, chat_template=template)
    chat = [
        {"role": "user", "content": " why "},
        {"role": "assistant", "content": "  the dog \n"},
        {"role": "assistant", "content": ""},
    ]
    out = tokenize(Document("c", 0, messages=chat), info, assistant_only=True)
    decoded = info.tokenizer.decode(labels_of(out).tolist(), skip_special_tokens=False)
    assert decoded == "the dog<|im_end|><|im_end|>"  # an empty turn still learns to end


def test_chat_template_features(tokenizer):
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m['role'] | tojson }}: {% generation %}{{ m['content'] }}{% endgeneration %}{{ '\\n' }}"
        "{% endfor %}"
    )
    info = make_tokenizer_info(tokenizer, chat_template=template)
    assert render_chat(CHAT[1:3], info) == (
        '<|endoftext|>"user": why the fox\n"assistant": the quick brown fox jumps\n'
    )
    out = tokenize(Document("c", 0, messages=CHAT[1:3]), info, assistant_only=True)
    assert (out.ids == info.bos_id).sum() == 2 and out.ids[1] != info.bos_id  # BOS + EOS only
    decoded = info.tokenizer.decode(labels_of(out).tolist(), skip_special_tokens=False)
    assert decoded == " the quick brown fox jumps"  # " the" straddles header and content
    with pytest.raises(ConfigError, match="refused a conversation: no tools"):
        render_chat([{"role": "tool", "content": "x"}], info)


def test_chat_errors(tokenizer, tok):
    no_template = make_tokenizer_info(tokenizer)
    with pytest.raises(ConfigError, match="tokenizer has no chat template; chat data needs one"):
        tokenize(Document("c", 0, messages=CHAT), no_template)
    with pytest.raises(ConfigError, match=r"expected chat data .* \(s #2\)"):
        tokenize(Document("s", 2, text="plain"), tok, assistant_only=True)
    broken = make_tokenizer_info(tokenizer, chat_template="{% for m in messages %}")
    with pytest.raises(ConfigError, match="syntax error"):
        tokenize(Document("c", 0, messages=CHAT), broken)
