"""Stage two: train a student from the cache alone. The teacher is never loaded.

Reads top to bottom (nanoGPT's train.py is the model): settings and cache checked before
anything loads -> the process group (torchrun) -> the student, checked against the cache ->
``DistillStep`` (the student and its loss in one module) under torch's engine (--parallel: none,
DDP or FSDP2) -> data (shuffled batch blocks, each rank its slice, exact resume) -> AdamW with
warmup + cosine -> resume from the newest committed checkpoint -> the loop: per optimizer step
``grad_accum`` micro-batches, one all-reduce of the step's row counts, forward/backward (DDP
syncs on the last micro-step only), clipping, the optimizer; logging, held-out evaluation and
sharded checkpoints on their schedules -> the trained student and ``metrics.json``.

N ranks reach the parameters one process reaches with the same global batch: each micro-batch's
loss is its rows' sum over the whole step's row count (``stages/train/step.py``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kdcache.stages.models.adapters import CausalLM
from kdcache.stages.models.devices import init_distributed
from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.dataset import Batch, CacheBatches
from kdcache.stages.train.distributed import (
    all_gather_objects,
    all_reduce_,
    gathered,
    no_sync,
    parallelize,
    resolve_parallel,
    world_size,
)
from kdcache.stages.train.evaluate import evaluate, heldout_batches
from kdcache.stages.train.losses import build_loss
from kdcache.stages.train.rundir import (
    CONFIG,
    EVAL,
    EVAL_HEADER,
    METRICS,
    STEPS,
    STEPS_HEADER,
    load_checkpoint,
    resumable_state,
    save_checkpoint,
    save_student,
    truncate_log,
)
from kdcache.stages.train.step import DistillStep, batch_targets, step_norms
from kdcache.stages.train.student import check_student, load_student
from kdcache.storage.background import prefetch
from kdcache.storage.durable import write_json_durable
from kdcache.storage.errors import ConfigError
from kdcache.storage.reader import CacheReader

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint saves besides the model and optimizer."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # micro-batches of this epoch already trained on
    tokens: int = 0
    seconds: float = 0.0
    loss: float = float("nan")
    eval: dict | None = None


def run_train(cfg: TrainConfig) -> dict:
    """``kdcache train``: returns the final metrics (also written to RUN/metrics.json)."""
    cfg.validate()
    cache, loss_fn = open_cache(cfg)
    rank, world, device = init_distributed(cfg.device)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be a multiple of ranks x --grad-accum = {world * cfg.grad_accum}"
        )
    student, block_size = setup_student(cfg, cache, device)
    mode = resolve_parallel(cfg.parallel, world, student.module, device)
    scale = world if mode != "none" else 1  # DDP and FSDP average gradients over the ranks
    step_module = DistillStep(student, loss_fn, chunk_rows=cfg.chunk_rows, grad_scale=scale)
    model = parallelize(
        step_module, student, mode, device, checkpointing=cfg.activation_checkpointing
    )
    model.train()
    train_ds, eval_ds = setup_data(cfg, cache, rank, world)
    opt, sched = build_optimizer(model, cfg)
    out = Path(cfg.out)
    run = resume(out, cfg, model, opt, sched, rank, device)
    resumed_at = run.step
    start_logs(out, cfg, run.step, rank)
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and mode != "fsdp"
    )
    if rank == 0:
        log.info("training %s under --parallel %s on %d rank(s)", cfg.student, mode, world)

    bar = tqdm(
        total=cfg.steps,
        initial=run.step,
        unit="step",
        desc=f"train {Path(cfg.student).name}",
        disable=not cfg.progress or rank != 0,
    )
    it = _epoch_iter(train_ds, run.epoch, run.consumed)
    while run.step < cfg.steps:
        t0 = time.perf_counter()
        micro, tokens = [], 0
        for _ in range(cfg.grad_accum):
            batch, run.epoch, run.consumed, it = _next(train_ds, it, run.epoch, run.consumed)
            tokens += batch.num_tokens  # counted on the host, before the copy to the device
            batch = batch.to(device)
            micro.append((batch, batch_targets(batch, student.vocab_size)))
        norms = step_norms(loss_fn, micro, all_reduce_ if world > 1 else None)
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for i, (batch, targets) in enumerate(micro):
            with no_sync(model, last=i == len(micro) - 1), autocast:
                loss = model(batch, targets, norms)
            loss.backward()
            loss_sum += loss.detach().float() / scale
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        totals = all_reduce_(
            torch.stack(
                [loss_sum.double(), torch.tensor(float(tokens), dtype=torch.float64, device=device)]
            )
        )
        run.step += 1
        run.loss, run.tokens = float(totals[0]), run.tokens + int(totals[1])
        run.seconds += time.perf_counter() - t0
        if rank == 0:
            log_step(out, run, sched.get_last_lr()[0], bar)
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            run.eval = evaluate_now(model, student, eval_ds, device, cfg)
            if rank == 0 and run.eval:
                log_eval(out, run)
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
            checkpoint(out, cfg, model, opt, sched, run, student, block_size, rank)
    bar.close()
    return finish(out, run, resumed_at, model, student, rank)


def batch_loss(student: CausalLM, loss_fn, batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """The loss of one batch on one process, as ``kdcache train`` computes it (a step of one
    micro-batch): the batch's mean over its counted rows."""
    step = DistillStep(student, loss_fn, chunk_rows=cfg.chunk_rows)
    micro = [(batch, batch_targets(batch, student.vocab_size))]
    return step(batch, micro[0][1], step_norms(loss_fn, micro))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW (weight decay on matrices only) and its warmup + cosine schedule."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=False,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def warmup_cosine(step: int, warmup: int, steps: int, min_ratio: float) -> float:
    """The learning-rate factor at ``step``: linear warmup to 1, then cosine down to min_ratio
    (``kdcache train`` and ``kdcache teacher-train``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _lr_lambda(cfg: TrainConfig):
    min_ratio = (cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10) / cfg.lr
    return lambda step: warmup_cosine(step, cfg.warmup, cfg.steps, min_ratio)


def open_cache(cfg: TrainConfig) -> tuple[CacheReader, torch.nn.Module]:
    """The cache and the loss, checked against each other before anything heavy loads."""
    cache = CacheReader(cfg.cache)  # clear errors for a damaged / unfinalized / missing-part cache
    if cache.num_sequences == 0:
        raise ConfigError(f"--cache {cfg.cache} holds no sequences; capture some data first")
    if cfg.k is not None and cfg.k > cache.k:
        raise ConfigError(
            f"--k {cfg.k} exceeds the cache's k={cache.k}; use --k <= {cache.k} or recapture"
        )
    if cfg.eval_cache:
        _check_same_tokens(cache, CacheReader(cfg.eval_cache), cfg)
    if cache.schema.targets == "sampled":
        _check_sampled(cfg)
    loss_fn = build_loss(
        cfg.loss, temperature=cfg.temperature, k=cfg.k, alpha=cfg.alpha, beta=cfg.beta
    )
    if loss_fn.needs_tail:  # Mixed carries its KD loss's
        _check_tail(cache, cfg)
    # No loss needs rows the cache lacks: with targets_on "mask" the top-k rows are exactly the
    # loss_mask rows, and both the KD losses and hard-label CE count only those rows.
    return cache, loss_fn


def _check_sampled(cfg: TrainConfig) -> None:
    if cfg.loss not in ("soft_ce", "ce"):
        raise ConfigError(
            f"--loss {cfg.loss} does not fit this cache's sampled targets (draws, not the "
            "teacher's top-k); use --loss soft_ce (or ce)"
        )
    if cfg.temperature != 1.0 or cfg.k is not None:
        raise ConfigError(
            f"expected no --temperature or --k on a sampled cache, found temperature="
            f"{cfg.temperature}, k={cfg.k}; drop them (the draws are stored at temperature 1)"
        )


def _check_tail(cache: CacheReader, cfg: TrainConfig) -> None:
    """Every capture stores log_tail (-inf when k = vocabulary); a cache written without a real
    one (NaN) would turn the loss into NaN at the first step. Checked on a sample."""
    if cache.k >= cache.vocab_size:
        log.info("k equals the vocabulary: the tail bucket is empty")
    tail = cache.block(0, min(cache.num_sequences, 64)).log_tail
    if np.isnan(tail).any():
        raise ConfigError(
            f"--loss {cfg.loss} needs the teacher's tail mass, but the cache's log_tail holds "
            f"NaN ({int(np.isnan(tail).sum())} of the first {tail.size} rows); "
            "use --loss forward_kl (top-k only) or recapture"
        )


def setup_student(cfg: TrainConfig, cache: CacheReader, device) -> tuple[CausalLM, int]:
    """The student (seeded), checked against the cache; and the context it was built for."""
    torch.manual_seed(cfg.seed)
    lengths_max = _longest(cache)
    block_size = cfg.block_size or lengths_max
    student = load_student(cfg, cache.vocab_size, block_size, device)
    check_student(student, cache, cfg)
    student.has_head  # noqa: B018 -- probed now, before an engine wraps the model
    if student.max_positions is not None and lengths_max > student.max_positions:
        raise ConfigError(
            f"the cache holds sequences of {lengths_max} tokens but the student's context is {student.max_positions}; "
            "use a student with a longer context (--block-size for built-in students)"
        )
    return student, block_size


def setup_data(
    cfg: TrainConfig, cache: CacheReader, rank: int, world: int
) -> tuple[CacheBatches, CacheBatches]:
    """This rank's slices of the training batches and of the held-out ones."""
    micro = cfg.batch_size // cfg.grad_accum  # sequences per micro-batch over all ranks
    train_ds = CacheBatches(
        cfg.cache,
        batch_size=micro,
        seed=cfg.seed,
        split="train",
        eval_fraction=0.0 if cfg.eval_cache else cfg.eval_fraction,
        rank=rank,
        world_size=world,
    )
    eval_ds = heldout_batches(cfg, rank, world)
    if len(train_ds) == 0:
        raise ConfigError(
            f"--cache {cfg.cache} has no training batches of {micro} sequences; lower --batch-size"
        )
    if len(eval_ds) == 0 and rank == 0 and (cfg.eval_cache or cfg.eval_fraction > 0):
        log.warning(
            "nothing is held out for evaluation: %s; the run reports no held-out metrics",
            f"--eval-cache {cfg.eval_cache} gives no batch"
            if cfg.eval_cache
            else f"the cache's {cache.num_sequences:,} sequences make {len(train_ds)} batch(es) of "
            f"{micro}, too few to hold out {cfg.eval_fraction:g} of them: lower --batch-size, "
            "or pass --eval-cache",
        )
    return train_ds, eval_ds


