"""The `score` stage (Ray Data): a scalar per candidate, then candidate pairs (docs/ALGORITHMS.md 3.2).

Scorers (`score.scorer`, `raybpo.scoring.scorers`): `reward_model` (`score.reward_model`, default the reward
stage's `reward/model/`, e.g. the MORE-trained one), `judge` (an LLM judge) or `oracle` (the built-in benchmark's
ground truth, only for the benchmark, labelled `oracle` in the manifest and the pairs' `source`). The evaluate
stage judges policies' responses with the same scorers.

A candidate whose judgement fails for good is quarantined (`score/quarantine/`) with its reason; the
rest are paired per prompt by `uniform_pairs` (rank i with rank n+1-i) or `all_pairs`, dropping
pairs whose score gap is below `score.min_gap`, and written as canonical pairs
(`score/candidate_pairs/`, source `bpo:<scorer>`, the scores in `score_chosen` / `score_rejected`).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from itertools import combinations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raybpo.artifacts import (
    CANDIDATE_PAIRS,
    CANDIDATE_PAIRS_FILE,
    CANDIDATES,
    GENERATE,
    SCORE,
    SCORE_QUARANTINE,
    SCORE_QUARANTINE_FILE,
    SCORED_CANDIDATES,
    SCORED_CANDIDATES_FILE,
    in_stage,
    relpath,
    scorer_model,
)
from raybpo.cluster import init_ray
from raybpo.config import Config
from raybpo.data.schema import PAIR_SCHEMA, make_pair_id
from raybpo.rundir import (
    NO_CONTEXT,
    RunDir,
    StageContext,
    StageCounts,
    StageResult,
    require_stage,
    run_stage,
    stage_identity,
)
from raybpo.scoring.pick import make_scorer, score_all

STAGE = SCORE


def uniform_pairs(scores: list[float], min_gap: float) -> list[tuple[int, int]]:
    """(chosen, rejected) indices: rank 1 with rank n, rank 2 with rank n-1, ... by descending score.

    Ties in score keep the input order (a stable sort). A pair whose gap is below `min_gap` is dropped.
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    pairs = [(order[k], order[-1 - k]) for k in range(len(order) // 2)]
    return [(a, b) for a, b in pairs if scores[a] - scores[b] >= min_gap and scores[a] > scores[b]]


def all_pairs(scores: list[float], min_gap: float) -> list[tuple[int, int]]:
    """Every (better, worse) pair with a score gap of at least `min_gap` (and a strict preference)."""
    out = []
    for a, b in combinations(range(len(scores)), 2):
        hi, lo = (a, b) if scores[a] >= scores[b] else (b, a)
        if scores[hi] - scores[lo] >= min_gap and scores[hi] > scores[lo]:
            out.append((hi, lo))
    return out


def make_pairs(scored: pa.Table, rule: str, min_gap: float, source: str) -> pa.Table:
    """Canonical pairs of each prompt's scored candidates under the `uniform` or `all` rule."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in scored.sort_by([("prompt_key", "ascending"), ("candidate", "ascending")]).to_pylist():
        by_prompt[row["prompt_key"]].append(row)
    pick = uniform_pairs if rule == "uniform" else all_pairs
    out: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
    for key, rows in by_prompt.items():
        scores = [r["score"] for r in rows]
        for a, b in pick(scores, min_gap):
            chosen, rejected = rows[a], rows[b]
            if chosen["response"] == rejected["response"]:
                continue
            values = {
                "pair_id": make_pair_id(source, chosen["prompt"], chosen["response"], rejected["response"]),
                "prompt": chosen["prompt"],
                "chosen": chosen["response"],
                "rejected": rejected["response"],
                "source": source,
                "score_chosen": chosen["score"],
                "score_rejected": rejected["score"],
                "meta": json.dumps(
                    {
                        "prompt_key": key,
                        "candidates": [chosen["candidate"], rejected["candidate"]],
                        "origins": [chosen["origin"], rejected["origin"]],
                    }
                ),
            }
            for name in out:
                out[name].append(values[name])
    return pa.table(out, schema=PAIR_SCHEMA)


def run_score(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `score` stage: score `generate/candidates/`, quarantine failed judgements, write candidate pairs."""
    run_dir = RunDir(cfg.run_dir)
    generate = require_stage(run_dir, GENERATE)
    inputs = {"generate": stage_identity(generate)}
    model, identity = None, ""
    if cfg.score.scorer == "reward_model":
        reward = scorer_model(cfg, run_dir)
        model, identity = reward.uri, reward.identity
        inputs["reward_model"] = identity
    scorer = make_scorer(cfg.score.scorer, cfg.score.judge, model, identity, cfg.reward.max_length, cfg.score.num_gpus)

    def body(stage_path: str) -> StageCounts:
        candidates = ray.data.read_parquet(run_dir.path(*CANDIDATES), filesystem=run_dir.fs)
        table = score_all(candidates, scorer)
        bad = pc.not_equal(table["reason"], "")
        good, quarantined = table.filter(pc.invert(bad)), table.filter(bad)
        if quarantined.num_rows:
            run_dir.write_bytes(relpath(SCORE_QUARANTINE_FILE), _parquet_bytes(quarantined))
        run_dir.write_bytes(relpath(SCORED_CANDIDATES_FILE), _parquet_bytes(good))
        source = f"bpo:{cfg.score.scorer}"
        pairs = make_pairs(good, cfg.score.pairs, cfg.score.min_gap, source)
        run_dir.write_bytes(relpath(CANDIDATE_PAIRS_FILE), _parquet_bytes(pairs))
        reasons = Counter(quarantined["reason"].to_pylist())
        return StageCounts(
            rows_in=table.num_rows,
            rows_out=good.num_rows,
            rows_quarantined=quarantined.num_rows,
            quarantine_reasons=dict(reasons),
            extra={
                "scorer": cfg.score.scorer,
                "labelled": scorer.label if cfg.score.scorer == "oracle" else cfg.score.scorer,
                "pairs": pairs.num_rows,
                "pair_rule": cfg.score.pairs,
                "prompts": len(set(good["prompt_key"].to_pylist())),
                "outputs": {
                    "scored": in_stage(SCORED_CANDIDATES, folder=True),
                    "candidate_pairs": in_stage(CANDIDATE_PAIRS, folder=True),
                    **({"quarantine": in_stage(SCORE_QUARANTINE, folder=True)} if quarantined.num_rows else {}),
                },
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("score", "reward") if model else ("score",), inputs, body)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
