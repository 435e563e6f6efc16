"""Evaluation: reward models per source, and the `evaluate` stage's policy win rates against SFT.

Reward models (`evaluate_reward_models`, called by the reward stage): for every source's held-out pairs
(the `eval` split, a stable function of `pair_id`) and every model (or ensemble, whose reward is the mean
of its members'): accuracy (r_w > r_l), ECE with equal-width bins on sigmoid(r_w - r_l) (top-label), and
the mean and std of the rewards (reward drift between sources). Written as `reward.json`, `reward.md`, a
reliability diagram and reward distributions (PNG).

Policies (`run_evaluate`, docs/ALGORITHMS.md section 3.4): the `train` stage's policy, and every variant
of `evaluate.variants` (trained here as stage `train-<name>` on a depth selection and/or with config
overrides), each against the SFT policy (the reference of training) on held-out prompts:
- prompts: the benchmark's `ingest/benchmark/eval_prompts.jsonl` when the run ingested it, else the
  distinct prompts of the ingested pairs in the `eval` split (`train.eval_fraction`) that no training-split
  pair shares; the first `evaluate.num_prompts` of them;
- samples: `evaluate.samples_per_prompt` per prompt and policy, sample i of a prompt drawn with the seed
  `sample_seed(seed, prompt_key, i)` by every policy (`raybpo.models.generation.PolicySampler`, the generate
  stage's `HfGenerator` for each policy, in a Ray Data actor pool), so each comparison is paired;
- judge (`evaluate.judge`): `oracle` (the benchmark's ground truth, `benchmark.mean_utility`),
  `reward_model` or `judge` (an LLM judge), the score stage's scorers, scoring every response alone;
- outcome of a comparison: 1 when the policy's response scores higher than the SFT response of the same
  prompt and seed, 0 when lower, 0.5 for a tie (equal scores, or the same text);
- win rate: the mean outcome p over the n scored comparisons; its interval is the normal one on that
  mean, p -/+ z * s / sqrt(n), s the sample standard deviation of the outcomes (ddof 1), z the normal
  quantile of (1 + `evaluate.confidence`) / 2, clipped to [0, 1] (n = 1: [0, 1]; n = 0: none);
- a comparison with a failed judgement (either side) is quarantined with the judge's reason, not lost;
- every win rate comes with its data budget: the training pairs and distinct prompts it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

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
from raybpo.cluster import init_ray
from raybpo.config import Config, ConfigError, GenerateConfig, RewardConfig, VariantSpec, with_overrides
from raybpo.data import benchmark
from raybpo.data.schema import prompt_key
from raybpo.data.splits import split_of
from raybpo.losses import expected_calibration_error, preference_accuracy
from raybpo.models.generation import PolicySampler
from raybpo.models.reward import encode_texts, load_reward_model
from raybpo.plots import png_bytes, pyplot
from raybpo.rundir import (
    MANIFEST,
    RunDir,
    StageCounts,
    StageResult,
    require_stage,
    run_stage,
    stage_identity,
)
from raybpo.stages.score import SCORED, JudgeScorer, RewardModelScorer, oracle_batch
from raybpo.tables import markdown_table
from raybpo.train.dpo import run_train

SCORE_BATCH = 32


@torch.no_grad()
def score_pairs(model_dir: str | Path, prompts: list[str], chosen: list[str], rejected: list[str], max_length: int):
    """(r_chosen, r_rejected) as numpy arrays from a saved reward model, in batches of chosen + rejected."""
    model, tokenizer = load_reward_model(str(model_dir))
    model.eval()
    out_chosen, out_rejected = [], []
    for start in range(0, len(prompts), SCORE_BATCH):
        end = start + SCORE_BATCH
        batch = encode_texts(tokenizer, prompts[start:end] * 2, chosen[start:end] + rejected[start:end], max_length)
        rewards = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, 0].float().numpy()
        half = len(rewards) // 2
        out_chosen.append(rewards[:half])
        out_rejected.append(rewards[half:])
    return np.concatenate(out_chosen), np.concatenate(out_rejected)


def evaluate_reward_models(members: dict[str, list[Path]], pairs: dict[str, list], cfg: RewardConfig) -> dict[str, Any]:
    """{model name: {source: metrics}} on each source's eval split; an ensemble averages its members."""
    eval_rows = [i for i, pair_id in enumerate(pairs["pair_id"]) if split_of(pair_id, cfg.eval_fraction) == "eval"]
    columns = {k: [pairs[k][i] for i in eval_rows] for k in ("prompt", "chosen", "rejected", "source")}
    scored = {}
    for name, paths in members.items():
        rewards = [
            score_pairs(p, columns["prompt"], columns["chosen"], columns["rejected"], cfg.max_length) for p in paths
        ]
        scored[name] = (np.mean([r[0] for r in rewards], 0), np.mean([r[1] for r in rewards], 0))
    sources = sorted(set(columns["source"]))
    result: dict[str, Any] = {
        "sources": sources,
        "eval_pairs": {s: columns["source"].count(s) for s in sources},
        "models": {},
    }
    for name, (r_chosen, r_rejected) in scored.items():
        per_source = {}
        for source in sources:
            mask = np.array([s == source for s in columns["source"]])
            margin = torch.from_numpy(r_chosen[mask] - r_rejected[mask])
            both = np.concatenate([r_chosen[mask], r_rejected[mask]])
            per_source[source] = {
                "accuracy": preference_accuracy(margin),
                "ece": expected_calibration_error(margin, cfg.ece_bins),
                "reward_mean": float(both.mean()),
                "reward_std": float(both.std()),
                "margins": margin.tolist(),
                "rewards": both.tolist(),
            }
        accuracies = [m["accuracy"] for m in per_source.values()]
        all_margins = torch.tensor([x for m in per_source.values() for x in m["margins"]])
        result["models"][name] = {
            "per_source": per_source,
            "mean_accuracy": float(np.mean(accuracies)),
            "worst_accuracy": float(np.min(accuracies)),
            "ece": expected_calibration_error(all_margins, cfg.ece_bins),
            "reward_drift": float(np.std([m["reward_mean"] for m in per_source.values()])),
        }
    return result


def summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation without the per-pair margins and rewards (for manifests and JSON tables)."""
    return {
        **{k: v for k, v in evaluation.items() if k != "models"},
        "models": {
            name: {
                **{k: v for k, v in m.items() if k != "per_source"},
                "per_source": {
                    s: {k: v for k, v in metrics.items() if k not in ("margins", "rewards")}
                    for s, metrics in m["per_source"].items()
                },
            }
            for name, m in evaluation["models"].items()
        },
    }


def reward_table(evaluation: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The reward-model table's header and cells, one row per model (of an evaluation or its `summary`)."""
    sources = evaluation["sources"]
    header = ["model", *[f"acc {s}" for s in sources], "mean acc", "worst acc", "ECE", "reward drift"]
    rows = []
    for name, m in evaluation["models"].items():
        cells = [name, *[f"{m['per_source'][s]['accuracy']:.3f}" for s in sources]]
        cells += [
            f"{m['mean_accuracy']:.3f}",
            f"{m['worst_accuracy']:.3f}",
            f"{m['ece']:.4f}",
            f"{m['reward_drift']:.3f}",
        ]
        rows.append(cells)
    return header, rows


def reward_markdown(evaluation: dict[str, Any]) -> str:
    """The reward-model table and the held-out pairs per source."""
    pairs = ", ".join(f"{s}: {n}" for s, n in evaluation["eval_pairs"].items())
    return markdown_table(*reward_table(evaluation)) + f"\n\nHeld-out pairs per source: {pairs}.\n"


