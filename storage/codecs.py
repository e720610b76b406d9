"""Array codecs: transforms between the logical top-k arrays and what the backends store.

They sit above the backends (both get them): the part writer encodes every block before the
backend stores it, and the cache reader decodes every block the backend loads, so readers always
see the logical schema (ids in probability order, log-probs in the schema's dtype).

``plain``        stores the logical arrays as they are.
``sorted-qB``    (B = 8, 9, 10 or 12) per row: ids sorted ascending and delta-coded (first id, then the
                 gaps, all >= 1; 0 only between padding entries) so that zstd sees small numbers;
                 probabilities quantized as q = round(sqrt(p / m) * (2^B - 1)), clamped to >= 1
                 (0 for padding entries, p = 0, of sampled targets), where m = the row's top-k
                 mass, stored in sorted-id order as uint8 / uint16. Decoding:
                 p = m * (q / (2^B - 1))^2 / sum((q / (2^B - 1))^2): the top-k mass is exact (it
                 is stored in log_tail, float32), and the within-top-k distribution carries an
                 error of at most half a step in sqrt-probability per entry: a KL of about
                 k / (6 (2^B - 1)^2) nats at most on average (measured per part and recorded as
                 ``codec_error`` in part.json). Probability order is restored by sorting on q
                 (descending), ties by id (ascending).
``sorted-counts`` sampled targets drawn at temperature 1 only, lossless: per row the drawn ids
                 sorted ascending and delta-coded (padding last, gap 0; every other gap after
                 the first column is >= 1, so padding is the gaps that are 0 there), and each
                 id's count minus 1 (count = N * exp(log-prob), N = the schema's k) as uint8
                 (uint16 for N > 256), 0 for padding. Decoding: log-prob = log(count / N);
                 probability order is count descending, ties by id ascending (the order the
                 capture writes).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kdcache.storage.errors import ConfigError

if TYPE_CHECKING:  # the schema imports the codec registry; codecs only see its instances
    from kdcache.storage.schema import Block, CacheSchema


class Codec:
    name = "plain"
    lossless = True  # decode(encode(b)) == b: no reconstruction error to measure

    def stored_dtypes(self, schema: CacheSchema) -> dict[str, np.dtype]:
        return schema.array_dtypes()

    def encode(self, block: Block, schema: CacheSchema) -> Block:
        return block

    def decode(self, block: Block, schema: CacheSchema) -> Block:
        return block

    def entry_ids(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """(ids (R, k) int64, real (R, k) bool) of a stored block's entries, in stored order and
        without a full decode: enough for anything that needs each row's id set, not its order."""
        return block.topk_ids.astype(np.int64), np.isfinite(block.topk_logprobs)


