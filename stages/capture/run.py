"""Stage one: run the teacher once over a dataset and write its top-k into a cache part.

Reads top to bottom:

1. ``CaptureConfig`` (kdcache.stages.capture.config) is validated completely (every problem at
   once) before anything loads.
2. ``load_session``: the tokenizer, then the teacher, loaded and checked against each other and
   the config; the settings resolved; the cache identity built.
3. ``capture_part``: the shard's documents planned into sequences and batches
   (kdcache.stages.capture.plan), the part's writer opened (resume, lease).
4. The hot loop (``_run_batches``): teacher body (in --dtype: bf16 on CUDA by default), output
   head and top-k extraction in float32 in chunks of positions (kdcache.stages.capture.extract;
   the fused Triton kernel on CUDA, kdcache.stages.capture.fused_head), only (rows, k) copied
   to the host; a writer thread behind a bounded queue builds sequences, compresses and
   writes, so the teacher never waits for the disk. A teacher split over ranks
   (--tensor-parallel, kdcache.stages.capture.tensor_parallel) runs the same loop on each;
   only the group's first rank writes.
5. The part is committed (part.json last). Which process captures which part (one process, a
   SLURM array task, a Dask worker) is the executors' business (kdcache.pipeline.executors).

Resume: the part writer records what is durable after every flush (flushes happen at batch
boundaries); a rerun skips those batches and repeats at most one flush interval of work.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kdcache.stages.capture.config import MAX_DEFAULT_SEQ_LEN, CaptureConfig
from kdcache.stages.capture.extract import (
    NonFiniteLogitsError,
    default_chunk_rows,
    extract_from_logits,
    extract_rows,
    row_seeds,
)
from kdcache.stages.capture.plan import Planned, make_batches, plan_sequences
from kdcache.stages.capture.sources import source_fingerprint
from kdcache.stages.capture.tensor_parallel import TensorParallel, start_tensor_parallel
from kdcache.stages.models.adapters import (
    AUTOCAST,
    CausalLM,
    HeadShard,
    load_model,
    resolve_dtype,
    weights_dtype,
)
from kdcache.stages.models.devices import use_cpu_threads
from kdcache.stages.models.tokenizer import TokenizerInfo, load_tokenizer
from kdcache.storage.background import WriteBehind
from kdcache.storage.errors import ConfigError
from kdcache.storage.manifest import CacheIdentity, part_name, parts_dir
from kdcache.storage.schema import CacheSchema, Sequence, transfer_id_dtype
from kdcache.storage.writer import PartWriter, part_committed

log = logging.getLogger(__name__)


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


def batch_tensors(batch: list[Planned], pack: bool, targets_mask_only: bool) -> dict:
    """The host tensors of one batch: ids (B, T) int64, valid (B, T) bool real positions, rows
    (B, T) bool target rows, and (packed) segment_ids / position_ids restarting per document."""
    B, T = len(batch), max(len(s.ids) for s in batch)
    ids = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    rows = torch.zeros(B, T, dtype=torch.bool)
    seg = torch.full((B, T), -1, dtype=torch.long) if pack else None
    pos = torch.zeros(B, T, dtype=torch.long) if pack else None
    for b, s in enumerate(batch):
        n = len(s.ids)
        ids[b, :n] = torch.from_numpy(s.ids)
        valid[b, :n] = True
        rows[b, :n] = torch.from_numpy(s.target_mask.astype(bool)) if targets_mask_only else True
        if pack:
            bounds = [*s.doc_starts.tolist(), n]
            for d in range(len(bounds) - 1):
                seg[b, bounds[d] : bounds[d + 1]] = d
                pos[b, bounds[d] : bounds[d + 1]] = torch.arange(bounds[d + 1] - bounds[d])
    return {"ids": ids, "valid": valid, "rows": rows, "segment_ids": seg, "position_ids": pos}


@torch.inference_mode()
def teacher_rows(session: CaptureSession, batch: list[Planned], cfg: CaptureConfig | None = None):
    """Run one batch; return (ids, logprobs, log_tail, finite) for its target rows, on the
    device. ``cfg``: the session's own unless given (a benchmark compares head settings)."""
    cfg = cfg or session.cfg
    teacher, device = session.teacher, session.device
    host = batch_tensors(batch, cfg.pack, cfg.targets_on == "assistant")
    t = {k: None if v is None else v.to(device, non_blocking=True) for k, v in host.items()}
    model_in = dict(position_ids=t["position_ids"], segment_ids=t["segment_ids"], valid=t["valid"])
    chunk = cfg.chunk_rows or default_chunk_rows(device)
    seeds = None
    if cfg.targets == "sampled":  # draws seeded by (sample id, position) of each target row
        sid = torch.tensor(np.array([s.sample_id for s in batch], np.uint64).view(np.int64))
        where = host["rows"].nonzero()  # (n, 2) (sequence, position), the order of h[rows]
        seeds = row_seeds(sid[where[:, 0]], where[:, 1]).to(device)
    sampling = dict(seeds=seeds, proposal_temperature=cfg.proposal_temperature)
    autocast = nullcontext()
    if cfg.dtype == AUTOCAST:  # float32 weights, a bf16 body; the head stays float32
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    if session.head is not None:
        with autocast:
            h = teacher.hidden(t["ids"], **model_in)  # (B, T, C)
        tf32 = cfg.head_precision == "tf32"
        out = extract_rows(
            h[t["rows"]], session.head, cfg.k, chunk, tf32, kernel=cfg.head_kernel, **sampling
        )
    else:
        with autocast:
            logits = teacher.logits(t["ids"], **model_in)  # (B, T, V)
        out = extract_from_logits(logits[t["rows"]], cfg.k, chunk, **sampling)
    top_ids, lp, tail, finite = out
    id_dtype = getattr(torch, transfer_id_dtype(teacher.vocab_size))  # exact, < int64's bytes
    return top_ids.to(id_dtype), lp.to(getattr(torch, cfg.logprob_dtype)), tail, finite


