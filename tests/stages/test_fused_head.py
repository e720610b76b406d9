"""The fused head -> top-k + tail kernel (Triton), run by Triton's CPU interpreter.

TRITON_INTERPRET=1 is set before Triton is imported (it decides at import what ``@triton.jit``
makes). Shapes are small and uneven on purpose: rows not a multiple of the kernel's 64-row
block, vocabularies not a multiple of its K-column tile, hidden sizes not a multiple of its
64-feature step, k below K (the extra entries fold into the tail). float32 and float16 only:
the interpreter's bf16 ``tl.dot`` is wrong, so bf16 is checked on a GPU.
"""

from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from train_helpers import assert_one_line_error, kdcache  # noqa: E402

from kdcache.stages.capture.extract import extract_rows, merge_topk, topk_from_logits  # noqa: E402
from kdcache.stages.capture.fused_head import block_k, fused_head_topk  # noqa: E402
from kdcache.stages.models.adapters import load_model  # noqa: E402
from kdcache.storage.reader import CacheReader  # noqa: E402


def reference(h, w, b, k):
    """torch's F.linear in the inputs' dtype, then float32 log_softmax + topk (and the tail as
    the log-sum-exp of the other entries, in float64)."""
    z = F.linear(h, w, b).float()
    ref = torch.log_softmax(z.double(), -1)
    lp, ids = ref.topk(k, -1)
    return ids, lp, ref.scatter(1, ids, float("-inf")).logsumexp(-1), z


