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
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kdcache.stages.adapters import CausalLM, load_model
from kdcache.stages.capture import pick_device
from kdcache.stages.dataset import Batch, CacheBatches, Prefetch
from kdcache.stages.losses import (
    IGNORE_INDEX,
    LOSSES,
    build_loss,
    chunked_loss,
    loss_chunk_rows,
)
from kdcache.storage.errors import CacheMismatchError, ConfigError
from kdcache.storage.manifest import identity_diff, read_json, write_json_durable
from kdcache.storage.paths import is_within, output_problem
from kdcache.storage.reader import CacheReader

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
ECE_BINS = 15


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``kdcache train`` takes; saved as RUN/config.json."""

    cache: str
    student: (
        str  # built-in size name (nano, micro, ...), HF folder, built-in checkpoint, module:factory
    )
    out: str
    loss: str = "forward_kl"
    alpha: float | None = None  # alpha * KD + (1 - alpha) * CE
    temperature: float = 1.0
    k: int | None = None  # use the first k' <= k cached entries
    beta: float = 0.5  # JSD
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    eval_cache: str | None = None  # a second cache to evaluate on; default: a held-out slice
    eval_fraction: float = 0.05
    eval_every: int = 200
    eval_batches: int = 50
    checkpoint_every: int = 200
    chunk_rows: int | None = None  # rows of logits alive at once in the loss; None: by vocabulary
    device: str = "auto"
    tokenizer: str | None = None  # the student's tokenizer, if it ships none
    tokenizer_check: bool = True
    block_size: int | None = None  # context of a built-in student (default: longest sequence)
    replace: bool = False  # a run folder made with other settings: start it over
    progress: bool = True

    def problems(self) -> list[str]:
        p = []
        if self.loss not in LOSSES:
            p.append(f"--loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if not self.temperature > 0:
            p.append(f"--temperature must be > 0, got {self.temperature}")
        if self.k is not None and self.k < 1:
            p.append(f"--k must be >= 1, got {self.k}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            p.append(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.steps < 1:
            p.append(f"--steps must be >= 1, got {self.steps}")
        for name in (
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "chunk_rows",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            p.append(
                f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"
            )
        if not 0 <= self.eval_fraction < 1:
            p.append(f"--eval-fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.lr <= 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            p.append(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not Path(self.cache).exists():
            p.append(f"--cache {self.cache}: no such directory")
        if problem := output_problem(self.out, "--out"):
            p.append(problem)
        for option, cache in (("--cache", self.cache), ("--eval-cache", self.eval_cache)):
            if cache and is_within(self.out, cache):
                p.append(
                    f"--out {self.out} lies inside {option} {cache}; expected a run folder "
                    "outside the cache (checkpoints would be written into it): choose another --out"
                )
        return p

    def validate(self) -> None:
        if problems := self.problems():
            raise ConfigError("; ".join(problems))

    def identity(self) -> dict:
        """What must match for a rerun to resume a run directory (how often it evaluates or
        checkpoints, and where it runs, may change)."""
        free = (
            "progress",
            "device",
            "out",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "replace",
        )
        return {k: v for k, v in asdict(self).items() if k not in free}


# -- student ---------------------------------------------------------------------------------
def load_student(
    cfg: TrainConfig, vocab_size: int, block_size: int, device: torch.device
) -> CausalLM:
    """A built-in GPT by size name (random init, sized for the cache), a Hugging Face config
    folder (random init) or model folder, a built-in checkpoint, or module:factory."""
    from kdcache.stages.models.gpt import GPT, SIZES, GPTConfig

    torch.manual_seed(cfg.seed)
    if cfg.student in SIZES:
        model = GPT(GPTConfig.from_size(cfg.student, vocab_size, block_size)).to(device)
        return CausalLM(cfg.student, "builtin", model, vocab_size, block_size, tokenizer_path=None)
    path = Path(cfg.student)
    has_weights = path.is_dir() and any(
        p.suffix in (".safetensors", ".bin") for p in path.iterdir()
    )
    if path.is_dir() and (path / "config.json").is_file() and not has_weights:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as e:
            raise ConfigError(
                "a Hugging Face student needs the extra: pip install 'kdcache[hf]'"
            ) from e
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(path, local_files_only=True)
        )
        model.to(device)
        vocab = model.get_output_embeddings().weight.shape[0]
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        tok = path if (path / "tokenizer.json").is_file() else None
        return CausalLM(cfg.student, "hf", model, vocab, max_pos, tokenizer_path=tok)
    return load_model(cfg.student, device)


def check_student(student: CausalLM, cache: CacheReader, cfg: TrainConfig) -> None:
    """Same ids must mean the same strings; the student must cover every real token id."""
    from kdcache.stages.models.gpt import SIZES
    from kdcache.stages.tokenizer import load_tokenizer

    cached_tok = cache.manifest["fingerprints"].get("tokenizer") or {}
    needed = int(cached_tok.get("vocab_size") or cache.vocab_size)
    if student.vocab_size < needed:
        raise ConfigError(
            f"the student outputs {student.vocab_size:,} tokens but the cache's tokenizer has {needed:,}; "
            "use a student with an output size >= the tokenizer's vocabulary"
        )
    if student.kind == "builtin" and cfg.student in SIZES:
        return  # a fresh built-in student is sized for this cache: same ids by construction
    tok_path = cfg.tokenizer or student.tokenizer_path
    if tok_path is None or not cached_tok.get("sha256"):
        msg = (
            f"the student {cfg.student} has no tokenizer to compare with the cache's"
            if tok_path is None
            else f"the cache {cfg.cache} records no tokenizer fingerprint to compare with {tok_path}"
        )
        if cfg.tokenizer_check:
            raise ConfigError(
                f"{msg}; pass --tokenizer, or --tokenizer-check off if its ids match the cache's"
            )
        log.warning("%s; trusting --tokenizer-check off", msg)
        return
    fp = load_tokenizer(tok_path).fingerprint
    if fp != cached_tok["sha256"]:
        msg = (
            f"the student's tokenizer ({tok_path}, sha256 {fp[:12]}) differs from the cache's "
            f"(sha256 {cached_tok['sha256'][:12]}): the same ids would mean other strings"
        )
        if cfg.tokenizer_check:
            raise ConfigError(
                msg + "; use a student with the teacher's tokenizer, or --tokenizer-check off"
            )
        log.warning("%s (--tokenizer-check off)", msg)


# -- distributed -----------------------------------------------------------------------------
def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(device_name)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# -- the loop --------------------------------------------------------------------------------
def _targets(batch: Batch, rows: torch.Tensor, vocab: int) -> dict:
    """Flatten the selected rows; ids beyond the student's vocabulary fold into the tail."""
    ids = batch.topk_ids[rows]
    lp = batch.topk_logprobs[rows].float()
    tail = batch.log_tail[rows].float()
    outside = ids >= vocab
    if outside.any():
        tail = torch.logaddexp(tail, torch.where(outside, lp, float("-inf")).logsumexp(-1))
        lp = lp.masked_fill(outside, float("-inf"))
        ids = ids.masked_fill(outside, 0)
    return {
        "topk_ids": ids,
        "topk_logprobs": lp,
        "log_tail": tail,
        "mask": batch.target_mask[rows] & batch.has_topk[rows],
        "labels": torch.where(batch.target_mask[rows], batch.labels[rows], IGNORE_INDEX),
    }