def _sequences(r: _Result) -> list[Sequence]:
    """A batch's teacher results as the part's sequences (on the writer thread)."""
    if r.event is not None:
        r.event.synchronize()  # the device-to-host copies are done
    finite, ids, lp, tail = (t.numpy() for t in (r.finite, r.ids, r.logprobs, r.log_tail))
    start, seqs = 0, []
    for s, n in zip(r.batch, r.rows_per_seq, strict=True):
        if not finite[start : start + n].all():
            bad = int(np.flatnonzero(~finite[start : start + n])[0])
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
    return seqs


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
    writer: bool = True  # False on a tensor-parallel rank that computes but does not write

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
    cfg: CaptureConfig, device: torch.device, tp: TensorParallel | None = None
) -> tuple[CausalLM, TokenizerInfo]:
    """Load both and check them against each other (before any teacher work): the teacher in
    --dtype, split over ``tp``'s ranks if given."""
    dtype = weights_dtype(resolve_dtype(cfg.dtype, device, cfg.teacher))
    teacher = load_model(cfg.teacher, device, dtype=dtype, tp_mesh=tp and tp.mesh)
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
    head: HeadShard | None = None  # the head rows this process multiplies; None: full logits
    tp: TensorParallel | None = None  # the ranks that share the teacher (--tensor-parallel)

    @property
    def writer(self) -> bool:
        """Whether this process writes what it captures (not a tensor-parallel helper)."""
        return self.tp is None or self.tp.writer

    def on_writer(self, decide):
        """``decide()`` on the process that writes; in a tensor-parallel group its answer (or
        its exception, raised on every rank) shared, so all ranks run the same batches and none
        waits in a collective for a rank that gave up."""
        if self.tp is None:
            return decide()
        answer = None
        if self.tp.writer:
            try:
                answer = decide()
            except Exception as e:
                answer = e
        return self.tp.share(answer)

    @property
    def num_shards(self) -> int:
        return self.cfg.num_shards


def load_session(cfg: CaptureConfig, num_shards: int) -> CaptureSession:
    """Validate, load the teacher and tokenizer on cfg.device, resolve the settings."""
    cfg.validate()
    tp, device = start_tensor_parallel(cfg.tensor_parallel, cfg.device)
    teacher, tok = load_teacher_and_tokenizer(cfg, device, tp)

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
        head_kernel=resolve_head_kernel(cfg, device, teacher),
        dtype=resolve_dtype(cfg.dtype, device, cfg.teacher),
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
    if tp is not None and teacher.vocab_size > 2**24:  # ids travel as float32 between ranks
        raise ConfigError(
            f"--tensor-parallel takes vocabularies up to {2**24:,} ids, found "
            f"{teacher.vocab_size:,}; drop --tensor-parallel"
        )
    head = teacher.head_shard(tp and tp.group) if teacher.has_head else None
    if tp is not None and head is None:
        log.info("%s: its forward changes the head's output; gathering full logits", cfg.teacher)
    return CaptureSession(resolved_cfg, device, teacher, tok, identity, head, tp)


def resolve_head_kernel(cfg: CaptureConfig, device: torch.device, teacher: CausalLM) -> str:
    """What --head-kernel means here: ``auto`` is the fused Triton kernel on CUDA for top-k
    targets (k <= 128: its registers hold a running top-k of up to 128 per row) of a teacher
    whose head kdcache applies itself (and Triton installed), else eager.
    ``triton`` elsewhere needs Triton's CPU interpreter (TRITON_INTERPRET=1: tests only)."""
    fits = cfg.targets == "topk" and teacher.has_head
    if cfg.head_kernel == "eager" or (cfg.head_kernel == "auto" and not fits):
        return "eager"
    try:
        from kdcache.stages.capture.fused_head import interpreted
    except ImportError as e:
        if cfg.head_kernel == "auto":
            return "eager"
        raise ConfigError(
            f"--head-kernel triton needs Triton ({e}); pip install triton, or --head-kernel eager"
        ) from e
    if cfg.head_kernel == "auto":
        return "triton" if device.type == "cuda" and cfg.k <= 128 else "eager"
    if not fits:
        raise ConfigError(
            "--head-kernel triton selects the top-k of a head kdcache applies itself; found "
            + (
                "--targets sampled"
                if cfg.targets != "topk"
                else f"{cfg.teacher}, whose forward changes its head's output"
            )
            + ": use --head-kernel eager"
        )
    if device.type != "cuda" and not interpreted():
        raise ConfigError(
            f"--head-kernel triton runs on CUDA, found device {device}; use --head-kernel eager "
            "(or TRITON_INTERPRET=1 to test the kernel on CPU, slowly)"
        )
    return "triton"


