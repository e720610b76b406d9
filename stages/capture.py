"""Stage one: run the teacher once over a dataset and write its top-k into a cache part.

Reads top to bottom:

1. ``CaptureConfig`` is validated completely (every problem at once) before anything loads.
2. The tokenizer, then the teacher, are loaded and checked against each other and the config.
3. The shard's documents are tokenized and cut into sequences (``plan_sequences``): one
   document per sequence, long documents as overlapping windows, or packed documents. Then
   batched by token budget inside fixed groups of documents, so batch boundaries depend only on
   the data and settings, never on how many shards run or where a run was interrupted.
4. The hot loop (``_run_batches``): teacher body (bf16 autocast on CUDA), output head and top-k
   extraction in float32 in chunks of positions, only (rows, k) copied to the host; a writer
   thread behind a bounded queue builds sequences, compresses and writes, so the teacher never
   waits for the disk.
5. The part is committed (part.json last); with one shard the cache is finalized.

Resume: the part writer records what is durable after every flush (flushes happen at batch
boundaries); a rerun skips those batches and repeats at most one flush interval of work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kdcache.stages.adapters import CausalLM, load_model
from kdcache.stages.data import iter_documents, source_fingerprint, tokenize
from kdcache.stages.extract import (
    NonFiniteLogitsError,
    default_chunk_rows,
    extract_from_logits,
    extract_rows,
    row_seeds,
)
from kdcache.stages.tokenizer import TokenizerInfo, load_tokenizer
from kdcache.storage.errors import ConfigError, MissingPartError
from kdcache.storage.lease import DEFAULT_LEASE_SECONDS
from kdcache.storage.manifest import (
    CacheIdentity,
    finalize,
    part_name,
    parts_dir,
    recorded_num_shards,
)
from kdcache.storage.paths import is_within, output_problem
from kdcache.storage.schema import CacheSchema, Sequence
from kdcache.storage.writer import PartWriter, part_committed, prepare_output

log = logging.getLogger(__name__)

MAX_DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class CaptureConfig:
    """Everything ``kdcache cache`` takes. Saved (resolved) in every part record."""

    teacher: str
    data: str
    out: str
    tokenizer: str | None = None  # default: the teacher's own
    k: int = 64
    seq_len: int | None = None  # default: the teacher's context, at most 2048
    stride: int | None = None  # window step for long documents; default seq_len // 2; 0: none
    pack: bool = False
    text_field: str | None = None
    ids_field: str | None = None
    targets_on: str = "all"  # "all" rows, or "assistant" rows of chat data only
    add_eos: bool = True
    backend: str = "zarr"
    logprob_dtype: str = "float16"
    codec: str = "plain"  # plain | sorted-q8 | sorted-q10 | sorted-q12 (kdcache.storage.codecs)
    targets: str = "topk"  # topk: the k most likely ids; sampled: k draws per row (unbiased)
    proposal_temperature: float = 1.0  # sampled: draw at this temperature, store IS weights
    num_shards: int | None = None  # None: the cache's own when resuming, else the array's, else 1
    shard_index: int | str = 0  # or "env": SLURM_ARRAY_TASK_ID, or RANK (torchrun)
    batch_tokens: int = 16384  # padded tokens per teacher batch
    group_docs: int = 256  # documents per batching group (the unit of sharding)
    flush_positions: int = 65536  # positions per durable flush (the most work a crash loses)
    device: str = "auto"
    chunk_rows: int | None = None  # positions per float32 head + top-k chunk; None: by device
    head_precision: str = "auto"  # float32 | tf32 (CUDA tensor cores) | auto: tf32 on CUDA
    # torch threads on a CPU device, recorded: BLAS rounds small matmuls differently with
    # another thread count, so every part (and every executor) uses one. None: torch's default.
    cpu_threads: int | None = None
    replace: bool = False
    progress: bool = True
    lease_seconds: float = DEFAULT_LEASE_SECONDS  # a killed writer's part is free after this
    lease_wait: float = 0.0  # wait this long for another writer's live lease before refusing

    def problems(self) -> list[str]:
        p = []
        if not isinstance(self.k, int) or self.k < 1:
            p.append(f"--k must be an integer >= 1, got {self.k!r}")
        if self.seq_len is not None and self.seq_len < 2:
            p.append(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.stride is not None and self.stride < 0:
            p.append(f"--stride must be >= 0 (0: no windows), got {self.stride}")
        if self.stride and self.seq_len and self.stride > self.seq_len:
            p.append(
                f"--stride {self.stride} exceeds --seq-len {self.seq_len}; windows would skip tokens"
            )
        if self.targets not in ("topk", "sampled"):
            p.append(f"--targets must be 'topk' or 'sampled', got {self.targets!r}")
        if not self.proposal_temperature > 0:
            p.append(f"--proposal-temperature must be > 0, got {self.proposal_temperature}")
        elif self.proposal_temperature != 1.0 and self.targets != "sampled":
            p.append(
                f"--proposal-temperature {self.proposal_temperature} applies to --targets sampled "
                "only; add --targets sampled or drop it"
            )
        if self.targets_on not in ("all", "assistant"):
            p.append(f"--targets-on must be 'all' or 'assistant', got {self.targets_on!r}")
        if self.backend not in ("zarr", "arrow"):
            p.append(f"--backend must be 'zarr' or 'arrow', got {self.backend!r}")
        if self.logprob_dtype not in ("float16", "float32"):
            p.append(f"--logprob-dtype must be float16 or float32, got {self.logprob_dtype!r}")
        if self.num_shards is not None and self.num_shards < 1:
            p.append(f"--num-shards must be >= 1, got {self.num_shards}")
        if (
            isinstance(self.shard_index, int)
            and self.num_shards
            and not (0 <= self.shard_index < self.num_shards)
        ):
            p.append(f"--shard-index must lie in [0, {self.num_shards}), got {self.shard_index}")
        if isinstance(self.shard_index, str) and self.shard_index != "env":
            p.append(f"--shard-index must be an integer or 'env', got {self.shard_index!r}")
        for name in ("batch_tokens", "group_docs", "flush_positions", "chunk_rows", "cpu_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lease_seconds > 0:
            p.append(f"--lease-seconds must be > 0, got {self.lease_seconds}")
        if not self.lease_wait >= 0:
            p.append(f"--lease-wait must be >= 0, got {self.lease_wait}")
        if self.head_precision not in ("auto", "float32", "tf32"):
            p.append(f"--head-precision must be auto, float32 or tf32, got {self.head_precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            p.append(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not Path(self.data).exists():
            p.append(f"--data {self.data}: no such file or folder")
        if problem := output_problem(self.out, "--out"):
            p.append(problem)
        if Path(self.data).exists() and (
            is_within(self.out, self.data) or is_within(self.data, self.out)
        ):
            p.append(
                f"--out {self.out} and --data {self.data} are nested; expected the cache outside "
                "the data (its files would become data, and the data's fingerprint would change "
                "with every run): choose another --out"
            )
        return p

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def stored_settings(self) -> dict:
        """The settings that change stored values: part of the cache identity."""
        keys = (
            "k",
            "seq_len",
            "stride",
            "pack",
            "text_field",
            "ids_field",
            "targets_on",
            "add_eos",
        )
        keys += ("logprob_dtype", "batch_tokens", "group_docs", "head_precision", "cpu_threads")
        return {key: getattr(self, key) for key in keys}


def resolve_num_shards(cfg: CaptureConfig, from_env: int | None = None) -> int | None:
    """How many parts the cache has: --num-shards if given; else the cache being resumed (so a
    rerun of one SLURM array task, whose environment describes a one-task array, resumes its
    part of the original array); else ``from_env`` (a fresh array's or torchrun's size); else
    1 outside --shard-index env, None (unknown) inside it.
    With --replace the cache at --out is being replaced: its count does not carry over."""
    if cfg.num_shards is not None:
        return cfg.num_shards
    recorded = None if cfg.replace else recorded_num_shards(Path(cfg.out))
    return recorded or from_env or (None if cfg.shard_index == "env" else 1)


def resolve_shard(cfg: CaptureConfig) -> tuple[int, int]:
    """(shard_index, num_shards). --shard-index env takes the index from the environment:
    SLURM_ARRAY_TASK_ID (the array index is the part index: --array=0-15 for 16 parts; a rerun
    --array=5 resumes part 5) or RANK (torchrun). The count never comes from a rerun's array
    shape (``resolve_num_shards``): a fresh array's is SLURM_ARRAY_TASK_MAX + 1."""
    env = os.environ
    if cfg.shard_index != "env":
        index, source, size = int(cfg.shard_index), "--shard-index", None
    elif "SLURM_ARRAY_TASK_ID" in env:
        index, source = int(env["SLURM_ARRAY_TASK_ID"]), "SLURM_ARRAY_TASK_ID"
        # A fresh array --array=0-15 is 16 parts; --array=5 (a rerun) says nothing of the count.
        fresh = env.get("SLURM_ARRAY_TASK_MIN", "0") == "0" and "SLURM_ARRAY_TASK_MAX" in env
        size = int(env["SLURM_ARRAY_TASK_MAX"]) + 1 if fresh else None
    elif "RANK" in env and "WORLD_SIZE" in env:
        index, source, size = int(env["RANK"]), "RANK", int(env["WORLD_SIZE"])
    else:
        raise ConfigError(
            "--shard-index env: expected SLURM_ARRAY_TASK_ID (a SLURM array) or RANK and "
            "WORLD_SIZE (torchrun) in the environment, found neither; pass --shard-index I"
        )
    count = resolve_num_shards(cfg, size)
    if count is None:
        raise ConfigError(
            f"{source} {index}: how many parts? the array does not start at 0 and {cfg.out} holds "
            "no cache to resume; pass --num-shards N (the array index is the part index)"
        )
    if not 0 <= index < count:
        how = (
            f"the array index is the part index: submit --array=0-{count - 1}, or pass --num-shards"
            if source == "SLURM_ARRAY_TASK_ID"
            else "pass --num-shards, or a smaller --shard-index"
        )
        raise ConfigError(
            f"{source} {index} names part {index}, but the cache has {count} part"
            f"{'s' if count != 1 else ''} (0 to {count - 1}); {how}"
        )
    return index, count


