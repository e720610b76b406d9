"""The compact codecs: sets and order survive, the error stays within its documented bound, and
a cache decodes with numpy alone following docs/FORMAT.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.storage.codecs import get_codec, reconstruction_kl
from kdcache.storage.convert import convert_cache
from kdcache.storage.manifest import CacheIdentity
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import Block, CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import write_cache

CODECS = ["sorted-q8", "sorted-q9", "sorted-q10", "sorted-q12"]


def write(
    path, codec: str, backend: str = "zarr", k: int = 32, vocab: int = 50257, seed: int = 0
) -> Block:
    schema = CacheSchema(k=k, vocab_size=vocab, logprob_dtype="float32", codec=codec)
    block = synthetic_block(np.random.default_rng(seed), [40, 1, 77, 13], schema)
    write_cache(
        path, CacheIdentity(backend=backend, schema=schema, fingerprints={}, settings={}), [block]
    )
    return block


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip_keeps_sets_order_tail_and_bounds_the_error(tmp_path, backend, codec):
    exact = write(tmp_path / "c", codec, backend)
    cache = CacheReader(tmp_path / "c")
    got = cache.block(0, cache.num_sequences)
    levels = 2 ** int(codec.split("q")[1]) - 1
    assert got.topk_ids.dtype == exact.topk_ids.dtype and got.topk_logprobs.dtype == np.float32
    np.testing.assert_array_equal(np.sort(got.topk_ids, 1), np.sort(exact.topk_ids, 1))  # same ids
    assert (np.diff(got.topk_logprobs, axis=1) <= 0).all()  # probability order
    np.testing.assert_array_equal(got.log_tail, exact.log_tail)  # the tail mass is exact
    np.testing.assert_allclose(
        np.exp(got.topk_logprobs).sum(1),
        np.exp(exact.topk_logprobs.astype(np.float64)).sum(1),
        rtol=1e-5,
    )
    kl = reconstruction_kl(exact, got)
    bound = (
        exact.topk_ids.shape[1] / levels**2
    )  # half a step in sqrt-probability per entry, with room
    assert kl.max() < bound, (kl.max(), bound)
    # Where the exact top-1 is clearly ahead, the decoded top-1 is the same id.
    clear = exact.topk_logprobs[:, 0] - exact.topk_logprobs[:, 1] > 4.0 / levels
    assert (got.topk_ids[clear, 0] == exact.topk_ids[clear, 0]).all()
    err = cache.describe()["codec_error"]
    assert err["rows"] == exact.num_rows and err["kl_mean"] == pytest.approx(kl.mean(), rel=1e-6)
    assert err["kl_p99"] <= err["kl_max"] == pytest.approx(kl.max(), rel=1e-6)


def test_compact_codec_is_smaller_and_plain_converts_back(tmp_path):
    write(tmp_path / "plain", "plain")
    for codec in CODECS:
        convert_cache(tmp_path / "plain", tmp_path / codec, "zarr", codec=codec)
    sizes = {c: CacheReader(tmp_path / c).describe()["bytes_on_disk"] for c in ["plain", *CODECS]}
    assert (
        sizes["sorted-q8"]
        < sizes["sorted-q9"]
        < sizes["sorted-q10"]
        < sizes["sorted-q12"]
        < sizes["plain"]
    ), sizes
    back = convert_cache(tmp_path / "sorted-q8", tmp_path / "back", "arrow", codec="plain")
    assert back["schema"]["codec"] == "plain"
    a, b = CacheReader(tmp_path / "sorted-q8")[0:4], CacheReader(tmp_path / "back")[0:4]
    assert a.equals(b)  # decoding once more changes nothing


def test_numpy_decode_following_format_md(tmp_path):
    """docs/FORMAT.md's recipe, with plain zarr + numpy, gives what the kdcache reader gives."""
    write(tmp_path / "c", "sorted-q8", k=8, vocab=1000)
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    g = zarr.open_group(tmp_path / "c/parts" / manifest["parts"][0]["name"], mode="r")
    levels = 2**8 - 1
    ro = g["row_offsets"][:]
    j = 2
    gaps, q = g["topk_ids"][ro[j] : ro[j + 1]], g["topk_logprobs"][ro[j] : ro[j + 1]]
    tail = g["log_tail"][ro[j] : ro[j + 1]].astype(np.float64)
    sorted_ids = np.cumsum(gaps.astype(np.int64), axis=1)
    order = np.argsort(-q.astype(np.int64), axis=1, kind="stable")
    ids = np.take_along_axis(sorted_ids, order, axis=1)
    s = np.take_along_axis(q, order, axis=1) / levels
    logprobs = np.log(s**2 / (s**2).sum(1, keepdims=True)) + np.log(-np.expm1(tail))[:, None]
    seq = CacheReader(tmp_path / "c")[j]
    np.testing.assert_array_equal(ids, seq.topk_ids)
    np.testing.assert_allclose(logprobs, seq.topk_logprobs, rtol=1e-6)


