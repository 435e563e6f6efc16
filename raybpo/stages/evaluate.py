"""The `evaluate` stage: win rates of the trained policies against the SFT policy (docs/ALGORITHMS.md 3.4).

The Ray part of evaluation: sampling and judging. The win-rate maths and tables are `raybpo.metrics.winrates`
(free of Ray); the reward models' metrics are `raybpo.metrics.reward`, called by the reward stage.

Policies: the `train` stage's policy, and every variant of `evaluate.variants` (the stage `train-<name>`, on a
depth selection and/or with config overrides, that the pipeline plans and runs before this stage, see
raybpo/graph.py; this stage trains nothing), each against the SFT policy (the reference of training) on held-out
prompts:
- prompts: the benchmark's `ingest/benchmark/eval_prompts.jsonl` when the run ingested it, else the
  distinct prompts of the ingested pairs in the `eval` split (`train.eval_fraction`) that no training-split
  pair shares; the first `evaluate.num_prompts` of them;
- samples: `evaluate.samples_per_prompt` per prompt and policy, sample i of a prompt drawn with the seed
  `sample_seed(seed, prompt_key, i)` by every policy (`raybpo.models.generation.PolicySampler`, the generate
  stage's `HfGenerator` for each policy, in a Ray Data actor pool), so each comparison is paired;
- judge (`evaluate.judge`): `oracle` (the benchmark's ground truth, `benchmark.mean_utility`),
  `reward_model` or `judge` (an LLM judge), the score stage's scorers, scoring every response alone;
- outcomes, win rates and their intervals: `raybpo.metrics.winrates`; a comparison with a failed
  judgement (either side) is quarantined with the judge's reason, not lost;
- every win rate comes with its data budget: the training pairs and distinct prompts it was trained on.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raybpo import artifacts
from raybpo.artifacts import (
    BENCHMARK_EVAL_PROMPTS,
    COMPARISONS_FILE,
    EVALUATE,
    EVALUATE_QUARANTINE,
    EVALUATION,
    INGEST,
    INGESTED_PAIRS,
    JUDGEMENTS_QUARANTINE,
    TRAIN,
    WINRATES_PLOT,
    WINRATES_TABLE,
    in_stage,
    ingested_pairs,
    judge_model,
    prepared_inputs,
    read_table,
    reference_model,
    relpath,
    trained_pairs,
)
from raybpo.cluster import actor_pool, init_ray
from raybpo.config import Config, ConfigError, GenerateConfig, variant_stage
from raybpo.data.schema import prompt_key
from raybpo.data.splits import split_of
from raybpo.metrics.winrates import BASELINE, compare, plot_winrates, summarize, winrate_markdown
from raybpo.models.generation import PolicySampler
from raybpo.rundir import (
    MANIFEST,
    NO_CONTEXT,
    RunDir,
    StageContext,
    StageCounts,
    StageMissingError,
    StageResult,
    require_stage,
    run_stage,
    stage_identity,
)
from raybpo.scoring.pick import Scorer, make_scorer, score_all

STAGE = EVALUATE
MAIN = TRAIN


def held_out_prompts(cfg: Config, run_dir: RunDir) -> tuple[list[str], str]:
    """The prompts to evaluate on (see the module docstring) and where they come from; at most `num_prompts`."""
    require_stage(run_dir, INGEST)
    if run_dir.exists(*BENCHMARK_EVAL_PROMPTS):
        source = relpath(BENCHMARK_EVAL_PROMPTS)
        lines = run_dir.read_bytes(source).decode().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    else:
        table = ingested_pairs(run_dir, ["pair_id", "prompt"])
        split = {"train": set(), "eval": set()}
        by_key: dict[str, str] = {}
        for pair_id, prompt in zip(table["pair_id"].to_pylist(), table["prompt"].to_pylist(), strict=True):
            key = prompt_key(prompt)
            split[split_of(pair_id, cfg.train.eval_fraction)].add(key)
            by_key.setdefault(key, prompt)
        prompts = [by_key[k] for k in sorted(split["eval"] - split["train"])]
        source = (
            f"{relpath(INGESTED_PAIRS)}, eval split (train.eval_fraction={cfg.train.eval_fraction:g}) "
            "without training prompts"
        )
    distinct: dict[str, str] = {}
    for prompt in prompts:
        distinct.setdefault(prompt_key(prompt), prompt)
    prompts = list(distinct.values())
    if not prompts:
        raise ConfigError(f"no held-out prompts in {source}: raise train.eval_fraction above 0 and rerun train")
    return prompts[: cfg.evaluate.num_prompts], source


@dataclass(frozen=True)
class Policy:
    """A trained policy under evaluation: its stage (`train` or `train-<variant>`), model and manifest."""

    stage: str
    variant: str | None
    model: str
    manifest: dict[str, Any]


def trained_policy(run_dir: RunDir, stage: str, variant: str | None = None) -> Policy:
    """The merged policy a finished train stage wrote (a clear error when it wrote none)."""
    if variant is not None and not run_dir.exists(stage, MANIFEST):
        raise StageMissingError(
            f"{run_dir.uri_of(stage)} has no finished run (no {MANIFEST}): the variant {variant!r} of "
            f"evaluate.variants is the stage {stage}: run `raybpo train --variant {variant}` (or `raybpo run`) first"
        )
    source = artifacts.trained_policy(run_dir, stage)
    return Policy(stage, variant, source.uri, source.manifest)


def trained_selection(manifest: dict[str, Any]) -> str:
    """Which pairs a train stage used: `ingested` (all of them) or the depth stage's selection (bpo, random, ...)."""
    parts = trained_pairs(manifest)
    return "ingested" if parts == INGESTED_PAIRS else parts[-1]


