"""Stage one (``kdcache cache``) on real teachers, real caches and the real command line.

Teachers: a random built-in GPT and a random Hugging Face GPT-2 (both saved to folders the way
users save them), a built-in GPT trained here for a few seconds, and ``module:factory`` teachers
written into tmp_path. Caches are read back with ``CacheReader`` and compared with a direct
forward pass of the same weights. Shared fixtures (tokenizer, teachers) are in conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.pipeline.executors import resolve_shard, run_capture
from kdcache.stages.capture import CaptureConfig, CaptureSummary, sample_id
from kdcache.stages.models.gpt import GPT, GPTConfig, load_checkpoint
from kdcache.stages.models.tokenizer import load_tokenizer, train_builtin_tokenizer
from kdcache.storage.durable import read_json
from kdcache.storage.errors import CacheMismatchError, ConfigError
from kdcache.storage.manifest import PART_RECORD, PROGRESS
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import Sequence

K = 8  # top-k of most captures here
VOCAB = 512  # conftest's tokenizer and random teachers


# -- running stage one ------------------------------------------------------------------------
def kdcache_args(*args: object) -> list[str]:
    """``kdcache ARGS`` with the installed script of this environment (as a user runs it)."""
    script = Path(sys.executable).with_name("kdcache")
    return [str(script) if script.exists() else "kdcache", *map(str, args)]


def kdcache(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``kdcache ARGS`` to completion: returncode, stdout, stderr."""
    return subprocess.run(kdcache_args(*args), capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def spawn():
    """spawn(*args, env=None, cwd=None): start ``kdcache ARGS`` in the background; killed at
    teardown if a failing test left it running."""
    started: list[subprocess.Popen] = []

    def start(*args: object, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        p = subprocess.Popen(
            kdcache_args(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate()


def wait_for_record(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll until ``path`` holds a whole JSON record (True), or the process ends or time runs
    out first (False). A record seen half-written does not count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if read_json(path) is not None:
            return True
        time.sleep(0.002)
    return read_json(path) is not None


def env_with_path(folder: Path) -> dict:
    """This environment with ``folder`` first on PYTHONPATH (for module:factory teachers)."""
    path = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def capture(teacher: Path | str, data: Path, out: Path, **settings) -> CaptureSummary:
    """Stage one in this process (no CLI start-up cost), no progress bar."""
    cfg = CaptureConfig(
        teacher=str(teacher), data=str(data), out=str(out), progress=False, **settings
    )
    return run_capture(cfg)


def read_sequences(cache: Path) -> dict[int, Sequence]:
    """Every sequence of a finalized cache, by sample id."""
    return {s.sample_id: s for s in CacheReader(cache)}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def text_records(texts: list[str], chars: int, max_docs: int | None = None) -> list[dict]:
    """{"text": piece} for consecutive pieces of ``chars`` characters of the texts."""
    pieces = [t[i : i + chars] for t in texts for i in range(0, len(t), chars)]
    return [{"text": p} for p in pieces if p.strip()][:max_docs]


@pytest.fixture(scope="session")
def docs_jsonl(tmp_path_factory, corpus) -> Path:
    """60 text documents of mixed length (~25, ~80 and ~190 tokens, shuffled), so batches pad
    and the longer documents need windows at --seq-len 64 (the longest at 128 too)."""
    texts = corpus["train"]
    records = []
    for j, chars in enumerate((40, 150, 400)):
        records += text_records(texts[2 * j : 2 * j + 2], chars, max_docs=20)
    order = np.random.default_rng(0).permutation(len(records))
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", [records[i] for i in order])


# -- comparing cached targets with the teacher ------------------------------------------------
def near_ties(logprobs: torch.Tensor, tol: float) -> torch.Tensor:
    """(R, k) bool: the entry is within ``tol`` of a neighbour in the ranking (may swap)."""
    close = logprobs[:, :-1] - logprobs[:, 1:] < tol  # (R, k-1)
    tie = torch.zeros_like(logprobs, dtype=torch.bool)
    tie[:, :-1] |= close
    tie[:, 1:] |= close
    return tie


def assert_rows_match_reference(seq: Sequence, ref: torch.Tensor) -> None:
    """The cached rows of ``seq`` == the top-k of ``ref`` (R, V), float32 log-probs of a direct
    forward at the same rows.

    Ids exactly, except where adjacent reference log-probs differ by < 1e-3 (near-ties may
    swap); the reference log-probs of the cached ids are the k largest, in order; the stored
    log-probs are those values in float16; the tail is 1 - top-k mass, in float32.
    """
    ids = torch.tensor(seq.topk_ids.astype(np.int64))  # (R, k)
    lp = torch.tensor(seq.topk_logprobs.astype(np.float32))  # (R, k)
    tail = torch.tensor(seq.log_tail)  # (R,) float32
    assert ids.shape == (len(ref), K)
    want_lp, want_ids = ref.topk(K, dim=-1)  # (R, k) each, most likely first
    mismatch = (ids != want_ids) & ~near_ties(want_lp, 1e-3)
    assert not mismatch.any(), f"ids differ at (row, rank) {torch.nonzero(mismatch)[:5].tolist()}"
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "an id repeats within a row"
    torch.testing.assert_close(ref.gather(1, ids), want_lp, atol=1e-3, rtol=0)
    torch.testing.assert_close(lp, want_lp, atol=1e-3, rtol=1e-3)  # float16 storage
    torch.testing.assert_close(tail.exp(), 1 - want_lp.exp().sum(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tail.exp(), 1 - lp.exp().sum(1), atol=2e-3, rtol=0)


def gpt_logprobs(model: GPT):
    return lambda ids: F.log_softmax(model(ids[None]).float(), dim=-1)[0]  # (T,) -> (T, V)


def hf_logprobs(model):
    return lambda ids: F.log_softmax(model(input_ids=ids[None]).logits.float(), dim=-1)[0]


def check_cache_against_teacher(cache: Path, logprobs_of) -> int:
    """Every sequence's rows == a direct forward of its own input ids; returns the row count.

    Alignment: row t comes from tokens 0..t, so feeding the prefix ids[: t + 1] alone gives
    row t as its last row (checked at a few t per sequence)."""
    rows = 0
    with torch.inference_mode():
        for seq in CacheReader(cache):
            ids = torch.tensor(seq.input_ids.astype(np.int64))
            assert_rows_match_reference(seq, logprobs_of(ids))
            for t in {0, len(ids) // 2, len(ids) - 1}:
                torch.testing.assert_close(
                    torch.tensor(seq.topk_logprobs[t].astype(np.float32)),
                    logprobs_of(ids[: t + 1])[-1].topk(K).values,
                    atol=1e-3,
                    rtol=1e-3,
                )
            rows += len(seq.log_tail)
    return rows


# -- 1. exactness -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_cache(gpt_teacher, docs_jsonl, tmp_path_factory) -> Path:
    """docs_jsonl through the random built-in GPT: windows of 64 every 32 tokens, k = 8."""
    out = tmp_path_factory.mktemp("gpt-cache") / "c"
    summary = capture(gpt_teacher, docs_jsonl, out, k=K, seq_len=64, stride=32)
    assert summary.finalized and summary.sequences == CacheReader(out).num_sequences
    return out


def test_builtin_gpt_rows_equal_a_direct_forward(gpt_cache, gpt_teacher):
    cache = CacheReader(gpt_cache)
    assert cache.schema.targets_on == "all" and cache.k == K and cache.vocab_size == VOCAB
    assert max(len(s.doc_starts) for s in cache) == 1  # no packing
    model, _ = load_checkpoint(gpt_teacher / "model.pt")
    assert check_cache_against_teacher(gpt_cache, gpt_logprobs(model)) == cache.num_positions


def test_long_documents_become_windows_with_each_row_a_target_once(gpt_cache, docs_jsonl):
    seqs = read_sequences(gpt_cache)
    windowed = 0
    for i in range(len(docs_jsonl.read_text().splitlines())):
        windows = []  # document i's windows, in order
        while (sid := sample_id("docs.jsonl", i, len(windows))) in seqs:
            windows.append(seqs.pop(sid))
        tokens, targets = [], []  # the document rebuilt from its windows; its target rows
        for w, seq in enumerate(windows):
            start = 32 * w
            assert tokens[start:] == seq.input_ids[: len(tokens) - start].tolist()  # overlap
            tokens[start:] = seq.input_ids.tolist()
            targets += (start + np.flatnonzero(seq.loss_mask)).tolist()
        assert windows and targets == list(range(len(tokens)))
        windowed += len(windows) > 1
    assert not seqs and windowed >= 10


def test_k_equal_to_the_vocabulary_stores_the_whole_distribution(gpt_teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "for i in range(10):\n    print(i)\n"}])
    capture(gpt_teacher, data, tmp_path / "c", k=VOCAB, logprob_dtype="float32")
    [seq] = CacheReader(tmp_path / "c")
    assert np.isneginf(seq.log_tail).all()
    assert seq.topk_logprobs.dtype == np.float32 and (np.diff(seq.topk_logprobs, axis=1) <= 0).all()
    np.testing.assert_allclose(np.exp(seq.topk_logprobs).sum(axis=1), 1.0, rtol=1e-5)
    assert (np.sort(seq.topk_ids, axis=1) == np.arange(VOCAB)).all()


def test_hf_gpt2_rows_equal_a_direct_forward(hf_teacher, docs_jsonl, tmp_path):
    from transformers import GPT2LMHeadModel

    capture(hf_teacher, docs_jsonl, tmp_path / "c", k=K, seq_len=64, stride=32, backend="arrow")
    cache = CacheReader(tmp_path / "c")
    assert cache.manifest["fingerprints"]["teacher"]["kind"] == "hf"
    model = GPT2LMHeadModel.from_pretrained(hf_teacher).eval()
    assert check_cache_against_teacher(tmp_path / "c", hf_logprobs(model)) == cache.num_positions


def test_hf_teacher_that_transforms_its_head_output(tok_dir, docs_jsonl, tmp_path):
    """Gemma 2 soft-caps its logits after lm_head: the cache must hold the capped distribution
    the model's forward gives, not the head's raw output."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        final_logit_softcapping=3.0,  # logits = 3 tanh(head / 3)
        initializer_range=0.3,
    )
    Gemma2ForCausalLM(config).eval().save_pretrained(tmp_path / "gemma")
    records = [json.loads(line) for line in docs_jsonl.read_text().splitlines()[:12]]
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    capture(tmp_path / "gemma", data, tmp_path / "c", k=K, tokenizer=str(tok_dir))
    model = Gemma2ForCausalLM.from_pretrained(tmp_path / "gemma").eval()
    assert check_cache_against_teacher(tmp_path / "c", hf_logprobs(model)) > 0


SCALED_TEACHER = '''
import torch


class ScaledLM(torch.nn.Module):
    """A causal LM (running mean of embeddings) with a learned scalar logit scale."""

    max_positions = 64

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(512, 16)
        self.out = torch.nn.Linear(16, 512)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.0))  # a 0-d parameter

    def forward(self, ids):
        steps = torch.arange(1, ids.shape[1] + 1)[:, None]  # (T, 1)
        h = torch.tanh(self.emb(ids).cumsum(1) / steps)  # (B, T, 16)
        return self.logit_scale * self.out(h)  # (B, T, V)


def make():
    torch.manual_seed(0)
    return ScaledLM()
'''


def test_factory_teacher_rows_equal_a_direct_forward(docs_jsonl, tok_dir, tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "scaled_teacher.py").write_text(SCALED_TEACHER)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import scaled_teacher

    capture("scaled_teacher:make", docs_jsonl, tmp_path / "c", k=K, tokenizer=str(tok_dir))
    cache = CacheReader(tmp_path / "c")
    assert cache.manifest["fingerprints"]["teacher"]["kind"] == "factory"
    model = scaled_teacher.make().eval()
    logprobs_of = lambda ids: F.log_softmax(model(ids[None]).float(), dim=-1)[0]  # noqa: E731
    assert check_cache_against_teacher(tmp_path / "c", logprobs_of) == cache.num_positions


TOKENWISE_TEACHER = """
import torch


class TokenwiseLM(torch.nn.Module):
    \"\"\"No parameters; each position's logits depend on its own token only (so packing is
    trivially exact), and it takes the packing arguments.\"\"\"

    def forward(self, ids, position_ids=None, segment_ids=None):
        freq = torch.arange(1, 513, dtype=torch.float32)  # (V,)
        return 3 * torch.sin(0.01 * (ids[..., None] + 1) * freq)  # (B, T, V)


def make():
    return TokenwiseLM()
"""


def test_pack_with_a_parameterless_factory_teacher(docs_jsonl, tok_dir, tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "tokenwise_teacher.py").write_text(TOKENWISE_TEACHER)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import tokenwise_teacher

    settings = dict(k=K, tokenizer=str(tok_dir), seq_len=128, pack=True)
    capture("tokenwise_teacher:make", docs_jsonl, tmp_path / "c", **settings)
    assert max(len(s.doc_starts) for s in CacheReader(tmp_path / "c")) > 1
    model = tokenwise_teacher.make()
    logprobs_of = lambda ids: F.log_softmax(model(ids[None]), dim=-1)[0]  # noqa: E731
    check_cache_against_teacher(tmp_path / "c", logprobs_of)


# -- 2. alignment with a trained teacher ------------------------------------------------------
@pytest.fixture(scope="session")
def trained_teacher(save_teacher, corpus, tok_dir) -> Path:
    """The built-in "nano" GPT (context 64) trained for a few seconds on standard-library text."""
    tok = load_tokenizer(tok_dir).tokenizer
    data = torch.tensor(np.concatenate([tok.encode(t).ids for t in corpus["train"]]))  # (N,)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=VOCAB, block_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = torch.stack([data[i : i + 65] for i in starts])  # (16, 65)
        logits = model(batch[:, :-1])  # (16, 64, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.5, "the teacher did not learn; the alignment test would mean nothing"
    return save_teacher(model.eval(), "trained-teacher")


def test_trained_teacher_top1_is_the_next_input_token(trained_teacher, corpus, tmp_path):
    data = write_jsonl(tmp_path / "heldout.jsonl", text_records(corpus["heldout"], 1500, 12))
    capture(trained_teacher, data, tmp_path / "c", k=K)  # windows of 64, stride 32
    hits, rows = {"t": 0, "t+1": 0, "t+2": 0}, 0
    for seq in CacheReader(tmp_path / "c"):
        top1 = seq.topk_ids[:-2, 0].astype(np.int64)  # rows t = 0 .. T-3
        ids = seq.input_ids.astype(np.int64)
        for name, shift in (("t", 0), ("t+1", 1), ("t+2", 2)):
            hits[name] += int((top1 == ids[shift : len(ids) - 2 + shift]).sum())
        rows += len(top1)
    rate = {name: n / rows for name, n in hits.items()}
    assert rows > 2000
    assert rate["t+1"] > 50 / VOCAB, rate  # chance is 1 / VOCAB
    assert rate["t+1"] > 1.4 * max(rate["t"], rate["t+2"]), rate  # a shifted row fails here


# -- 3. packing -------------------------------------------------------------------------------
def assert_same_targets(ids, logprobs, log_tail, want: Sequence) -> None:
    """Rows (ids, logprobs, log_tail) == want's rows: log-probs within float16 rounding of each
    other, ids exactly except between near-tied neighbours."""
    lp, want_lp = logprobs.astype(np.float32), want.topk_logprobs.astype(np.float32)
    np.testing.assert_allclose(lp, want_lp, atol=1e-2, rtol=0)
    tie = near_ties(torch.tensor(want_lp), 1e-2).numpy()
    assert ((ids == want.topk_ids) | tie).all(), "top-k ids differ"
    np.testing.assert_allclose(log_tail, want.log_tail, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("teacher", ["gpt_teacher", "hf_teacher", "mistral_teacher"])
def test_packed_document_gets_the_rows_it_gets_alone(teacher, docs_jsonl, tmp_path, request):
    """Each packed document's rows equal its rows captured alone; for the Mistral teacher (an
    8-token sliding window, documents of 25-190 tokens) that holds only if packing keeps the
    model's own sliding-window mask inside each document."""
    teacher = request.getfixturevalue(teacher)
    capture(teacher, docs_jsonl, tmp_path / "alone", k=K, seq_len=128)
    capture(teacher, docs_jsonl, tmp_path / "packed", k=K, seq_len=128, pack=True)
    alone = {s.input_ids.tobytes(): s for s in CacheReader(tmp_path / "alone")}
    packed = CacheReader(tmp_path / "packed")
    assert packed.num_sequences < len(alone)
    found = after_another = 0
    for seq in packed:
        bounds = [*seq.doc_starts.tolist(), len(seq.input_ids)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            want = alone[seq.input_ids[a:b].tobytes()]  # the same document, cached alone
            assert_same_targets(seq.topk_ids[a:b], seq.topk_logprobs[a:b], seq.log_tail[a:b], want)
            found += 1
            after_another += a > 0
    assert found == len(alone) and after_another >= 10


# -- 4. chat data -----------------------------------------------------------------------------
CHAT_TEMPLATE = (  # each turn: <role>content</role> and a newline
    "{% for m in messages %}"
    "{{ '<' + m['role'] + '>' + m['content'] + '</' + m['role'] + '>\\n' }}"
    "{% endfor %}"
)
CONVERSATIONS = [  # each renders to < 128 tokens: one sequence per conversation
    [
        {"role": "user", "content": "What does len do?"},
        {"role": "assistant", "content": "It returns the number of items."},
    ],
    [
        {"role": "user", "content": "Open a file?"},
        {"role": "assistant", "content": "Use open(path)."},
        {"role": "user", "content": "And read it?"},
        {"role": "assistant", "content": "Call f.read() on it."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a sort function."},
        {"role": "assistant", "content": "sorted(iterable)"},
    ],
]


def chat_tokenizer(tok_dir: Path, folder: Path, template: str) -> Path:
    """The test tokenizer with ``template`` as chat_template in tokenizer_config.json."""
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def test_chat_targets_only_on_assistant_rows(gpt_teacher, tok_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    chat_tok = chat_tokenizer(tok_dir, tmp_path / "chat-tok", CHAT_TEMPLATE)
    settings = dict(k=K, tokenizer=str(chat_tok), targets_on="assistant")
    capture(gpt_teacher, data, tmp_path / "c", **settings)

    cache = CacheReader(tmp_path / "c")
    assert cache.schema.targets_on == "mask"
    assert cache.num_rows == sum(int(s.loss_mask.sum()) for s in cache) < cache.num_positions
    tok = load_tokenizer(chat_tok)
    model, _ = load_checkpoint(gpt_teacher / "model.pt")
    by_id = {sample_id("chat.jsonl", i, 0): c for i, c in enumerate(CONVERSATIONS)}
    assert sorted(by_id) == sorted(s.sample_id for s in cache)
    for seq in cache:
        conversation = by_id[seq.sample_id]
        mask = seq.loss_mask.astype(bool)
        assert len(seq.log_tail) == mask.sum() and not mask[-1]
        # Each run of target rows predicts one assistant turn, and no user or system text.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
        runs = [
            tok.tokenizer.decode(seq.input_ids[a + 1 : b + 1].tolist())
            for a, b in zip(edges[::2], edges[1::2])
        ]
        turns = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert len(runs) == len(turns)
        for run, turn in zip(runs, turns):
            assert turn in run and "<user>" not in run
        labels = " ".join(runs)
        assert not any(m["content"] in labels for m in conversation if m["role"] != "assistant")
        # The stored rows are the teacher's rows at those positions.
        with torch.inference_mode():
            ref = gpt_logprobs(model)(torch.tensor(seq.input_ids.astype(np.int64)))
        assert_rows_match_reference(seq, ref[torch.tensor(mask)])

    # The template is part of the tokenizer fingerprint: changing only the template changes it.
    fingerprint = cache.manifest["fingerprints"]["tokenizer"]
    assert fingerprint["sha256"] == tok.fingerprint
    other_tok = chat_tokenizer(tok_dir, tmp_path / "other-tok", "{# v2 #}" + CHAT_TEMPLATE)
    capture(gpt_teacher, data, tmp_path / "c2", **{**settings, "tokenizer": str(other_tok)})
    other = CacheReader(tmp_path / "c2").manifest["fingerprints"]["tokenizer"]
    assert other["sha256"] != fingerprint["sha256"]
    with pytest.raises(CacheMismatchError, match="fingerprints.tokenizer"):
        capture(gpt_teacher, data, tmp_path / "c", **{**settings, "tokenizer": str(other_tok)})


# -- 5. kill and resume -----------------------------------------------------------------------
SLOW_TEACHER = '''
import os
import time

import torch


class SlowLM(torch.nn.Module):
    """A causal LM (running mean of embeddings -> logits); sleeps $SLOW_TEACHER_DELAY s a call."""

    max_positions = 64

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(512, 16)
        self.out = torch.nn.Linear(16, 512)

    def forward(self, ids):
        time.sleep(float(os.environ.get("SLOW_TEACHER_DELAY", "0")))
        steps = torch.arange(1, ids.shape[1] + 1)[:, None]  # (T, 1)
        return 4 * self.out(torch.tanh(self.emb(ids).cumsum(1) / steps))  # (B, T, V)


def make():
    torch.manual_seed(0)
    return SlowLM()
'''


@pytest.mark.slow
def test_killed_capture_resumes_to_the_same_cache(tok_dir, corpus, tmp_path, spawn):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "slow_teacher.py").write_text(SLOW_TEACHER)
    env = env_with_path(tmp_path / "mods")
    data = write_jsonl(tmp_path / "docs.jsonl", text_records(corpus["train"], 100, 240))
    args = ["cache", "--teacher", "slow_teacher:make", "--tokenizer", tok_dir, "--data", data]
    args += ["--k", K, "--batch-tokens", 256, "--flush-positions", 512, "--no-progress"]
    whole = spawn(*args, "--out", tmp_path / "whole", env=env)  # uninterrupted, meanwhile
    # ~50 batches of 50 ms, a flush every 2-3 batches: the kill lands early, between flushes.
    victim = spawn(*args, "--out", tmp_path / "c", env={**env, "SLOW_TEACHER_DELAY": "0.05"})
    part = tmp_path / "c" / "parts" / "part-00000"
    assert wait_for_record(part / PROGRESS, victim), victim.communicate()[1]
    assert victim.poll() is None, "the run ended before the kill: give it more work"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (part / PROGRESS).exists() and not (part / PART_RECORD).exists()

    again = kdcache("-v", *args, "--out", tmp_path / "c", env=env)
    assert again.returncode == 0, again.stderr
    assert "resuming after" in again.stderr
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    resumed, uninterrupted = CacheReader(tmp_path / "c"), CacheReader(tmp_path / "whole")
    done_now = int(
        re.search(r"this run ([\d,]+) positions", again.stdout).group(1).replace(",", "")
    )
    assert 0 < done_now < uninterrupted.num_positions  # the rerun skipped the durable part
    n = uninterrupted.num_sequences
    assert resumed.num_sequences == n and resumed.num_positions == uninterrupted.num_positions
    assert resumed.block(0, n).equals(uninterrupted.block(0, n))


# -- 6. shards --------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_shard_processes_equal_one_shard(gpt_teacher, corpus, tmp_path, spawn):
    data = write_jsonl(tmp_path / "docs.jsonl", text_records(corpus["train"], 40, 600))
    settings = ["--k", K, "--seq-len", 64, "--no-progress"]  # 600 documents: 3 groups of 256
    shard = ["--out", tmp_path / "sharded", "--num-shards", 2, "--shard-index"]
    cache = ["cache", "--teacher", gpt_teacher, "--data", data, *settings]
    # Shard 1 runs elsewhere with relative paths: the same cache, spelled another way.
    (tmp_path / "elsewhere").mkdir()
    relative = ["cache", "--teacher", os.path.relpath(gpt_teacher, tmp_path / "elsewhere")]
    relative += ["--data", "../docs.jsonl", *settings, "--out", "../sharded", *shard[2:]]
    runs = [
        spawn(*cache, *shard, 0),
        spawn(*relative, 1, cwd=tmp_path / "elsewhere"),
        spawn(*cache, "--out", tmp_path / "one"),
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    finalized = kdcache("finalize", tmp_path / "sharded")
    assert finalized.returncode == 0, finalized.stderr

    sharded, one = CacheReader(tmp_path / "sharded"), CacheReader(tmp_path / "one")
    assert sharded.num_parts == 2 and one.num_parts == 1
    assert all(p["counts"]["sequences"] > 0 for p in sharded.manifest["parts"])
    a, b = read_sequences(tmp_path / "sharded"), read_sequences(tmp_path / "one")
    assert len(a) == sharded.num_sequences and sorted(a) == sorted(b)
    for sid, want in b.items():
        for name in ("input_ids", "loss_mask", "doc_starts", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(a[sid], name), getattr(want, name), err_msg=name)
        np.testing.assert_array_equal(a[sid].log_tail, want.log_tail)


# -- 7. --shard-index env ---------------------------------------------------------------------
SHARD_VARS = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_STEP",
    "RANK",
    "WORLD_SIZE",
)


def slurm_array(task: int, lo: int, hi: int) -> dict:
    """The variables SLURM sets in task ``task`` of --array=lo-hi."""
    return {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(lo),
        "SLURM_ARRAY_TASK_MAX": str(hi),
        "SLURM_ARRAY_TASK_COUNT": str(hi - lo + 1),
        "SLURM_ARRAY_TASK_STEP": "1",
    }


def env_shard(monkeypatch, env: dict, out: str = "o", **settings) -> tuple[int, int]:
    for name in SHARD_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = CaptureConfig(teacher="t", data="d", out=str(out), shard_index="env", **settings)
    return resolve_shard(cfg)


@pytest.mark.parametrize(
    "env, expected",
    [
        (slurm_array(3, 0, 3), (3, 4)),  # --array=0-3: the array index is the part index
        ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
    ],
)
def test_shard_index_env_reads_slurm_or_torchrun(monkeypatch, env, expected):
    assert env_shard(monkeypatch, env) == expected
    assert env_shard(monkeypatch, env, num_shards=expected[1]) == expected


def test_a_one_task_slurm_rerun_takes_the_count_from_the_cache(monkeypatch, tmp_path):
    """`sbatch --array=5` (SLURM then says MIN = MAX = 5, COUNT = 1) on a 16-part cache resumes
    part 5 of 16; never shard 0 of 1."""
    out = tmp_path / "c" / "parts" / "part-00002"
    out.mkdir(parents=True)
    (out / "progress.json").write_text(json.dumps({"num_shards": 16, "format": "kdcache"}))
    assert env_shard(monkeypatch, slurm_array(5, 5, 5), out=tmp_path / "c") == (5, 16)
    assert env_shard(monkeypatch, slurm_array(5, 5, 5), num_shards=16) == (5, 16)
    with pytest.raises(ConfigError, match="how many parts.*pass --num-shards"):
        env_shard(monkeypatch, slurm_array(5, 5, 5))  # nothing to resume, no count given


def test_shard_index_env_errors(monkeypatch):
    with pytest.raises(
        ConfigError, match="SLURM_ARRAY_TASK_ID.*RANK and WORLD_SIZE.*found neither"
    ):
        env_shard(monkeypatch, {})
    with pytest.raises(ConfigError, match="RANK 2 names part 2, but the cache has 2 parts"):
        env_shard(monkeypatch, {"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="submit --array=0-3"):
        env_shard(monkeypatch, slurm_array(4, 0, 4), num_shards=4)
    monkeypatch.setenv("RANK", "1")  # an explicit index ignores the environment
    cfg = CaptureConfig(teacher="t", data="d", out="o", shard_index=0, num_shards=3)
    assert resolve_shard(cfg) == (0, 3)


# -- 8. bad input -----------------------------------------------------------------------------
NAN_TEACHER = '''
import torch


class NaNOn7(torch.nn.Module):
    """Finite logits, except NaN at every position whose input id is 7."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(512, 512)

    def forward(self, ids):
        return self.emb(ids).masked_fill((ids == 7)[..., None], float("nan"))  # (B, T, V)


def make():
    torch.manual_seed(0)
    return NaNOn7()
'''


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The run failed as a user mistake: exit code 2 and one line on stderr, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcache: error: "), run.stderr
    return lines[0]


def bad_input(case: str, tmp_path: Path, teacher: Path, tok_dir: Path) -> tuple[list, dict | None]:
    """(args after ``kdcache cache``, env) of one bad-input case; files go into tmp_path."""
    jsonl = tmp_path / "docs.jsonl"
    ok_data = write_jsonl(jsonl, [{"text": "def f(x):\n    return x + 1\n"}] * 3)
    args = ["--teacher", teacher, "--data", ok_data, "--out", tmp_path / "c", "--no-progress"]
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "nan_teacher.py").write_text(NAN_TEACHER)
    if case == "tokenizer larger than teacher":
        big = train_builtin_tokenizer([jsonl.read_text()] * 2 + ["x y z " * 50], vocab_size=600)
        big.add_tokens([f"<extra{i}>" for i in range(600 - big.get_vocab_size())])
        (tmp_path / "big").mkdir()
        big.save(str(tmp_path / "big" / "tokenizer.json"))
        return [*args, "--tokenizer", tmp_path / "big"], None
    if case == "k 0":
        return [*args, "--k", 0], None
    if case == "k above vocabulary":
        return [*args, "--k", VOCAB + 1], None
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return [*args, "--data", tmp_path / "empty"], None
    if case == "empty jsonl":
        (tmp_path / "empty.jsonl").write_text("")
        return [*args, "--data", tmp_path / "empty.jsonl"], None
    if case == "jsonl without text field":
        body = write_jsonl(tmp_path / "body.jsonl", [{"body": "x", "n": 1}])
        return [*args, "--data", body], None
    if case == "long document, stride 0":
        long = write_jsonl(tmp_path / "long.jsonl", [{"text": "import os\n" * 200}])
        return [*args, "--data", long, "--stride", 0], None
    if case == "stride above the default seq-len":
        return [*args, "--stride", 200], None
    if case == "seq-len above context":
        return [*args, "--seq-len", 2 * 128], None
    if case == "pack with a teacher without boundary masks":
        args = [*args, "--teacher", "nan_teacher:make", "--tokenizer", tok_dir, "--pack"]
        return args, env_with_path(mods)
    if case == "NaN logits":
        records = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 7, 5]}]  # NaN in document 1
        ids = write_jsonl(tmp_path / "ids.jsonl", records)
        args = [*args, "--teacher", "nan_teacher:make", "--tokenizer", tok_dir, "--data", ids]
        return args, env_with_path(mods)
    if case == "binary data file":
        (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
        return [*args, "--data", tmp_path / "blob.bin"], None
    if case == "teacher folder that does not load":
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{not json at all")
        return [*args, "--teacher", tmp_path / "broken", "--tokenizer", tok_dir], None
    if case == "documents too short to predict":
        short = write_jsonl(tmp_path / "short.jsonl", [{"input_ids": []}, {"input_ids": []}])
        return [*args, "--data", short, "--tokenizer", tok_dir], None
    if case == "samples above vocabulary":
        return [*args, "--targets", "sampled", "--samples", 10**8], None
    if case == "out inside data":
        (tmp_path / "corpus").mkdir()
        write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"text": "x = 1\n"}] * 3)
        return [*args, "--data", tmp_path / "corpus", "--out", tmp_path / "corpus" / "c"], None
    if case == "shard-index env without the environment":
        env = {k: v for k, v in os.environ.items() if k not in SHARD_VARS}
        return [*args, "--shard-index", "env"], env
    raise AssertionError(case)


BAD_INPUTS = {  # case: what its one-line message says
    "tokenizer larger than teacher": r"tokenizer has 600 tokens but the teacher outputs only 512",
    "k 0": r"--k must be an integer >= 1, got 0",
    "k above vocabulary": r"--k 513 exceeds the teacher's vocabulary of 512",
    "empty folder": r"expected files under --data .*empty, found none",
    "empty jsonl": r"--data .*empty.jsonl holds no documents",
    "jsonl without text field": r"body.jsonl line 1: expected a 'text' field.*found fields \['body', 'n'\]",
    "long document, stride 0": r"long.jsonl document 0 has \d+ tokens, more than --seq-len 128 and no stride",
    "seq-len above context": r"--seq-len 256 exceeds the teacher's context of 128",
    "stride above the default seq-len": r"--stride 200 exceeds the sequence length 128",
    "pack with a teacher without boundary masks": r"--pack needs a teacher that keeps packed documents apart",
    "documents too short to predict": r"gave no sequence to capture: every document is shorter than 2 tokens",
    "samples above vocabulary": r"--samples 100000000 exceeds the teacher's vocabulary of 512; use --samples <= 512",
    "out inside data": r"--out .*corpus/c and --data .*corpus are nested",
    "NaN logits": f"NaN or inf logits for sample {sample_id('ids.jsonl', 1, 0)} ",
    "binary data file": r"blob.bin is not a UTF-8 text file",
    "teacher folder that does not load": r"teacher folder .*broken does not load as a Hugging Face",
    "shard-index env without the environment": r"--shard-index env: expected SLURM_ARRAY_TASK_ID",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(case, gpt_teacher, tok_dir, tmp_path):
    args, env = bad_input(case, tmp_path, gpt_teacher, tok_dir)
    message = one_line_error(kdcache("cache", *args, env=env))
    assert re.search(BAD_INPUTS[case], message), message
    assert not list(tmp_path.glob("c/parts/*/part.json")), "a failed run left a committed part"


@pytest.mark.slow
def test_rerun_with_other_k_is_refused_unless_replace(gpt_teacher, docs_jsonl, tmp_path):
    capture(gpt_teacher, docs_jsonl, tmp_path / "c", k=K, seq_len=64)
    args = ["cache", "--teacher", gpt_teacher, "--data", docs_jsonl, "--out", tmp_path / "c"]
    args += ["--seq-len", 64, "--no-progress"]
    message = one_line_error(kdcache(*args, "--k", 4))
    assert f"k: cache has {K}, this run has 4" in message and "--replace" in message
    assert CacheReader(tmp_path / "c").k == K  # untouched

    replaced = kdcache(*args, "--k", 4, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    cache = CacheReader(tmp_path / "c")
    assert cache.k == 4 and cache.manifest["settings"]["k"] == 4
    assert all(s.topk_ids.shape[1] == 4 for s in cache)
