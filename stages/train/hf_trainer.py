"""Distill from a kdcache cache with the Hugging Face ``Trainer`` (the ``hf`` extra).

    from kdcache.stages.train.hf_trainer import CacheDataset, DistillTrainer

    trainer = DistillTrainer(
        model=AutoModelForCausalLM.from_config(config),   # the student
        args=TrainingArguments("out", max_steps=100, gradient_accumulation_steps=4),
        train_dataset=CacheDataset("teacher-cache"),
        loss_fn="forward_kl",                             # or build_loss(...)
    )
    trainer.train()
    trainer.save_model("student")                         # a plain save_pretrained folder

The pieces, each usable alone:

- ``CacheDataset``: the cache's sequences as a map-style torch Dataset (the Trainer's sampler
  shuffles them); ``CacheCollator`` pads a list of them with kdcache's ``collate`` and returns
  the ``Batch``'s tensors as a dict (``batch_to_inputs``), which the Trainer moves to the device.
- ``DistillModel``: the module the Trainer trains and its DDP / FSDP wrap: a ``DistillStep``
  whose ``forward`` takes that dict and returns the chunked KD loss, computed from the student's
  final hidden states inside the root module's forward (so FSDP has the head weight gathered).
- ``DistillTrainer``: a ``Trainer`` whose ``compute_loss`` runs it, with exact normalization.

Normalization. The loss of an optimizer step is the mean over every counted row of the step:
all its accumulation micro-batches on all processes, as ``kdcache train`` computes it
(``step_norms``). The collator's ``labels`` are != -100 exactly on the rows a KD loss counts, so
the Trainer's own ``num_items_in_batch`` (``get_batch_samples``: labels counted over the step's
micro-batches, summed over processes when ``average_tokens_across_devices``) is that divisor.
Each micro-batch returns its rows' sum over it; ``loss_is_scaled_for_ga = True`` stops
``training_step`` from dividing by the accumulation steps, and the loss is multiplied by the
number of processes because DDP / FSDP average gradients. Losses with other divisors (``ce``,
``Mixed`` with alpha < 1: KD rows and labelled rows, each term over its own count) and runs
where the Trainer's count is per process (``average_tokens_across_devices=False``) take their
divisors from ``step_norms`` over the same micro-batches, all-reduced over processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from kdcache.stages.models.adapters import HFLM, CausalLM
from kdcache.stages.train.dataset import Batch, collate
from kdcache.stages.train.losses import HardCE, Mixed, SoftCE, build_loss
from kdcache.stages.train.step import DistillStep, Norms, batch_targets, step_norms
from kdcache.storage.errors import ConfigError
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import IGNORE_INDEX, Block, CacheSchema, Sequence

__all__ = [
    "CacheCollator",
    "CacheDataset",
    "DistillModel",
    "DistillTrainer",
    "as_causal_lm",
    "batch_to_inputs",
    "check_fits",
    "inputs_to_batch",
]

log = logging.getLogger(__name__)

BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(Batch))


# -- data ---------------------------------------------------------------------------------------
class CacheDataset(Dataset):
    """The sequences of a cache as a map-style dataset: item ``i`` is sequence ``indices[i]``
    (all of them by default), a kdcache ``Sequence`` read on demand (one reader per DataLoader
    worker). Items are not dicts, so the Trainer's ``remove_unused_columns`` never touches them.

    ``token_vocab`` is the number of token ids the student must cover (the cache's tokenizer
    vocabulary, else the teacher's output size)."""

    def __init__(self, cache: str | Path, indices=None) -> None:
        self.path = Path(cache)
        reader = CacheReader(self.path)
        if reader.num_sequences == 0:
            raise ConfigError(f"the cache {cache} holds no sequences; capture some data first")
        self.schema: CacheSchema = reader.schema
        self.packed = bool(reader.manifest["settings"].get("pack", False))
        tokenizer = reader.manifest["fingerprints"].get("tokenizer") or {}
        self.token_vocab = int(tokenizer.get("vocab_size") or reader.vocab_size)
        n = reader.num_sequences
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        if any(not 0 <= i < n for i in self.indices):
            raise ConfigError(f"expected sequence indices in [0, {n}) for {cache}, found others")
        self._reader, self._pid = reader, os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sequence:
        if self._reader is None or self._pid != os.getpid():  # a forked DataLoader worker
            self._reader, self._pid = CacheReader(self.path), os.getpid()
        return self._reader.sequence(self.indices[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}  # a spawned worker opens its own

    def collator(self) -> CacheCollator:
        return CacheCollator(self.schema, packed=self.packed)

    def sample_log_tail(self, n: int = 64) -> np.ndarray:
        """The log_tail of the first ``n`` sequences (a check that the cache stores a real one)."""
        return np.concatenate([self[i].log_tail for i in range(min(n, len(self)))])


class CacheCollator:
    """A list of cached sequences -> the dict of a padded ``Batch`` (``batch_to_inputs``).

    Padding is kdcache's ``collate`` (on a ``--pack`` cache: position and segment ids that
    restart at every document)."""

    def __init__(self, schema: CacheSchema, *, packed: bool | None = None) -> None:
        self.schema, self.packed = schema, packed

    def __call__(self, sequences: list[Sequence]) -> dict[str, Tensor]:
        block = Block.from_sequences(list(sequences), self.schema)
        return batch_to_inputs(collate(block, packed=self.packed))


def batch_to_inputs(batch: Batch) -> dict[str, Tensor]:
    """A Batch as the Trainer's inputs: its tensors by field name, except that its next-token
    labels travel as ``next_token_labels`` and ``labels`` is the Trainer's row count: != -100
    exactly on the rows with a KD target (the next-token label, or on a row without one, a
    sequence's or document's last, the teacher's first cached id), -100 elsewhere."""
    kd_rows = batch.target_mask & batch.has_topk
    label = torch.where(batch.labels != IGNORE_INDEX, batch.labels, batch.topk_ids[..., 0])
    out = {name: v for name, v in vars(batch).items() if v is not None}
    out["next_token_labels"] = out.pop("labels")
    out["labels"] = torch.where(kd_rows, label, IGNORE_INDEX)
    return out


def inputs_to_batch(inputs: Mapping[str, Tensor]) -> Batch:
    """The Batch of ``batch_to_inputs``'s dict (on whatever device its tensors are)."""
    fields = {name: inputs.get(name) for name in BATCH_FIELDS}
    fields["labels"] = inputs["next_token_labels"]
    return Batch(**fields)


# -- the module the Trainer trains ---------------------------------------------------------------
def as_causal_lm(model: PreTrainedModel | CausalLM) -> CausalLM:
    """A kdcache adapter over a Hugging Face causal LM (a CausalLM is returned as is)."""
    if isinstance(model, CausalLM):
        return model
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    if head is None:
        raise ConfigError(
            f"expected a Hugging Face causal LM (AutoModelForCausalLM) or a kdcache CausalLM as "
            f"the student, found {type(model).__name__}; load it with AutoModelForCausalLM"
        )
    cfg = model.config
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    name = getattr(cfg, "name_or_path", "") or type(model).__name__
    vocab = int(head.weight.shape[0])
    return HFLM(
        name=name, module=model, vocab_size=vocab, max_positions=max_pos, tokenizer_path=None
    )


def _student_keys(module, state_dict, prefix, *_) -> None:
    """Load hook: a state dict of the student's own keys (a save_pretrained checkpoint, as the
    Trainer writes and resumes from) loads into the wrapper as ``student.*``."""
    ours = prefix + "student."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(ours)]:
        state_dict[ours + key[len(prefix) :]] = state_dict.pop(key)


class DistillModel(DistillStep):
    """A ``DistillStep`` whose forward takes the collator's tensors: the module the Trainer
    trains, and the root of its DDP / FSDP wrap (the student is its only child).

    ``norms`` are the divisors of the step's means; None: this batch's own rows (a per-batch
    mean, as in evaluation). ``_no_split_modules`` are the student's, so the Trainer's FSDP
    wraps its transformer blocks."""

    accepts_loss_kwargs = True  # the Trainer counts the labels of each step (num_items_in_batch)
    main_input_name = "input_ids"

    def __init__(
        self, student: PreTrainedModel | CausalLM, loss_fn: nn.Module, *, chunk_rows=None
    ) -> None:
        adapter = as_causal_lm(student)
        super().__init__(adapter, loss_fn, chunk_rows=chunk_rows)
        adapter.has_head  # noqa: B018 -- probed now, before an engine wraps the model
        self._no_split_modules = list(getattr(adapter.module, "_no_split_modules", None) or ())
        self.register_load_state_dict_pre_hook(_student_keys)

    def forward(
        self,
        input_ids: Tensor,
        next_token_labels: Tensor,
        valid: Tensor,
        target_mask: Tensor,
        has_topk: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        log_tail: Tensor,
        labels: Tensor | None = None,  # the Trainer's row count; the loss reads the rest
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        norms: Norms | None = None,
    ) -> Tensor:
        batch = Batch(
            input_ids=input_ids, labels=next_token_labels, valid=valid, target_mask=target_mask,
            has_topk=has_topk, topk_ids=topk_ids, topk_logprobs=topk_logprobs, log_tail=log_tail,
            position_ids=position_ids, segment_ids=segment_ids,
        )  # fmt: skip
        targets = batch_targets(batch, self.adapter.vocab_size)
        if norms is None:
            norms = step_norms(self.loss_fn, [(batch, targets)])
        return super().forward(batch, targets, norms)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """The Trainer's ``activation_checkpointing``, passed to the student."""
        student = self.adapter.module
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(
                activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload
            )
        else:
            self.adapter.enable_activation_checkpointing()


# -- checks ---------------------------------------------------------------------------------------
def _cache_datasets(datasets) -> list[CacheDataset]:
    """The CacheDatasets among train / eval datasets (a Subset or a dict of them unwrapped)."""
    out = []
    for ds in datasets.values() if isinstance(datasets, Mapping) else [datasets]:
        while isinstance(ds, Subset):
            ds = ds.dataset
        if isinstance(ds, CacheDataset):
            out.append(ds)
    return out


def _kd_part(loss_fn: nn.Module) -> nn.Module | None:
    if isinstance(loss_fn, Mixed):
        return loss_fn.kd if loss_fn.alpha > 0 else None
    return None if isinstance(loss_fn, HardCE) else loss_fn


def check_fits(student: CausalLM, loss_fn: nn.Module, ds: CacheDataset) -> None:
    """The student covers the cache's token ids; the loss fits the cache's targets."""
    if student.vocab_size < ds.token_vocab:
        raise ConfigError(
            f"the student outputs {student.vocab_size:,} tokens but the cache {ds.path} needs "
            f"{ds.token_vocab:,}; use a student whose output size covers the cache's vocabulary"
        )
    kd = _kd_part(loss_fn)
    if kd is None:
        return
    if kd.k is not None and kd.k > ds.schema.k:
        raise ConfigError(
            f"expected the loss's k <= the cache's k={ds.schema.k}, found k={kd.k}; "
            "build the loss with a smaller k or recapture"
        )
    if ds.schema.targets == "sampled" and (not isinstance(kd, SoftCE) or kd.temperature != 1):
        raise ConfigError(
            f"the cache {ds.path} holds sampled targets (draws, not the teacher's top-k); use "
            "the soft_ce loss at temperature 1 (or ce)"
        )
    if kd.needs_tail and np.isnan(ds.sample_log_tail()).any():
        raise ConfigError(
            f"the {kd.name} loss needs the teacher's tail mass, but the cache {ds.path} stores "
            "NaN log_tail; use the forward_kl loss (top-k only) or recapture"
        )


def _untied(module: nn.Module, missing: list[str]) -> list[str]:
    """The missing keys that no loaded key shares a tensor with."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    gone = set(missing)
    loaded = {n for names in groups.values() if not gone.issuperset(names) for n in names}
    return [k for k in missing if k not in loaded]


# -- the Trainer ---------------------------------------------------------------------------------
class DistillTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student: a Hugging Face causal LM,
    a kdcache CausalLM or a ready DistillModel) on a kdcache cache with a kdcache loss.

    ``loss_fn``: a loss name or ``build_loss(...)``; ``chunk_rows``: rows of logits alive at
    once. ``data_collator`` defaults to the training cache's. ``save_model`` writes the
    student alone (``save_pretrained``). Evaluation reports the per-batch mean loss."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's count already

    def __init__(
        self,
        model: PreTrainedModel | CausalLM | DistillModel,
        args=None,
        *,
        loss_fn: str | nn.Module = "forward_kl",
        chunk_rows: int | None = None,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        **kwargs,
    ) -> None:
        if kwargs.get("compute_loss_func") is not None or kwargs.get("model_init") is not None:
            raise ConfigError(
                "DistillTrainer computes kdcache's loss from the student it is given; "
                "drop compute_loss_func / model_init"
            )
        if not isinstance(model, DistillModel):
            loss_fn = build_loss(loss_fn) if isinstance(loss_fn, str) else loss_fn
            model = DistillModel(model, loss_fn, chunk_rows=chunk_rows)
        caches = _cache_datasets(train_dataset) + _cache_datasets(eval_dataset or {})
        for ds in caches:
            check_fits(model.adapter, model.loss_fn, ds)
        if data_collator is None:
            if not caches:
                raise ConfigError(
                    "expected a CacheDataset (or a data_collator for your dataset), found "
                    f"{type(train_dataset).__name__}; pass train_dataset=CacheDataset(cache)"
                )
            data_collator = caches[0].collator()
        self._student_module = model.adapter.module  # read while the accelerator is made
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        self._check_args()
        self._step_norms: Norms | None = None

    def create_accelerator_and_postprocess(self) -> None:
        """DDP's find_unused_parameters (unless set) as the Trainer picks it for a Hugging Face
        model, off under activation checkpointing, which breaks with it; for a module that is
        not a PreTrainedModel, as DistillModel, the Trainer would always turn it on."""
        unset = self.args.ddp_find_unused_parameters is None
        if unset:
            checkpointing = getattr(self._student_module, "is_activation_checkpointing", False)
            self.args.ddp_find_unused_parameters = not (
                checkpointing or self.args.activation_checkpointing
            )
        try:
            super().create_accelerator_and_postprocess()
        finally:
            if unset:
                self.args.ddp_find_unused_parameters = None

    def _check_args(self) -> None:
        strategy = self.args.train_sampling_strategy
        if strategy not in ("random", "sequential"):
            raise ConfigError(
                f"expected train_sampling_strategy 'random' or 'sequential', found {strategy!r}: "
                "cached sequences carry no length column; drop it"
            )
        if self.args.n_gpu > 1:
            raise ConfigError(
                f"DistillTrainer runs one device per process, found {self.args.n_gpu} GPUs in one "
                "(nn.DataParallel); launch with torchrun or accelerate launch instead"
            )
        shared = self.get_tp_size() * self.get_cp_size() * self.get_sp_size()
        if shared != 1:
            raise ConfigError(
                "DistillTrainer supports data parallelism (DDP, FSDP) only, found tensor, "
                "context or sequence parallelism; drop it from the parallelism config"
            )

    # -- normalization ----------------------------------------------------------------------
    def _uses_trainer_count(self) -> bool:
        """Whether the Trainer's num_items_in_batch is the loss's divisor: a loss with one
        divisor, the KD rows (the collator's labels), counted over all processes."""
        loss_fn = self.model.loss_fn
        single_kd = not isinstance(loss_fn, HardCE | Mixed) or (
            isinstance(loss_fn, Mixed) and loss_fn.alpha == 1.0
        )
        return single_kd and (self.args.world_size == 1 or self.args.average_tokens_across_devices)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and the Trainer's count; also kdcache's own divisors of
        the step (``step_norms``, all-reduced) when the Trainer's count is not the loss's."""
        samples, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_norms = None
        if samples and not self._uses_trainer_count():
            self._step_norms = self._own_norms(samples, device)
        return samples, count

    def _own_norms(self, samples: list[dict], device) -> Norms:
        vocab = self.model.adapter.vocab_size
        batches = [inputs_to_batch(s) for s in samples]
        micro = [(b, batch_targets(b, vocab)) for b in batches]
        many = self.accelerator.num_processes > 1
        reduce = (lambda t: self.accelerator.reduce(t.to(device), "sum")) if many else None
        norms = step_norms(self.model.loss_fn, micro, reduce)
        return tuple(None if n is None else n.to(device) for n in norms)

    def _norms(self, num_items_in_batch) -> Norms | None:
        if self._step_norms is not None:
            return self._step_norms
        if num_items_in_batch is None or not self._uses_trainer_count():
            return None
        n = torch.as_tensor(num_items_in_batch, device=self.args.device).float()
        return (n, None) if isinstance(self.model.loss_fn, Mixed) else (n,)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """In training: this micro-batch's share of the step's loss (the shares of the step's
        micro-batches on all processes add up to the mean over all its counted rows), times
        the number of processes (DDP / FSDP average gradients). Else this batch's mean."""
        norms = self._norms(num_items_in_batch) if self.model.training else None
        loss = model(**inputs, norms=norms)
        if norms is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The batch's mean loss; no logits are gathered (the loss never builds full logits)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def floating_point_ops(self, inputs) -> int:
        student = self.model.adapter.module
        if hasattr(student, "floating_point_ops"):
            return student.floating_point_ops({"input_ids": inputs["input_ids"]})
        return 0

    # -- saving and loading -------------------------------------------------------------------
    def _issue_warnings_after_load(self, load_result) -> None:
        """A save_pretrained folder stores one of each group of tied weights (GPT-2's head is its
        embedding): the others are loaded through it, not missing."""
        missing = _untied(self.model, load_result.missing_keys)
        if missing:
            log.warning("missing keys in the checkpoint loaded: %s", missing)
        if load_result.unexpected_keys:
            log.warning("unexpected keys in the checkpoint loaded: %s", load_result.unexpected_keys)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student as its own kind's folder (Hugging Face: save_pretrained), not the
        wrapper; ``state_dict`` (gathered under FSDP) loses its ``student.`` prefix."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if state_dict is not None:
            state_dict = {k.removeprefix("student."): v for k, v in state_dict.items()}
        self.model.adapter.save(Path(output_dir), state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