def resume(out: Path, cfg: TrainConfig, model, opt, sched, rank: int, device) -> Progress:
    """The newest committed checkpoint's state loaded into model, optimizer and scheduler
    (resharded to this run's ranks), and where the run stands; a fresh Progress if none."""
    found = resumable_state(out, cfg, rank)
    if found is None:
        return Progress()
    folder, meta = found
    load_checkpoint(folder, model, opt)
    sched.load_state_dict(meta["scheduler"])
    set_rng_state(meta["rng"], rank, device)
    if rank == 0:
        log.info("resuming %s at step %d", out, meta["progress"]["step"])
    return Progress(**meta["progress"])


def start_logs(out: Path, cfg: TrainConfig, step: int, rank: int) -> None:
    """config.json; steps.tsv and eval.tsv fresh, or cut back to the resumed step (the steps
    logged after the checkpoint are run again)."""
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_durable(out / CONFIG, {"config": asdict(cfg), "identity": cfg.identity()})
    if step == 0:
        (out / STEPS).write_text(STEPS_HEADER)
        (out / EVAL).write_text(EVAL_HEADER)
    else:
        truncate_log(out / STEPS, step)
        truncate_log(out / EVAL, step)


def log_step(out: Path, run: Progress, lr: float, bar) -> None:
    with open(out / STEPS, "a") as f:
        f.write(f"{run.step}\t{run.loss:.6f}\t{lr:.3e}\t{run.tokens}\t{run.seconds:.2f}\n")
    bar.set_postfix(loss=f"{run.loss:.4f}", tok_s=f"{run.tokens / max(run.seconds, 1e-9):,.0f}")
    bar.update(1)