def write_reward_report(evaluation: dict[str, Any], out: Path) -> None:
    """reward.json, reward.md, reliability.png and rewards.png in `out`."""
    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    (out / "reward.json").write_text(json.dumps(summary(evaluation), indent=2, sort_keys=True))
    (out / "reward.md").write_text("# Reward models\n\n" + reward_markdown(evaluation))

    models, sources = evaluation["models"], evaluation["sources"]
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items(), strict=True):
        for source in sources:
            centers, accuracy = reliability(np.array(m["per_source"][source]["margins"]))
            ax.plot(centers, accuracy, marker="o", label=source)
        ax.plot([0.5, 1], [0.5, 1], "k--", linewidth=1)
        ax.set(title=f"{name} (ECE {m['ece']:.3f})", xlabel="confidence sigmoid(|r_w - r_l|)", ylabel="accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "reliability.png").write_bytes(png_bytes(fig))

    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items(), strict=True):
        for source in sources:
            ax.hist(m["per_source"][source]["rewards"], bins=30, alpha=0.5, label=source)
        ax.set(title=f"{name}: rewards (drift {m['reward_drift']:.2f})", xlabel="reward")
        ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "rewards.png").write_bytes(png_bytes(fig))


def reliability(margins: np.ndarray, bins: int = 10) -> tuple[list[float], list[float]]:
    """Mean top-label confidence and accuracy of each non-empty confidence bin (for the diagram)."""
    p = 1 / (1 + np.exp(-margins))
    confidence, correct = np.maximum(p, 1 - p), margins > 0
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    centers, accuracy = [], []
    for b in range(bins):
        if (index == b).any():
            centers.append(float(confidence[index == b].mean()))
            accuracy.append(float(correct[index == b].mean()))
    return centers, accuracy


