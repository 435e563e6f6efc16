"""Stable splits of the pairs, functions of `pair_id` alone, so every stage and every rerun agree on them.

- `split_of`: `train` or `eval`; the same `eval_fraction` holds out the same pairs in every stage (sft, reward,
  train, and the evaluation's held-out prompts).
- `judge_half`: 0 or 1, independent of the eval split: `reward.judge_model` trains the candidates' scorer and
  the evaluation's judge on the two halves.
"""

from __future__ import annotations

import hashlib


def split_of(pair_id: str, eval_fraction: float) -> str:
    """`eval` for a stable `eval_fraction` share of pair ids (by hash), else `train`."""
    return "eval" if int(pair_id[:8], 16) / 0x1_0000_0000 < eval_fraction else "train"


def judge_half(pair_id: str) -> int:
    """0 or 1, a stable half of the pair ids independent of the eval split: `reward.judge_model`'s two halves."""
    return hashlib.sha256(f"judge:{pair_id}".encode()).digest()[0] % 2
