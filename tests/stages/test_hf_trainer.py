"""The Hugging Face Trainer integration (kdcache.stages.train.hf_trainer), run for real.

The real ``transformers.Trainer`` (DistillTrainer) trains a tiny random GPT-2 over a synthetic
cache; the batches it trained on are recorded at the collator and replayed with kdcache's own
``DistillStep`` + ``step_norms`` from the same initial weights. Its logged per-step losses and
final parameters must equal the replay's (rtol 1e-5): the step's loss is the mean over every
counted row of its accumulation micro-batches, whatever their sizes (the cache's sequences vary
in length and loss masks, and the epoch's last step has one micro-batch, not two). Plain SGD
without clipping, so any error in the gradient's scale shows in the parameters too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from train_helpers import (  # noqa: E402
    VOCAB,
    free_port,
    lengths,
    one_thread_env,
    rank_env,
    synthetic_cache,
)

from kdcache.stages.models.adapters import HFLM  # noqa: E402
from kdcache.stages.train.dataset import collate  # noqa: E402
from kdcache.stages.train.hf_trainer import (  # noqa: E402
    CacheDataset,
    DistillTrainer,
    as_causal_lm,
)
from kdcache.stages.train.losses import build_loss  # noqa: E402
from kdcache.stages.train.step import DistillStep, batch_targets, step_norms  # noqa: E402
from kdcache.storage.errors import ConfigError  # noqa: E402
from kdcache.storage.schema import Block  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEQUENCES, BATCH, ACCUM, STEPS, LR = 10, 2, 2, 3, 0.5
# 10 sequences in micro-batches of 2: 5 per epoch, so the 3 steps take 2, 2 and 1 of them.
STEP_SIZES = [2, 2, 1]
RTOL, ATOL = 1e-5, 1e-6


def tiny_config(vocab: int = VOCAB):
    """A 1-layer GPT-2 without dropout (the replay must see the same forward)."""
    return transformers.GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def tiny_student(vocab: int = VOCAB):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(vocab))


def logits_only(model) -> HFLM:
    """The student as a model whose head kdcache cannot use: it hands over full logits."""
    adapter = as_causal_lm(model)
    adapter._head_exact = False
    return adapter


def training_args(out: Path, **overrides):
    settings = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=True,  # the default: it must not drop the cache's columns
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class Recorder:
    """The Trainer's collator, keeping the sequences of every micro-batch it built."""

    def __init__(self, collator) -> None:
        self.collator, self.seen = collator, []

    def __call__(self, sequences):
        self.seen.append(list(sequences))
        return self.collator(sequences)


def fit(cache: Path, out: Path, loss_fn, *, head: bool = True, **overrides):
    """(trainer, initial weights, recorded micro-batches) after the Trainer's run."""
    model = tiny_student()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = CacheDataset(cache)
    recorder = Recorder(dataset.collator())
    trainer = DistillTrainer(
        model if head else logits_only(model),
        training_args(out, **overrides),
        loss_fn=loss_fn,
        train_dataset=dataset,
        data_collator=recorder,
    )
    trainer.train()
    return trainer, initial, recorder.seen


