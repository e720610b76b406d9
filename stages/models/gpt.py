"""The built-in GPT: a small decoder-only transformer in the style of nanoGPT.

Pre-LN blocks, causal self-attention through ``F.scaled_dot_product_attention``, learned
position embeddings and an ``lm_head`` tied to the token embedding. Two additions over nanoGPT:

- packed sequences: ``segment_ids`` (B, T) numbers the documents inside a row; attention is then
  block-diagonal *and* causal, and ``position_ids`` restart at each document start, so a packed
  document gets exactly the logits it would get alone;
- ``hidden_states()`` + ``lm_head``, so the loss can compute logits a chunk of positions at a
  time instead of materialising (B, T, V) at once.

Checkpoints are one ``torch.save`` file that carries its own format name, version and config.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from kdcache.storage.durable import write_durable
from kdcache.storage.errors import ConfigError, FormatVersionError

CHECKPOINT_FORMAT = "kdcache-gpt"
CHECKPOINT_VERSION = 1

# Named sizes. Parameter counts (non-embedding, ~12 * n_layer * n_embd^2) in the comments.
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=4, n_head=4, n_embd=64),  # ~0.2M: unit tests, CPU demo
    "micro": dict(n_layer=4, n_head=4, n_embd=128),  # ~0.8M
    "mini": dict(n_layer=6, n_head=4, n_embd=256),  # ~4.7M
    "small": dict(n_layer=8, n_head=8, n_embd=512),  # ~25M
    "base": dict(n_layer=16, n_head=12, n_embd=768),  # ~113M: GPU benchmark
}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0
    bias: bool = False  # bias in Linear and LayerNorm layers (False: a bit better and faster)

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.n_embd % self.n_head != 0:
            problems.append(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}; "
                "choose a width that is a multiple of the number of heads"
            )
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if problems:
            raise ConfigError("invalid GPTConfig: " + "; ".join(problems))

    @classmethod
    def from_size(cls, name: str, vocab_size: int, block_size: int, **overrides: Any) -> GPTConfig:
        """The named size ``name`` (see ``SIZES``) for this vocabulary and context length."""
        if name not in SIZES:
            raise ConfigError(
                f"unknown GPT size {name!r}; expected one of {', '.join(SIZES)}; "
                "pick one of these or give n_layer/n_head/n_embd explicitly"
            )
        return cls(vocab_size=vocab_size, block_size=block_size, **{**SIZES[name], **overrides})


def position_ids_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes along a row.

    (B, T) segment ids -> (B, T) long positions, e.g. [[0, 0, 0, 1, 1]] -> [[0, 1, 2, 0, 1]].
    """
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # (B, T) True at a document start
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    last_start = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # (B, T)
    return idx - last_start


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(  # (B, nh, T, hs)
            q,
            k,
            v,
            attn_mask=attn_mask,  # (B, 1, T, T) bool for packed rows, else None
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,  # lets SDPA pick the flash kernel for unpacked rows
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (V, C) matrix
        self.checkpointing = False  # activation checkpointing of the blocks (training)

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the token and position embeddings.

        The tied lm_head shares the token embedding, so it is counted once (or not at all).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C) after ``ln_f``; ``lm_head`` of them gives the logits."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ConfigError(
                f"sequence of length {T} exceeds the model's context "
                f"block_size={self.config.block_size}; use a shorter --seq-len or a stride"
            )
        for name, ids in (("position_ids", position_ids), ("segment_ids", segment_ids)):
            if ids is not None and ids.shape != input_ids.shape:
                raise ConfigError(
                    f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(ids.shape)}; pass one id per token"
                )
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)

        attn_mask = None
        if segment_ids is not None:
            # Packed rows: a token sees earlier tokens of its own document only.
            same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            attn_mask = (same_doc & causal)[:, None]  # (B, 1, T, T), broadcast over heads

        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():  # recompute in the backward
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return self.ln_f(x)  # (B, T, C)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, segment_ids))


_RESERVED_KEYS = ("format", "version", "config", "state_dict")


def save_checkpoint(
    model: GPT, path: str | os.PathLike, *, state_dict: dict | None = None, **extra: Any
) -> Path:
    """Write ``model`` (config + weights, or ``state_dict``'s weights: those gathered from a
    sharded run) and ``extra`` plain values to one file, atomically.

    ``extra`` values should be plain Python values or tensors (step, optimizer state, losses...):
    ``load_checkpoint`` reads with ``weights_only=True``.
    """
    clashes = sorted(set(extra) & set(_RESERVED_KEYS))
    if clashes:
        raise ConfigError(
            f"checkpoint extra keys {clashes} clash with the reserved keys {list(_RESERVED_KEYS)}; "
            "rename them"
        )
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": asdict(model.config),
        "state_dict": state_dict if state_dict is not None else model.state_dict(),
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durable(path, lambda f: torch.save(payload, f))  # never half a file under the name
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[GPT, dict[str, Any]]:
    """Read a file written by ``save_checkpoint``: the model (eval mode) and the extra values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no GPT checkpoint at {path}: the file does not exist; check the path")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"{path} is not a kdcache GPT checkpoint: torch.load failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a file written by kdcache's training stage"
        ) from e
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if found != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{path} is not a kdcache GPT checkpoint: expected format {CHECKPOINT_FORMAT!r}, "
            f"found {found!r}; pass a file written by kdcache's training stage"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise FormatVersionError(
            f"{path} is a {CHECKPOINT_FORMAT} checkpoint of version {payload.get('version')!r}; "
            f"this kdcache reads version {CHECKPOINT_VERSION}; upgrade kdcache"
        )
    try:
        config = GPTConfig(**payload["config"])
    except (KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} holds an incomplete or unknown GPT config ({e}); "
            "pass a file written by kdcache's training stage"
        ) from e
    model = GPT(config)
    model.load_state_dict(payload["state_dict"])
    model.to(map_location).eval()
    extra = {k: v for k, v in payload.items() if k not in _RESERVED_KEYS}
    return model, extra
