import pytest
import torch

from kdcache.stages.capture.extract import extract_rows, group_topk, topk_from_logits
from kdcache.stages.models.adapters import HeadShard


@pytest.mark.parametrize("V, k", [(4096, 64), (4099, 64), (1000, 3), (2048, 1)])
def test_group_topk_equals_torch_topk(V, k):
    z = torch.randn(300, V, generator=torch.Generator().manual_seed(V + k)) * 4
    vals, ids = group_topk(z, k)
    ref_vals, ref_ids = torch.topk(z, k, dim=-1)
    assert torch.equal(vals, ref_vals) and torch.equal(ids, ref_ids)


def test_topk_logprobs_and_tail_match_log_softmax():
    z = torch.randn(50, 5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    ids, lp, tail, finite = topk_from_logits(z.float().clone(), 64)
    ref = torch.log_softmax(z, -1)
    ref_lp, ref_ids = torch.topk(ref, 64, -1)
    assert torch.equal(ids, ref_ids) and finite.all()
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    outside = ref.scatter(1, ref_ids, float("-inf"))  # the entries outside the top-k
    torch.testing.assert_close(tail.double(), outside.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("V, k", [(14260, 8), (151936, 64)])
def test_a_tiny_tail_is_stored_to_float32_precision(V, k):
    """A sharpened teacher (the top-k hold all but 1e-6 .. 1e-30 of the mass): the tail is the
    log-sum-exp of the other entries, right to ~1e-5 nats, never -inf while k < V. Computed as
    log(1 - sum of top-k p) in float32 it came out -inf or tens of nats off on most rows."""
    g = torch.Generator().manual_seed(V)
    z = torch.randn(64, V, generator=g, dtype=torch.float64)
    z[:, :k] += torch.linspace(14, 68, 64, dtype=torch.float64)[:, None]  # 1e-6 .. 1e-30 tails
    _, _, tail, finite = topk_from_logits(z.float().clone(), k)
    ref = torch.log_softmax(z.float().double(), -1)  # the same float32 logits, in float64
    top = ref.topk(k, -1).indices
    ref_tail = ref.scatter(1, top, float("-inf")).logsumexp(-1)
    assert finite.all() and torch.isfinite(tail).all()
    assert ref_tail.min() < -50 and (ref_tail < -14).float().mean() > 0.75
    torch.testing.assert_close(tail.double(), ref_tail, atol=1e-4, rtol=1e-6)


def test_full_vocabulary_tail_is_minus_inf_and_nan_rows_flagged():
    z = torch.randn(4, 10)
    z[2, 3] = float("nan")
    _, _, tail, finite = topk_from_logits(z.clone(), 10)
    assert torch.isneginf(tail).all()
    assert finite.tolist() == [True, True, False, True]


def test_chunked_head_equals_one_chunk():
    g = torch.Generator().manual_seed(1)
    h, w, b = (
        torch.randn(1000, 32, generator=g),
        torch.randn(3000, 32, generator=g),
        torch.randn(3000, generator=g),
    )
    one = extract_rows(h, HeadShard(w, b), 16, chunk_rows=5000)
    many = extract_rows(h, HeadShard(w, b), 16, chunk_rows=77)
    for x, y in zip(one, many, strict=True):
        assert torch.equal(x, y)


def test_capture_records_the_head_precision_it_used(tmp_path, gpt_teacher, corpus):
    """auto resolves to float32 on CPU (tf32 exists on CUDA only) and is stored resolved."""
    import json

    from kdcache.pipeline.executors import run_capture
    from kdcache.stages.capture import CaptureConfig

    (tmp_path / "d.txt").write_text(corpus["train"][0][:2000])
    run_capture(
        CaptureConfig(
            teacher=str(gpt_teacher),
            data=str(tmp_path / "d.txt"),
            out=str(tmp_path / "c"),
            k=4,
            progress=False,
        )
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["settings"]["head_precision"] == "float32"


def test_sampled_targets_are_unbiased_and_reproducible():
    """The average of many draws converges to the teacher's probabilities; draws depend only on
    (sample id, position), not on the batch."""
    from kdcache.stages.capture.extract import row_seeds, sample_from_logits

    torch.manual_seed(0)
    V, N, rows = 50, 16, 4000
    z = torch.randn(1, V) * 2
    p = torch.softmax(z, -1)[0].double()
    seeds = row_seeds(torch.full((rows,), 12345, dtype=torch.int64), torch.arange(rows))
    ids, lp, tail, finite = sample_from_logits(z.expand(rows, V).clone(), N, seeds)
    assert finite.all() and torch.isneginf(tail).all()
    w = lp.exp().double()  # count / N, 0 for padding
    assert torch.allclose(w.sum(1), torch.ones(rows, dtype=torch.float64))
    est = torch.zeros(V, dtype=torch.float64).index_add_(0, ids.flatten(), w.flatten()) / rows
    # Monte-Carlo error: sqrt(p (1 - p) / (rows * N)) per id; allow 5 standard errors.
    assert ((est - p).abs() <= 5 * (p * (1 - p) / (rows * N)).sqrt() + 1e-9).all()
    # Same (sample id, position) -> same draws, whatever else is in the batch.
    again, lp2, _, _ = sample_from_logits(z.expand(3, V).clone(), N, seeds[[7, 8, 9]])
    assert torch.equal(again, ids[7:10]) and torch.equal(lp2, lp[7:10])
    # Most drawn first; padding (count 0) is id 0 with -inf.
    assert (lp[:, :-1] >= lp[:, 1:]).all()
    assert (ids[torch.isneginf(lp)] == 0).all()


@pytest.mark.parametrize("tau", [0.7, 2.0])
def test_proposal_temperature_importance_weights_converge_to_the_teacher(tau):
    """Draws from softmax(z / tau), weighted count * p / r and normalized: the average target
    converges to the teacher's p (self-normalized importance sampling; bias O(1 / N)), while the
    plain counts of the draws converge to the proposal r, not p (so the weights matter)."""
    from kdcache.stages.capture.extract import row_seeds, sample_from_logits

    torch.manual_seed(2)
    V, N, rows = 40, 64, 4000
    z = torch.randn(1, V) * 2
    p = torch.softmax(z, -1)[0].double()
    seeds = row_seeds(torch.full((rows,), 99, dtype=torch.int64), torch.arange(rows))
    ids, lp, tail, finite = sample_from_logits(z.expand(rows, V).clone(), N, seeds, tau)
    assert finite.all() and torch.isneginf(tail).all()
    w = lp.exp().double()
    assert torch.allclose(w.sum(1), torch.ones(rows, dtype=torch.float64))
    assert (lp[:, :-1] >= lp[:, 1:]).all()  # most weight first, padding (-inf) last
    est = torch.zeros(V, dtype=torch.float64).index_add_(0, ids.flatten(), w.flatten()) / rows
    assert (est - p).abs().max() < 0.01, (est - p).abs().max()
    plain = torch.zeros(V, dtype=torch.float64).index_add_(
        0, ids.flatten(), torch.isfinite(lp).flatten().double()
    )
    assert (plain / plain.sum() - p).abs().max() > 0.02  # unique-id frequencies are not p
    # tau > 1 reaches more unique ids per row than tau = 1, tau < 1 fewer
    _, lp1, _, _ = sample_from_logits(z.expand(rows, V).clone(), N, seeds)
    more = torch.isfinite(lp).sum(1).double().mean() > torch.isfinite(lp1).sum(1).double().mean()
    assert more == (tau > 1)


def test_sampled_ce_gradient_matches_full_kd_in_expectation():
    """E[grad of the sampled CE] = grad of the full-distribution forward KL (same student)."""
    from kdcache.stages.capture.extract import row_seeds, sample_from_logits
    from kdcache.stages.train.losses import build_loss

    torch.manual_seed(1)
    V, N, rows = 30, 8, 6000
    teacher = torch.randn(1, V)
    seeds = row_seeds(torch.full((rows,), 7, dtype=torch.int64), torch.arange(rows))
    ids, lp, tail, _ = sample_from_logits(teacher.expand(rows, V).clone(), N, seeds)
    ids, lp, tail = (
        ids.clone(),
        lp.clone(),
        tail.clone(),
    )  # out of inference mode, as read from a cache
    student = torch.randn(1, V, dtype=torch.float64)
    s = student.expand(rows, V).clone().requires_grad_(True)
    build_loss("soft_ce")(s, topk_ids=ids, topk_logprobs=lp, log_tail=tail).backward()
    sampled_grad = s.grad.sum(0)  # mean over rows already in the loss
    full = student.clone().requires_grad_(True)
    torch.nn.functional.kl_div(
        torch.log_softmax(full, -1),
        torch.log_softmax(teacher.double(), -1),
        log_target=True,
        reduction="batchmean",
    ).backward()
    assert torch.allclose(sampled_grad, full.grad[0], atol=0.01), (
        (sampled_grad - full.grad[0]).abs().max()
    )


def test_sampled_capture_is_reproducible_across_shard_counts(tmp_path, gpt_teacher, corpus):
    """--targets sampled: draws depend on (sample id, position) only, so a 2-shard capture holds
    exactly the 1-shard capture's rows; weights are counts / N and sum to 1."""
    import numpy as np

    from kdcache.pipeline.executors import run_capture
    from kdcache.stages.capture import CaptureConfig
    from kdcache.storage.reader import CacheReader

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(__import__("json").dumps({"text": t[:1500]}) + "\n" for t in corpus["train"][:12])
    )
    base = dict(
        teacher=str(gpt_teacher),
        data=str(data),
        k=8,
        targets="sampled",
        group_docs=2,
        progress=False,
    )
    run_capture(CaptureConfig(out=str(tmp_path / "one"), **base))
    for shard in (0, 1):
        run_capture(
            CaptureConfig(out=str(tmp_path / "two"), num_shards=2, shard_index=shard, **base)
        )

    def rows(path):
        cache = CacheReader(path)
        assert cache.schema.targets == "sampled" and cache.k == 8
        return {s.sample_id: s for s in cache}

    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert one.keys() == two.keys()
    for sid, s in one.items():
        np.testing.assert_array_equal(s.topk_ids, two[sid].topk_ids)
        np.testing.assert_array_equal(s.topk_logprobs, two[sid].topk_logprobs)
        w = np.exp(s.topk_logprobs.astype(np.float64))
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=2e-3)  # float16 log(count / 8)
        assert np.isneginf(s.log_tail).all()


def test_proposal_temperature_is_recorded_and_trains_with_soft_ce(tmp_path, gpt_teacher, corpus):
    """--proposal-temperature: recorded in the schema (so the cache says what its weights are),
    part of the identity (a rerun at another tau refuses), refused without --targets sampled,
    and the weights train a student with soft_ce."""
    import numpy as np

    from kdcache.pipeline.executors import run_capture
    from kdcache.stages.capture import CaptureConfig
    from kdcache.stages.train import TrainConfig, run_train
    from kdcache.storage.errors import ConfigError, KDCacheError
    from kdcache.storage.reader import CacheReader

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(corpus["train"][:4]))
    base = dict(teacher=str(gpt_teacher), data=str(data), k=8, targets="sampled", progress=False)
    run_capture(CaptureConfig(out=str(tmp_path / "c"), proposal_temperature=2.0, **base))
    cache = CacheReader(tmp_path / "c")
    assert cache.schema.proposal_temperature == 2.0
    s = next(iter(cache))
    w = np.exp(s.topk_logprobs.astype(np.float64))
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=2e-3)
    counts = w * 8  # not multiples of 1/N any more: importance weights
    assert np.abs(counts - np.round(counts)).max() > 0.01
    with pytest.raises(KDCacheError, match="proposal_temperature"):
        run_capture(CaptureConfig(out=str(tmp_path / "c"), proposal_temperature=0.5, **base))
    with pytest.raises(ConfigError, match="applies to --targets sampled only"):
        CaptureConfig(
            teacher=str(gpt_teacher), data=str(data), out="x", proposal_temperature=2.0
        ).validate()
    m = run_train(
        TrainConfig(
            cache=str(tmp_path / "c"),
            student="nano",
            out=str(tmp_path / "run"),
            loss="soft_ce",
            steps=2,
            batch_size=2,
            progress=False,
        )
    )
    assert np.isfinite(m["train_loss"])