def data_budget(run_dir: RunDir, stage: str) -> tuple[int, int]:
    """(pairs, distinct prompts) a train stage trained on: its prepared training-split pairs that fit."""
    prepared = read_table(run_dir, prepared_inputs(stage), ["pair_id", "split", "reason"])
    used = prepared.filter(pc.and_(pc.equal(prepared["split"], "train"), pc.equal(prepared["reason"], "")))
    ids = set(used["pair_id"].to_pylist())
    pairs = read_table(run_dir, trained_pairs(run_dir.read_json(f"{stage}/{MANIFEST}")), ["pair_id", "prompt"])
    prompts = {
        prompt_key(p)
        for i, p in zip(pairs["pair_id"].to_pylist(), pairs["prompt"].to_pylist(), strict=True)
        if i in ids
    }
    return len(ids), len(prompts)


def loss_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """loss, alpha, rho, beta0 of a train stage, and a label: `beta-DPO (alpha=.., rho=.., beta0=..)` or `DPO (..)`."""
    train = manifest["config"]["train"]
    settings = {k: train[k] for k in ("loss", "alpha", "rho", "beta0")}
    loss, beta0 = train["loss"].upper(), f"beta0={train['beta0']:g}"
    if train["alpha"] == 0 and train["rho"] == 1:
        return {**settings, "loss_label": f"{loss} ({beta0})"}
    return {**settings, "loss_label": f"beta-{loss} (alpha={train['alpha']:g}, rho={train['rho']:g}, {beta0})"}


def sampling_config(cfg: Config) -> GenerateConfig:
    """The generate stage's settings for evaluation samples, from `evaluate`."""
    e = cfg.evaluate
    return GenerateConfig(
        n=e.samples_per_prompt,
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        max_prompt_length=e.max_prompt_length,
        batch_size=e.batch_size,
        concurrency=e.concurrency,
        num_cpus=e.num_cpus,
        num_gpus=e.num_gpus,
    )


def judge_setup(cfg: Config, run_dir: RunDir) -> Scorer:
    """The judge `evaluate.judge` names, with what identifies it in the manifest (never an API key)."""
    model, identity = None, ""
    if cfg.evaluate.judge == "reward_model":
        source = judge_model(cfg, run_dir)
        model, identity = source.uri, source.identity
    judge = cfg.evaluate.llm_judge or cfg.score.judge
    return make_scorer(cfg.evaluate.judge, judge, model, identity, cfg.reward.max_length, cfg.evaluate.num_gpus)