def batch_loss(
    student: CausalLM, loss_fn, batch: Batch, cfg: TrainConfig, reduce_norms=None
) -> torch.Tensor:
    from kdcache.stages.losses import Targets

    rows = batch.valid  # (B, T) every real position; the loss masks the rest
    targets = _targets(batch, rows, student.vocab_size)
    if batch.input_ids.shape[0] == 0:
        # This rank's slice of a short block is empty. No forward (Hugging Face models refuse
        # an empty batch), but the same all-reduces of the row counts as the other ranks.
        for n in loss_fn.normalizers(Targets(**targets), 0, batch.log_tail):
            if n is not None and reduce_norms is not None:
                reduce_norms(n)
        return torch.zeros((), device=batch.input_ids.device, requires_grad=True)
    if student.has_head:
        h = student.hidden(
            batch.input_ids,
            batch.position_ids,
            batch.segment_ids,
            attention_mask=_hf_mask(student, batch),
        )
        head = student.head_module
        return chunked_loss(
            loss_fn,
            h[rows],
            head,
            chunk_size=cfg.chunk_rows or loss_chunk_rows(student.vocab_size),
            reduce_norms=reduce_norms,
            **targets,
        )
    logits = student.logits(batch.input_ids, batch.position_ids, batch.segment_ids)[rows]
    t = Targets(**targets)
    norms = loss_fn.normalizers(t, logits.shape[0], logits)
    if reduce_norms is not None:
        norms = tuple(None if n is None else reduce_norms(n) for n in norms)
    return loss_fn.partial(logits, t, norms)