def replay(initial: dict, steps: list[list], schema, loss_fn, head: bool):
    """kdcache's own training of the same batches: (per-step losses, final weights)."""
    model = tiny_student()
    model.load_state_dict(initial)
    model.train()
    adapter = as_causal_lm(model) if head else logits_only(model)
    step = DistillStep(adapter, loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for micro in steps:
        batches = [collate(Block.from_sequences(seqs, schema)) for seqs in micro]
        pairs = [(b, batch_targets(b, adapter.vocab_size)) for b in batches]
        norms = step_norms(loss_fn, pairs)
        total = 0.0
        for batch, targets in pairs:
            loss = step(batch, targets, norms)
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model.state_dict()


def split(seen: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(seen[start : start + n])
        start += n
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Sequences of 3-16 tokens with random loss masks (every step counts different rows)."""
    path = tmp_path_factory.mktemp("hf") / "cache"
    return synthetic_cache(path, [lengths(SEQUENCES)], masked=True)


CASES = {
    "forward_kl": (dict(name="forward_kl"), True, {}),  # the Trainer's count is the divisor
    "logits": (dict(name="forward_kl"), False, {}),  # a student without a usable head
    "mixed": (dict(name="forward_kl_tail", alpha=0.5), True, {}),  # two divisors: step_norms
    "ce": (dict(name="ce"), True, {}),  # labelled rows, not KD rows
    "packed": (dict(name="jsd", temperature=2.0), True, dict(pack=True)),  # documents' ends
    "mask": (dict(name="reverse_kl"), True, dict(targets_on="mask")),  # rows on the mask only
}


@pytest.mark.parametrize("case", CASES)
def test_trainer_steps_equal_kdcache_steps(case, cache, tmp_path):
    spec, head, cache_kwargs = CASES[case]
    if cache_kwargs:
        cache = synthetic_cache(tmp_path / "cache", [lengths(SEQUENCES)], **cache_kwargs)
    loss_fn = build_loss(**spec)
    trainer, initial, seen = fit(cache, tmp_path / "out", loss_fn, head=head)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [len(s) for s in seen[: sum(STEP_SIZES)]] == [BATCH] * sum(STEP_SIZES)
    losses, params = replay(
        initial, split(seen, STEP_SIZES), CacheDataset(cache).schema, loss_fn, head
    )
    assert len(logged) == STEPS
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(losses), rtol=RTOL, atol=0)
    trained = trainer.model.student.state_dict()
    for name, value in params.items():
        torch.testing.assert_close(trained[name], value, rtol=RTOL, atol=ATOL, msg=name)
    assert not torch.equal(
        trained["transformer.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"]
    )


# Two processes (DDP over gloo) of 5 sequences each per epoch, micro-batches of 2: an epoch is a
# step of 2 micro-batches per process and a step of 1; the third step opens the second epoch.
DDP_STEP_SIZES = [2, 1, 2]
DDP_CASES = {
    "forward_kl": (dict(name="forward_kl"), {}),  # the Trainer's count, gathered
    "mixed": (dict(name="jsd", alpha=0.3), {}),  # two divisors, all-reduced
    "local_count": (dict(name="forward_kl"), dict(average_tokens_across_devices=False)),
}


def ddp_worker(cache: str, out: str) -> None:
    """One rank of test_ddp_steps_equal_kdcache_steps: train every DDP case, save what it saw."""
    rank = int(os.environ["RANK"])
    for case, (spec, overrides) in DDP_CASES.items():
        trainer, initial, seen = fit(
            Path(cache), Path(out) / case, build_loss(**spec), ddp_backend="gloo", **overrides
        )
        record = {"seen": seen, "initial": initial, "log": trainer.state.log_history}
        record["params"] = trainer.model.student.state_dict()
        record["world"] = trainer.accelerator.num_processes
        torch.save(record, Path(out) / f"{case}-rank{rank}.pt")


@pytest.mark.slow
def test_ddp_steps_equal_kdcache_steps(cache, tmp_path):
    """Two processes: each step's loss is the mean over both processes' rows, as one process
    computes it over the same micro-batches (the Trainer's count gathered; Mixed's two
    divisors, or a per-process Trainer count's, all-reduced), and both end with the replay's
    weights."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(cache), str(tmp_path)],
            env=rank_env(rank, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    schema = CacheDataset(cache).schema
    for case, (spec, _) in DDP_CASES.items():
        ranks = [torch.load(tmp_path / f"{case}-rank{r}.pt", weights_only=False) for r in range(2)]
        assert ranks[0]["world"] == 2
        per_rank = [split(r["seen"], DDP_STEP_SIZES) for r in ranks]
        steps = [a + b for a, b in zip(*per_rank)]  # a step's micro-batches on both processes
        losses, params = replay(ranks[0]["initial"], steps, schema, build_loss(**spec), True)
        logged = [h["loss"] for h in ranks[0]["log"] if "loss" in h]
        torch.testing.assert_close(torch.tensor(logged), torch.tensor(losses), rtol=RTOL, atol=0)
        for r in ranks:
            for name, value in params.items():
                torch.testing.assert_close(r["params"][name], value, rtol=RTOL, atol=ATOL)


def test_save_model_writes_a_plain_hugging_face_folder(cache, tmp_path):
    trainer, _, _ = fit(cache, tmp_path / "out", build_loss("forward_kl"))
    trained = trainer.model.student.state_dict()
    trainer.save_model(str(tmp_path / "student"))
    # FSDP's save_model hands _save the wrapper's gathered state dict (keys "student.*")
    trainer._save(str(tmp_path / "gathered"), state_dict=trainer.model.state_dict())
    for folder in ("student", "gathered"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        assert loaded.state_dict().keys() == trained.keys()
        for name, value in loaded.state_dict().items():
            torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    assert trainer.evaluate(CacheDataset(cache))["eval_loss"] > 0


def test_fsdp_wraps_the_students_blocks(cache, tmp_path):
    """The Trainer's FSDP (accelerate's transformer auto-wrap) reads the root module's
    _no_split_modules and wraps the modules of those classes: GPT-2's blocks."""
    model = DistillTrainer(
        tiny_student(), training_args(tmp_path / "out"), train_dataset=CacheDataset(cache)
    ).model
    assert model._no_split_modules == ["GPT2Block"]
    assert sum(type(m).__name__ == "GPT2Block" for m in model.modules()) == 1


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights(cache, tmp_path):
    loss_fn = build_loss("forward_kl")
    full, _, _ = fit(cache, tmp_path / "full", loss_fn)
    fit(cache, tmp_path / "cut", loss_fn, max_steps=2, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert (checkpoint / "config.json").is_file()  # the student's own folder, loadable alone
    dataset = CacheDataset(cache)
    resumed = DistillTrainer(
        tiny_student(), training_args(tmp_path / "cut"), loss_fn=loss_fn, train_dataset=dataset
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = full.model.student.state_dict(), resumed.model.student.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize(
    "student, loss, needle",
    [
        (32, dict(name="forward_kl"), "the student outputs 32 tokens but the cache"),
        (VOCAB, dict(name="forward_kl", k=16), "expected the loss's k <= the cache's k=8"),
    ],
)
def test_bad_input_is_one_clear_error(cache, tmp_path, student, loss, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        DistillTrainer(
            tiny_student(student),
            training_args(tmp_path / "out"),
            loss_fn=build_loss(**loss),
            train_dataset=CacheDataset(cache),
        )
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_example_script_trains_and_saves_a_student(cache, tmp_path):
    folder = tmp_path / "student-config"
    tiny_config().save_pretrained(folder)
    out = tmp_path / "out"
    args = [ROOT / "examples/hf_trainer.py", cache, folder, out, "--steps", "2", "--cpu"]
    r = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=one_thread_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2: loss" in r.stdout, r.stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.vocab_size == VOCAB


if __name__ == "__main__":  # a rank of test_ddp_steps_equal_kdcache_steps
    torch.set_num_threads(1)
    ddp_worker(*sys.argv[1:3])
