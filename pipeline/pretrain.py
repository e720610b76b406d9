"""Train the built-in GPT on text with hard labels: how the demo gets a teacher.

nanoGPT's loop, read top to bottom: tokenize the documents once into one flat token stream
(BOS/EOS per document, as stage one does), sample random windows, AdamW with warmup + cosine,
evaluate on held-out text, save a teacher folder that ``kdcache cache --teacher`` takes:

    OUT/model.pt            the checkpoint (config inside)
    OUT/tokenizer.json      the tokenizer it was trained with (+ tokenizer_config.json)
    OUT/metrics.json        held-out cross-entropy, parameters, tokens, time (numbers only)
    OUT/config.json         the resolved config it was trained with
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdcache.stages.capture.sources import iter_documents, tokenize
from kdcache.stages.models.devices import pick_device
from kdcache.stages.models.gpt import GPT, GPTConfig, save_checkpoint
from kdcache.stages.models.tokenizer import load_tokenizer, save_tokenizer
from kdcache.stages.train import warmup_cosine
from kdcache.storage.durable import write_json_durable
from kdcache.storage.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    data: str  # training text (any --data source of stage one)
    tokenizer: str
    out: str
    heldout: str | None = None  # held-out text for the reported cross-entropy
    size: str = "micro"
    block_size: int = 256
    steps: int = 2000
    batch_size: int = 16  # windows per step
    lr: float = 3e-3
    warmup: int = 100
    seed: int = 0
    max_seconds: float | None = None  # stop early (and say so) when this budget is spent
    device: str = "auto"
    progress: bool = True


def token_stream(data: str, tok) -> np.ndarray:
    """All documents as one (N,) int64 stream, each with the BOS/EOS policy of stage one."""
    parts = [tokenize(doc, tok).ids for doc in iter_documents(Path(data))]
    if not parts:
        raise ConfigError(f"--data {data} holds no documents to train on")
    return np.concatenate(parts)


def _windows(
    stream: np.ndarray, rng: np.random.Generator, batch: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = rng.integers(0, len(stream) - block - 1, size=batch)
    x = np.stack([stream[s : s + block] for s in starts])
    y = np.stack([stream[s + 1 : s + block + 1] for s in starts])
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def heldout_ce(model: GPT, stream: np.ndarray, block: int, device, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy over non-overlapping windows of the held-out stream."""
    model.eval()
    n = min(max_windows, (len(stream) - 1) // block)
    total, count = 0.0, 0
    for i in range(0, n, 16):
        idx = range(i, min(i + 16, n))
        x = torch.from_numpy(np.stack([stream[j * block : (j + 1) * block] for j in idx])).to(
            device
        )
        y = torch.from_numpy(
            np.stack([stream[j * block + 1 : (j + 1) * block + 1] for j in idx])
        ).to(device)
        logits = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train()
    return total / max(count, 1)


def run_pretrain(cfg: PretrainConfig) -> dict:
    device = pick_device(cfg.device)
    tok = load_tokenizer(cfg.tokenizer)
    train = token_stream(cfg.data, tok)
    heldout = token_stream(cfg.heldout, tok) if cfg.heldout else None
    if len(train) < cfg.block_size + 2:
        raise ConfigError(
            f"--data {cfg.data} has {len(train)} tokens; expected more than --block-size {cfg.block_size}"
        )
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = GPT(GPTConfig.from_size(cfg.size, tok.vocab_size, cfg.block_size)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, unit="step", desc=f"teacher {cfg.size}", disable=not cfg.progress)
    step = 0
    loss = torch.tensor(float("nan"))
    while step < cfg.steps:
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
            log.warning(
                "time budget of %.0fs spent after %d of %d steps", cfg.max_seconds, step, cfg.steps
            )
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup, cfg.steps, 0.1)
        x, y = _windows(train, rng, cfg.batch_size, cfg.block_size)
        x, y = x.to(device), y.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out / "model.pt")
    save_tokenizer(tok, out)
    metrics = {  # numbers only: what `dvc metrics show` / `dvc exp show` compare
        "params": model.num_parameters(non_embedding=False),
        "steps": step,
        "tokens": step * cfg.batch_size * cfg.block_size,
        "train_tokens_available": int(len(train)),
        "train_loss": float(loss.detach()),
        "train_seconds": round(seconds, 2),
        "heldout_ce": heldout_ce(model, heldout, cfg.block_size, device)
        if heldout is not None
        else None,
    }
    write_json_durable(out / "config.json", {"config": asdict(cfg)})
    write_json_durable(out / "metrics.json", metrics)
    return metrics
