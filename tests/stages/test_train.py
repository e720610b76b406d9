"""Stage two (``kdcache train``): the loss wiring from cache to student, chunking, the guarantee
that the teacher is never needed, data parallelism, exact resume and bad input.

Students are built-in "nano" GPTs on synthetic caches (stages/../storage/synthetic.py, written
by the real writer) or on a stage-one cache of conftest's random teacher. Helpers are in
train_helpers.py.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from train_helpers import (
    assert_one_line_error,
    assert_same_params,
    config,
    kdcache,
    kdcache_args,
    lengths,
    one_thread_env,
    step_rows,
    student_params,
    synthetic_cache,
    train_args,
    wait_until,
)

from kdcache.pipeline.cli import main as cli_main
from kdcache.pipeline.cli.train import train as train_command
from kdcache.pipeline.executors import run_capture
from kdcache.stages.capture import CaptureConfig
from kdcache.stages.models.gpt import GPT, GPTConfig, save_checkpoint
from kdcache.stages.models.tokenizer import (
    make_tokenizer_info,
    save_tokenizer,
    train_builtin_tokenizer,
)
from kdcache.stages.train import TrainConfig, batch_loss, load_student, run_train
from kdcache.stages.train.dataset import CacheBatches, collate
from kdcache.stages.train.losses import build_loss
from kdcache.stages.train.rundir import committed_checkpoints
from kdcache.stages.train.step import DistillStep, batch_targets, step_norms
from kdcache.storage.reader import CacheReader

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the kdcache subprocesses here get (train_helpers.one_thread_env):
    many times faster for nano models on a shared CPU, and in-process and subprocess runs then
    compute bit for bit the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*args: object) -> subprocess.CompletedProcess:
    """``kdcache ARGS`` in this process (the real click command; no interpreter start-up)."""
    r = CliRunner().invoke(cli_main, [str(a) for a in args])
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


# -- 1. the loss, from the cache to the student -----------------------------------------------
def teacher_rows(reader: CacheReader) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sequence: the positions with a target and the teacher's full log-probs there (R, V),
    rebuilt from the stored rows (k = vocabulary: the rows are the whole distribution)."""
    positions, full = [], []
    for seq in reader:
        rows = np.flatnonzero(seq.loss_mask)  # target positions
        stored = rows if reader.schema.targets_on == "mask" else np.arange(len(seq.input_ids))
        lp = torch.full((len(stored), reader.vocab_size), -math.inf)
        lp.scatter_(
            1, torch.from_numpy(seq.topk_ids.astype(np.int64)), torch.from_numpy(seq.topk_logprobs)
        )
        keep = np.isin(stored, rows)
        positions.append(torch.from_numpy(rows))
        full.append(lp[torch.from_numpy(keep)])
    return positions, full


@pytest.mark.parametrize(
    "targets_on,loss,alpha,temperature",
    [
        ("all", "forward_kl", None, 1.0),
        ("all", "forward_kl_tail", None, 2.0),
        ("mask", "forward_kl", 0.3, 1.0),
        ("mask", "forward_kl_tail", 0.6, 0.5),
    ],
)
def test_training_loss_is_the_full_kl_when_k_is_the_vocabulary(
    tmp_path, targets_on, loss, alpha, temperature
):
    vocab = 32
    path = synthetic_cache(
        tmp_path / "c",
        [lengths(5, seed=2)],
        vocab=vocab,
        k=vocab,
        targets_on=targets_on,
        masked=True,
    )
    reader = CacheReader(path)
    block = reader.block(0, reader.num_sequences)
    assert np.isneginf(block.log_tail).all()
    np.testing.assert_allclose(np.exp(block.topk_logprobs).sum(1), 1.0, rtol=1e-5)
    cfg = config(path, tmp_path / "run", loss=loss, alpha=alpha, temperature=temperature)
    student = load_student(cfg, vocab, 16, CPU)
    loss_fn = build_loss(loss, temperature=temperature, alpha=alpha)
    got = batch_loss(student, loss_fn, collate(block), cfg)

    # Reference: each sequence alone through the student, the teacher rebuilt from the cache.
    t = temperature
    kl_sum, ce_sum, n_kd, n_ce = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for seq, pos, teacher in zip(reader, *teacher_rows(reader)):
            ids = torch.from_numpy(seq.input_ids.astype(np.int64))
            z = student.module(ids[None])[0]  # (T, V)
            log_q = F.log_softmax(z[pos] / t, -1)
            log_p = F.log_softmax(teacher / t, -1)
            kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item() * t**2
            n_kd += len(pos)
            labelled = pos[pos < len(ids) - 1]  # the last row has no label
            ce_sum += F.cross_entropy(z[labelled], ids[labelled + 1], reduction="sum").item()
            n_ce += len(labelled)
    want = kl_sum / n_kd
    if alpha is not None:
        want = alpha * want + (1 - alpha) * ce_sum / n_ce
    assert n_kd < block.num_positions  # some rows carry no target
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "loss,alpha", [("forward_kl", None), ("forward_kl_tail", 0.5), ("jsd", None), ("ce", None)]
)
def test_chunked_equals_unchunked_through_the_trainer(tmp_path, loss, alpha):
    path = synthetic_cache(tmp_path / "c", [lengths(6, seed=4)], masked=True)
    block = CacheReader(path).block(0, 6)
    batch = collate(block)
    assert batch.num_tokens > 3 * 7  # several chunks of 7 rows
    results = []
    for chunk_rows in (7, 10_000):
        cfg = config(path, tmp_path / "run", loss=loss, alpha=alpha, chunk_rows=chunk_rows)
        student = load_student(cfg, 64, 16, CPU)  # the same init (seeded)
        value = batch_loss(student, build_loss(loss, alpha=alpha), batch, cfg)
        value.backward()
        grads = {n: p.grad.clone() for n, p in student.module.named_parameters()}
        results.append((value.detach(), grads))
    (v1, g1), (v2, g2) = results
    assert v1.item() > 0
    torch.testing.assert_close(v1, v2, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert g1[name].abs().sum() > 0 or "bias" in name, name
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5, msg=name)


