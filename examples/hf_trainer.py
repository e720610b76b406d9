"""Distill a Hugging Face student from a kdcache cache with the transformers ``Trainer``.

STUDENT is a Hugging Face folder: a config.json alone (a random student of that shape) or a
saved model (its weights). OUT receives the trained student as a save_pretrained folder, which
AutoModelForCausalLM.from_pretrained(OUT) loads. Under torchrun / accelerate launch every
process runs this same script (DDP; FSDP through the TrainingArguments' fsdp options).

    python examples/hf_trainer.py CACHE STUDENT OUT [--steps 50] [--loss forward_kl_tail]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from kdcache import KDCacheError, build_loss
from kdcache.stages.train.hf_trainer import CacheDataset, DistillTrainer


def load_student(folder: Path):
    """The student: its saved weights if the folder has some, else a random init of its config."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("cache", help="a kdcache cache folder")
    ap.add_argument("student", type=Path, help="a Hugging Face config or model folder")
    ap.add_argument("out", help="where the trained student (and the Trainer's files) go")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--loss", default="forward_kl", help="a kdcache loss name")
    ap.add_argument("--alpha", type=float, default=None, help="mix in hard-label CE")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per device")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    args = ap.parse_args()

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=args.cpu,
        disable_tqdm=True,
    )
    try:
        trainer = DistillTrainer(
            model=load_student(args.student),
            args=training_args,
            train_dataset=CacheDataset(args.cache),
            loss_fn=build_loss(args.loss, alpha=args.alpha),
        )
    except KDCacheError as e:  # a one-line message: what was expected, found, and the fix
        ap.exit(2, f"hf_trainer.py: error: {e}\n")
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}")
    trainer.save_model(args.out)
    print(f"saved the student to {args.out}")


if __name__ == "__main__":
    main()
