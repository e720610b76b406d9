"""The student: loaded (built-in size, Hugging Face config or model, checkpoint, factory) and
checked against the cache (same ids mean the same strings; every real token id covered)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdcache.stages.models.adapters import HFLM, BuiltinLM, CausalLM, load_model
from kdcache.stages.train.config import TrainConfig
from kdcache.storage.errors import ConfigError
from kdcache.storage.reader import CacheReader

log = logging.getLogger(__name__)


def load_student(
    cfg: TrainConfig, vocab_size: int, block_size: int, device: torch.device
) -> CausalLM:
    """A built-in GPT by size name (random init, sized for the cache), a Hugging Face config
    folder (random init) or model folder, a built-in checkpoint, or module:factory."""
    from kdcache.stages.models.gpt import GPT, SIZES, GPTConfig

    torch.manual_seed(cfg.seed)
    if cfg.student in SIZES:
        model = GPT(GPTConfig.from_size(cfg.student, vocab_size, block_size)).to(device)
        return BuiltinLM(cfg.student, model, vocab_size, block_size, tokenizer_path=None)
    path = Path(cfg.student)
    has_weights = path.is_dir() and any(
        p.suffix in (".safetensors", ".bin") for p in path.iterdir()
    )
    if path.is_dir() and (path / "config.json").is_file() and not has_weights:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as e:
            raise ConfigError(
                "a Hugging Face student needs the extra: pip install 'kdcache[hf]'"
            ) from e
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(path, local_files_only=True)
        )
        model.to(device)
        vocab = model.get_output_embeddings().weight.shape[0]
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        tok = path if (path / "tokenizer.json").is_file() else None
        return HFLM(cfg.student, model, vocab, max_pos, tokenizer_path=tok)
    return load_model(cfg.student, device)


def check_student(student: CausalLM, cache: CacheReader, cfg: TrainConfig) -> None:
    """Same ids must mean the same strings; the student must cover every real token id."""
    from kdcache.stages.models.gpt import SIZES
    from kdcache.stages.models.tokenizer import load_tokenizer

    cached_tok = cache.manifest["fingerprints"].get("tokenizer") or {}
    needed = int(cached_tok.get("vocab_size") or cache.vocab_size)
    if student.vocab_size < needed:
        raise ConfigError(
            f"the student outputs {student.vocab_size:,} tokens but the cache's tokenizer has {needed:,}; "
            "use a student with an output size >= the tokenizer's vocabulary"
        )
    if isinstance(student, BuiltinLM) and cfg.student in SIZES:
        return  # a fresh built-in student is sized for this cache: same ids by construction
    tok_path = cfg.tokenizer or student.tokenizer_path
    if tok_path is None or not cached_tok.get("sha256"):
        msg = (
            f"the student {cfg.student} has no tokenizer to compare with the cache's"
            if tok_path is None
            else f"the cache {cfg.cache} records no tokenizer fingerprint to compare with {tok_path}"
        )
        if cfg.tokenizer_check:
            raise ConfigError(
                f"{msg}; pass --tokenizer, or --tokenizer-check off if its ids match the cache's"
            )
        log.warning("%s; trusting --tokenizer-check off", msg)
        return
    fp = load_tokenizer(tok_path).fingerprint
    if fp != cached_tok["sha256"]:
        msg = (
            f"the student's tokenizer ({tok_path}, sha256 {fp[:12]}) differs from the cache's "
            f"(sha256 {cached_tok['sha256'][:12]}): the same ids would mean other strings"
        )
        if cfg.tokenizer_check:
            raise ConfigError(
                msg + "; use a student with the teacher's tokenizer, or --tokenizer-check off"
            )
        log.warning("%s (--tokenizer-check off)", msg)
