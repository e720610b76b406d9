"""The run directory of ``kdcache train`` (--out): its files, resuming from it, saving into it.

RUN/config.json     the resolved TrainConfig and its identity (what a resume must match)
RUN/steps.tsv       step, loss, lr, tokens, seconds (a DVC plot)
RUN/eval.tsv        step, held-out CE, KL to the teacher's top-k, top-1 agreement
RUN/metrics.json    the final numbers (DVC metrics)
RUN/checkpoint.pt   model, optimizer, scheduler, data position, RNG: the resume point
RUN/student/        the trained student, loadable as a --teacher or --student again
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from kdcache.stages.models.adapters import CausalLM
from kdcache.stages.train.config import TrainConfig
from kdcache.storage.durable import read_json, write_durable
from kdcache.storage.errors import CacheMismatchError
from kdcache.storage.manifest import identity_diff

log = logging.getLogger(__name__)

CONFIG = "config.json"
STEPS = "steps.tsv"
EVAL = "eval.tsv"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
STUDENT = "student"
RUN_FILES = (CONFIG, STEPS, EVAL, METRICS, CHECKPOINT, STUDENT)
STEPS_HEADER = "step\tloss\tlr\ttokens\tseconds\n"
EVAL_HEADER = "step\teval_ce\teval_kl_topk\teval_top1_agreement\n"


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
        found = (read_json(out / CONFIG) or {}).get("identity")
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


def save_checkpoint(out: Path, state: dict) -> None:
    """The resume point, durably (a kill never leaves a torn checkpoint under the name)."""
    write_durable(out / CHECKPOINT, lambda f: torch.save(state, f))


def save_student(student: CausalLM, out: Path) -> None:
    student.save(out / STUDENT)


def truncate_log(path: Path, step: int) -> None:
    """Keep the header and the whole lines of steps <= step (a killed run may leave later ones,
    or half a line)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    keep = [x for x in lines[1:] if x.endswith("\n") and int(x.split("\t", 1)[0]) <= step]
    path.write_text("".join(lines[:1] + keep))