def use_cpu_threads(threads: int | None, device: torch.device) -> int | None:
    """Set (and return) the torch threads of a CPU capture: ``threads``, or torch's current
    count. None on CUDA: the GPU's results do not depend on the host's threads. Called in every
    thread that runs the teacher (OpenMP's count is per thread)."""
    if device.type != "cpu":
        return None
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA device is available here; use --device cpu or auto"
        )
    return torch.device(name)


# -- planning: documents -> sequences -> batches ---------------------------------------------
@dataclass
class Planned:
    """One sequence to run through the teacher."""

    sample_id: int
    ids: np.ndarray  # (T,) int64
    target_mask: np.ndarray  # (T,) uint8
    doc_starts: np.ndarray  # (D,) int32


def sample_id(*parts: object) -> int:
    """Stable 64-bit id of (source, document, window): never depends on the shard count."""
    h = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def windows(
    ids: np.ndarray, mask: np.ndarray, seq_len: int, stride: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a long document into windows of seq_len starting every stride tokens.

    Row p predicts token p+1; each row is a target in exactly one window: the first
    ``seq_len - stride`` rows of every window after the first were targets in the previous
    window (with less left context), so they are context only here.
    """
    n = len(ids)
    out, start = [], 0
    while True:
        end = min(start + seq_len, n)
        m = mask[start:end].copy()
        if start > 0:
            m[: seq_len - stride] = 0
        out.append((ids[start:end], m))
        if end == n:
            return out
        start += stride


def plan_sequences(
    cfg: CaptureConfig, tok: TokenizerInfo, shard: int, num_shards: int, seq_len: int, stride: int
):
    """Yield (group index, [Planned]) for this shard's groups, in order.

    Document i belongs to group i // group_docs; group g belongs to shard g % num_shards.
    """
    assistant = cfg.targets_on == "assistant"
    current = -1
    pieces: list[tuple[int, np.ndarray, np.ndarray]] = []  # (sample id, ids, mask)

    def flush_group():
        nonlocal pieces
        seqs = (
            _pack(pieces, seq_len)
            if cfg.pack
            else [Planned(s, i, m, np.zeros(1, np.int32)) for s, i, m in pieces]
        )
        pieces = []
        return seqs

    n_docs = 0
    for i, doc in enumerate(
        iter_documents(Path(cfg.data), text_field=cfg.text_field, ids_field=cfg.ids_field)
    ):
        n_docs += 1
        g = i // cfg.group_docs
        if g != current:
            if pieces:
                yield current, flush_group()
            current = g
        if g % num_shards != shard:
            continue
        t = tokenize(doc, tok, add_eos=cfg.add_eos, assistant_only=assistant)
        if len(t.ids) < 2 and not cfg.pack:
            continue  # nothing to predict
        if len(t.ids) > seq_len:
            if not stride:
                raise ConfigError(
                    f"{doc.source} document {doc.index} has {len(t.ids)} tokens, more than --seq-len {seq_len} "
                    "and no stride; pass --stride S to cut long documents into overlapping windows"
                )
            for w, (ids, m) in enumerate(windows(t.ids, t.target_mask, seq_len, stride)):
                pieces.append((sample_id(doc.source, doc.index, w), ids, m))
        else:
            pieces.append((sample_id(doc.source, doc.index, 0), t.ids, t.target_mask))
    if pieces:
        yield current, flush_group()
    if n_docs == 0:
        raise ConfigError(
            f"--data {cfg.data} holds no documents; expected at least one non-empty file or record"
        )


def _pack(pieces: list[tuple[int, np.ndarray, np.ndarray]], seq_len: int) -> list[Planned]:
    """Join pieces in order into sequences of at most seq_len tokens (a piece is never split)."""
    out, cur = [], []

    def close():
        if cur:
            starts = np.cumsum([0] + [len(p[1]) for p in cur[:-1]]).astype(np.int32)
            out.append(
                Planned(
                    sample_id=sample_id("pack", *[p[0] for p in cur]),
                    ids=np.concatenate([p[1] for p in cur]),
                    target_mask=np.concatenate([p[2] for p in cur]),
                    doc_starts=starts,
                )
            )

    used = 0
    for piece in pieces:
        if cur and used + len(piece[1]) > seq_len:
            close()
            cur, used = [], 0
        cur.append(piece)
        used += len(piece[1])
    close()
    return out


def make_batches(seqs: list[Planned], batch_tokens: int) -> list[list[Planned]]:
    """Longest first inside the group, then greedy: B * longest <= batch_tokens (>= 1 sequence)."""
    order = sorted(seqs, key=lambda s: -len(s.ids))  # stable: ties keep document order
    batches, cur = [], []
    for s in order:
        if cur and (len(cur) + 1) * len(cur[0].ids) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(s)
    if cur:
        batches.append(cur)
    return batches


# -- the hot loop ---------------------------------------------------------------------------
@dataclass
class _Result:
    batch: list[Planned]
    rows_per_seq: list[int]
    ids: torch.Tensor  # (n, k) on host
    logprobs: torch.Tensor  # (n, k)
    log_tail: torch.Tensor  # (n,)
    finite: torch.Tensor  # (n,) bool
    event: torch.cuda.Event | None = None


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


@torch.inference_mode()
def teacher_rows(
    teacher: CausalLM,
    batch: list[Planned],
    device: torch.device,
    cfg: CaptureConfig,
    targets_mask_only: bool,
):
    """Run one batch; return (ids, logprobs, log_tail, finite) for its target rows, on the device."""
    B, T = len(batch), max(len(s.ids) for s in batch)
    ids = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    rows = torch.zeros(B, T, dtype=torch.bool)
    seg = pos = None
    if cfg.pack:
        seg = torch.full((B, T), -1, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(batch):
        n = len(s.ids)
        ids[b, :n] = torch.from_numpy(s.ids)
        valid[b, :n] = True
        rows[b, :n] = torch.from_numpy(s.target_mask.astype(bool)) if targets_mask_only else True
        if cfg.pack:
            bounds = list(s.doc_starts) + [n]
            for d in range(len(bounds) - 1):
                seg[b, bounds[d] : bounds[d + 1]] = d
                pos[b, bounds[d] : bounds[d + 1]] = torch.arange(bounds[d + 1] - bounds[d])
    host_rows = rows
    ids, rows = ids.to(device, non_blocking=True), rows.to(device, non_blocking=True)
    if cfg.pack:
        seg, pos = seg.to(device, non_blocking=True), pos.to(device, non_blocking=True)
    mask = (
        valid.to(device, non_blocking=True).long()
        if teacher.kind == "hf" and not cfg.pack
        else None
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    chunk = cfg.chunk_rows or default_chunk_rows(device)
    seeds = None
    if cfg.targets == "sampled":  # draws seeded by (sample id, position) of each target row
        sid = torch.tensor(np.array([s.sample_id for s in batch], np.uint64).view(np.int64))
        where = host_rows.nonzero()  # (n, 2) (sequence, position), the order of h[rows]
        seeds = row_seeds(sid[where[:, 0]], where[:, 1]).to(device)
    if teacher.has_head:
        with autocast:
            h = teacher.hidden(
                ids, position_ids=pos, segment_ids=seg, attention_mask=mask
            )  # (B, T, C)
        head = teacher.head_module
        out = extract_rows(
            h[rows],
            head.weight,
            head.bias,
            cfg.k,
            chunk,
            tf32=cfg.head_precision == "tf32",
            seeds=seeds,
            proposal_temperature=cfg.proposal_temperature,
        )
    else:
        with autocast:
            logits = teacher.logits(
                ids, position_ids=pos, segment_ids=seg, attention_mask=mask
            )  # (B, T, V)
        out = extract_from_logits(
            logits[rows], cfg.k, chunk, seeds=seeds, proposal_temperature=cfg.proposal_temperature
        )
    top_ids, lp, tail, finite = out
    id_dtype = (
        torch.int32 if teacher.vocab_size > 2**15 else torch.int16
    )  # exact, half the bytes of int64
    lp_dtype = torch.float16 if cfg.logprob_dtype == "float16" else torch.float32
    return top_ids.to(id_dtype), lp.to(lp_dtype), tail, finite


class _WriterThread(threading.Thread):
    """Turns teacher results into sequences and writes them, behind a bounded queue."""

    def __init__(self, writer: PartWriter, targets_mask_only: bool, maxsize: int = 4):
        super().__init__(daemon=True, name="kdcache-writer")
        self.writer, self.targets_mask_only = writer, targets_mask_only
        self.q: queue.Queue[_Result | None] = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.bytes_in = 0

    def put(self, item: _Result | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while (r := self.q.get()) is not None:
                if r.event is not None:
                    r.event.synchronize()
                self._write(r)
        except BaseException as e:  # surfaced in the main thread by put()/finish()
            self.error = e
            while True:  # drain so the producer never blocks on a dead consumer
                try:
                    if self.q.get(timeout=1) is None:
                        return
                except queue.Empty:
                    continue

    def _write(self, r: _Result) -> None:
        finite = r.finite.numpy()
        ids = r.ids.numpy()
        lp = r.logprobs.numpy()
        tail = r.log_tail.numpy()
        start = 0
        seqs = []
        for s, n in zip(r.batch, r.rows_per_seq, strict=True):
            if not finite[start : start + n].all():
                bad = start + int(np.flatnonzero(~finite[start : start + n])[0]) - start
                raise NonFiniteLogitsError(
                    f"the teacher produced NaN or inf logits for sample {s.sample_id} (row {bad}); "
                    "check the teacher weights and dtype (try --device cpu to rule out bf16 overflow)"
                )
            seqs.append(
                Sequence(
                    sample_id=s.sample_id,
                    input_ids=s.ids,
                    loss_mask=s.target_mask,
                    doc_starts=s.doc_starts,
                    topk_ids=ids[start : start + n],
                    topk_logprobs=lp[start : start + n],
                    log_tail=tail[start : start + n],
                )
            )
            start += n
        self.writer.add(seqs)

    def finish(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error


# -- the stage ------------------------------------------------------------------------------
@dataclass
class CaptureSummary:
    """One part's capture. ``positions`` / ``sequences``: this run's teacher work (a resumed
    run skips what was durable); ``part_positions`` / ``part_sequences``: the committed part."""

    out: str
    part: str
    shard_index: int
    num_shards: int
    positions: int = 0
    sequences: int = 0
    part_positions: int = 0
    part_sequences: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: bool = False
    finalized: bool = False
    resumed_sequences: int = 0
    details: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.positions / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        done = "; cache finalized" if self.finalized else ""
        if self.skipped:
            return f"{self.part}: already committed; nothing to do{done}"
        bpp = self.bytes / self.part_positions if self.part_positions else 0.0
        resumed = (
            f" (resumed after {self.resumed_sequences:,} durable sequences; this run "
            f"{self.positions:,} positions)"
            if self.resumed_sequences
            else ""
        )
        return (
            f"{self.part}: {self.part_positions:,} positions in {self.part_sequences:,} sequences"
            f"{resumed}, {self.bytes / 1e6:.1f} MB ({bpp:.1f} bytes/position), "
            f"{self.tokens_per_second:,.0f} tokens/s, {self.seconds:.1f}s{done}"
        )


def load_teacher_and_tokenizer(
    cfg: CaptureConfig, device: torch.device
) -> tuple[CausalLM, TokenizerInfo]:
    """Load both and check them against each other (before any teacher work)."""
    teacher = load_model(cfg.teacher, device)
    tok_path = cfg.tokenizer or teacher.tokenizer_path
    if tok_path is None:
        raise ConfigError(
            f"the teacher {cfg.teacher} ships no tokenizer; pass --tokenizer (a tokenizer.json or a Hugging Face tokenizer folder)"
        )
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > teacher.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tok.vocab_size:,} tokens but the teacher outputs only {teacher.vocab_size:,}; "
            "use the teacher's own tokenizer (leave out --tokenizer)"
        )
    if cfg.k > teacher.vocab_size:
        option = "--samples" if cfg.targets == "sampled" else "--k"  # sampled: k is the draws
        raise ConfigError(
            f"{option} {cfg.k} exceeds the teacher's vocabulary of {teacher.vocab_size:,}; use "
            f"{option} <= {teacher.vocab_size}"
        )
    return teacher, tok


@dataclass
class CaptureSession:
    """The teacher and tokenizer loaded once, with everything resolved that every part shares.

    One process (or one Dask worker) builds it once and captures any number of parts with it:
    ``capture_part(session, shard)``."""

    cfg: CaptureConfig  # resolved: seq_len, stride, head_precision, num_shards
    device: torch.device
    teacher: CausalLM
    tok: TokenizerInfo
    identity: CacheIdentity

    @property
    def num_shards(self) -> int:
        return self.cfg.num_shards


def load_session(cfg: CaptureConfig, num_shards: int) -> CaptureSession:
    """Validate, load the teacher and tokenizer on cfg.device, resolve the settings."""
    cfg.validate()
    device = pick_device(cfg.device)
    teacher, tok = load_teacher_and_tokenizer(cfg, device)

    context = teacher.max_positions
    seq_len = cfg.seq_len or min(context or MAX_DEFAULT_SEQ_LEN, MAX_DEFAULT_SEQ_LEN)
    if context is not None and seq_len > context:
        raise ConfigError(
            f"--seq-len {seq_len} exceeds the teacher's context of {context} tokens; use --seq-len <= {context}"
        )
    stride = seq_len // 2 if cfg.stride is None else cfg.stride
    if stride > seq_len:  # validate() checks this only when --seq-len is given
        raise ConfigError(
            f"--stride {stride} exceeds the sequence length {seq_len} (the teacher's context); "
            f"windows would skip tokens: use --stride <= {seq_len}"
        )
    if cfg.pack and not teacher.supports_packing(seq_len):
        raise ConfigError(
            f"--pack needs a teacher that keeps packed documents apart; {cfg.teacher} gave other "
            "logits for a packed document than for the document alone (a Hugging Face model needs "
            "transformers >= 4.54, which builds the packed mask from position ids); drop --pack"
        )
    head_precision = cfg.head_precision
    if head_precision == "auto" or device.type != "cuda":  # tf32 exists on CUDA only
        head_precision = "tf32" if device.type == "cuda" else "float32"
    resolved_cfg = replace(
        cfg,
        seq_len=seq_len,
        stride=stride,
        num_shards=num_shards,
        head_precision=head_precision,
        cpu_threads=use_cpu_threads(cfg.cpu_threads, device),
    )
    settings = resolved_cfg.stored_settings()
    data_fp = {
        "sources": source_fingerprint(Path(cfg.data)),
        "settings": {**settings, "add_bos": tok.add_bos},
    }
    data_fp["sha256"] = hashlib.sha256(repr(sorted(data_fp.items())).encode()).hexdigest()
    schema = CacheSchema(
        k=cfg.k,
        vocab_size=teacher.vocab_size,
        logprob_dtype=cfg.logprob_dtype,
        targets_on="mask" if cfg.targets_on == "assistant" else "all",
        targets=cfg.targets,
        codec=cfg.codec,
        proposal_temperature=float(cfg.proposal_temperature),
    )
    identity = CacheIdentity(
        backend=cfg.backend,
        schema=schema,
        fingerprints={
            "teacher": teacher.fingerprint(),
            "tokenizer": {
                "sha256": tok.fingerprint,
                "vocab_size": tok.vocab_size,
                # the name, not the path: a resume or another shard may spell the path otherwise
                "name": Path(tok.path).name if tok.path else None,
            },
            "data": data_fp,
        },
        settings=settings,
        num_shards=num_shards,
    )
    return CaptureSession(resolved_cfg, device, teacher, tok, identity)


def capture_part(session: CaptureSession, shard: int) -> CaptureSummary:
    """Capture part ``shard`` whole (or resume it, or skip it if committed). Never finalizes.

    The one per-part function of every executor: one process, a SLURM array task, a Dask
    worker. Holds the part's lease while writing, so a second writer of the part is refused."""
    cfg, num_shards = session.cfg, session.num_shards
    if not 0 <= shard < num_shards:
        raise ConfigError(f"shard {shard} does not exist: expected 0 <= shard < {num_shards}")
    resolved = {**asdict(cfg), "shard_index": shard}
    name = part_name(shard)
    summary = CaptureSummary(out=cfg.out, part=name, shard_index=shard, num_shards=num_shards)
    if part_committed(parts_dir(Path(cfg.out)) / name):
        summary.skipped = True
        return summary
    # Plan (tokenize, window, batch) before the part folder exists: bad data leaves nothing.
    batches = [
        b
        for _, group in plan_sequences(cfg, session.tok, shard, num_shards, cfg.seq_len, cfg.stride)
        for b in make_batches(group, cfg.batch_tokens)
    ]
    if not batches and num_shards == 1:
        raise ConfigError(
            f"--data {cfg.data} gave no sequence to capture: every document is shorter than 2 "
            "tokens; expected at least one document with something to predict"
        )
    if not batches:  # more shards than document groups: an empty part, committed like any other
        log.info(
            "%s: shard %d of %d got no document; committing an empty part", name, shard, num_shards
        )
    writer = PartWriter(
        Path(cfg.out),
        session.identity,
        shard_index=shard,
        config=resolved,
        flush_positions=cfg.flush_positions,
        lease_seconds=cfg.lease_seconds,
        lease_wait=cfg.lease_wait,
    )
    if writer.committed:  # another writer finished it while this one waited for the lease
        summary.skipped = True
        return summary
    try:
        _run_batches(session.teacher, batches, writer, session.device, cfg, summary)
        t_commit = time.perf_counter()
        record = writer.commit(
            {"capture": {"device": str(session.device), "loop_seconds": summary.seconds}}
        )
    except BaseException:
        writer.release()  # what was flushed stays durable: a rerun resumes at once
        raise
    summary.seconds += time.perf_counter() - t_commit  # the last flush + checksums + part.json
    summary.bytes = record["bytes"]
    summary.part_positions = record["counts"]["positions"]
    summary.part_sequences = record["counts"]["sequences"]
    return summary


def run_capture(cfg: CaptureConfig) -> CaptureSummary:
    """``kdcache cache``: write this shard's part of the cache (and finalize a one-shard cache)."""
    cfg.validate()
    shard, num_shards = resolve_shard(cfg)
    session = load_session(cfg, num_shards)
    prepare_output(Path(cfg.out), session.identity, replace=cfg.replace)  # refuse others first
    summary = capture_part(session, shard)
    try:
        finalize(Path(cfg.out))
        summary.finalized = True
    except MissingPartError as e:
        log.info("not finalized yet: %s", e)
    return summary


def _run_batches(
    teacher, batches, writer: PartWriter, device, cfg: CaptureConfig, summary: CaptureSummary
) -> None:
    done = writer.resume_sequences
    summary.resumed_sequences = done
    first = 0
    while done > 0 and first < len(batches):
        done -= len(batches[first])
        first += 1
    if done != 0:
        raise ConfigError(
            f"{writer.dir}: its durable {writer.resume_sequences} sequences end inside a batch of this run's plan; "
            "the data changed since it was written: pass --replace to start the part over"
        )
    todo = batches[first:]
    total = sum(len(s.ids) for b in todo for s in b)
    mask_only = cfg.targets_on == "assistant"
    thread = _WriterThread(writer, mask_only)
    thread.start()
    t0 = time.perf_counter()
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"capture {writer.name}",
        disable=not cfg.progress,
    )
    try:
        for batch in todo:
            top_ids, lp, tail, finite = teacher_rows(teacher, batch, device, cfg, mask_only)
            rows = [int(s.target_mask.sum()) if mask_only else len(s.ids) for s in batch]
            result = _Result(
                batch, rows, _to_host(top_ids), _to_host(lp), _to_host(tail), _to_host(finite)
            )
            if device.type == "cuda":
                result.event = torch.cuda.Event()
                result.event.record()
            thread.put(result)
            n = sum(len(s.ids) for s in batch)
            summary.positions += n
            summary.sequences += len(batch)
            bar.update(n)
        thread.finish()
    except BaseException:
        bar.close()
        if thread.is_alive():
            thread.q.put(None)
        raise
    bar.close()
    summary.seconds = time.perf_counter() - t0