def test_unknown_codec_is_refused():
    from kdcache.storage.errors import ConfigError

    with pytest.raises(ConfigError, match="codec must be one of"):
        CacheSchema(k=2, vocab_size=10, codec="zip")
    with pytest.raises(ConfigError, match="unknown codec"):
        get_codec("zip")


def test_codec_keeps_the_padding_of_sampled_targets(tmp_path):
    """Sampled rows end in padding (id 0, -inf): it stays padding, and counts / N survive."""
    from kdcache.storage.schema import Sequence

    schema = CacheSchema(k=8, vocab_size=100, targets="sampled", codec="sorted-q8")
    counts = np.array([[4, 2, 1, 1, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0], [1] * 8])
    ids = np.array(
        [[7, 3, 50, 9, 0, 0, 0, 0], [42, 0, 0, 0, 0, 0, 0, 0], [90, 1, 2, 3, 4, 5, 6, 99]]
    )
    with np.errstate(divide="ignore"):
        lp = np.log(counts / 8).astype(np.float32)
    seq = Sequence(
        1,
        np.array([1, 2, 3]),
        np.ones(3, np.uint8),
        np.zeros(1, np.int32),
        ids,
        lp,
        np.full(3, -np.inf, np.float32),
    )
    write_cache(
        tmp_path / "c",
        CacheIdentity(backend="arrow", schema=schema, fingerprints={}, settings={}),
        [Block.from_sequences([seq], schema)],
    )
    got = CacheReader(tmp_path / "c")[0]
    assert (
        np.isneginf(got.topk_logprobs[counts == 0]).all() and (got.topk_ids[counts == 0] == 0).all()
    )
    real = counts > 0
    np.testing.assert_array_equal(np.sort(got.topk_ids[0, :4]), [3, 7, 9, 50])
    np.testing.assert_allclose(np.exp(got.topk_logprobs[real]), (counts / 8)[real], rtol=0.02)


