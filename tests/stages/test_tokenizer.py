import json

import pytest
from tokenizers import Tokenizer

from kdcache.pipeline.corpus import builtin_corpus
from kdcache.stages.models.tokenizer import (
    load_tokenizer,
    make_tokenizer_info,
    save_tokenizer,
    tokenizer_fingerprint,
    train_builtin_tokenizer,
)
from kdcache.storage.errors import ConfigError

EXTRA = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": None}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d.text for d in builtin_corpus("train", max_files=24)]


@pytest.fixture(scope="module")
def tok(texts) -> Tokenizer:
    return train_builtin_tokenizer(texts, vocab_size=600)


def test_training_is_deterministic(texts, tok):
    assert train_builtin_tokenizer(texts, vocab_size=600).to_str() == tok.to_str()
    assert tok.get_vocab_size() == 600
    assert tok.token_to_id("<|endoftext|>") == 0
    assert train_builtin_tokenizer(texts[:12], vocab_size=600).to_str() != tok.to_str()


def test_vocab_size_too_small_is_a_config_error(texts):
    with pytest.raises(ConfigError, match="vocab_size must be an integer above 256"):
        train_builtin_tokenizer(texts, vocab_size=100)


def test_encode_decode_round_trips_a_stdlib_file(tok):
    heldout = builtin_corpus("heldout", max_files=200)  # text the tokenizer was not trained on
    text = max(heldout, key=lambda d: len(d.text)).text
    ids = tok.encode(text).ids
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges do compress code
    assert tok.decode(ids) == text
    odd = "naïve — 日本語 <|endoftext|>\ttabs\r\n  \x00"
    assert tok.decode(tok.encode(odd).ids, skip_special_tokens=False) == odd


def _edited(tok: Tokenizer, edit) -> str:
    definition = json.loads(tok.to_str())
    edit(definition)
    return json.dumps(definition)


def test_fingerprint_sensitivity(tok):
    base = tokenizer_fingerprint(tok.to_str(), EXTRA)
    assert len(base) == 64 and base == tokenizer_fingerprint(tok.to_str(), dict(EXTRA))

    def swap_merges(d):
        d["model"]["merges"][0], d["model"]["merges"][1] = (
            d["model"]["merges"][1],
            d["model"]["merges"][0],
        )

    def rename_special(d):
        d["added_tokens"][0]["content"] = "<|eot|>"

    def drop_vocab_entry(d):
        d["model"]["vocab"].pop(max(d["model"]["vocab"], key=d["model"]["vocab"].get))

    def set_normalizer(d):
        d["normalizer"] = {"type": "NFC"}

    prints = {base}
    for edit in (swap_merges, rename_special, drop_vocab_entry, set_normalizer):
        prints.add(tokenizer_fingerprint(_edited(tok, edit), EXTRA))
    for key, value in (("chat_template", "{{ messages }}"), ("bos_token", None)):
        prints.add(tokenizer_fingerprint(tok.to_str(), {**EXTRA, key: value}))
    assert len(prints) == 7


def test_fingerprint_ignores_serialization_details(tok):
    base = tokenizer_fingerprint(tok.to_str(), EXTRA)

    def old_style(d):  # tokenizers < 0.20 wrote merges as "a b"
        d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]
        d["version"] = "0.9"
        d["truncation"] = {"max_length": 8, "strategy": "LongestFirst", "stride": 0}

    reordered = json.dumps(dict(reversed(json.loads(tok.to_str()).items())), indent=4)
    assert tokenizer_fingerprint(reordered, EXTRA) == base
    assert tokenizer_fingerprint(_edited(tok, old_style), EXTRA) == base


def test_save_load_round_trip(tok, tmp_path):
    expected = make_tokenizer_info(tok)
    folder = save_tokenizer(tok, tmp_path / "tok")
    first, second = load_tokenizer(folder), load_tokenizer(folder / "tokenizer.json")
    assert first.fingerprint == second.fingerprint == expected.fingerprint
    assert (first.bos_id, first.eos_id, first.add_bos, first.vocab_size) == (0, 0, True, 600)
    assert first.chat_template is None and first.path == str(folder)
    assert first.tokenizer.encode("def f(x):").ids == tok.encode("def f(x):").ids
    assert not list(folder.glob("*.partial"))


def test_hf_folder_settings(tok, tmp_path):
    folder = save_tokenizer(tok, tmp_path / "hf")
    plain = load_tokenizer(folder).fingerprint
    config = {
        "bos_token": {"content": "<|endoftext|>", "lstrip": False},  # AddedToken form
        "eos_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "{{ messages }}"},
        ],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    info = load_tokenizer(folder)
    assert (info.bos_id, info.add_bos, info.chat_template) == (0, False, "{{ messages }}")
    assert info.fingerprint != plain

    (folder / "tokenizer_config.json").unlink()  # the template may live in its own file
    (folder / "chat_template.jinja").write_text("{{ bos_token }}")
    assert load_tokenizer(folder).chat_template == "{{ bos_token }}"

    resaved = load_tokenizer(save_tokenizer(load_tokenizer(folder), tmp_path / "again"))
    assert resaved.fingerprint == load_tokenizer(folder).fingerprint


def test_transformers_reads_the_saved_folder(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = save_tokenizer(tok, tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = "import os\nprint(os.getcwd())\n"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text).ids
    assert hf.bos_token_id == hf.eos_token_id == 0


def test_load_errors(tok, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ConfigError, match="expected a tokenizer.json .*tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ConfigError, match="found no"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a tokenizer the tokenizers library can read"):
        load_tokenizer(tmp_path / "bad")
    folder = save_tokenizer(tok, tmp_path / "wrong_bos")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ConfigError, match="bos_token '<s>' is not in the tokenizer's vocabulary"):
        load_tokenizer(folder)
