"""The logical schema of a kdcache cache: what is stored per sequence and per position.

Both backends store exactly these arrays (docs/FORMAT.md gives the physical layout of each).
A *block* is a run of consecutive sequences held as flat arrays plus offsets: the unit that
writers append and readers return. Nothing here knows about files.

Alignment (tests/storage/test_schema.py): row t of a sequence is the teacher's distribution
for the token *after* input token t, given tokens 0..t; the hard label of row t is input token
t+1; the last row of a sequence has no label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from kdcache.storage.codecs import CODECS, get_codec
from kdcache.storage.errors import ConfigError, FormatVersionError

FORMAT_NAME = "kdcache"
FORMAT_VERSION = 1
IGNORE_INDEX = -100  # the label of a row without one (a sequence's last row): torch's default

LOGPROB_DTYPES = ("float16", "float32")
TARGETS_ON = ("all", "mask")
TARGET_KINDS = ("topk", "sampled")


def id_dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id of the vocabulary: no vocabulary cap."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def transfer_id_dtype(vocab_size: int) -> str:
    """The signed type token ids cross from the device to the host in ("int16" or "int32"):
    torch has no usable uint16, so int16 holds ids below 2^15 only; larger vocabularies move as
    int32. The host casts to ``id_dtype_for`` (the stored type) without loss either way."""
    return "int16" if vocab_size <= 2**15 else "int32"


def target_problems(
    *,
    targets: str,
    codec: str,
    logprob_dtype: str,
    proposal_temperature: float,
    names: dict[str, str] | None = None,
) -> list[str]:
    """What is wrong with how a cache would store its targets: the kind, the codec, the log-prob
    type and the proposal temperature, alone and together. The one set of rules behind both
    ``CacheSchema`` (``names`` None: field names) and ``kdcache cache``'s early checks (``names``:
    field -> option, so messages name the options)."""
    names = names or {}

    def name(field: str) -> str:
        return names.get(field, field)

    p = []
    if logprob_dtype not in LOGPROB_DTYPES:
        p.append(f"{name('logprob_dtype')} must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    if targets not in TARGET_KINDS:
        p.append(f"{name('targets')} must be one of {TARGET_KINDS}, got {targets!r}")
    if codec not in CODECS:
        p.append(f"{name('codec')} must be one of {tuple(CODECS)}, got {codec!r}")
    if codec == "sorted-counts" and targets != "sampled":
        p.append(
            f"the sorted-counts codec stores sampled targets, found {name('targets')}={targets!r}; "
            "use --targets sampled or a sorted-qB codec"
        )
    tau = proposal_temperature
    if not isinstance(tau, int | float) or not tau > 0:
        p.append(f"{name('proposal_temperature')} must be > 0, got {tau!r}")
    elif tau != 1.0 and targets != "sampled":
        p.append(
            f"{name('proposal_temperature')} {tau} applies to --targets sampled only; add "
            "--targets sampled or drop it"
        )
    elif tau != 1.0 and codec == "sorted-counts":
        p.append(
            f"the sorted-counts codec stores whole counts, found {name('proposal_temperature')} "
            f"{tau} (importance weights); use a sorted-qB codec or proposal temperature 1"
        )
    return p


@dataclass(frozen=True)
class CacheSchema:
    """What every part of one cache stores; recorded in each part record and the manifest.

    k: top-k entries per target row (targets="sampled": the number of draws N; a row holds the
    unique ids drawn, most drawn first, log-probs log(count / N), -inf padding; with a
    proposal_temperature tau != 1 the draws come from the teacher at tau and the log-probs are
    normalized log importance weights). vocab_size: the teacher's output size (ids < vocab_size).
    logprob_dtype: storage type of the top-k log-probs (no bfloat16: neither Zarr v3 nor Arrow
    names it). targets_on: "all" stores a target row for every position; "mask" stores rows only
    for positions whose loss_mask is 1 (chat data with --targets-on assistant).
    """

    k: int
    vocab_size: int
    logprob_dtype: str = "float16"
    targets_on: str = "all"
    targets: str = "topk"
    codec: str = "plain"
    proposal_temperature: float = 1.0  # targets="sampled": the temperature the draws came from

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            problems.append(f"vocab_size must be a positive integer, got {self.vocab_size!r}")
        if not isinstance(self.k, int) or self.k < 1:
            problems.append(f"k must be an integer >= 1, got {self.k!r}")
        elif isinstance(self.vocab_size, int) and self.k > self.vocab_size:
            problems.append(
                f"k={self.k} exceeds the vocabulary size {self.vocab_size}; use --k <= {self.vocab_size}"
            )
        if self.targets_on not in TARGETS_ON:
            problems.append(f"targets_on must be one of {TARGETS_ON}, got {self.targets_on!r}")
        problems += target_problems(
            targets=self.targets,
            codec=self.codec,
            logprob_dtype=self.logprob_dtype,
            proposal_temperature=self.proposal_temperature,
        )
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype_for(self.vocab_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "id_dtype": self.id_dtype.name}

    @classmethod
    def from_dict(cls, d: dict) -> CacheSchema:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"id_dtype"}
        if unknown:
            raise FormatVersionError(
                f"cache schema has fields this kdcache does not know: {sorted(unknown)}; "
                "upgrade kdcache to read this cache"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def stored_dtypes(self) -> dict[str, np.dtype]:
        """What the backends store: the logical dtypes as the codec changes them."""
        return get_codec(self.codec).stored_dtypes(self)

    def array_dtypes(self) -> dict[str, np.dtype]:
        """Storage dtype of every logical array (the flat ones and the per-sequence ones)."""
        return {
            "sample_id": np.dtype(np.uint64),
            "input_ids": self.id_dtype,
            "loss_mask": np.dtype(np.uint8),
            "doc_starts": np.dtype(np.int32),
            "topk_ids": self.id_dtype,
            "topk_logprobs": np.dtype(self.logprob_dtype),
            "log_tail": np.dtype(np.float32),
        }


@dataclass
class Sequence:
    """One sequence of the cache, as numpy arrays (views into a block where possible).

    T positions, R target rows (R == T when targets_on == "all", else R == loss_mask.sum()).
    """

    sample_id: int
    input_ids: np.ndarray  # (T,) uint16|uint32 token ids
    loss_mask: np.ndarray  # (T,) uint8, 1 where the row carries a target
    doc_starts: np.ndarray  # (D,) int32 start position of each document inside the sequence
    topk_ids: np.ndarray  # (R, k) uint16|uint32, probability order (most likely first)
    topk_logprobs: np.ndarray  # (R, k) float16|float32 log-probs at temperature 1
    log_tail: np.ndarray  # (R,) float32 log of the probability mass outside the top-k

    @property
    def labels(self) -> np.ndarray:
        """(T,) int64 hard labels: input token t+1 for row t, IGNORE_INDEX for the last row."""
        out = np.full(len(self.input_ids), IGNORE_INDEX, dtype=np.int64)
        out[:-1] = self.input_ids[1:]
        return out


# Flat arrays of a block and the axis each runs along: positions (N), target rows (R),
# documents (D) or sequences (S). Offsets (S + 1 each, starting at 0) map sequences to axes.
AXIS_OF = {
    "sample_id": "sequence",
    "input_ids": "position",
    "loss_mask": "position",
    "doc_starts": "doc",
    "topk_ids": "row",
    "topk_logprobs": "row",
    "log_tail": "row",
}
OFFSETS_OF_AXIS = {"position": "seq_offsets", "row": "row_offsets", "doc": "doc_offsets"}


@dataclass
class Block:
    """Consecutive sequences as flat arrays + offsets (all offsets start at 0)."""

    sample_id: np.ndarray  # (S,) uint64 stable id of (source, document, window)
    seq_offsets: np.ndarray  # (S+1,) int64 into the position axis
    row_offsets: np.ndarray  # (S+1,) int64 into the target-row axis
    doc_offsets: np.ndarray  # (S+1,) int64 into doc_starts
    input_ids: np.ndarray  # (N,)
    loss_mask: np.ndarray  # (N,) uint8
    doc_starts: np.ndarray  # (D,) int32
    topk_ids: np.ndarray  # (R, k)
    topk_logprobs: np.ndarray  # (R, k)
    log_tail: np.ndarray  # (R,) float32

    @property
    def num_sequences(self) -> int:
        return len(self.sample_id)

    @property
    def num_positions(self) -> int:
        return len(self.input_ids)

    @property
    def num_rows(self) -> int:
        return len(self.log_tail)

    def counts(self) -> dict[str, int]:
        return {
            "sequence": self.num_sequences,
            "position": self.num_positions,
            "row": self.num_rows,
            "doc": len(self.doc_starts),
        }

    def sequence(self, j: int) -> Sequence:
        p0, p1 = self.seq_offsets[j], self.seq_offsets[j + 1]
        r0, r1 = self.row_offsets[j], self.row_offsets[j + 1]
        d0, d1 = self.doc_offsets[j], self.doc_offsets[j + 1]
        return Sequence(
            sample_id=int(self.sample_id[j]),
            input_ids=self.input_ids[p0:p1],
            loss_mask=self.loss_mask[p0:p1],
            doc_starts=self.doc_starts[d0:d1],
            topk_ids=self.topk_ids[r0:r1],
            topk_logprobs=self.topk_logprobs[r0:r1],
            log_tail=self.log_tail[r0:r1],
        )

    def __iter__(self):
        return (self.sequence(j) for j in range(self.num_sequences))

    def slice(self, start: int, stop: int) -> Block:
        """Sequences [start, stop) as a block of views, offsets rebased to 0."""

        def cut(offsets: np.ndarray) -> tuple[np.ndarray, int, int]:
            sub = offsets[start : stop + 1]
            return sub - sub[0], int(sub[0]), int(sub[-1])

        seq, p0, p1 = cut(self.seq_offsets)
        row, r0, r1 = cut(self.row_offsets)
        doc, d0, d1 = cut(self.doc_offsets)
        return Block(
            sample_id=self.sample_id[start:stop],
            seq_offsets=seq,
            row_offsets=row,
            doc_offsets=doc,
            input_ids=self.input_ids[p0:p1],
            loss_mask=self.loss_mask[p0:p1],
            doc_starts=self.doc_starts[d0:d1],
            topk_ids=self.topk_ids[r0:r1],
            topk_logprobs=self.topk_logprobs[r0:r1],
            log_tail=self.log_tail[r0:r1],
        )

    @classmethod
    def empty(cls, schema: CacheSchema) -> Block:
        dt = schema.array_dtypes()
        zero = np.zeros(1, dtype=np.int64)
        return cls(
            sample_id=np.zeros(0, dt["sample_id"]),
            seq_offsets=zero,
            row_offsets=zero.copy(),
            doc_offsets=zero.copy(),
            input_ids=np.zeros(0, dt["input_ids"]),
            loss_mask=np.zeros(0, dt["loss_mask"]),
            doc_starts=np.zeros(0, dt["doc_starts"]),
            topk_ids=np.zeros((0, schema.k), dt["topk_ids"]),
            topk_logprobs=np.zeros((0, schema.k), dt["topk_logprobs"]),
            log_tail=np.zeros(0, dt["log_tail"]),
        )

    @classmethod
    def concat(cls, blocks: list[Block], schema: CacheSchema) -> Block:
        if not blocks:
            return cls.empty(schema)
        if len(blocks) == 1:
            return blocks[0]

        def offsets(name: str) -> np.ndarray:
            lengths = np.concatenate([np.diff(getattr(b, name)) for b in blocks])
            return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        flat = {name: np.concatenate([getattr(b, name) for b in blocks]) for name in AXIS_OF}
        return cls(
            seq_offsets=offsets("seq_offsets"),
            row_offsets=offsets("row_offsets"),
            doc_offsets=offsets("doc_offsets"),
            **flat,
        )

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], schema: CacheSchema) -> Block:
        """Validate and pack sequences (casting to the schema's dtypes)."""
        if not seqs:
            return cls.empty(schema)
        dt = schema.array_dtypes()
        for s in seqs:
            check_sequence(s, schema)

        def offsets(lengths: list[int]) -> np.ndarray:
            return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def cat(name: str) -> np.ndarray:
            return np.concatenate([np.asarray(getattr(s, name)) for s in seqs]).astype(
                dt[name], copy=False
            )

        return cls(
            sample_id=np.array([s.sample_id for s in seqs], dtype=np.uint64),
            seq_offsets=offsets([len(s.input_ids) for s in seqs]),
            row_offsets=offsets([len(s.log_tail) for s in seqs]),
            doc_offsets=offsets([len(s.doc_starts) for s in seqs]),
            input_ids=cat("input_ids"),
            loss_mask=cat("loss_mask"),
            doc_starts=cat("doc_starts"),
            topk_ids=cat("topk_ids").reshape(-1, schema.k),
            topk_logprobs=cat("topk_logprobs").reshape(-1, schema.k),
            log_tail=cat("log_tail"),
        )

    def equals(self, other: Block) -> bool:
        """Bit-exact equality of every array (NaN-safe for the float arrays)."""
        names = list(AXIS_OF) + list(OFFSETS_OF_AXIS.values())
        return all(
            getattr(self, n).dtype == getattr(other, n).dtype
            and getattr(self, n).shape == getattr(other, n).shape
            and getattr(self, n).tobytes() == getattr(other, n).tobytes()
            for n in names
        )


def check_sequence(s: Sequence, schema: CacheSchema) -> None:
    """Raise ConfigError if a sequence does not fit the schema (shapes, ids, mask)."""
    t = len(s.input_ids)
    if t < 1:
        raise ConfigError(f"sample {s.sample_id}: a sequence needs at least 1 position, got 0")
    if len(s.loss_mask) != t:
        raise ConfigError(
            f"sample {s.sample_id}: loss_mask has {len(s.loss_mask)} entries for {t} positions"
        )
    rows = t if schema.targets_on == "all" else int(np.count_nonzero(s.loss_mask))
    k = schema.k
    if (
        np.shape(s.topk_ids) != (rows, k)
        or np.shape(s.topk_logprobs) != (rows, k)
        or np.shape(s.log_tail) != (rows,)
    ):
        raise ConfigError(
            f"sample {s.sample_id}: expected top-k arrays of shape ({rows}, {k}) and tail ({rows},) "
            f"(targets_on={schema.targets_on}), got {np.shape(s.topk_ids)}, {np.shape(s.topk_logprobs)}, "
            f"{np.shape(s.log_tail)}"
        )
    for name in ("input_ids", "topk_ids"):
        a = np.asarray(getattr(s, name))
        if a.size and (a.min() < 0 or a.max() >= schema.vocab_size):
            raise ConfigError(
                f"sample {s.sample_id}: {name} must lie in [0, {schema.vocab_size}), found [{a.min()}, {a.max()}]"
            )
    d = np.asarray(s.doc_starts)
    if len(d) == 0 or d[0] != 0 or np.any(np.diff(d) <= 0) or d[-1] >= t:
        raise ConfigError(
            f"sample {s.sample_id}: doc_starts must start at 0, increase strictly and stay below {t}, got {d.tolist()[:8]}"
        )