class SortedQuantized(Codec):
    lossless = False

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.name = f"sorted-q{bits}"
        self.levels = 2**bits - 1
        self.dtype = np.dtype(np.uint8 if bits <= 8 else np.uint16)
        with np.errstate(divide="ignore"):  # level 0 (padding): -inf
            self._log_squares = (2 * np.log(np.arange(self.levels + 1) / self.levels)).astype(
                np.float32
            )

    def stored_dtypes(self, schema: CacheSchema) -> dict[str, np.dtype]:
        return {**schema.array_dtypes(), "topk_logprobs": self.dtype}

    def encode(self, block: Block, schema: CacheSchema) -> Block:
        ids = block.topk_ids  # (R, k) probability order
        sorted_ids, order = _sort_rows(ids.astype(np.int64))  # ascending ids, their columns
        gaps = np.diff(sorted_ids, axis=1, prepend=0)  # first id absolute, then gaps >= 1
        p = np.exp(np.take_along_axis(block.topk_logprobs, order, axis=1).astype(np.float64))
        mass = p.sum(axis=1, keepdims=True)
        q = np.rint(np.sqrt(p / np.maximum(mass, 1e-300)) * self.levels)
        q = np.where(p > 0, np.clip(q, 1, self.levels), 0).astype(self.dtype)  # 0: padding only
        return replace(block, topk_ids=gaps.astype(schema.id_dtype), topk_logprobs=q)

    def decode(self, block: Block, schema: CacheSchema) -> Block:
        q = block.topk_logprobs.astype(_key_dtype(schema.vocab_size, self.bits))
        # log p = 2 log(q / L) - log(sum (q / L)^2) + log m: a table per level, one log per row
        norm = np.einsum("ij,ij->i", q, q, dtype=np.int64) * (1.0 / self.levels**2)
        tail = block.log_tail.astype(np.float64)
        with np.errstate(divide="ignore"):
            row = (np.log(np.maximum(-np.expm1(tail), 0.0)) - np.log(norm)).astype(np.float32)
        # Probability order: q descending, ties by id ascending
        rank, ids = _order_rows(
            np.subtract(self.levels, q, out=q), _row_cumsum(block.topk_ids), schema.vocab_size
        )
        lp = np.take(self._log_squares, np.subtract(self.levels, rank, out=rank))
        lp += row[:, None]
        return replace(
            block,
            topk_ids=ids.astype(schema.id_dtype),
            topk_logprobs=lp.astype(schema.logprob_dtype, copy=False),
        )

    def entry_ids(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        real = block.topk_logprobs > 0  # q = 0: padding
        return _row_cumsum(block.topk_ids).astype(np.int64), real


def count_logprobs(n: int) -> np.ndarray:
    """(n + 1,) float64 log(c / n) for c = 0..n (-inf at 0): the one definition of a sampled
    target's log-prob, shared by the capture and the sorted-counts decoder (so a decoded cache
    equals the captured one bit for bit, in either storage dtype)."""
    with np.errstate(divide="ignore"):
        return np.log(np.arange(n + 1) / n)


class SortedCounts(Codec):
    name = "sorted-counts"

    def stored_dtypes(self, schema: CacheSchema) -> dict[str, np.dtype]:
        return {**schema.array_dtypes(), "topk_logprobs": self._count_dtype(schema)}

    @staticmethod
    def _count_dtype(schema: CacheSchema) -> np.dtype:
        return np.dtype(np.uint8 if schema.k <= 256 else np.uint16)

    def encode(self, block: Block, schema: CacheSchema) -> Block:
        n = schema.k
        exact = np.exp(block.topk_logprobs.astype(np.float64)) * n  # (R, N) counts, 0 padding
        counts = np.rint(exact)
        if block.num_rows and np.abs(exact - counts).max() > 0.25:
            raise ConfigError(
                f"expected sampled targets whose weights are counts / {n} (the sorted-counts "
                f"codec), found weights that are not: {float(np.abs(exact - counts).max()):.3f} "
                "off a whole count; use a sorted-qB codec for importance-weighted targets"
            )
        if block.num_rows and not (counts[:, 0] > 0).all():
            raise ConfigError(
                "expected at least one drawn id in every sampled row, found a row of padding "
                "only; recapture the cache (a row holds N >= 1 draws)"
            )
        key = np.where(counts > 0, block.topk_ids.astype(np.int64), schema.vocab_size)
        sorted_ids, order = _sort_rows(key)  # ascending ids, padding (key V) last
        valid = sorted_ids < schema.vocab_size
        gaps = np.where(valid, np.diff(sorted_ids, axis=1, prepend=0), 0)
        counts = np.take_along_axis(counts, order, axis=1)
        # count - 1: singletons (most draws) and padding share the symbol 0
        stored = np.maximum(counts - 1, 0).astype(self._count_dtype(schema))
        return replace(block, topk_ids=gaps.astype(schema.id_dtype), topk_logprobs=stored)

    def decode(self, block: Block, schema: CacheSchema) -> Block:
        n = schema.k
        sorted_ids, valid = self.entry_ids(block)
        counts = np.where(valid, block.topk_logprobs.astype(np.int64) + 1, 0)  # sorted-id order
        # Probability order: count descending, ties by id ascending; padding (count 0, id 0) last
        dtype = _key_dtype(schema.vocab_size, int(n).bit_length())
        rank, ids = _order_rows(
            (n - counts).astype(dtype), np.where(valid, sorted_ids, 0), schema.vocab_size
        )
        counts = n - rank
        # -inf for padding; through float32 first, as the capture rounds it
        lp = count_logprobs(n).astype(np.float32)[counts]
        return replace(
            block,
            topk_ids=ids.astype(schema.id_dtype),
            topk_logprobs=lp.astype(schema.logprob_dtype),
        )

    def entry_ids(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        valid = block.topk_ids > 0  # padding: a gap of 0 after the first column
        valid[:, :1] = True  # the first column always holds a draw (its gap is its id)
        return _row_cumsum(block.topk_ids).astype(np.int64), valid


def _row_cumsum(gaps: np.ndarray) -> np.ndarray:
    """Cumulative sum along each row of non-negative gaps whose row sums fit their dtype (ids
    below 2^16 in uint16, 2^32 in uint32): one pass over the flat array in the gaps' own
    unsigned dtype, whose wrap-around cancels when each row's start is subtracted (numpy's
    axis=1 cumsum over short rows is several times slower)."""
    R, k = gaps.shape
    if R == 0:
        return gaps.copy()
    flat = np.cumsum(gaps.reshape(-1), dtype=gaps.dtype)
    before = np.empty(R, gaps.dtype)
    before[0] = 0
    before[1:] = flat[k - 1 :: k][:-1]  # the sum of all earlier rows, modulo 2^bits
    return flat.reshape(R, k) - before[:, None]


def _key_dtype(vocab_size: int, rank_bits: int) -> np.dtype:
    """The integer type of ``_order_rows``'s packed (rank, id) keys."""
    return np.dtype(np.int32 if _id_bits(vocab_size) + rank_bits <= 31 else np.int64)


def _id_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def _order_rows(
    rank: np.ndarray, ids: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row ordered by rank ascending, ties by id ascending: (ranks, ids) in that order.
    One vectorized sort of packed (rank, id) keys, built in ``rank``'s own array (of
    ``_key_dtype``; it is overwritten) -- no argsort, no gather."""
    shift = _id_bits(vocab_size)
    keys = rank
    keys <<= shift
    keys |= ids
    keys.sort(axis=1)
    ids = keys & ((1 << shift) - 1)
    keys >>= shift
    return keys, ids


def _sort_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of (R, k) non-negative integers sorted ascending (ties: by column), and the
    columns they came from: one vectorized sort of packed (value, column) keys, no argsort."""
    k = values.shape[1]
    shift = max(1, int(k - 1).bit_length())
    small = int(values.max(initial=0)) < 2 ** (31 - shift)
    dtype = np.int32 if small else np.int64
    keys = (values.astype(dtype) << shift) | np.arange(k, dtype=dtype)
    keys.sort(axis=1)
    return keys >> shift, keys & ((1 << shift) - 1)


CODECS: dict[str, Codec] = {
    c.name: c for c in (Codec(), *(SortedQuantized(b) for b in (8, 9, 10, 12)), SortedCounts())
}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}")
    return CODECS[name]


def reconstruction_kl(exact: Block, decoded: Block) -> np.ndarray:
    """(R,) KL(exact || decoded) of the renormalized top-k distributions, in nats."""
    if exact.num_rows == 0:
        return np.zeros(0)

    def dist(b: Block) -> dict:
        lp = b.topk_logprobs.astype(np.float64)
        lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
        return b.topk_ids.astype(np.int64), lp

    ids_e, lp_e = dist(exact)
    ids_d, lp_d = dist(decoded)
    # Align the decoded entries with the exact ones by id (both rows hold the same id set).
    oe, od = np.argsort(ids_e, axis=1), np.argsort(ids_d, axis=1)
    lp_e = np.take_along_axis(lp_e, oe, axis=1)
    lp_d = np.take_along_axis(lp_d, od, axis=1)
    p = np.exp(lp_e)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (lp_e - lp_d), 0.0).sum(axis=1)
