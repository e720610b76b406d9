"""Synthetic teacher outputs with realistic statistics, for tests and storage benchmarks.

Top-k ids are distinct per row and Zipf-concentrated on frequent tokens (as a language model's
are); log-probs decay with rank; the tail mass varies per row. Not a teacher: a stand-in whose
bytes compress like a teacher's, so storage figures mean something before any model runs.
"""

from __future__ import annotations

import numpy as np

from kdcache.storage.schema import Block, CacheSchema, Sequence


def synthetic_rows(
    rng: np.random.Generator, rows: int, schema: CacheSchema
) -> tuple[np.ndarray, ...]:
    """(ids (R,k), logprobs (R,k), log_tail (R,)) in probability order."""
    k, vocab = schema.k, schema.vocab_size
    perm = np.random.default_rng(0).permutation(vocab)  # frequency rank -> token id, fixed
    # Distinct increasing frequency ranks per row: gaps >= 1, geometric, wider for larger k.
    gaps = 1 + rng.geometric(p=min(0.9, 8.0 / max(k, 8)), size=(rows, k)) - 1
    ranks = np.minimum(np.cumsum(gaps, axis=1) - 1 + rng.integers(0, 4, size=(rows, 1)), vocab - 1)
    ranks = _make_distinct(ranks, vocab)
    # The most likely tokens are not always the most frequent ones: shuffle the head a little.
    noise = rng.gumbel(size=(rows, k)) * 0.7
    score = -1.1 * np.log1p(np.arange(k))[None, :] + noise
    order = np.argsort(-score, axis=1)
    ids = np.take_along_axis(perm[ranks], order, axis=1)
    logits = np.sort(score, axis=1)[:, ::-1]
    logits = logits - logits.max(axis=1, keepdims=True)
    mass = rng.uniform(0.6, 0.999, size=(rows, 1))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)) + np.log(mass)
    log_tail = (
        np.log1p(-mass[:, 0]).astype(np.float32)
        if k < vocab
        else np.full(rows, -np.inf, np.float32)
    )
    return ids.astype(schema.id_dtype), lp.astype(schema.logprob_dtype), log_tail


def _make_distinct(ranks: np.ndarray, vocab: int) -> np.ndarray:
    """Strictly increasing ranks per row within [0, vocab)."""
    k = ranks.shape[1]
    r = np.maximum(ranks, np.arange(k)[None, :])
    r = np.maximum.accumulate(r - np.arange(k)[None, :], axis=1) + np.arange(k)[None, :]
    return np.minimum(r, vocab - k + np.arange(k)[None, :])  # still strictly increasing, >= 0


def synthetic_block(
    rng: np.random.Generator,
    lengths: list[int] | np.ndarray,
    schema: CacheSchema,
    first_sample_id: int = 0,
) -> Block:
    """A block of len(lengths) sequences with every target row filled (targets_on="all")."""
    seqs = []
    for j, t in enumerate(lengths):
        ids, lp, tail = synthetic_rows(rng, int(t), schema)
        seqs.append(
            Sequence(
                sample_id=first_sample_id + j,
                input_ids=ids[:, 0].copy(),
                loss_mask=np.ones(int(t), np.uint8),
                doc_starts=np.zeros(1, np.int32),
                topk_ids=ids,
                topk_logprobs=lp,
                log_tail=tail,
            )
        )
    return Block.from_sequences(seqs, schema)