def capture_part(session: CaptureSession, shard: int) -> CaptureSummary:
    """Capture part ``shard`` whole (or resume it, or skip it if committed). Never finalizes.

    The one per-part function of every executor: one process, a SLURM array task, a Dask
    worker, a tensor-parallel group (whose first rank decides and writes, the others compute
    with it). Holds the part's lease while writing, so a second writer is refused."""
    cfg, num_shards = session.cfg, session.num_shards
    if not 0 <= shard < num_shards:
        raise ConfigError(f"shard {shard} does not exist: expected 0 <= shard < {num_shards}")
    name = part_name(shard)
    summary = CaptureSummary(out=cfg.out, part=name, shard_index=shard, num_shards=num_shards)
    summary.writer = session.writer
    if session.on_writer(lambda: part_committed(parts_dir(Path(cfg.out)) / name)):
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
    writer = None

    def open_part() -> int | None:
        """The first batch to run; None: another writer finished the part while this one
        waited for the lease."""
        nonlocal writer
        writer = PartWriter(
            Path(cfg.out),
            session.identity,
            shard_index=shard,
            config={**asdict(cfg), "shard_index": shard},
            flush_positions=cfg.flush_positions,
            lease_seconds=cfg.lease_seconds,
            lease_wait=cfg.lease_wait,
        )
        return None if writer.committed else _first(batches, writer)

    try:
        first = session.on_writer(open_part)
        if first is None:
            summary.skipped = True
            return summary
        summary.resumed_sequences = sum(len(b) for b in batches[:first])
        _run_batches(session, batches[first:], writer, summary)
        if writer is None:
            return summary
        t_commit = time.perf_counter()
        record = writer.commit(
            {"capture": {"device": str(session.device), "loop_seconds": summary.seconds}}
        )
    except BaseException:
        if writer is not None:
            writer.release()  # what was flushed stays durable: a rerun resumes at once
        raise
    summary.seconds += time.perf_counter() - t_commit  # the last flush + checksums + part.json
    summary.bytes = record["bytes"]
    summary.part_positions = record["counts"]["positions"]
    summary.part_sequences = record["counts"]["sequences"]
    return summary


def _first(batches: list[list[Planned]], writer: PartWriter) -> int:
    """The first batch after the part's durable sequences (0 for a new part)."""
    done, first = writer.resume_sequences, 0
    while done > 0 and first < len(batches):
        done -= len(batches[first])
        first += 1
    if done != 0:
        raise ConfigError(
            f"{writer.dir}: its durable {writer.resume_sequences} sequences end inside a batch of this run's plan; "
            "the data changed since it was written: pass --replace to start the part over"
        )
    return first


def _run_batches(
    session: CaptureSession, todo, writer: PartWriter | None, summary: CaptureSummary
) -> None:
    """The batches through the teacher, their results to the writer thread (none for a
    tensor-parallel rank that does not write)."""
    cfg = session.cfg
    write = (lambda r: writer.add(_sequences(r))) if writer is not None else (lambda r: None)
    behind = WriteBehind(write)  # sequences, zstd, fsync
    t0 = time.perf_counter()
    bar = tqdm(
        total=sum(len(s.ids) for b in todo for s in b),
        unit="tok",
        unit_scale=True,
        desc=f"capture {summary.part}",
        disable=not (cfg.progress and session.writer),
    )
    try:
        for batch in todo:
            behind.put(_run_batch(session, batch))
            n = sum(len(s.ids) for s in batch)
            summary.positions += n
            summary.sequences += len(batch)
            bar.update(n)
        behind.finish()
    except BaseException:
        behind.abandon()
        raise
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0


def _run_batch(session: CaptureSession, batch: list[Planned]) -> _Result:
    """One batch through the teacher; its results on their way to the host (``_Result``)."""
    top_ids, lp, tail, finite = teacher_rows(session, batch)
    mask_only = session.cfg.targets_on == "assistant"
    rows = [int(s.target_mask.sum()) if mask_only else len(s.ids) for s in batch]
    result = _Result(batch, rows, *(_to_host(t) for t in (top_ids, lp, tail, finite)))
    if session.device.type == "cuda":
        result.event = torch.cuda.Event()
        result.event.record()
    return result
