"""The scorers of the score and evaluate stages, one interface (docs/ALGORITHMS.md 3.2).

A scorer is a Ray Data `map_batches` callable taking a pyarrow batch of candidates (prompt, response, ...) to
the same rows as `SCORED`, each with its `score` and a `reason` ("" when scored; a failed judgement keeps a
null score and its reason):
- `reward_model` (`raybpo.scoring.reward_model.RewardModelScorer`, an actor): a one-output
  sequence-classification model;
- `judge` (`JudgeScorer`, one actor holding one client): an LLM judge at an OpenAI-compatible URL
  (`raybpo.scoring.judge.JudgeClient.score_many`: concurrent, rate-limited, retried; the API key from the
  environment variable named in the config);
- `oracle` (`oracle_batch`, a function): the built-in benchmark's ground-truth utility (its source average).

`raybpo.scoring.pick` picks one for a stage and runs it over a dataset (the oracle in the driver, the others as
one actor). This module imports no model library: a Ray worker that runs `JudgeScorer` loads no torch.
"""

from __future__ import annotations

import pyarrow as pa

from raybpo.config import JudgeConfig
from raybpo.data import benchmark
from raybpo.scoring.judge import JudgeClient

SCORED = pa.schema(
    [
        ("prompt_key", pa.string()),
        ("prompt", pa.string()),
        ("candidate", pa.int32()),
        ("origin", pa.string()),
        ("response", pa.string()),
        ("score", pa.float64()),
        ("reason", pa.string()),
    ]
)


def with_scores(batch: pa.Table, scores: list, reasons: list[str]) -> pa.Table:
    """`batch`'s SCORED columns with `score` and `reason` set."""
    columns = {name: batch[name] for name in SCORED.names if name in batch.column_names}
    return pa.table({**columns, "score": pa.array(scores, pa.float64()), "reason": reasons}, schema=SCORED)


class JudgeScorer:
    """Ray Data actor holding ONE judge client, so its concurrency and rate limit hold for the whole job."""

    def __init__(self, judge: dict):
        self.client = JudgeClient(JudgeConfig.model_validate(judge))

    def __call__(self, batch: pa.Table) -> pa.Table:
        """A failed judgement keeps its reason and a null score (it is quarantined, not lost)."""
        items = list(zip(batch["prompt"].to_pylist(), batch["response"].to_pylist(), strict=True))
        judgements = self.client.score_many(items)
        return with_scores(batch, [j.score for j in judgements], [j.reason or "" for j in judgements])


def oracle_batch(batch: pa.Table) -> pa.Table:
    """map_batches: the benchmark's ground-truth utility, averaged over its sources."""
    scores = [
        benchmark.mean_utility(p, r)
        for p, r in zip(batch["prompt"].to_pylist(), batch["response"].to_pylist(), strict=True)
    ]
    return with_scores(batch, scores, [""] * len(scores))
