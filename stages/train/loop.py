"""Stage two: train a student from the cache alone. The teacher is never loaded.

Reads top to bottom: config (validated before anything loads) -> cache and student, checked
against each other (tokenizer identity, vocabulary) -> data (shuffled batch blocks, exact
resume) -> AdamW with warmup + cosine, clipping, accumulation, bf16 autocast on CUDA -> the
loss from final hidden states and the head in chunks (students kdcache can reach) -> held-out
evaluation -> checkpoints, ``steps.tsv`` / ``eval.tsv`` (DVC plots) and ``metrics.json``.

Data parallel under torchrun: every rank takes its slice of each global batch; the loss is
divided by the *global* row counts and gradients are summed, so N processes reach the
parameters one process reaches with the same global batch.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kdcache.stages.models.adapters import CausalLM
from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.dataset import Batch, CacheBatches
from kdcache.stages.train.distributed import all_reduce_, init_distributed
from kdcache.stages.train.evaluate import evaluate, heldout_batches
from kdcache.stages.train.losses import Targets, build_loss, chunked_loss, loss_chunk_rows
from kdcache.stages.train.rundir import (
    CONFIG,
    EVAL,
    EVAL_HEADER,
    METRICS,
    STEPS,
    STEPS_HEADER,
    resumable_state,
    save_checkpoint,
    save_student,
    truncate_log,
)
from kdcache.stages.train.student import check_student, load_student
from kdcache.storage.background import prefetch
from kdcache.storage.durable import write_json_durable
from kdcache.storage.errors import ConfigError
from kdcache.storage.reader import CacheReader

log = logging.getLogger(__name__)


def batch_loss(
    student: CausalLM, loss_fn, batch: Batch, cfg: TrainConfig, reduce_norms=None
) -> torch.Tensor:
    rows = batch.valid  # (B, T) every real position; the loss masks the rest
    targets = batch.targets(rows, student.vocab_size)
    if batch.input_ids.shape[0] == 0:
        # This rank's slice of a short block is empty. No forward (Hugging Face models refuse
        # an empty batch), but the same all-reduces of the row counts as the other ranks.
        for n in loss_fn.normalizers(Targets(**targets), 0, batch.log_tail):
            if n is not None and reduce_norms is not None:
                reduce_norms(n)
        return torch.zeros((), device=batch.input_ids.device, requires_grad=True)
    if student.has_head:
        h = student.hidden(**batch.lm_inputs())  # (B, T, C)
        head = student.head_module
        return chunked_loss(
            loss_fn,
            h[rows],
            head,
            chunk_size=cfg.chunk_rows or loss_chunk_rows(student.vocab_size),
            reduce_norms=reduce_norms,
            **targets,
        )
    logits = student.logits(**batch.lm_inputs())[rows]  # (N, V)
    t = Targets(**targets)
    norms = loss_fn.normalizers(t, logits.shape[0], logits)
    if reduce_norms is not None:
        norms = tuple(None if n is None else reduce_norms(n) for n in norms)
    return loss_fn.partial(logits, t, norms)


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


def run_train(cfg: TrainConfig) -> dict:
    """``kdcache train``: returns the final metrics (also written to RUN/metrics.json)."""
    cfg.validate()
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
    loss_fn = build_loss(
        cfg.loss, temperature=cfg.temperature, k=cfg.k, alpha=cfg.alpha, beta=cfg.beta
    )
    needs_tail = loss_fn.needs_tail  # Mixed carries its KD loss's
    if needs_tail and cache.k >= cache.vocab_size:
        log.info("k equals the vocabulary: the tail bucket is empty")
    if needs_tail:
        # Every capture stores log_tail (-inf when k = vocabulary); a cache written without a
        # real one (NaN) would turn the loss into NaN at the first step. Checked on a sample.
        tail = cache.block(0, min(cache.num_sequences, 64)).log_tail
        if np.isnan(tail).any():
            raise ConfigError(
                f"--loss {cfg.loss} needs the teacher's tail mass, but the cache's log_tail holds "
                f"NaN ({int(np.isnan(tail).sum())} of the first {tail.size} rows); "
                "use --loss forward_kl (top-k only) or recapture"
            )
    # No loss needs rows the cache lacks: with targets_on "mask" the top-k rows are exactly the
    # loss_mask rows, and both the KD losses and hard-label CE count only those rows.
    out = Path(cfg.out)
    rank, world, device = init_distributed(cfg.device)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be a multiple of ranks x --grad-accum = {world * cfg.grad_accum}"
        )
    torch.manual_seed(cfg.seed)
    lengths_max = _longest(cache)
    student = load_student(cfg, cache.vocab_size, cfg.block_size or lengths_max, device)
    check_student(student, cache, cfg)
    if student.max_positions is not None and lengths_max > student.max_positions:
        raise ConfigError(
            f"the cache holds sequences of {lengths_max} tokens but the student's context is {student.max_positions}; "
            "use a student with a longer context (--block-size for built-in students)"
        )
    model = student.module
    model.train()

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

    opt, sched = build_optimizer(model, cfg)

    step, epoch, consumed, tokens_seen, train_seconds = 0, 0, 0, 0, 0.0
    loss_sum, last_eval = float("nan"), None
    state = resumable_state(out, cfg, device, rank)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        tokens_seen, train_seconds = state["tokens"], state["seconds"]
        loss_sum, last_eval = state.get("loss", float("nan")), state.get("eval")
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if rank == 0:
            log.info("resuming %s at step %d", out, step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_durable(out / CONFIG, {"config": asdict(cfg), "identity": cfg.identity()})
        if step == 0:
            (out / STEPS).write_text(STEPS_HEADER)
            (out / EVAL).write_text(EVAL_HEADER)
        else:  # the steps logged after the checkpoint are run again: drop their lines
            truncate_log(out / STEPS, step)
            truncate_log(out / EVAL, step)
    params = sum(p.numel() for p in model.parameters())
    resumed_at = step
    reduce = all_reduce_ if world > 1 else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        unit="step",
        desc=f"train {Path(cfg.student).name}",
        disable=not cfg.progress or rank != 0,
    )
    it = _epoch_iter(train_ds, epoch, consumed)
    while step < cfg.steps:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum, step_tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            batch, epoch, consumed, it = _next(train_ds, it, epoch, consumed)
            batch = batch.to(device)
            with autocast:
                loss = batch_loss(student, loss_fn, batch, cfg, reduce) / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            step_tokens += batch.num_tokens
        if world > 1:
            for p in model.parameters():
                if p.requires_grad:
                    if p.grad is None:  # unused on this rank: still add its zeros to the sum
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
            loss_sum = float(all_reduce_(torch.tensor(loss_sum, device=device)))
            step_tokens = int(all_reduce_(torch.tensor(step_tokens, device=device)))
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        step += 1
        tokens_seen += step_tokens
        train_seconds += time.perf_counter() - t0
        if rank == 0:
            with open(out / STEPS, "a") as f:
                f.write(
                    f"{step}\t{loss_sum:.6f}\t{sched.get_last_lr()[0]:.3e}\t{tokens_seen}\t{train_seconds:.2f}\n"
                )
            bar.set_postfix(
                loss=f"{loss_sum:.4f}", tok_s=f"{tokens_seen / max(train_seconds, 1e-9):,.0f}"
            )
            bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = (
                evaluate(student, iter(eval_ds), device, cfg.eval_batches) if len(eval_ds) else None
            )
            if rank == 0 and last_eval:
                with open(out / EVAL, "a") as f:
                    f.write(
                        f"{step}\t{last_eval['ce']:.6f}\t{last_eval['kl_topk']:.6f}\t{last_eval['top1_agreement']:.6f}\n"
                    )
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            state = {
                "identity": cfg.identity(),  # what a rerun must match to resume this state
                "step": step,
                "epoch": epoch,
                "consumed": consumed,
                "tokens": tokens_seen,
                "seconds": train_seconds,
                "loss": loss_sum,
                "eval": last_eval,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            }
            save_checkpoint(out, state)
    bar.close()
    metrics = {  # numbers only (DVC metrics); what was trained is in config.json
        "params": params,
        "steps": step,
        "resumed_at_step": resumed_at,
        "train_loss": loss_sum,
        "tokens": tokens_seen,
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
        "eval": last_eval,
    }
    if rank == 0:
        save_student(student, out)
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