def evaluate_now(model, student: CausalLM, eval_ds: CacheBatches, device, cfg) -> dict | None:
    if not len(eval_ds):
        return None
    with gathered(model):
        return evaluate(student, iter(eval_ds), device, cfg.eval_batches)


def log_eval(out: Path, run: Progress) -> None:
    e = run.eval
    with open(out / EVAL, "a") as f:
        f.write(f"{run.step}\t{e['ce']:.6f}\t{e['kl_topk']:.6f}\t{e['top1_agreement']:.6f}\n")


def checkpoint(out, cfg, model, opt, sched, run: Progress, student, block_size, rank) -> None:
    """A sharded checkpoint of this step: every rank's shards, then the COMMITTED marker."""
    meta = {
        "identity": cfg.identity(),  # what a rerun must match to resume this state
        "config": asdict(cfg),
        "student": {"vocab_size": student.vocab_size, "block_size": block_size},
        "progress": asdict(run),
        "scheduler": sched.state_dict(),
        "rng": all_gather_objects(rng_state(block_device(student))),  # every rank's
    }
    save_checkpoint(out, run.step, model, opt, meta, rank)


def block_device(student: CausalLM) -> torch.device:
    return next(student.module.parameters()).device


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    state["python"] = random.getstate()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(states: list[dict], rank: int, device) -> None:
    """This rank's random state as saved: bit-exact on the same number of ranks; on another
    number, each rank continues rank 0's (dropout masks then differ from an unbroken run)."""
    state = states[rank] if len(states) == world_size() else states[0]
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def finish(out: Path, run: Progress, resumed_at: int, model, student, rank: int) -> dict:
    """The trained student (RUN/student/) and the final metrics (RUN/metrics.json)."""
    metrics = {  # numbers only (DVC metrics); what was trained is in config.json
        "params": sum(p.numel() for p in student.module.parameters()),
        "steps": run.step,
        "resumed_at_step": resumed_at,
        "train_loss": run.loss,
        "tokens": run.tokens,
        "train_seconds": round(run.seconds, 3),
        "tokens_per_second": run.tokens / max(run.seconds, 1e-9),
        "eval": run.eval,
    }
    save_student(student, model, out, rank)
    if rank == 0:
        write_json_durable(out / METRICS, metrics)
    return metrics