def _hf_mask(student: CausalLM, batch: Batch):
    return batch.valid.long() if student.kind == "hf" and batch.segment_ids is None else None


@torch.no_grad()
def evaluate(student: CausalLM, batches, device, max_batches: int) -> dict:
    """Held-out CE on the true next tokens, KL to the teacher's top-k (renormalized), top-1
    agreement, and expected calibration error (ECE: the mean |accuracy - confidence| of the
    student's top-1 over 15 confidence bins, weighted by the bins' share of rows)."""
    student.module.eval()
    chunk = loss_chunk_rows(student.vocab_size)  # rows of (rows, V) logits alive at once
    ce_sum = kl_sum = agree = n_ce = n_kd = 0.0
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)  # rows, confidence, correct
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        if batch.input_ids.shape[0] == 0:  # an empty slice of a short block (see batch_loss)
            continue
        batch = batch.to(device)
        rows = batch.valid & batch.target_mask
        h_or_z = (
            student.hidden(
                batch.input_ids,
                batch.position_ids,
                batch.segment_ids,
                attention_mask=_hf_mask(student, batch),
            )
            if student.has_head
            else student.logits(batch.input_ids, batch.position_ids, batch.segment_ids)
        )[rows]
        labels = batch.labels[rows]
        t = _targets(batch, rows, student.vocab_size)
        kd_rows = t["mask"]
        for s in range(0, h_or_z.shape[0], chunk):
            z = h_or_z[s : s + chunk]
            z = (student.head(z) if student.has_head else z).float()
            logp = torch.log_softmax(z, -1)
            lab = labels[s : s + chunk]
            has = lab != IGNORE_INDEX
            logp_has = logp[has]
            ce_sum += float(-logp_has.gather(1, lab[has, None]).sum())
            n_ce += float(has.sum())
            conf, pred = logp_has.max(-1)
            conf = conf.exp().double()
            b = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
            bins[0].index_add_(0, b, torch.ones_like(conf))
            bins[1].index_add_(0, b, conf)
            bins[2].index_add_(0, b, (pred == lab[has]).double())
            m = kd_rows[s : s + chunk]
            ids, lp = t["topk_ids"][s : s + chunk][m], t["topk_logprobs"][s : s + chunk][m]
            p = torch.softmax(lp, -1)  # teacher top-k renormalized
            logp_m = logp[m]
            q = torch.log_softmax(logp_m.gather(1, ids), -1)
            kl_sum += float(torch.where(p > 0, p * (torch.log(p) - q), 0.0).sum())
            agree += float((logp_m.argmax(-1) == ids[:, 0]).sum())
            n_kd += float(m.sum())
    student.module.train()
    totals = _all_reduce_(
        torch.tensor([ce_sum, n_ce, kl_sum, agree, n_kd], dtype=torch.float64, device=device)
    )
    ce_sum, n_ce, kl_sum, agree, n_kd = totals.tolist()
    rows_b, conf_b, correct_b = _all_reduce_(bins)
    ece = float((conf_b - correct_b).abs().sum() / rows_b.sum().clamp_min(1))
    return {
        "ece": ece,
        "ce": ce_sum / max(n_ce, 1),
        "perplexity": math.exp(min(ce_sum / max(n_ce, 1), 50)),
        "kl_topk": kl_sum / max(n_kd, 1),
        "top1_agreement": agree / max(n_kd, 1),
        "tokens": int(n_ce),
    }


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