def sample_all(cfg: Config, models: list[tuple[str, str]], prompts: list[str]) -> ray.data.Dataset:
    """Every (policy name, model)'s `samples_per_prompt` seeded responses to every prompt: a Ray Data actor pool."""
    keys = [prompt_key(p) for p in prompts]
    blocks = [
        pa.table(
            {"policy": [name] * len(prompts), "model": [model] * len(prompts), "prompt": prompts, "prompt_key": keys}
        )
        for name, model in models
    ]
    sampling = sampling_config(cfg)
    return ray.data.from_arrow(blocks).map_batches(
        PolicySampler,
        fn_constructor_kwargs={
            "policy": cfg.policy.model_dump(mode="json"),
            "generate": sampling.model_dump(mode="json"),
            "seed": cfg.seed,
        },
        batch_format="pyarrow",
        batch_size=max(1, sampling.batch_size // sampling.n),
        compute=actor_pool(sampling.concurrency),
        num_cpus=sampling.num_cpus,
        num_gpus=sampling.num_gpus,
    )


def policy_result(run_dir: RunDir, policy: Policy, comparisons: pa.Table, confidence: float) -> dict[str, Any]:
    """A policy's line of evaluation.json: what it was trained on (selection, loss, budget) and how it did."""
    pairs, prompts = data_budget(run_dir, policy.stage)
    return {
        "name": policy.stage,
        "variant": policy.variant,
        "selection": trained_selection(policy.manifest),
        **loss_settings(policy.manifest),
        "pairs": pairs,
        "prompts": prompts,
        "model": policy.model,
        **summarize(comparisons, policy.stage, confidence),
    }


def run_evaluate(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `evaluate` stage: win rates vs SFT of `train` and of every variant's stage `train-<name>`, into
    `evaluate/`. It trains nothing: the pipeline runs the variants before it (raybpo/graph.py)."""
    run_dir = RunDir(cfg.run_dir)
    reference = reference_model(cfg, run_dir)
    baseline, baseline_manifest = reference.uri, reference.manifest
    policies = [trained_policy(run_dir, MAIN)]
    policies += [trained_policy(run_dir, variant_stage(name), name) for name in cfg.evaluate.variants]
    prompts, prompt_source = held_out_prompts(cfg, run_dir)
    judge = judge_setup(cfg, run_dir)
    inputs = {
        "prompts": stage_identity(require_stage(run_dir, INGEST)),
        BASELINE: stage_identity(baseline_manifest),
        **{p.stage: stage_identity(p.manifest) for p in policies},
        "judge": judge.identity,
    }

    def body(stage_path: str) -> StageCounts:
        models = [(BASELINE, baseline), *((p.stage, p.model) for p in policies)]
        responses = score_all(sample_all(cfg, models, prompts), judge)
        comparisons = compare(responses, [p.stage for p in policies], prompts, cfg.evaluate.samples_per_prompt)
        rows = [policy_result(run_dir, p, comparisons, cfg.evaluate.confidence) for p in policies]
        evaluation = {
            "judge": cfg.evaluate.judge,
            "labelled": judge.label,
            "baseline": {"name": BASELINE, "model": baseline},
            "eval_prompts": len(prompts),
            "prompt_source": prompt_source,
            "samples_per_prompt": cfg.evaluate.samples_per_prompt,
            "confidence": cfg.evaluate.confidence,
            "interval": "normal interval on the mean outcome (win 1, tie 0.5, loss 0), sample std, clipped to [0, 1]",
            "policies": rows,
        }
        run_dir.write_json(relpath(EVALUATION), evaluation)
        run_dir.write_bytes(relpath(WINRATES_TABLE), winrate_markdown(evaluation).encode())
        run_dir.write_bytes(relpath(WINRATES_PLOT), plot_winrates(evaluation))
        pq.write_table(comparisons, run_dir.path(*COMPARISONS_FILE), filesystem=run_dir.fs)
        failed = responses.filter(pc.not_equal(responses["reason"], ""))
        if failed.num_rows:
            run_dir.makedirs(*EVALUATE_QUARANTINE)
            pq.write_table(failed, run_dir.path(*JUDGEMENTS_QUARANTINE), filesystem=run_dir.fs)
        reasons = Counter(r for r in comparisons["reason"].to_pylist() if r)
        main = rows[0]
        return StageCounts(
            rows_in=comparisons.num_rows,
            rows_out=comparisons.num_rows - sum(reasons.values()),
            rows_quarantined=sum(reasons.values()),
            quarantine_reasons=dict(reasons),
            extra={
                "win_rate": main["win_rate"],
                "final_metrics": {k: main[k] for k in ("win_rate", "ci_low", "ci_high") if main[k] is not None},
                "judge": cfg.evaluate.judge,
                "eval_prompts": len(prompts),
                "judgements_failed": failed.num_rows,
                "policies": {
                    r["name"]: {k: r[k] for k in ("pairs", "prompts", "wins", "ties", "losses", "win_rate")}
                    for r in rows
                },
                "outputs": {
                    "evaluation": in_stage(EVALUATION),
                    "table": in_stage(WINRATES_TABLE),
                    "plot": in_stage(WINRATES_PLOT),
                    "comparisons": in_stage(COMPARISONS_FILE),
                    **({"quarantine": in_stage(EVALUATE_QUARANTINE, folder=True)} if failed.num_rows else {}),
                },
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("policy", "evaluate"), inputs, body)