def _check_same_tokens(cache: CacheReader, eval_cache: CacheReader, cfg: TrainConfig) -> None:
    """The evaluation cache must speak the training cache's tokenizer and vocabulary."""
    fp = [
        (c.manifest["fingerprints"].get("tokenizer") or {}).get("sha256")
        for c in (cache, eval_cache)
    ]
    if fp[0] != fp[1] or eval_cache.vocab_size > cache.vocab_size:
        raise ConfigError(
            f"--eval-cache {cfg.eval_cache} was made with another tokenizer or vocabulary "
            f"(tokenizer {str(fp[1])[:12]}, vocabulary {eval_cache.vocab_size:,}) than --cache "
            f"(tokenizer {str(fp[0])[:12]}, vocabulary {cache.vocab_size:,}); capture it with the same teacher"
        )


def _longest(cache: CacheReader) -> int:
    """The longest sequence: the capture's --seq-len, or (caches without it) a scan."""
    if cache.manifest["settings"].get("seq_len"):
        return int(cache.manifest["settings"]["seq_len"])
    return max(
        (int(np.diff(b.seq_offsets).max()) for b in cache.iter_blocks(1024) if b.num_sequences),
        default=1,
    )


def _epoch_iter(ds: CacheBatches, epoch: int, consumed: int):
    ds.set_position(epoch, consumed)
    return prefetch(iter(ds))


def _next(ds: CacheBatches, it, epoch: int, consumed: int):
    """The next batch and the position *after* consuming it (exact resume)."""
    try:
        batch = next(it)
    except StopIteration:
        epoch, consumed = epoch + 1, 0
        it = _epoch_iter(ds, epoch, 0)
        batch = next(it)
    return batch, epoch, consumed + 1, it
