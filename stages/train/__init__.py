"""Stage two: train a student from the cache alone. The teacher is never loaded.

    config.py       TrainConfig: every setting of ``kdcache train``, validated before anything loads
    dataset.py      shuffled, resumable, rank-sliced batches of the cache as torch tensors
    losses.py       the distillation losses and the chunked driver that bounds their memory
    student.py      the student, loaded and checked against the cache
    step.py         DistillStep: the student and its loss as the one module torch's engines wrap
    distributed.py  torchrun: the process group, --parallel (DDP, FSDP2), sums over ranks
    evaluate.py     held-out CE, KL to the teacher's top-k, agreement, calibration
    rundir.py       the run directory: its files, resume, checkpoints
    loop.py         ``run_train``: the training loop
    hf_trainer.py   the Hugging Face Trainer on the cache (the ``hf`` extra; imported by nothing here)

Imports kdcache.stages.models and kdcache.storage only, never stage one.
"""

from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.evaluate import evaluate, heldout_batches
from kdcache.stages.train.loop import batch_loss, build_optimizer, run_train, warmup_cosine
from kdcache.stages.train.rundir import loss_label
from kdcache.stages.train.student import check_student, load_student

__all__ = [
    "TrainConfig",
    "batch_loss",
    "build_optimizer",
    "check_student",
    "evaluate",
    "heldout_batches",
    "load_student",
    "loss_label",
    "run_train",
    "warmup_cosine",
]