def _save_student(student: CausalLM, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if student.kind == "builtin":
        from kdcache.stages.models.gpt import save_checkpoint

        save_checkpoint(student.module, folder / "model.pt")
    elif student.kind == "hf":
        student.module.save_pretrained(folder)
    else:
        torch.save(student.module.state_dict(), folder / "state_dict.pt")


def heldout_batches(cfg: TrainConfig, rank: int = 0, world: int = 1) -> CacheBatches:
    """The held-out batches a run evaluates on, in order: the whole --eval-cache, else the
    held-out slice of --cache (``kdcache report`` scores the teacher on the same batches)."""
    micro = cfg.batch_size // cfg.grad_accum  # sequences per micro-batch over all ranks
    common = dict(batch_size=micro, seed=cfg.seed, shuffle=False, rank=rank, world_size=world)
    if cfg.eval_cache:
        return CacheBatches(cfg.eval_cache, split="train", **common)
    return CacheBatches(cfg.cache, split="eval", eval_fraction=cfg.eval_fraction, **common)


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
    ckpt_path = out / CHECKPOINT
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
        write_json_durable(out / "config.json", {"config": asdict(cfg), "identity": cfg.identity()})
        if step == 0:
            (out / "steps.tsv").write_text("step\tloss\tlr\ttokens\tseconds\n")
            (out / "eval.tsv").write_text("step\teval_ce\teval_kl_topk\teval_top1_agreement\n")
        else:  # the steps logged after the checkpoint are run again: drop their lines
            _truncate_log(out / "steps.tsv", step)
            _truncate_log(out / "eval.tsv", step)
    params = sum(p.numel() for p in model.parameters())
    resumed_at = step
    reduce = _all_reduce_ if world > 1 else None
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
            loss_sum = float(_all_reduce_(torch.tensor(loss_sum, device=device)))
            step_tokens = int(_all_reduce_(torch.tensor(step_tokens, device=device)))
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        step += 1
        tokens_seen += step_tokens
        train_seconds += time.perf_counter() - t0
        if rank == 0:
            with open(out / "steps.tsv", "a") as f:
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
                with open(out / "eval.tsv", "a") as f:
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
            tmp = ckpt_path.with_name(CHECKPOINT + ".partial")
            torch.save(state, tmp)
            os.replace(tmp, ckpt_path)
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
        _save_student(student, out / "student")
        write_json_durable(out / "metrics.json", metrics)
    return metrics


RUN_FILES = ("config.json", "steps.tsv", "eval.tsv", "metrics.json", CHECKPOINT, "student")


def resumable_state(out: Path, cfg: TrainConfig, device: torch.device, rank: int) -> dict | None:
    """The checkpoint a rerun continues from, or None to start fresh.

    The checkpoint records the settings it was trained with (``TrainConfig.identity``): a run
    folder made with other settings is refused (naming them), or with --replace emptied and
    started over. The checkpoint itself is the authority, not config.json, which DVC deletes
    before a rerun while it keeps the (``persist``) checkpoint."""
    ckpt = out / CHECKPOINT
    state = torch.load(ckpt, map_location=device, weights_only=False) if ckpt.exists() else None
    if state is not None:
        found = state.get("identity")
    else:
        found = (read_json(out / "config.json") or {}).get("identity")
    if found is None or found == cfg.identity():
        return state
    if not cfg.replace:
        diffs = identity_diff(cfg.identity(), found)
        raise CacheMismatchError(
            f"{out} holds a run made with other settings ({'; '.join(diffs[:4])}); pass "
            "--replace to start it over, or choose another --out"
        )
    if rank == 0:
        log.warning("replacing %s: it was trained with other settings", out)
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return None


def loss_label(config: dict) -> str:
    """How a run's loss reads in reports: ``soft_ce``, or ``0.7*soft_ce+0.3*ce`` with --alpha."""
    alpha = config.get("alpha")
    return config["loss"] if alpha is None else f"{alpha}*{config['loss']}+{1 - alpha:g}*ce"


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


def _truncate_log(path: Path, step: int) -> None:
    """Keep the header and the whole lines of steps <= step (a killed run may leave later ones,
    or half a line)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    keep = [x for x in lines[1:] if x.endswith("\n") and int(x.split("\t", 1)[0]) <= step]
    path.write_text("".join(lines[:1] + keep))


def _epoch_iter(ds: CacheBatches, epoch: int, consumed: int):
    ds.set_position(epoch, consumed)
    return Prefetch(iter(ds))


def _next(ds: CacheBatches, it, epoch: int, consumed: int):
    """The next batch and the position *after* consuming it (exact resume)."""
    try:
        batch = next(it)
    except StopIteration:
        epoch, consumed = epoch + 1, 0
        it = _epoch_iter(ds, epoch, 0)
        batch = next(it)
    return batch, epoch, consumed + 1, it
