"""Distill from a kdcache cache inside your own training loop: a Hugging Face GPT-2 student.

The library API is three pieces: ``CacheBatches`` (shuffled, resumable batches of the cache),
``build_loss`` and ``chunked_loss`` (the KD loss from the student's final hidden states and
head, a chunk of positions at a time). In a Hugging Face ``Trainer`` put the body of ``step``
into ``compute_loss``; in Lightning, into ``training_step``.

    python examples/own_loop.py CACHE [--steps 50] [--loss forward_kl_tail]
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdcache import Batch, CacheBatches, CacheReader, build_loss, chunked_loss


def step(model: GPT2LMHeadModel, loss_fn, batch: Batch) -> torch.Tensor:
    rows = batch.valid  # (B, T) real positions; the loss masks rows without targets
    # input_ids with the padding mask; on a --pack cache, position_ids that restart at every
    # document instead, so the student keeps documents apart as the teacher did.
    hidden = model.transformer(**batch.model_inputs()).last_hidden_state  # (B, T, C)
    return chunked_loss(
        loss_fn,
        hidden[rows],  # (N, C)
        model.lm_head,
        topk_ids=batch.topk_ids[rows],  # (N, k)
        topk_logprobs=batch.topk_logprobs[rows].float(),
        log_tail=batch.log_tail[rows],
        mask=batch.target_mask[rows] & batch.has_topk[rows],
        labels=batch.labels[rows],
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("cache")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--loss", default="forward_kl_tail")
    args = ap.parse_args()

    cache = CacheReader(args.cache)
    seq_len = int(cache.manifest["settings"].get("seq_len") or 1024)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=cache.vocab_size, n_positions=seq_len, n_embd=64, n_layer=2, n_head=2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss(args.loss)
    loader = torch.utils.data.DataLoader(
        CacheBatches(args.cache, batch_size=8, seed=0), batch_size=None, num_workers=1
    )
    done = 0
    while done < args.steps:
        for batch in loader:
            loss = step(model, loss_fn, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done % 10 == 0 or done == args.steps:
                print(f"step {done}: loss {loss.item():.4f}")
            if done == args.steps:
                break


if __name__ == "__main__":
    main()
