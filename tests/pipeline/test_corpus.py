import json
import platform

import pytest

from kdcache.pipeline.corpus import (
    _select,
    builtin_corpus,
    corpus_fingerprint,
    is_heldout,
    stdlib_files,
    write_corpus,
)
from kdcache.storage.errors import ConfigError


@pytest.fixture(scope="module")
def everything():
    return builtin_corpus("all")


def test_deterministic_and_sorted(everything):
    again = builtin_corpus("all")
    assert again == everything
    sources = [d.source for d in everything]
    assert sources == sorted(sources) and len(set(sources)) == len(sources)
    assert len(everything) > 300  # the whole stdlib, not a handful of files
    assert {"json/decoder.py", "collections/__init__.py", "argparse.py"} <= set(sources)


def test_no_tests_caches_third_party_or_build_files(everything):
    for doc in everything:
        *dirs, name = doc.source.split("/")
        assert name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata_"))
        assert not set(dirs) & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
        assert not any(d.startswith("config-") for d in dirs)


def test_exclusions_on_a_stdlib_shaped_tree(tmp_path):
    keep = ["abc.py", "json/decoder.py", "unittest/case.py", "idlelib/run.py"]
    drop = [
        "test/test_abc.py",
        "test/support/__init__.py",
        "lib2to3/tests/data/bom.py",
        "idlelib/idle_test/htest.py",
        "unittest/test/dummy.py",
        "site-packages/numpy/__init__.py",
        "dist-packages/apt/__init__.py",
        "json/__pycache__/decoder.py",
        "config-3.11-x86_64-linux-gnu/python-config.py",
        "_sysconfigdata__linux_x86_64-linux-gnu.py",
        "sqlite3/test_dump.py",
        "README.txt",
    ]
    for rel in keep + drop:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert stdlib_files(tmp_path) == sorted(keep)


def test_files_that_are_not_utf8_are_skipped(tmp_path):
    (tmp_path / "good.py").write_text("s = 'café'\n", encoding="utf-8")
    (tmp_path / "latin1.py").write_bytes("s = 'café'\n".encode("latin-1"))
    assert [source for source, _ in _select(None, None, tmp_path)] == ["good.py"]


def test_split_is_disjoint_complete_and_stable(everything):
    train, heldout = builtin_corpus("train"), builtin_corpus("heldout")
    train_set, heldout_set = {d.source for d in train}, {d.source for d in heldout}
    assert not train_set & heldout_set
    assert train_set | heldout_set == {d.source for d in everything}
    assert 0.01 < len(heldout) / len(everything) < 0.12  # ~5%
    # A file's split depends on its path only, not on the caps or the other files.
    capped = builtin_corpus("heldout", max_files=200)
    assert capped and {d.source for d in capped} <= heldout_set
    assert builtin_corpus("heldout", heldout_percent=0) == []
    bigger = {d.source for d in builtin_corpus("heldout", heldout_percent=20)}
    assert heldout_set < bigger  # raising the share only moves files into held-out


def test_caps_span_the_library_and_nest(everything):
    sources = [d.source for d in everything]
    ten = builtin_corpus("all", max_files=10)
    assert len(ten) == 10
    positions = [sources.index(d.source) for d in ten]
    assert positions[0] < len(sources) / 8 and positions[-1] > len(sources) * 3 / 4
    assert len({d.source[0] for d in ten}) >= 5  # not just the first letters
    assert {d.source for d in ten} <= {d.source for d in builtin_corpus("all", max_files=40)}

    small = builtin_corpus("all", max_bytes=300_000)
    size = sum(len(d.text.encode()) for d in small)
    assert 250_000 < size <= 300_000
    both = builtin_corpus("all", max_files=50, max_bytes=300_000)
    assert len(both) <= 50 and sum(len(d.text.encode()) for d in both) <= 300_000


def test_fingerprint(everything):
    fp = corpus_fingerprint("all", max_files=30)
    assert fp == corpus_fingerprint("all", max_files=30)
    assert fp["python_version"] == platform.python_version()
    assert fp["num_files"] == 30
    docs = builtin_corpus("all", max_files=30)
    assert fp["total_bytes"] == sum(len(d.text.encode()) for d in docs)
    assert fp["sha256"] == corpus_fingerprint("all", max_files=30, documents=docs)["sha256"]
    assert fp["sha256"] != corpus_fingerprint("all", max_files=31)["sha256"]
    assert fp["sha256"] != corpus_fingerprint("train", max_files=30)["sha256"]


def test_write_corpus(tmp_path):
    description = write_corpus(tmp_path, max_files=60, heldout_percent=20)
    assert json.loads((tmp_path / "corpus.json").read_text()) == description
    assert not list(tmp_path.glob("*.partial"))
    read = {}
    for split in ("train", "heldout"):
        lines = (tmp_path / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        read[split] = [json.loads(line) for line in lines]
        assert all(set(r) == {"text", "source"} for r in read[split])
        assert len(read[split]) == description["splits"][split]["num_files"] > 0
    expected = builtin_corpus("all", max_files=60, heldout_percent=20)
    assert sorted(r["source"] for r in read["train"] + read["heldout"]) == [
        d.source for d in expected
    ]
    texts = {d.source: d.text for d in expected}
    assert all(r["text"] == texts[r["source"]] for r in read["train"] + read["heldout"])
    assert all(is_heldout(r["source"], 20) for r in read["heldout"])


def test_invalid_settings_report_every_problem():
    with pytest.raises(ConfigError, match="split must be one of.*max_files.*heldout_percent"):
        builtin_corpus("dev", max_files=0, heldout_percent=100)