def _sampled_block(schema: CacheSchema, rows: int = 300, seed: int = 0) -> Block:
    """Rows drawn by the capture's own sampler (counts / N, count order, padding last)."""
    import torch

    from kdcache.stages.capture.extract import row_seeds, sample_from_logits
    from kdcache.storage.schema import Sequence

    z = torch.randn(rows, schema.vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
    seeds = row_seeds(torch.full((rows,), seed, dtype=torch.int64), torch.arange(rows))
    ids, lp, tail, _ = sample_from_logits(z, schema.k, seeds)
    seqs, start = [], 0
    for j, n in enumerate([1, 120, 7, rows - 128]):
        seqs.append(
            Sequence(
                j,
                np.arange(n) % schema.vocab_size,
                np.ones(n, np.uint8),
                np.zeros(1, np.int32),
                ids[start : start + n].numpy(),
                lp[start : start + n].numpy().astype(schema.logprob_dtype),
                tail[start : start + n].numpy(),
            )
        )
        start += n
    return Block.from_sequences(seqs, schema)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_sorted_counts_codec_is_lossless_for_sampled_targets(tmp_path, backend, dtype):
    schema = CacheSchema(k=16, vocab_size=3000, targets="sampled", logprob_dtype=dtype)
    exact = _sampled_block(schema)
    coded = CacheSchema(**{**schema.__dict__, "codec": "sorted-counts"})
    write_cache(
        tmp_path / "c",
        CacheIdentity(backend=backend, schema=coded, fingerprints={}, settings={}),
        [exact],
    )
    cache = CacheReader(tmp_path / "c")
    got = cache.block(0, cache.num_sequences)
    np.testing.assert_array_equal(got.topk_ids, exact.topk_ids)  # ids, order, padding 0
    np.testing.assert_array_equal(got.topk_logprobs, exact.topk_logprobs)  # log(count / N)
    np.testing.assert_array_equal(got.log_tail, exact.log_tail)
    assert cache.describe()["codec_error"]["kl_max"] == 0.0
    # What is stored: sorted gaps and whole counts, padding last
    stored = get_codec("sorted-counts").encode(exact, coded)
    assert stored.topk_logprobs.dtype == np.uint8
    pad = np.isneginf(np.sort(exact.topk_logprobs, 1)[:, ::-1])  # padding is last when sorted
    assert (stored.topk_ids[pad] == 0).all() and (stored.topk_ids[:, 1:][~pad[:, 1:]] > 0).all()
    counts = np.where(pad, 0, stored.topk_logprobs.astype(int) + 1)  # count - 1 stored
    assert (counts.sum(1) == 16).all()


def test_sorted_counts_codec_refuses_what_it_cannot_store_exactly():
    from kdcache.storage.errors import ConfigError

    with pytest.raises(ConfigError, match="sorted-counts codec stores sampled targets"):
        CacheSchema(k=4, vocab_size=10, codec="sorted-counts")
    with pytest.raises(ConfigError, match="stores whole counts"):
        CacheSchema(
            k=4, vocab_size=10, targets="sampled", codec="sorted-counts", proposal_temperature=2.0
        )
    schema = CacheSchema(k=4, vocab_size=10, targets="sampled", codec="sorted-counts")
    block = synthetic_block(np.random.default_rng(0), [5], schema)  # weights, not counts / 4
    with pytest.raises(ConfigError, match="not: .* off a whole count"):
        get_codec("sorted-counts").encode(block, schema)


def test_numpy_decode_of_sorted_counts_following_format_md(tmp_path):
    """docs/FORMAT.md's sorted-counts recipe, with plain zarr + numpy, gives the reader's arrays."""
    schema = CacheSchema(k=16, vocab_size=3000, targets="sampled", codec="sorted-counts")
    write_cache(
        tmp_path / "c",
        CacheIdentity(backend="zarr", schema=schema, fingerprints={}, settings={}),
        [_sampled_block(CacheSchema(k=16, vocab_size=3000, targets="sampled"))],
    )
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    g = zarr.open_group(tmp_path / "c/parts" / manifest["parts"][0]["name"], mode="r")
    ro = g["row_offsets"][:]
    j = 1
    N = manifest["schema"]["k"]
    gaps = g["topk_ids"][ro[j] : ro[j + 1]].astype(np.int64)
    stored = g["topk_logprobs"][ro[j] : ro[j + 1]].astype(np.int64)
    real = gaps > 0
    real[:, 0] = True
    counts = np.where(real, stored + 1, 0)
    sorted_ids = np.where(real, np.cumsum(gaps, axis=1), 0)
    order = np.lexsort((sorted_ids, -counts), axis=-1)
    ids = np.take_along_axis(sorted_ids, order, axis=1)
    with np.errstate(divide="ignore"):
        logprobs = np.log(np.take_along_axis(counts, order, axis=1) / N).astype(np.float32)
    seq = CacheReader(tmp_path / "c")[j]
    np.testing.assert_array_equal(ids, seq.topk_ids)
    np.testing.assert_array_equal(logprobs.astype(np.float16), seq.topk_logprobs)


def _rows(rng: np.random.Generator, rows: int, k: int, vocab: int, peaked: bool):
    """(ids, logprobs float32, log_tail) of top-k rows in probability order: flat rows (logits
    of spread 1) or peaked ones (one id far ahead, the rest decaying fast)."""
    ids = np.array(
        [rng.choice(vocab, size=k, replace=False) for _ in range(rows)], np.int64
    ).reshape(rows, k)
    scale = 12.0 if peaked else 1.0
    logits = -np.sort(rng.exponential(scale, size=(rows, k)), axis=1)
    if peaked:
        logits[:, 1:] -= 8.0
    mass = rng.uniform(0.5, 1.0, size=(rows, 1)) if k < vocab else np.ones((rows, 1))
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True) + np.log(mass)
    tail = np.log1p(-mass[:, 0]) if k < vocab else np.full(rows, -np.inf)
    return ids, lp.astype(np.float32), tail.astype(np.float32)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    vocab=st.sampled_from([7, 65536, 65537, 200000]),
    codec=st.sampled_from(CODECS),
    backend=st.sampled_from(["zarr", "arrow"]),
    peaked=st.booleans(),
)
def test_sorted_codecs_round_trip_within_their_documented_bound(
    tmp_path_factory, data, vocab, codec, backend, peaked
):
    k = data.draw(st.sampled_from([1, 2, 64, vocab] if vocab <= 65536 else [1, 64, 300]), "k")
    k = min(k, vocab)
    lengths = data.draw(st.lists(st.integers(1, 4 if k >= 65536 else 30), min_size=1, max_size=4))
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    path = tmp_path_factory.mktemp("c") / "c"
    check_round_trip(path, vocab, k, lengths, seed, codec, backend, peaked)


