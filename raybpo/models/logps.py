"""Batched sequence log-probabilities: logp(y|x) = SUM of the response tokens' log-probs (prompt masked).

A preference batch runs chosen and rejected sequences in ONE forward pass: the two are stacked into
a (2B, L) batch, right-padded. Batches are formed by length bucketing to limit padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def collate(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, response ids) pairs -> right-padded `input_ids`, `attention_mask`, `response_mask`."""
    length = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor([*prompt, *response])
        attention_mask[i, :n] = 1
        response_mask[i, len(prompt) : n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """B pairs -> one (2B, L) batch: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected."""
    return collate([*zip(prompts, chosen, strict=True), *zip(prompts, rejected, strict=True)], pad_id)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, shape (B, L-1), computed in float32."""
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits, 2, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response-token log-probs of every row of a collated batch, shape (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return (token_logps(logits, batch["input_ids"]) * batch["response_mask"][:, 1:]).sum(-1)


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs from one forward over a `collate_pairs` batch."""
    logps = sequence_logps(model, batch)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0, bucket_batches: int = 16
) -> list[list[int]]:
    """Full index batches of similar length, the same on every worker for a (seed, epoch).

    Shuffle, cut into chunks of `bucket_batches` batches, sort each chunk by length, cut it into
    batches, then shuffle the batch order: little padding, yet every epoch mixes differently. The
    remainder (fewer than `batch_size` rows) is left out of this epoch, as `drop_last` does.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))[: len(lengths) - len(lengths) % batch_size]
    lengths = np.asarray(lengths)
    chunk = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
