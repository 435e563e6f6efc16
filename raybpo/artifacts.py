"""Every path below a run directory in one place: each stage's folder, what it writes there, and the resolvers
and readers of what a stage takes from another.

    ingest/pairs/                 INGESTED_PAIRS: the canonical pairs (`ingested_pairs`, `read_pairs`)
    ingest/benchmark/             BENCHMARK: the built-in benchmark's files (its held-out prompts)
    sft/model/                    SFT_MODEL: the reference policy (`reference_model`, `reward_backbone`)
    reward/model/, judge/         REWARD_MODEL, REWARD_JUDGE: the scorer and the judge (`scorer_model`, `judge_model`)
    breadth/prompts/              BREADTH_PROMPTS: every distinct prompt with its `kept` flag
    generate/candidates/          CANDIDATES: the candidate responses
    score/candidate_pairs/        CANDIDATE_PAIRS: the scored candidates' pairs
    depth/selections/<name>/      `depth_selection(name)`: the depth stage's selections (`input_pairs`)
    <train stage>/policy/merged/  `merged_policy(stage)`: a trained policy (`trained_policy`)
    evaluate/evaluation.json      EVALUATION: the win rates

A location is relative: `Parts` below a run directory (a local path or a URI that pyarrow's filesystems
understand). An `Artifact` is a run directory's URI and the parts of one output there: `Artifact.uri` is a place
any node resolves on its own, never a path of the driver's disk. A model a stage loads is a `ModelSource`:
another stage's artifact or an external name, with the identity the loading stage's manifest records for it.
Stages hand remote work `ModelSource.uri` (the artifact's URI, or the name); the actor or Train worker that
loads it resolves it on its own node (`models.loading.resolve_model_path`: a local path as it is, an `s3://`
folder fetched into that node's cache, `rundir.node_local`).

Every stage folder, every output another module opens, and every output a stage's manifest lists (relative
to its folder, `in_stage`) is named here, and the stages write their outputs under these names. Only files a
module writes into its own folder for no other module to open by name keep their names there (tune's
results tables, the reward report's files, the report's copied images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from raybpo.config import Config
from raybpo.data.benchmark import EVAL_PROMPTS
from raybpo.rundir import MANIFEST, RunDir, StageMissingError, require_stage, stage_identity

Parts = tuple[str, ...]

# -- the folders of the run directory ---------------------------------------------------------------------------

INGEST = "ingest"
SFT = "sft"
REWARD = "reward"
BREADTH = "breadth"
GENERATE = "generate"
SCORE = "score"
DEPTH = "depth"
TRAIN = "train"  # the evaluate stage's variants train as `train-<name>`, with the same outputs
EVALUATE = "evaluate"
CHECKPOINTS = "checkpoints"  # Ray Train's storage: the checkpoints of every training run
REPORT = "report"  # not a stage: `raybpo report` rewrites it whole
TUNE = "tune"

# -- what each stage writes, relative to the run directory ------------------------------------------------------

INGESTED_PAIRS: Parts = (INGEST, "pairs")
INGEST_QUARANTINE: Parts = (INGEST, "quarantine")
BENCHMARK: Parts = (INGEST, "benchmark")

SFT_BASE: Parts = (SFT, "base")  # the tiny policy built from the data, before training
SFT_MODEL: Parts = (SFT, "model")

REWARD_MODEL: Parts = (REWARD, "model")  # more / multitask: the candidates' scorer
REWARD_JUDGE: Parts = (REWARD, "judge")  # reward.judge_model: the evaluation's judge, trained on the other half
REWARD_MODELS: Parts = (REWARD, "models")  # single / average: one model per source
REWARD_REPORT: Parts = (REWARD, "report")
REWARD_TABLE: Parts = (*REWARD_REPORT, "reward.md")

BREADTH_PROMPTS: Parts = (BREADTH, "prompts")
BREADTH_CLUSTER_SIZES: Parts = (BREADTH, "cluster_sizes.png")

CANDIDATES: Parts = (GENERATE, "candidates")

SCORED_CANDIDATES: Parts = (SCORE, "scored")
SCORED_CANDIDATES_FILE: Parts = (*SCORED_CANDIDATES, "candidates.parquet")
SCORE_QUARANTINE: Parts = (SCORE, "quarantine")
SCORE_QUARANTINE_FILE: Parts = (*SCORE_QUARANTINE, "candidates.parquet")
CANDIDATE_PAIRS: Parts = (SCORE, "candidate_pairs")
CANDIDATE_PAIRS_FILE: Parts = (*CANDIDATE_PAIRS, "pairs.parquet")

DEPTH_FEATURES: Parts = (DEPTH, "features")
DEPTH_FEATURES_FILE: Parts = (*DEPTH_FEATURES, "part-00000.parquet")
DEPTH_SELECTIONS: Parts = (DEPTH, "selections")
DEPTH_QUARANTINE: Parts = (DEPTH, "quarantine.parquet")
DEPTH_WARMUP: Parts = (DEPTH, "warmup.safetensors")
DEPTH_PAIRS_PER_PROMPT: Parts = (DEPTH, "pairs_per_prompt.png")
DEPTH_CLUSTER_SIZES: Parts = (DEPTH, "cluster_sizes.png")

EVALUATION: Parts = (EVALUATE, "evaluation.json")
WINRATES_TABLE: Parts = (EVALUATE, "winrates.md")
WINRATES_PLOT: Parts = (EVALUATE, "winrates.png")
COMPARISONS_FILE: Parts = (EVALUATE, "comparisons.parquet")
EVALUATE_QUARANTINE: Parts = (EVALUATE, "quarantine")
JUDGEMENTS_QUARANTINE: Parts = (*EVALUATE_QUARANTINE, "judgements.parquet")

REPORT_MARKDOWN: Parts = (REPORT, "report.md")
REPORT_HTML: Parts = (REPORT, "report.html")


def benchmark_file(name: str) -> Parts:
    """A file of the built-in benchmark (`raybpo.data.benchmark.generate`'s names) as the ingest stage wrote it."""
    return (*BENCHMARK, name)


BENCHMARK_EVAL_PROMPTS: Parts = benchmark_file(EVAL_PROMPTS)


def reward_member(source: str) -> Parts:
    """The single / average reward model of one source."""
    return (*REWARD_MODELS, source)


def depth_selection(name: str) -> Parts:
    """The depth stage's selection `name` (bpo, random, uniform, original): a folder of canonical pairs."""
    return (*DEPTH_SELECTIONS, name)


def depth_selection_file(name: str) -> Parts:
    return (*depth_selection(name), "pairs.parquet")


def prepared_inputs(stage: str) -> Parts:
    """A training stage's (sft, train, train-<name>) tokenised pairs or examples."""
    return (stage, "prepared")


def training_metrics(stage: str) -> Parts:
    """A training stage's metrics, one JSON line per logged step."""
    return (stage, "metrics.jsonl")


def tensorboard(stage: str) -> Parts:
    return (stage, "tensorboard")


def policy_adapter(stage: str) -> Parts:
    """A train stage's LoRA adapter (with the tokenizer)."""
    return (stage, "policy", "adapter")


def merged_policy(stage: str) -> Parts:
    """A train stage's policy with its adapter merged (`train.merge`), a Hugging Face model folder."""
    return (stage, "policy", "merged")


def relpath(parts: Parts) -> str:
    """`parts` as one `/`-joined path relative to the run directory (what `RunDir.write_bytes` takes)."""
    return "/".join(parts)


def in_stage(parts: Parts, folder: bool = False) -> str:
    """A location relative to its stage's folder, as the stage's manifest lists it (`pairs/`, `metrics.jsonl`)."""
    return "/".join(parts[1:]) + ("/" if folder else "")


# -- locations a node resolves on its own -----------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """One output below a run directory: the run directory's URI (a local path or scheme://...) and its parts."""

    run_dir: str
    parts: Parts

    @property
    def uri(self) -> str:
        """Where it is, for any node: a local path on a local run directory, else scheme://..."""
        return RunDir(self.run_dir).uri_of(*self.parts)


@dataclass(frozen=True)
class ModelSource:
    """A model a stage loads: a folder another stage wrote (`artifact`) or an external `name` (a Hub id, a local
    folder, a GGUF file, `tiny`); `identity` is what the loading stage's manifest records as this input, from
    `manifest` (the writing stage's manifest, or the config's hash for an external model)."""

    artifact: Artifact | None
    name: str | None
    identity: str
    manifest: dict[str, Any]

    @property
    def uri(self) -> str:
        """What a loader takes, on any node: the artifact's URI, or the external name as given."""
        if self.artifact is not None:
            return self.artifact.uri
        assert self.name is not None
        return self.name


def _written(run_dir: RunDir, parts: Parts, manifest: dict[str, Any], suffix: str = "") -> ModelSource:
    """A model folder a finished stage (of `manifest`) wrote."""
    return ModelSource(Artifact(run_dir.uri, parts), None, stage_identity(manifest) + suffix, manifest)


def _external(name: str, config_hash: str) -> ModelSource:
    manifest = {"config_hash": config_hash, "created_at": "external"}
    return ModelSource(None, name, stage_identity(manifest), manifest)


def reference_model(cfg: Config, run_dir: RunDir) -> ModelSource:
    """The reference policy: the sft stage's model when it has run, else `policy.model` itself."""
    if run_dir.exists(SFT, MANIFEST):
        return _written(run_dir, SFT_MODEL, require_stage(run_dir, SFT))
    if cfg.policy.model == "tiny":
        raise StageMissingError("the tiny policy is created by the sft stage: run `raybpo sft` first")
    return _external(cfg.policy.model, cfg.section_hash("policy"))


def reward_backbone(cfg: Config, run_dir: RunDir) -> ModelSource:
    """The reward models' backbone: `reward.model`, with `sft` meaning the sft stage's model."""
    if cfg.reward.model == "sft":
        return _written(run_dir, SFT_MODEL, require_stage(run_dir, SFT))
    return _external(cfg.reward.model, cfg.section_hash("reward"))


def scorer_model(cfg: Config, run_dir: RunDir) -> ModelSource:
    """The reward model the score stage scores with: `score.reward_model`, else the reward stage's `model/`."""
    if cfg.score.reward_model:
        return _external(cfg.score.reward_model, cfg.section_hash("score"))
    manifest = require_stage(run_dir, REWARD)
    if not run_dir.exists(*REWARD_MODEL):
        raise ValueError("the reward stage ran in single/average mode: set score.reward_model to one model folder")
    return _written(run_dir, REWARD_MODEL, manifest)


def judge_model(cfg: Config, run_dir: RunDir) -> ModelSource:
    """The evaluation's reward-model judge: `evaluate.reward_model`, else the reward stage's `judge/`
    (`reward.judge_model`: trained on the half of the pairs that scored no candidates), else the scorer."""
    if cfg.evaluate.reward_model:
        return ModelSource(None, cfg.evaluate.reward_model, f"external:{cfg.evaluate.reward_model}", {})
    if run_dir.exists(*REWARD_JUDGE):
        return _written(run_dir, REWARD_JUDGE, require_stage(run_dir, REWARD), "#judge")
    return scorer_model(cfg, run_dir)


def trained_policy(run_dir: RunDir, stage: str) -> ModelSource:
    """The merged policy a finished train stage (`train`, `train-<name>`) wrote (a clear error when it wrote none)."""
    manifest = require_stage(run_dir, stage)
    if not run_dir.exists(*merged_policy(stage)):
        raise StageMissingError(
            f"{run_dir.uri_of(stage)} has no merged policy (policy/merged/): rerun it with train.merge=true"
        )
    return _written(run_dir, merged_policy(stage), manifest)


def input_pairs(run_dir: RunDir, selection: str | None = None) -> tuple[Artifact, dict]:
    """The pairs to train on: the depth stage's selection when it has run, else all ingested pairs.

    The depth stage writes `selections/{bpo,random,uniform,original}/` at one budget and names the one to
    train on (`depth.selection`) in its manifest; `selection` picks another (how evaluation trains the baselines).
    Returns the pairs and the manifest of the stage that wrote them.
    """
    if selection is None and not run_dir.exists(DEPTH, MANIFEST):
        return Artifact(run_dir.uri, INGESTED_PAIRS), require_stage(run_dir, INGEST)
    depth = require_stage(run_dir, DEPTH)
    name = selection or depth["selection"]
    if not run_dir.exists(*depth_selection(name)):
        raise StageMissingError(f"the depth stage wrote no selection {name!r} in {run_dir.uri_of(DEPTH)}")
    return Artifact(run_dir.uri, depth_selection(name)), depth


def trained_pairs(manifest: dict[str, Any]) -> Parts:
    """The pairs a train stage trained on (`input_pairs`), from its manifest (which holds their full path)."""
    parts = tuple(manifest["pairs"]["input"].rstrip("/").split("/"))
    return parts[-3:] if parts[-3:-1] == DEPTH_SELECTIONS else parts[-2:]


# -- readers ----------------------------------------------------------------------------------------------------


def read_table(run_dir: RunDir, parts: Parts, columns: list[str] | None = None) -> pa.Table:
    """A Parquet folder (or file) below the run directory as one table, in the dataset's order."""
    return pads.dataset(run_dir.path(*parts), filesystem=run_dir.fs, format="parquet").to_table(columns=columns)


def ingested_pairs(run_dir: RunDir, columns: list[str] | None = None) -> pa.Table:
    """The ingest stage's pairs (the columns asked for, all by default), in the dataset's order."""
    return read_table(run_dir, INGESTED_PAIRS, columns)


def read_pairs(run_dir: RunDir, sources: list[str] | None = None) -> dict[str, list]:
    """The ingested pairs (columns as lists), sorted by pair_id, optionally of some sources only."""
    table = ingested_pairs(run_dir, ["pair_id", "prompt", "chosen", "rejected", "source"])
    columns = table.sort_by("pair_id").to_pydict()
    if sources is not None:
        keep = [i for i, s in enumerate(columns["source"]) if s in sources]
        columns = {k: [v[i] for i in keep] for k, v in columns.items()}
    return columns
