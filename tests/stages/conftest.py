"""Shared fixtures of the stage tests: a small tokenizer and teachers saved the way users save
them (a built-in GPT folder: model.pt + tokenizer files; a Hugging Face save_pretrained folder).

Everything is tiny, built on the fly from the Python standard library's own sources: no
download, every random draw seeded.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdcache.pipeline.corpus import builtin_corpus, is_heldout
from kdcache.stages.models.gpt import GPT, GPTConfig, save_checkpoint
from kdcache.stages.models.tokenizer import (
    make_tokenizer_info,
    save_tokenizer,
    train_builtin_tokenizer,
)

VOCAB = 512  # the test tokenizer's vocabulary (and the random teachers' output size)
CONTEXT = 128  # the random teachers' context


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    """Train and held-out texts of 24 standard-library files (~320 kB and ~50 kB)."""
    docs = builtin_corpus("all", max_files=24)
    return {
        split: [d.text for d in docs if is_heldout(d.source, 5) == (split == "heldout")]
        for split in ("train", "heldout")
    }


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus) -> Path:
    """A byte-level BPE tokenizer folder (tokenizer.json + tokenizer_config.json), VOCAB ids."""
    tok = train_builtin_tokenizer(corpus["train"], vocab_size=VOCAB)
    assert tok.get_vocab_size() == VOCAB
    return save_tokenizer(make_tokenizer_info(tok), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def save_teacher(tmp_path_factory, tok_dir) -> Callable[[GPT, str], Path]:
    """save_teacher(model, name): a built-in teacher folder, model.pt next to the tokenizer."""

    def save(model: GPT, name: str) -> Path:
        folder = tmp_path_factory.mktemp(name)
        save_checkpoint(model, folder / "model.pt")
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / file, folder / file)
        return folder

    return save


@pytest.fixture(scope="session")
def gpt_teacher(save_teacher) -> Path:
    """A random built-in GPT folder. Embeddings drawn wider than the training init so the
    logits spread over several nats and the top-k ranking is well defined."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT))
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 0.5)  # (V, C), tied to lm_head
    return save_teacher(model, "gpt-teacher")


def save_hf_teacher(folder: Path, tok_dir: Path, model) -> Path:
    """A random Hugging Face model saved (save_pretrained) with the test tokenizer next to it."""
    model.eval().save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / file, folder / file)
    return folder


# Random Hugging Face teachers share this: wide logits (a well-defined top-k ranking) and the
# test tokenizer's special id.
HF_COMMON = dict(initializer_range=0.3, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="session")
def hf_teacher(tmp_path_factory, tok_dir) -> Path:
    """A random Hugging Face GPT-2 folder (save_pretrained) with the test tokenizer in it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2, **HF_COMMON
    )
    model = transformers.GPT2LMHeadModel(config)
    return save_hf_teacher(tmp_path_factory.mktemp("hf-teacher"), tok_dir, model)


@pytest.fixture(scope="session")
def mistral_teacher(tmp_path_factory, tok_dir) -> Path:
    """A random Hugging Face Mistral folder with an 8-token sliding window: documents longer
    than the window show whether packing keeps the model's own mask."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        sliding_window=8,
        **HF_COMMON,
    )
    model = transformers.MistralForCausalLM(config)
    return save_hf_teacher(tmp_path_factory.mktemp("mistral-teacher"), tok_dir, model)
