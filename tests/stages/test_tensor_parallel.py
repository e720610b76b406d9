"""Teachers split over ranks (--tensor-parallel, gloo on this CPU) and the vocab-parallel head.

Ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), each
running the installed ``kdcache`` command; transformers splits the random-init Llama and Qwen2
teachers with their own plans (``tp_plan="auto"``). Tolerances: the ranks sum the row-parallel
layers' partial products in another order than one process, so the logits agree to float32
rounding: ids exact except at near-ties (entries whose stored float16 log-probs lie within
one float16 step of a neighbour's, or of the first entry outside the top-k: the step at -6
nats is 0.004), log-probs within 2 float16 steps, the float32 tail within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HF_COMMON, VOCAB, save_hf_teacher
from train_helpers import assert_one_line_error, kdcache, run_ranks

from kdcache.stages.capture.extract import local_topk, merge_topk, topk_from_logits
from kdcache.storage.reader import CacheReader

pytestmark = pytest.mark.slow


# -- the vocab-parallel merge, on random tensors ---------------------------------------------
@pytest.mark.parametrize(
    "V, ranks, k",
    [(1000, 2, 16), (1001, 2, 16), (1003, 4, 64), (515, 2, 300), (100, 8, 20), (7, 3, 5)],
)
def test_every_ranks_top_k_merged_equals_the_whole_vocabulary(V, ranks, k):
    """Rows cut the way torch.chunk cuts (uneven when N does not divide V; k above one rank's
    share of the vocabulary: that rank offers all its rows)."""
    g = torch.Generator().manual_seed(V + ranks + k)
    z = torch.randn(64, V, generator=g, dtype=torch.float64) * 3
    z[:8, :k] += 30.0  # peaked rows: tails of ~1e-10, kept to float32 precision
    vals, ids, rests, offset = [], [], [], 0
    for part in torch.chunk(z.float(), ranks, dim=1):
        v, i, r = local_topk(part.clone(), k)
        vals.append(v), ids.append(i + offset), rests.append(r)
        offset += part.shape[1]
    merged = merge_topk(
        torch.cat(vals, 1), torch.cat(ids, 1), torch.stack(rests, 1).logsumexp(1), k
    )
    whole = topk_from_logits(z.float().clone(), k)
    ref = torch.log_softmax(z.float().double(), -1)
    ref_ids = ref.topk(k, -1).indices
    ref_tail = ref.scatter(1, ref_ids, float("-inf")).logsumexp(-1)
    assert torch.equal(merged[0], whole[0]) and torch.equal(merged[0], ref_ids)
    torch.testing.assert_close(merged[1].double(), ref.gather(1, ref_ids), atol=2e-6, rtol=0)
    if k < V:
        torch.testing.assert_close(merged[2].double(), ref_tail, atol=1e-4, rtol=1e-6)
    else:
        assert torch.isneginf(merged[2]).all()
    assert merged[3].all()


# -- whole captures on 2 gloo ranks -----------------------------------------------------------
def _hf_teacher(kind: str, vocab: int):
    """A random-init Llama (untied head) or Qwen2 (the head is the embedding: both split by rows)."""
    transformers = pytest.importorskip("transformers")
    config, model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return model(
        config(
            vocab_size=vocab,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=kind == "qwen2",
            **shape,
            **HF_COMMON,
        )
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus) -> Path:
    texts = [t[i : i + 300] for t in corpus["train"][:3] for i in range(0, 3600, 300)]
    path = tmp_path_factory.mktemp("tp-data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def assert_same_targets(a: Path, b: Path) -> None:
    """Two caches of the same teacher, computed with the logits' float32 rounding apart."""
    seqs_a = {s.sample_id: s for s in CacheReader(a)}
    seqs_b = {s.sample_id: s for s in CacheReader(b)}
    assert seqs_a.keys() == seqs_b.keys() and seqs_a
    for sid, x in seqs_a.items():
        y = seqs_b[sid]
        assert np.array_equal(x.input_ids, y.input_ids)
        lp_x, lp_y = x.topk_logprobs.astype(np.float32), y.topk_logprobs.astype(np.float32)
        step = np.abs(lp_x) * 2.0**-10 + 2.0**-24  # one float16 step at each value
        tie = np.abs(np.diff(lp_x, axis=1)) <= step[:, 1:]
        near_tie = np.zeros_like(x.topk_ids, dtype=bool)
        near_tie[:, :-1] |= tie
        near_tie[:, 1:] |= tie
        near_tie[:, -1] = True  # tied with the best entry outside the top-k, which is not stored
        near_tie &= np.abs(lp_x - lp_y) <= step
        same = x.topk_ids == y.topk_ids
        assert (same | near_tie).all(), f"sample {sid}: ids differ away from a near-tie"
        assert same.mean() > 0.9  # near-ties are rare
        assert (np.abs(lp_x - lp_y) <= 2 * step + 1e-6).all()
        np.testing.assert_allclose(x.log_tail, y.log_tail, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kind, vocab, k",
    [("llama", VOCAB + 3, 8), ("qwen2", VOCAB + 1, 300)],
    ids=["llama-uneven-vocab", "qwen2-tied-k-above-a-ranks-share"],
)
def test_two_ranks_capture_what_one_process_captures(kind, vocab, k, tmp_path, tok_dir, data):
    torch.manual_seed(0)
    teacher = save_hf_teacher(tmp_path / "teacher", tok_dir, _hf_teacher(kind, vocab))
    common = ["cache", "--teacher", teacher, "--data", data, "--k", k, "--seq-len", 64]
    common += ["--device", "cpu", "--no-progress"]
    one = kdcache(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = run_ranks([*common, "--out", tmp_path / "tp", "--tensor-parallel", 2])
    for r in ranks:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "part-00000" in ranks[0].stdout and ranks[1].stdout == ""  # rank 0 writes, reports
    assert_same_targets(tmp_path / "one", tmp_path / "tp")
    manifests = [json.loads((tmp_path / c / "manifest.json").read_text()) for c in ("one", "tp")]
    assert manifests[0]["fingerprints"] == manifests[1]["fingerprints"]  # the same teacher
    [record] = (tmp_path / "tp" / "parts").glob("*/part.json")
    config = json.loads(record.read_text())["config"]
    assert config["tensor_parallel"] == 2 and config["dtype"] == "float32"


def test_two_ranks_with_the_fused_kernel(tmp_path, tok_dir, data):
    """Each rank's fused kernel offers K = 16 candidates for k = 8 (Triton's interpreter)."""
    torch.manual_seed(0)
    teacher = save_hf_teacher(tmp_path / "teacher", tok_dir, _hf_teacher("llama", VOCAB + 3))
    few = tmp_path / "few.jsonl"
    few.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))
    common = ["cache", "--teacher", teacher, "--data", few, "--k", 8, "--seq-len", 64]
    common += ["--device", "cpu", "--no-progress"]
    one = kdcache(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    args = [*common, "--out", tmp_path / "tp", "--tensor-parallel", 2, "--head-kernel", "triton"]
    for r in run_ranks(args, env={"TRITON_INTERPRET": "1"}):
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same_targets(tmp_path / "one", tmp_path / "tp")


def test_more_ranks_than_the_teacher_is_split_over_is_one_clear_error(tmp_path, hf_teacher, data):
    """Several teacher groups in one torchrun job: transformers' plans size the local heads by
    the whole world, so kdcache refuses before loading anything."""
    args = ["cache", "--teacher", hf_teacher, "--data", data, "--out", tmp_path / "c"]
    args += ["--tensor-parallel", 2, "--shard-index", "env", "--device", "cpu"]
    for r in run_ranks(args, world=4):
        assert_one_line_error(r, "--tensor-parallel 2", "WORLD_SIZE 4", "one such job per part")
    assert not (tmp_path / "c").exists()


def test_tensor_parallel_outside_torchrun_is_one_clear_error(tmp_path, hf_teacher, data):
    r = kdcache(
        "cache", "--teacher", hf_teacher, "--data", data, "--out", tmp_path / "c",
        "--tensor-parallel", "2", "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(r, "--tensor-parallel 2", "WORLD_SIZE 1", "torchrun --nproc_per_node 2")
    assert not (tmp_path / "c").exists()


def test_a_teacher_without_a_tensor_parallel_plan_is_one_clear_error(tmp_path, gpt_teacher, data):
    ranks = run_ranks(
        ["cache", "--teacher", gpt_teacher, "--data", data, "--out", tmp_path / "c",
         "--tensor-parallel", "2", "--device", "cpu"]
    )  # fmt: skip
    for r in ranks:
        assert_one_line_error(r, "--tensor-parallel needs a Hugging Face model folder")
    assert not (tmp_path / "c").exists()
