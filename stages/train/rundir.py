"""The run directory of ``kdcache train`` (--out): its files, resuming from it, saving into it.

RUN/config.json     the resolved TrainConfig and its identity (what a resume must match)
RUN/steps.tsv       step, loss, lr, tokens, seconds (a DVC plot)
RUN/eval.tsv        step, held-out CE, KL to the teacher's top-k, top-1 agreement
RUN/metrics.json    the final numbers (DVC metrics)
RUN/checkpoints/    the resume points: step-00000400/ holds the model and optimizer as a
                    torch.distributed.checkpoint (each rank writes its shards), trainer.pt (data
                    position, scheduler, RNG, what the run was made with) and COMMITTED, written
                    by rank 0 after every rank has finished: a folder without it is ignored
RUN/student/        the trained student, loadable as a --teacher or --student again

A checkpoint saved by N ranks loads on any number of ranks, under any --parallel: the model and
optimizer state are keyed by parameter name and resharded on load.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from kdcache.stages.models.adapters import CausalLM
from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.distributed import barrier
from kdcache.storage.durable import fsync_path, read_json, write_durable
from kdcache.storage.errors import CacheMismatchError, ConfigError
from kdcache.storage.manifest import identity_diff

log = logging.getLogger(__name__)

CONFIG = "config.json"
STEPS = "steps.tsv"
EVAL = "eval.tsv"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
STUDENT = "student"
RUN_FILES = (CONFIG, STEPS, EVAL, METRICS, CHECKPOINTS, STUDENT)
STEPS_HEADER = "step\tloss\tlr\ttokens\tseconds\n"
EVAL_HEADER = "step\teval_ce\teval_kl_topk\teval_top1_agreement\n"
TRAINER_STATE = "trainer.pt"
COMMITTED = "COMMITTED"
KEEP_CHECKPOINTS = 2  # the newest committed ones; older ones are deleted


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}"


def committed_checkpoints(out: Path) -> list[Path]:
    """The committed checkpoint folders of a run, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / COMMITTED).is_file())


def resumable_state(out: Path, cfg: TrainConfig, rank: int) -> tuple[Path, dict] | None:
    """The newest committed checkpoint and its trainer state, or None to start fresh.

    The checkpoint records the settings it was trained with (``TrainConfig.identity``): a run
    folder made with other settings is refused (naming them), or with --replace emptied and
    started over. The checkpoint itself is the authority, not config.json, which DVC deletes
    before a rerun while it keeps the (``persist``) checkpoints."""
    done = committed_checkpoints(out)
    meta = torch.load(done[-1] / TRAINER_STATE, weights_only=False) if done else None
    found = meta["identity"] if meta else (read_json(out / CONFIG) or {}).get("identity")
    if found is None or found == cfg.identity():
        return (done[-1], meta) if meta else None
    if not cfg.replace:
        diffs = identity_diff(cfg.identity(), found)
        raise CacheMismatchError(
            f"{out} holds a run made with other settings ({'; '.join(diffs[:4])}); pass "
            "--replace to start it over, or choose another --out"
        )
    barrier()  # every rank has read the old state before rank 0 deletes it
    if rank == 0:
        log.warning("replacing %s: it was trained with other settings", out)
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    barrier()
    return None


def save_checkpoint(
    out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, meta: dict, rank: int
) -> None:
    """Every rank writes its shards of the model and optimizer; rank 0 the trainer state and,
    after all ranks are done, the COMMITTED marker; then the older checkpoints go."""
    folder = checkpoint_dir(out, step)
    if rank == 0 and folder.exists():  # a torn attempt of a killed run: start it over
        shutil.rmtree(folder)
    barrier()
    dcp, sd = _dcp()
    model_sd, optim_sd = sd.get_state_dict(model, opt)
    with _one_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    if rank == 0:
        write_durable(folder / TRAINER_STATE, lambda f: torch.save(meta, f))
    barrier()  # every rank's shards are on disk
    if rank == 0:
        write_durable(folder / COMMITTED, f"{step}\n".encode())
        fsync_path(folder.parent)
        for old in committed_checkpoints(out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)


def load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Model and optimizer state from ``folder``, resharded to this run's ranks and engine."""
    dcp, sd = _dcp()
    model_sd, optim_sd = sd.get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=folder)
    sd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def save_student(student: CausalLM, model: nn.Module, out: Path, rank: int) -> None:
    """RUN/student/: the trained student, its full weights gathered from every rank (a
    sharded run) and written by rank 0."""
    if any(hasattr(p, "full_tensor") for p in model.parameters()):  # FSDP2 DTensors
        _, sd = _dcp()
        options = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = sd.get_model_state_dict(model, options=options)  # a collective: every rank calls
        if rank == 0:  # the only rank the gathered weights land on
            for first, later in _tied(model):  # one tensor again, as in the module's state dict
                full[later] = full[first]
            state = {k.removeprefix("student."): v for k, v in full.items()}
            student.save(out / STUDENT, state_dict=state)
    elif rank == 0:
        student.save(out / STUDENT)


def _tied(model: nn.Module) -> list[tuple[str, str]]:
    """(first name, later name) of every parameter shared under several names (a head tied to
    the embedding): a gathered state dict holds separate copies of them."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [(group[0], later) for group in names.values() for later in group[1:]]


def export_student(run: Path, dest: Path, step: int | None = None) -> Path:
    """A run's student from a committed checkpoint (the newest, or ``step``) as the folder its
    kind saves: a Hugging Face student with ``save_pretrained``, a built-in GPT as a kdcache
    folder. One process; the checkpoint may come from any number of ranks."""
    from kdcache.stages.train.student import load_student

    done = {int(p.name.removeprefix("step-")): p for p in committed_checkpoints(run)}
    if not done or (step is not None and step not in done):
        have = ", ".join(map(str, sorted(done))) or "none"
        raise ConfigError(
            f"expected a committed checkpoint{f' of step {step}' if step else ''} in "
            f"{run / CHECKPOINTS}, found {have}; pass a run folder of kdcache train (and --step)"
        )
    folder = done[step if step is not None else max(done)]
    meta = torch.load(folder / TRAINER_STATE, weights_only=False)
    cfg = TrainConfig(**{**meta["config"], "device": "cpu"})
    dims = meta["student"]
    student = load_student(cfg, dims["vocab_size"], dims["block_size"], torch.device("cpu"))
    state = {"model": {f"student.{k}": v for k, v in student.module.state_dict().items()}}
    dcp, _ = _dcp()
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=folder)
    student.module.load_state_dict(
        {k.removeprefix("student."): v for k, v in state["model"].items()}
    )
    student.save(dest)
    return folder


def _dcp():
    """torch.distributed.checkpoint and its state_dict helpers, imported on first use (a
    second of start-up that a run refused at its first check need not pay)."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict as sd

    return dcp, sd


@contextlib.contextmanager
def _one_process_quiet():
    """torch.distributed.checkpoint warns on every call without a process group; one process
    is a supported use here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def loss_label(config: dict) -> str:
    """How a run's loss reads in reports: ``soft_ce``, or ``0.7*soft_ce+0.3*ce`` with --alpha."""
    alpha = config.get("alpha")
    return config["loss"] if alpha is None else f"{alpha}*{config['loss']}+{1 - alpha:g}*ce"


def truncate_log(path: Path, step: int) -> None:
    """Keep the header and the whole lines of steps <= step (a killed run may leave later ones,
    or half a line)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    keep = [x for x in lines[1:] if x.endswith("\n") and int(x.split("\t", 1)[0]) <= step]
    path.write_text("".join(lines[:1] + keep))