@pytest.mark.parametrize(
    "vocab,k", [(65536, 65536), (65536, 64), (65537, 64), (200000, 64), (200000, 1), (5, 5)]
)
@pytest.mark.parametrize("peaked", [False, True])
def test_sorted_codecs_at_the_edges_of_id_widths_and_k(tmp_path, vocab, k, peaked):
    """The vocabularies where ids change width (65,536 / 65,537) and a 200,000-id one, k = 1
    and k = the whole vocabulary, on both backends."""
    for backend in ("zarr", "arrow"):
        for codec in ("sorted-q8", "sorted-q12"):
            lengths = [2, 1] if k > 1024 else [40, 1, 9]
            check_round_trip(
                tmp_path / f"{backend}-{codec}", vocab, k, lengths, 1, codec, backend, peaked
            )


def check_round_trip(path, vocab, k, lengths, seed, codec, backend, peaked):
    """Ragged sequences (and rows), flat or peaked rows: the reader returns the exact id sets in
    probability order, the exact tail mass, and log-probs equal to docs/FORMAT.md's decode of
    FORMAT.md's levels, each level within half a step of the entry's sqrt-probability (within
    one step where it is clamped up to 1)."""
    from kdcache.storage.schema import Sequence

    rng = np.random.default_rng(seed)
    schema = CacheSchema(k=k, vocab_size=vocab, logprob_dtype="float32")
    seqs = []
    for j, n in enumerate(lengths):
        ids, lp, tail = _rows(rng, n, k, vocab, peaked)
        tokens = rng.integers(0, vocab, n)
        seqs.append(
            Sequence(
                j,
                tokens,
                np.ones(n, np.uint8),
                np.zeros(1, np.int32),
                ids.astype(schema.id_dtype),
                lp,
                tail,
            )
        )
    exact = Block.from_sequences(seqs, schema)
    coded = CacheSchema(k=k, vocab_size=vocab, logprob_dtype="float32", codec=codec)
    identity = CacheIdentity(backend=backend, schema=coded, fingerprints={}, settings={})
    write_cache(path, identity, [exact])
    got = CacheReader(path).block(0, len(lengths))
    np.testing.assert_array_equal(np.sort(got.topk_ids, 1), np.sort(exact.topk_ids, 1))
    np.testing.assert_array_equal(got.log_tail, exact.log_tail)
    assert (np.diff(got.topk_logprobs, axis=1) <= 0).all()  # probability order
    # FORMAT.md by hand: levels in sorted-id order, then its decode formula
    L = 2 ** int(codec.split("q")[1]) - 1
    order = np.argsort(exact.topk_ids.astype(np.int64), axis=1)
    p = np.exp(np.take_along_axis(exact.topk_logprobs.astype(np.float64), order, axis=1))
    m = -np.expm1(exact.log_tail.astype(np.float64))[:, None]
    a = np.sqrt(p / p.sum(1, keepdims=True))  # each entry's sqrt-probability within the top-k
    q = np.clip(np.rint(a * L), 1, L)
    assert ((np.abs(q / L - a) <= 0.5 / L + 1e-6) | ((q == 1) & (a * L < 0.5 + 1e-6))).all()
    want = np.log(m * (q / L) ** 2 / ((q / L) ** 2).sum(1, keepdims=True))
    back = np.argsort(got.topk_ids.astype(np.int64), axis=1)
    np.testing.assert_array_equal(
        np.take_along_axis(got.topk_ids.astype(np.int64), back, 1),
        np.take_along_axis(exact.topk_ids.astype(np.int64), order, axis=1),
    )
    err = np.abs(np.take_along_axis(got.topk_logprobs.astype(np.float64), back, 1) - want)
    assert (err <= 2e-5 * np.maximum(1, np.abs(want))).all(), err.max()


@pytest.mark.parametrize("vocab", [65536, 65537, 200000])
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_sorted_counts_is_lossless_where_ids_change_width(tmp_path, vocab, backend):
    schema = CacheSchema(k=8, vocab_size=vocab, targets="sampled", logprob_dtype="float32")
    exact = _sampled_block(schema, rows=130)
    coded = CacheSchema(**{**schema.__dict__, "codec": "sorted-counts"})
    identity = CacheIdentity(backend=backend, schema=coded, fingerprints={}, settings={})
    write_cache(tmp_path / "c", identity, [exact])
    got = CacheReader(tmp_path / "c").block(0, 4)
    np.testing.assert_array_equal(got.topk_ids, exact.topk_ids)
    np.testing.assert_array_equal(got.topk_logprobs, exact.topk_logprobs)
