"""Which scorer a stage uses (`score.scorer`, `evaluate.judge`), and one way to run it over a Ray dataset."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from raybpo.cluster import actor_pool
from raybpo.config import JudgeConfig
from raybpo.data import benchmark
from raybpo.scoring.reward_model import RewardModelScorer
from raybpo.scoring.scorers import SCORED, JudgeScorer, oracle_batch


@dataclass(frozen=True)
class Scorer:
    """A scorer (an actor class, or the oracle's function when `args` is None), its identity and label, and the
    GPUs its actor asks for."""

    fn: Any
    args: dict[str, Any] | None
    identity: str
    label: str
    num_gpus: float = 0.0


def make_scorer(
    kind: str,
    judge: JudgeConfig,
    reward_model: str | None,
    reward_identity: str,
    max_length: int,
    num_gpus: float = 0.0,
) -> Scorer:
    """The scorer `kind` names (`reward_model`: the model `reward_model`, identified by `reward_identity`, its actor
    on `num_gpus` GPUs; `judge`: an LLM judge; `oracle`)."""
    if kind == "reward_model":
        args = {"model": reward_model, "max_length": max_length}
        identity = f"{reward_identity}#max_length={max_length}"
        return Scorer(RewardModelScorer, args, identity, f"reward model {reward_model}", num_gpus)
    if kind == "judge":
        settings = judge.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return Scorer(JudgeScorer, {"judge": settings}, f"judge:{digest}", f"LLM judge {judge.model} at {judge.url}")
    return Scorer(
        oracle_batch, None, f"oracle:benchmark-{benchmark.GENERATOR_VERSION}", "oracle: the benchmark's ground truth"
    )


def score_all(dataset: ray.data.Dataset, scorer: Scorer) -> pa.Table:
    """Every row of `dataset` scored alone (SCORED rows); a failed judgement keeps a null score and its reason.

    A reward model or LLM judge runs as one actor fed by the dataset's pipeline; the oracle, a pure function of
    the text, scores the collected rows in the driver (no worker to start for it).
    """
    if scorer.args is not None:
        dataset = dataset.map_batches(
            scorer.fn,
            fn_constructor_kwargs=scorer.args,
            batch_format="pyarrow",
            batch_size=256,
            compute=actor_pool(1),
            num_gpus=scorer.num_gpus,
        )
    tables = ray.get(dataset.materialize().to_arrow_refs())
    if scorer.args is None:
        tables = [scorer.fn(t) for t in tables if t.num_rows]
    return pa.concat_tables([t.cast(SCORED) for t in tables]) if tables else SCORED.empty_table()
