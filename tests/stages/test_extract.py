import pytest
import torch

from kdcache.stages.extract import extract_rows, group_topk, topk_from_logits


@pytest.mark.parametrize("V, k", [(4096, 64), (4099, 64), (1000, 3), (2048, 1)])
def test_group_topk_equals_torch_topk(V, k):
    z = torch.randn(300, V, generator=torch.Generator().manual_seed(V + k)) * 4
    vals, ids = group_topk(z, k)
    ref_vals, ref_ids = torch.topk(z, k, dim=-1)
    assert torch.equal(vals, ref_vals) and torch.equal(ids, ref_ids)


def test_topk_logprobs_and_tail_match_log_softmax():
    z = torch.randn(50, 5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    ids, lp, tail, finite = topk_from_logits(z.float().clone(), 64)
    ref = torch.log_softmax(z, -1)
    ref_lp, ref_ids = torch.topk(ref, 64, -1)
    assert torch.equal(ids, ref_ids) and finite.all()
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    ref_tail = torch.log(1 - ref_lp.exp().sum(-1))
    torch.testing.assert_close(tail.double(), ref_tail, atol=1e-5, rtol=1e-5)


def test_full_vocabulary_tail_is_minus_inf_and_nan_rows_flagged():
    z = torch.randn(4, 10)
    z[2, 3] = float("nan")
    _, _, tail, finite = topk_from_logits(z.clone(), 10)
    assert torch.isneginf(tail).all()
    assert finite.tolist() == [True, True, False, True]


def test_chunked_head_equals_one_chunk():
    g = torch.Generator().manual_seed(1)
    h, w, b = (
        torch.randn(1000, 32, generator=g),
        torch.randn(3000, 32, generator=g),
        torch.randn(3000, generator=g),
    )
    one = extract_rows(h, w, b, 16, chunk_rows=5000)
    many = extract_rows(h, w, b, 16, chunk_rows=77)
    for x, y in zip(one, many, strict=True):
        assert torch.equal(x, y)


def test_capture_records_the_head_precision_it_used(tmp_path, gpt_teacher, corpus):
    """auto resolves to float32 on CPU (tf32 exists on CUDA only) and is stored resolved."""
    import json

    from kdcache.stages.capture import CaptureConfig, run_capture

    (tmp_path / "d.txt").write_text(corpus["train"][0][:2000])
    run_capture(
        CaptureConfig(
            teacher=str(gpt_teacher),
            data=str(tmp_path / "d.txt"),
            out=str(tmp_path / "c"),
            k=4,
            progress=False,
        )
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["settings"]["head_precision"] == "float32"