# -- 2. the guarantee: the teacher is never needed --------------------------------------------
@pytest.fixture(scope="module")
def captured(tmp_path_factory, gpt_teacher, corpus) -> Path:
    """A stage-one cache of a copy of conftest's random built-in teacher (k=8, windows of 32);
    the teacher's folder is then renamed, so nothing can load it."""
    root = tmp_path_factory.mktemp("captured")
    teacher = root / "teacher"
    shutil.copytree(gpt_teacher, teacher)
    text = corpus["train"][0][:6000]
    records = [{"text": text[i : i + 200]} for i in range(0, len(text), 200)]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = CaptureConfig(
        teacher=str(teacher),
        data=str(root / "docs.jsonl"),
        out=str(root / "cache"),
        k=8,
        seq_len=32,
        stride=16,
        device="cpu",
        progress=False,
    )
    assert run_capture(cfg).finalized
    teacher.rename(root / "teacher-moved-away")
    return root / "cache"


@pytest.mark.slow
def test_trains_from_the_cache_alone_with_the_teacher_moved_away(captured, tmp_path):
    reader = CacheReader(captured)
    assert not Path(reader.manifest["config"]["teacher"]).exists()
    assert reader.num_sequences >= 20 and reader.manifest["fingerprints"]["tokenizer"]["sha256"]
    run = tmp_path / "run"
    args = train_args(captured, run, steps=5, eval_every=2, eval_fraction=0.2, checkpoint_every=2)
    result = kdcache(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 steps" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 5
    for key in ("ce", "kl_topk", "top1_agreement"):
        assert math.isfinite(metrics["eval"][key]), key
    assert 0 <= metrics["eval"]["top1_agreement"] <= 1 and metrics["eval"]["tokens"] > 0
    assert [row[0] for row in step_rows(run)] == ["1", "2", "3", "4", "5"]
    assert all(math.isfinite(float(row[1])) for row in step_rows(run))
    evals = (run / "eval.tsv").read_text().splitlines()
    assert evals[0].split("\t") == ["step", "eval_ce", "eval_kl_topk", "eval_top1_agreement"]
    assert [line.split("\t")[0] for line in evals[1:]] == ["2", "4", "5"]
    params = student_params(run)
    assert params["lm_head.weight"].shape[0] == reader.vocab_size
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 5


# -- 3. data parallel (more in test_parallel.py) ------------------------------------------
def test_an_empty_slice_joins_every_collective_with_zero_gradients(tmp_path):
    # One sequence, two ranks: rank 0's slice is empty. Under DDP / FSDP it must still run a
    # forward (the other rank's reducer and all-gathers wait for it) and give every parameter a
    # gradient, all zero, and add nothing to the step's row counts. Hugging Face models refuse
    # an empty batch, so the forward is on one dummy token.
    cache = synthetic_cache(tmp_path / "c", [[6]])
    [empty] = CacheBatches(cache, batch_size=4, rank=0, world_size=2)
    [whole] = CacheBatches(cache, batch_size=4, rank=1, world_size=2)
    assert empty.input_ids.shape[0] == 0 and whole.input_ids.shape[0] == 1
    student_dir = hf_student(tmp_path / "hf", 64)
    for loss, alpha in (("forward_kl", None), ("forward_kl_tail", 0.5)):
        cfg = config(cache, tmp_path / "run", student=str(student_dir), loss=loss, alpha=alpha)
        student = load_student(cfg, 64, 16, CPU)
        loss_fn = build_loss(loss, alpha=alpha)
        micro = [(b, batch_targets(b, 64)) for b in (empty, whole)]
        norms_empty = step_norms(loss_fn, micro[:1])
        norms_whole = step_norms(loss_fn, micro[1:])
        assert len(norms_empty) == len(norms_whole) >= 1
        assert all(n is None or n.item() == 0.0 for n in norms_empty)
        value = DistillStep(student, loss_fn)(empty, micro[0][1], norms_whole)
        value.backward()
        assert value.item() == 0.0
        params = list(student.module.parameters())
        assert all(p.grad is not None and not p.grad.any() for p in params)


# -- 4. resume --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume_cache(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("resume") / "c", [lengths(30, seed=9)])


def test_crash_after_a_checkpoint_resumes_to_the_uninterrupted_run(
    resume_cache, tmp_path, monkeypatch
):
    # 10 steps, checkpoints every 4, an evaluation every 3: the run dies during step 7, after
    # logging steps 5 and 6 (and evaluating at 6), which the resumed run must redo, not repeat.
    opts = dict(steps=10, checkpoint_every=4, eval_every=3, grad_accum=2)
    run_train(config(resume_cache, tmp_path / "straight", **opts))

    calls = {"n": 0}
    real = DistillStep.forward

    def dies_in_step_7(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6 * 2:  # 2 micro-batches a step
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DistillStep, "forward", dies_in_step_7)
    run = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_train(config(resume_cache, run, **opts))
    assert len(step_rows(run)) == 6
    assert [p.name for p in committed_checkpoints(run)] == ["step-00000004"]
    monkeypatch.setattr(DistillStep, "forward", real)
    metrics = run_train(config(resume_cache, run, **opts))

    assert_same_params(student_params(tmp_path / "straight"), student_params(run))
    assert step_rows(run) == step_rows(tmp_path / "straight")
    evals = [(d / "eval.tsv").read_text() for d in (tmp_path / "straight", run)]
    assert evals[0] == evals[1] and len(evals[0].splitlines()) == 1 + 4  # 3, 6, 9, 10
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    for key in ("steps", "train_loss", "tokens", "eval"):
        assert metrics[key] == straight[key], key

    # Rerunning a finished run trains nothing and reports the same metrics.
    again = run_train(config(resume_cache, run, **opts))
    for key in ("steps", "train_loss", "tokens", "eval"):
        assert again[key] == straight[key], key
    assert step_rows(run) == step_rows(tmp_path / "straight")


@pytest.mark.slow
def test_killed_train_resumes_to_the_uninterrupted_run(resume_cache, tmp_path):
    opts = dict(steps=100, checkpoint_every=4, eval_every=5, eval_fraction=0.2)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        kdcache_args(*train_args(resume_cache, run, **opts)),
        env=one_thread_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Kill once a checkpoint exists and a later step is logged (steps.tsv runs ahead).
        def past_a_checkpoint() -> bool:
            steps = run / "steps.tsv"
            return (
                committed_checkpoints(run)
                and steps.exists()
                and (len(steps.read_text().splitlines()) >= 1 + 5)
            )

        assert wait_until(past_a_checkpoint, proc, timeout=120), proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = int(committed_checkpoints(run)[-1].name.removeprefix("step-"))
    assert 4 <= saved < 100, "killed too late: the run had finished"
    resumed = kdcache(*train_args(resume_cache, run, **opts))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    straight_run = cli(*train_args(resume_cache, tmp_path / "straight", **opts))
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    assert_same_params(student_params(tmp_path / "straight"), student_params(run))
    assert step_rows(run) == step_rows(tmp_path / "straight")
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed_m = json.loads((run / "metrics.json").read_text())
    for key in ("steps", "train_loss", "tokens", "eval"):
        assert resumed_m[key] == straight[key], key


# -- 5. bad input -----------------------------------------------------------------------------
def other_tokenizer(folder: Path, vocab: int) -> Path:
    """A tokenizer of ``vocab`` ids trained on other text than conftest's: other ids."""
    texts = [
        "def f(x):\n    return x * 2\n" * 5,
        "the quick brown fox jumps over the lazy dog\n" * 5,
    ]
    tok = train_builtin_tokenizer(texts * 20, vocab_size=vocab)
    return save_tokenizer(make_tokenizer_info(tok), folder)


def hf_student(folder: Path, vocab: int) -> Path:
    """A Hugging Face config folder (random init at load) with conftest-sized context."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2
    )
    config.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_tokenizer_mismatch_is_refused_unless_the_check_is_off(captured, tmp_path, caplog):
    student = hf_student(tmp_path / "hf-student", 512)
    other_tokenizer(student, 512)
    args = train_args(captured, tmp_path / "run", student=student, steps=2, eval_every=2)
    assert_one_line_error(
        cli(*args), "tokenizer", "differs from the cache's", "--tokenizer-check off"
    )
    with caplog.at_level("WARNING", logger="kdcache.stages.train"):
        result = cli(*args, "--tokenizer-check", "off")
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("differs from the cache's" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "student" / "config.json").exists()


def small_student(folder: Path, vocab: int, tokenizer_from: Path | None) -> Path:
    """A built-in GPT checkpoint folder (model.pt) with ``vocab`` outputs."""
    folder.mkdir()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=64))
    save_checkpoint(model, folder / "model.pt")
    if tokenizer_from is not None:
        shutil.copy(tokenizer_from / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _student_too_small(tmp, captured, tok_dir):
    return dict(cache=captured, student=small_student(tmp / "s", 256, tok_dir))


def _checkpoint_without_tokenizer(tmp, captured, tok_dir):
    return dict(cache=captured, student=small_student(tmp / "s", 512, None))


def _missing_part(tmp, captured, tok_dir):
    cache = synthetic_cache(tmp / "c", [lengths(4), lengths(4, seed=1)])
    shutil.rmtree(cache / "parts" / "part-00001")
    return dict(cache=cache)


def _nan_tail(tmp, captured, tok_dir):
    return dict(cache=synthetic_cache(tmp / "c", [lengths(8)], tail="nan"), loss="forward_kl_tail")


def _empty_cache(tmp, captured, tok_dir):
    return dict(cache=synthetic_cache(tmp / "c", [[]]))


def _eval_cache_other_tokenizer(tmp, captured, tok_dir):
    other = synthetic_cache(tmp / "e", [lengths(8)], tokenizer={"sha256": "another"})
    return dict(
        cache=synthetic_cache(tmp / "c", [lengths(8)], tokenizer={"sha256": "this"}),
        eval_cache=other,
    )


def _topk_loss_on_sampled_cache(tmp, captured, tok_dir):
    import numpy as np

    from kdcache.storage.manifest import CacheIdentity
    from kdcache.storage.schema import CacheSchema
    from kdcache.storage.synthetic import synthetic_block
    from kdcache.storage.writer import write_cache

    schema = CacheSchema(k=4, vocab_size=64, targets="sampled")
    block = synthetic_block(np.random.default_rng(0), [16] * 8, schema)
    write_cache(
        tmp / "c",
        CacheIdentity(backend="zarr", schema=schema, fingerprints={}, settings={}),
        [block],
    )
    return dict(cache=tmp / "c", loss="forward_kl")


def _plain(**options):
    def make(tmp, captured, tok_dir):
        return dict(cache=synthetic_cache(tmp / "c", [lengths(8)]), **options)

    return make


BAD_INPUT = {
    "student vocabulary": (
        _student_too_small,
        ["the student outputs 256 tokens", "tokenizer has 512"],
    ),
    "checkpoint without tokenizer": (
        _checkpoint_without_tokenizer,
        ["has no tokenizer to compare", "--tokenizer"],
    ),
    "missing part": (_missing_part, ["part-00001", "missing"]),
    "nan tail": (_nan_tail, ["log_tail", "forward_kl_tail", "--loss forward_kl"]),
    "temperature 0": (_plain(temperature=0), ["--temperature must be > 0, got 0.0"]),
    "k above cached": (_plain(k=9), ["--k 9 exceeds the cache's k=8"]),
    "steps 0": (_plain(steps=0), ["--steps must be >= 1, got 0"]),
    "empty cache": (_empty_cache, ["holds no sequences"]),
    "ce with alpha": (_plain(loss="ce", alpha=0.5), ["no alpha with --loss ce"]),
    "device": (_plain(device="tpu"), ["--device"]),
    "top-k loss on a sampled cache": (_topk_loss_on_sampled_cache, ["does not fit", "soft_ce"]),
    "eval cache with another tokenizer": (
        _eval_cache_other_tokenizer,
        ["--eval-cache", "another tokenizer"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case, request, tmp_path, tok_dir):
    make, needles = BAD_INPUT[case]
    needs_capture = case in ("student vocabulary", "checkpoint without tokenizer")
    captured = request.getfixturevalue("captured") if needs_capture else None
    opts = make(tmp_path, captured, tok_dir)
    cache = opts.pop("cache")
    assert_one_line_error(cli(*train_args(cache, tmp_path / "run", **opts)), *needles)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_input_through_the_installed_command(tmp_path):
    cache = synthetic_cache(tmp_path / "c", [lengths(4), lengths(4, seed=1)])
    shutil.rmtree(cache / "parts" / "part-00001")
    result = kdcache(*train_args(cache, tmp_path / "run"))
    assert_one_line_error(result, "part-00001")
    assert result.stdout == ""


def test_mask_cache_trains_with_every_loss(tmp_path):
    # A "mask" cache stores top-k rows only where loss_mask is 1. No loss needs more: the KD
    # losses read target rows only, and hard-label CE (alone or mixed) counts the same rows
    # (test_training_loss_is_the_full_kl_when_k_is_the_vocabulary checks both on mask caches).
    cache = synthetic_cache(tmp_path / "c", [lengths(12)], targets_on="mask")
    for loss, alpha in (("ce", None), ("jsd", 0.5), ("forward_kl_tail", None)):
        out = tmp_path / f"run-{loss}"
        m = run_train(config(cache, out, loss=loss, alpha=alpha, steps=2, eval_every=2))
        assert m["steps"] == 2 and math.isfinite(m["train_loss"]) and m["eval"] is not None


def test_help_lists_every_option_with_help_text():
    result = cli("train", "--help")
    assert result.returncode == 0
    options = {p.name: p for p in train_command.params}
    expected = {f.name for f in fields(TrainConfig)} - {"progress"} | {"no_progress"}
    assert set(options) == expected
    text = " ".join(result.stdout.split())
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name, param in options.items():
        assert param.help and len(param.help) > 10, name
        assert "--" + name.replace("_", "-") in text, name
        if name in defaults and name != "tokenizer_check" and not param.required:
            assert param.default == defaults[name], name  # the CLI and the library agree


MEMORY_PROBE = """
import resource
import numpy as np
import torch
from kdcache.stages.models.adapters import BuiltinLM
from kdcache.stages.train.dataset import collate
from kdcache.stages.train.losses import build_loss
from kdcache.stages.models.gpt import GPT, GPTConfig
from kdcache.stages.train import TrainConfig, batch_loss
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block

V, T = 151936, 4096
torch.set_num_threads(1)
batch = collate(synthetic_block(np.random.default_rng(0), [T], CacheSchema(k=8, vocab_size=V)))
model = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=1, n_embd=16, block_size=T))
student = BuiltinLM("probe", model, V, T, None)
cfg = TrainConfig(cache=".", student="probe", out="unused")  # the default --chunk-rows
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batch_loss(student, build_loss("forward_kl", alpha=0.7), batch, cfg).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


@pytest.mark.slow
def test_default_loss_chunks_keep_a_152k_vocabulary_under_half_a_logits_tensor():
    """A 151,936-id student at 4,096 positions: one float32 (T, V) logits tensor is 2.49 GB;
    a KD + CE step with the default chunking grows the peak resident memory by at most half
    of that (it grew by 2.7 GB with 2,048-row chunks)."""
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.strip().splitlines()[-1])
    assert grown <= 0.5 * 4096 * 151936 * 4, f"peak grew by {grown / 1e9:.2f} GB"


def test_a_batch_larger_than_the_cache_says_nothing_was_held_out(tmp_path, caplog):
    """One batch block holds the whole cache: there is nothing to hold out, and the run says so
    (a warning up front, no 'held-out CE nan' at the end)."""
    path = synthetic_cache(tmp_path / "c", [lengths(6, seed=3)])
    r = cli(
        "train",
        "--cache",
        path,
        "--student",
        "nano",
        "--out",
        tmp_path / "r2",
        "--steps",
        2,
        "--batch-size",
        1000,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout and "no held-out evaluation (nothing was held out)" in r.stdout
    assert "nothing is held out for evaluation" in caplog.text
    assert "lower --batch-size" in caplog.text
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["eval"] is None
