"""A 32,768-token sequence through a teacher with a 151,936-id vocabulary (Qwen2's), on CPU.

The float32 logits of that sequence would take T x V x 4 = 19.9 GB; the capture holds one
chunk of positions at a time, so its peak memory stays a small fraction of that. The peak is
the capture process's own (its resident set's high-water mark, read by a parent that starts
only it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import HF_COMMON, save_hf_teacher
from train_helpers import kdcache_args, one_thread_env

from kdcache.stages.capture.extract import topk_from_logits
from kdcache.stages.models.adapters import load_model
from kdcache.storage.reader import CacheReader

T, V = 32_768, 151_936

PEAK = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(r.stderr)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_a_32k_sequence_with_a_152k_vocabulary_never_holds_its_logits(tmp_path, tok_dir):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=T,
        tie_word_embeddings=True,
        **HF_COMMON,
    )
    torch.manual_seed(0)
    teacher = save_hf_teacher(tmp_path / "teacher", tok_dir, transformers.Qwen2ForCausalLM(config))
    ids = torch.randint(1, 512, (T - 2,), generator=torch.Generator().manual_seed(0))
    data = tmp_path / "long.jsonl"  # pre-tokenized: with its BOS and EOS exactly T tokens
    data.write_text(json.dumps({"input_ids": ids.tolist()}) + "\n")
    args = ["cache", "--teacher", teacher, "--data", data, "--out", tmp_path / "c", "--k", 64]
    args += ["--seq-len", T, "--batch-tokens", T, "--device", "cpu", "--no-progress"]
    r = subprocess.run(
        [sys.executable, "-c", PEAK, *kdcache_args(*args)],
        capture_output=True,
        text=True,
        env=one_thread_env(),
        timeout=600,
    )
    code, peak = map(int, r.stdout.split())
    assert code == 0, r.stderr[-3000:]
    assert peak < 0.1 * T * V * 4, f"peak {peak / 2**30:.2f} GiB"  # measured: ~0.9 GB
    print(f"peak resident memory {peak / 1e9:.2f} GB against {T * V * 4 / 1e9:.1f} GB of logits")

    [seq] = CacheReader(tmp_path / "c")
    assert len(seq.input_ids) == T and seq.topk_ids.shape == (T, 64)
    model = load_model(str(teacher))  # the last positions, directly: attention over 32k tokens
    with torch.inference_mode():
        h = model.hidden(torch.from_numpy(seq.input_ids.astype("int64"))[None])[0, -4:]
        ref_ids, ref_lp, ref_tail, _ = topk_from_logits(model.head(h).float(), 64)
    assert (torch.from_numpy(seq.topk_ids[-4:].astype("int64")) == ref_ids).float().mean() > 0.99
    torch.testing.assert_close(torch.from_numpy(seq.log_tail[-4:]), ref_tail, atol=1e-4, rtol=0)