@pytest.mark.parametrize(
    "n, C, V, k, bias",
    [(70, 40, 1000, 20, True), (64, 96, 515, 64, False), (5, 16, 300, 1, True)],
)
def test_float32_equals_log_softmax_and_topk(n, C, V, k, bias):
    g = torch.Generator().manual_seed(n + V + k)
    h = torch.randn(n, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    vals, ids, rest = fused_head_topk(h, w, b, k)
    assert vals.shape == ids.shape == (n, block_k(k))
    out_ids, lp, tail, finite = merge_topk(vals, ids, rest, k)
    ref_ids, ref_lp, ref_tail, _ = reference(h, w, b, k)
    assert torch.equal(out_ids, ref_ids) and finite.all()
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(tail.double(), ref_tail, atol=1e-4, rtol=1e-5)


def test_a_tiny_tail_is_the_sum_of_the_other_entries_not_a_difference():
    """Peaked rows (tails of e^-20 .. e^-84, far below float32's precision of the total): the
    kernel sums what drops out of its top-K, so the tail stays right to ~1e-4 nats."""
    g = torch.Generator().manual_seed(7)
    n, C, V, k = 64, 64, 2000, 8
    w = torch.randn(V, C, generator=g) * 0.3
    h = torch.randn(n, C, generator=g) * 0.3
    h += w[:n] * torch.linspace(8, 16, n)[:, None]  # id i of row i stands out ever more
    out_ids, lp, tail, finite = merge_topk(*fused_head_topk(h, w, None, k), k)
    ref_ids, ref_lp, ref_tail, _ = reference(h, w, None, k)
    assert ref_tail.max() < -16 and ref_tail.min() < -60 and torch.isfinite(ref_tail).all()
    assert torch.equal(out_ids, ref_ids) and finite.all()
    torch.testing.assert_close(tail.double(), ref_tail, atol=1e-4, rtol=1e-6)


def test_float16_within_the_float16_step_of_the_same_dtype_reference():
    """The kernel accumulates in float32; the reference rounds its float16 logits: ids agree
    except where the reference's logits lie within a float16 step of each other."""
    g = torch.Generator().manual_seed(3)
    n, C, V, k = 70, 48, 700, 16
    h = torch.randn(n, C, generator=g).half()
    w = (torch.randn(V, C, generator=g) * 0.5).half()
    b = torch.randn(V, generator=g).half()
    out_ids, lp, tail, finite = merge_topk(*fused_head_topk(h, w, b, k), k)
    ref_ids, ref_lp, ref_tail, z = reference(h, w, b, k)
    step = z.abs().amax(-1, keepdim=True) * 2.0**-10  # the float16 step of the largest logits
    z_ours = z.gather(1, out_ids)  # the reference's logits of the ids the kernel chose
    kth = z.gather(1, ref_ids[:, -1:])
    assert finite.all()
    assert ((out_ids == ref_ids) | ((z_ours - z.gather(1, ref_ids)).abs() <= step)).all()
    assert (z_ours >= kth - step).all()  # a chosen id is never more than a step outside
    assert (out_ids == ref_ids).float().mean() > 0.9
    assert (lp.double() - ref_lp).abs().max() <= 2 * step.max()
    assert (tail.double() - ref_tail).abs().max() <= 2 * step.max()


def test_a_real_teachers_hidden_states(gpt_teacher, corpus):
    """The built-in teacher's final hidden states (not Gaussian: a few large directions)."""
    from kdcache.stages.models.tokenizer import load_tokenizer

    teacher = load_model(str(gpt_teacher))
    tok = load_tokenizer(gpt_teacher)
    ids = torch.tensor(tok.tokenizer.encode(corpus["train"][0][:2000]).ids[:100])[None]
    with torch.inference_mode():
        h = teacher.hidden(ids)[0]  # (100, C)
    head = teacher.head_shard()
    eager = extract_rows(h, head, 8, chunk_rows=37)
    fused = extract_rows(h, head, 8, chunk_rows=37, kernel="triton")
    assert torch.equal(eager[0], fused[0]) and fused[3].all()
    torch.testing.assert_close(fused[1], eager[1], atol=2e-5, rtol=0)
    torch.testing.assert_close(fused[2], eager[2], atol=1e-4, rtol=1e-5)
    with torch.inference_mode():
        ref = topk_from_logits(teacher.head(h).float(), 8)
    assert torch.equal(fused[0], ref[0])


@pytest.mark.slow
def test_kdcache_cache_with_the_fused_kernel_equals_the_eager_head(tmp_path, gpt_teacher, corpus):
    data = tmp_path / "docs.jsonl"
    texts = [t[i : i + 200] for t in corpus["train"][:2] for i in range(0, 800, 200)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = ["cache", "--teacher", gpt_teacher, "--data", data, "--k", "8", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    for kernel in ("eager", "triton"):
        r = kdcache(*common, "--out", tmp_path / kernel, "--head-kernel", kernel, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    eager = {s.sample_id: s for s in CacheReader(tmp_path / "eager")}
    fused = {s.sample_id: s for s in CacheReader(tmp_path / "triton")}
    assert eager.keys() == fused.keys() and eager
    for sid, x in eager.items():
        assert np.array_equal(x.topk_ids, fused[sid].topk_ids)
        # float32 log-probs that agree to ~1e-5 can round to neighbouring float16 values: one
        # float16 step of the value apart at most
        a, b = x.topk_logprobs, fused[sid].topk_logprobs
        step = np.spacing(np.maximum(np.abs(a), np.abs(b))).astype(np.float32)
        assert (np.abs(a.astype(np.float32) - b.astype(np.float32)) <= step).all()
        np.testing.assert_allclose(x.log_tail, fused[sid].log_tail, atol=1e-4)
    [record] = (tmp_path / "triton" / "parts").glob("*/part.json")
    assert json.loads(record.read_text())["config"]["head_kernel"] == "triton"


def test_the_fused_kernel_on_cpu_without_the_interpreter_is_one_clear_error(
    tmp_path, gpt_teacher, corpus
):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": corpus["train"][0][:300]}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    r = kdcache(
        "cache", "--teacher", gpt_teacher, "--data", data, "--out", tmp_path / "c",
        "--head-kernel", "triton", "--device", "cpu", env=env,
    )  # fmt: skip
    assert_one_line_error(r, "--head-kernel triton runs on CUDA", "--head-kernel eager")
    assert not (tmp_path / "c").exists()
