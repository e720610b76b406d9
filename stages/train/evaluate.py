"""Held-out evaluation of a student: cross-entropy, KL to the teacher's top-k, top-1 agreement,
calibration; and the held-out batches a run evaluates on (``kdcache report`` uses the same)."""

from __future__ import annotations

import math

import torch

from kdcache.stages.models.adapters import CausalLM
from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.dataset import CacheBatches
from kdcache.stages.train.distributed import all_reduce_
from kdcache.stages.train.losses import loss_chunk_rows
from kdcache.storage.schema import IGNORE_INDEX

ECE_BINS = 15


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
        if batch.input_ids.shape[0] == 0:  # an empty slice of a short block: no rows, but
            _join_collectives(student, device)  # the other ranks' sharded forward needs ours
            continue
        batch = batch.to(device)
        rows = batch.valid & batch.target_mask
        run = student.hidden if student.has_head else student.logits
        h_or_z = run(**batch.lm_inputs())[rows]  # (N, C) hidden states or (N, V) logits
        labels = batch.labels[rows]
        t = batch.targets(rows, student.vocab_size)
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
    totals = all_reduce_(
        torch.tensor([ce_sum, n_ce, kl_sum, agree, n_kd], dtype=torch.float64, device=device)
    )
    ce_sum, n_ce, kl_sum, agree, n_kd = totals.tolist()
    rows_b, conf_b, correct_b = all_reduce_(bins)
    ece = float((conf_b - correct_b).abs().sum() / rows_b.sum().clamp_min(1))
    return {
        "ece": ece,
        "ce": ce_sum / max(n_ce, 1),
        "perplexity": math.exp(min(ce_sum / max(n_ce, 1), 50)),
        "kl_topk": kl_sum / max(n_kd, 1),
        "top1_agreement": agree / max(n_kd, 1),
        "tokens": int(n_ce),
    }


def _join_collectives(student: CausalLM, device) -> None:
    """A forward on one dummy token: under FSDP every rank's blocks gather their weights
    together, so a rank with nothing to evaluate still runs one."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    student.hidden(ids) if student.has_head else student.logits(ids)


def heldout_batches(cfg: TrainConfig, rank: int = 0, world: int = 1) -> CacheBatches:
    """The held-out batches a run evaluates on, in order: the whole --eval-cache, else the
    held-out slice of --cache (``kdcache report`` scores the teacher on the same batches)."""
    micro = cfg.batch_size // cfg.grad_accum  # sequences per micro-batch over all ranks
    common = dict(batch_size=micro, seed=cfg.seed, shuffle=False, rank=rank, world_size=world)
    if cfg.eval_cache:
        return CacheBatches(cfg.eval_cache, split="train", **common)
    return CacheBatches(cfg.cache, split="eval", eval_fraction=cfg.eval_fraction, **common)