def plot_lambda(history: list[dict[str, float]], path: Path) -> None:
    """MORE's lambda per source over training steps."""
    plt = pyplot()

    names = sorted({k for h in history for k in h if k.startswith("lambda/")})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in names:
        points = [(h["step"], h[name]) for h in history if name in h and math.isfinite(h[name])]
        ax.plot(*zip(*points, strict=True), label=name.removeprefix("lambda/"))
    ax.set(title="MORE loss weights", xlabel="step", ylabel="lambda", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.write_bytes(png_bytes(fig))


# -- policies: win rates against the SFT policy --------------------------------------------------------------

STAGE = EVALUATE
BASELINE = "sft"
MAIN = "train"
WIN, TIE, LOSS = 1.0, 0.5, 0.0
COMPARISONS = pa.schema(
    [
        ("policy", pa.string()),
        ("prompt_key", pa.string()),
        ("prompt", pa.string()),
        ("sample", pa.int32()),
        ("response", pa.string()),
        ("sft_response", pa.string()),
        ("score", pa.float64()),
        ("sft_score", pa.float64()),
        ("outcome", pa.float64()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class WinRate:
    """Counts of one policy's comparisons with SFT, the win rate (ties half) and its normal interval."""

    wins: int
    ties: int
    losses: int
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def comparisons(self) -> int:
        return self.wins + self.ties + self.losses


def outcome(score: float, sft_score: float, same_response: bool = False) -> float:
    """1 when the policy's response scores higher, 0 when lower, 0.5 on equal scores or the very same text."""
    if same_response or score == sft_score:
        return TIE
    return WIN if score > sft_score else LOSS


def win_rate(wins: int, ties: int, losses: int, confidence: float) -> WinRate:
    """The mean outcome p (win 1, tie 0.5, loss 0) and the normal interval p -/+ z * s / sqrt(n), in [0, 1].

    s is the sample standard deviation (ddof 1) of the n outcomes and z the normal quantile of
    (1 + confidence) / 2; one comparison gives the whole [0, 1], none gives no rate at all.
    """
    n = wins + ties + losses
    if n == 0:
        return WinRate(wins, ties, losses, None, None, None)
    p = (wins + TIE * ties) / n
    if n == 1:
        return WinRate(wins, ties, losses, p, 0.0, 1.0)
    squares = wins * (WIN - p) ** 2 + ties * (TIE - p) ** 2 + losses * (LOSS - p) ** 2
    half = NormalDist().inv_cdf((1 + confidence) / 2) * math.sqrt(squares / (n - 1) / n)
    return WinRate(wins, ties, losses, p, max(0.0, p - half), min(1.0, p + half))


def variant_config(cfg: Config, name: str, spec: VariantSpec) -> Config:
    """The run's config with a variant's overrides applied (dotted keys, validated like the command line)."""
    return with_overrides(cfg, spec.overrides, f"evaluate.variants.{name}.overrides")


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
    source = artifacts.trained_policy(run_dir, stage)
    return Policy(stage, variant, source.local(), source.manifest)


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


@dataclass(frozen=True)
class Judge:
    """A score stage scorer (an actor class, or the oracle's function when `args` is None), its identity and label."""

    scorer: Any
    args: dict[str, Any] | None
    identity: str
    label: str


def judge_setup(cfg: Config, run_dir: RunDir) -> Judge:
    """The judge `evaluate.judge` names, with what identifies it in the manifest (never an API key)."""
    if cfg.evaluate.judge == "reward_model":
        source = judge_model(cfg, run_dir)
        model, identity = source.local(), source.identity
        args = {"model": model, "max_length": cfg.reward.max_length}
        return Judge(RewardModelScorer, args, f"{identity}#max_length={cfg.reward.max_length}", f"reward model {model}")
    if cfg.evaluate.judge == "judge":
        judge = cfg.evaluate.llm_judge or cfg.score.judge
        settings = judge.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return Judge(JudgeScorer, {"judge": settings}, f"judge:{digest}", f"LLM judge {judge.model} at {judge.url}")
    identity = f"oracle:benchmark-{benchmark.GENERATOR_VERSION}"
    return Judge(oracle_batch, None, identity, "oracle: the benchmark's ground truth")


def judged(dataset: ray.data.Dataset, judge: Judge) -> pa.Table:
    """Every response scored alone (SCORED rows); a failed judgement keeps a null score and its reason.

    A reward model or LLM judge runs as one actor fed by the generation pipeline; the oracle, a pure
    function of the text, scores the collected responses in the driver (no worker to start for it).
    """
    if judge.args is not None:
        dataset = dataset.map_batches(
            judge.scorer,
            fn_constructor_kwargs=judge.args,
            batch_format="pyarrow",
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=1),
        )
    tables = ray.get(dataset.materialize().to_arrow_refs())
    if judge.args is None:
        tables = [judge.scorer(t) for t in tables if t.num_rows]
    return pa.concat_tables([t.cast(SCORED) for t in tables]) if tables else SCORED.empty_table()


def compare(responses: pa.Table, policies: list[str], prompts: list[str], samples: int) -> pa.Table:
    """One row per (policy, prompt, sample): both responses and scores, the outcome, or why it has none.

    A comparison whose policy or SFT response has no score (a failed judgement, or no response at all)
    gets a null outcome and that reason: it is quarantined, not dropped.
    """
    index = {(r["origin"], r["prompt_key"], r["candidate"]): r for r in responses.to_pylist()}
    missing = {"score": None, "response": None, "reason": "missing_response"}
    out: dict[str, list] = {name: [] for name in COMPARISONS.names}
    for policy in policies:
        for prompt in prompts:
            key = prompt_key(prompt)
            for sample in range(samples):
                mine = index.get((policy, key, sample), missing)
                base = index.get((BASELINE, key, sample), missing)
                reason = mine["reason"] or base["reason"] or ""
                result = None if reason else outcome(mine["score"], base["score"], mine["response"] == base["response"])
                values = (policy, key, prompt, sample, mine["response"], base["response"])
                values += (mine["score"], base["score"], result, reason)
                for name, value in zip(COMPARISONS.names, values, strict=True):
                    out[name].append(value)
    return pa.table(out, schema=COMPARISONS)


def summarize(comparisons: pa.Table, policy: str, confidence: float) -> dict[str, Any]:
    """A policy's counts, win rate, interval and mean scores (of its scored comparisons)."""
    rows = [r for r in comparisons.to_pylist() if r["policy"] == policy]
    scored = [r for r in rows if not r["reason"]]
    outcomes = Counter(r["outcome"] for r in scored)
    rate = win_rate(outcomes[WIN], outcomes[TIE], outcomes[LOSS], confidence)
    return {
        "comparisons": len(rows),
        "scored": len(scored),
        "quarantined": len(rows) - len(scored),
        "wins": rate.wins,
        "ties": rate.ties,
        "losses": rate.losses,
        "win_rate": rate.win_rate,
        "ci_low": rate.ci_low,
        "ci_high": rate.ci_high,
        "mean_score": float(np.mean([r["score"] for r in scored])) if scored else None,
        "mean_score_sft": float(np.mean([r["sft_score"] for r in scored])) if scored else None,
    }


WINRATE_HEADER = ("policy", "selection", "loss", "pairs", "prompts", "win rate vs SFT", "CI", "wins / ties / losses")


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def winrate_rows(evaluation: dict[str, Any]) -> list[list[str]]:
    """The win-rate table's cells (WINRATE_HEADER), one row per policy, numbers to 3 decimals."""
    return [
        [
            p["name"],
            p["selection"],
            p["loss_label"],
            str(p["pairs"]),
            str(p["prompts"]),
            _rate(p["win_rate"]),
            f"[{_rate(p['ci_low'])}, {_rate(p['ci_high'])}]",
            f"{p['wins']} / {p['ties']} / {p['losses']}",
        ]
        for p in evaluation["policies"]
    ]


def winrate_note(evaluation: dict[str, Any]) -> str:
    """What the table's numbers are: judge, prompts, samples, the interval and the quarantine."""
    level = f"{evaluation['confidence']:.0%}"
    quarantined = sum(p["quarantined"] for p in evaluation["policies"])
    return (
        f"Judge: {evaluation['labelled']}. {evaluation['eval_prompts']} held-out prompts "
        f"({evaluation['prompt_source']}) x {evaluation['samples_per_prompt']} seeded sample(s), "
        "the same seeds for the policy and SFT. "
        f"Win rate = mean outcome (win 1, tie 0.5, loss 0); CI = {level} normal interval on that mean, clipped to "
        f"[0, 1]. Pairs and prompts: the data the policy was trained on. Comparisons quarantined (judge failures): "
        f"{quarantined}."
    )


def winrate_markdown(evaluation: dict[str, Any]) -> str:
    table = markdown_table(WINRATE_HEADER, winrate_rows(evaluation))
    return "# Win rates against the SFT policy\n\n" + table + "\n\n" + winrate_note(evaluation) + "\n"


def plot_winrates(evaluation: dict[str, Any]) -> bytes:
    """Horizontal bars of the win rates with their intervals, and the 0.5 line (PNG bytes)."""
    plt = pyplot()

    policies = evaluation["policies"]
    labels = [f"{p['name']}\n{p['pairs']} pairs, {p['prompts']} prompts" for p in policies]
    rates = [p["win_rate"] if p["win_rate"] is not None else np.nan for p in policies]
    errors = [
        [r - p["ci_low"] if p["ci_low"] is not None else 0 for r, p in zip(rates, policies, strict=True)],
        [p["ci_high"] - r if p["ci_high"] is not None else 0 for r, p in zip(rates, policies, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.7 * len(policies)))
    ax.barh(range(len(policies)), rates, xerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.axvline(0.5, color="k", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(policies)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel=f"win rate vs SFT ({evaluation['confidence']:.0%} CI)", title=evaluation["labelled"])
    fig.tight_layout()
    return png_bytes(fig)


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
        compute=ray.data.ActorPoolStrategy(size=sampling.concurrency),
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


def run_evaluate(cfg: Config) -> StageResult:
    """The `evaluate` stage: train the variants (their own stages), then win rates vs SFT into `evaluate/`."""
    run_dir = RunDir(cfg.run_dir)
    reference = reference_model(cfg, run_dir)
    baseline, baseline_manifest = reference.local(), reference.manifest
    policies = [trained_policy(run_dir, MAIN)]
    for name, spec in cfg.evaluate.variants.items():
        stage = f"{MAIN}-{name}"
        run_train(variant_config(cfg, name, spec), stage=stage, selection=spec.selection)
        policies.append(trained_policy(run_dir, stage, name))
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
        responses = judged(sample_all(cfg, models, prompts), judge)
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
