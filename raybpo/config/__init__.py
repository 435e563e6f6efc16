"""One typed config tree for every stage, loaded from YAML with dotted command-line overrides.

    cfg = load_config("demo.yaml", ["train.beta0=0.2", "breadth.eta=0.1"])

Every section forbids unknown keys; a bad key or value raises `ConfigError` naming the dotted key
and what is allowed. Defaults follow docs/ALGORITHMS.md (the papers' settings, or the documented
raybpo rule where a paper is vague).

The sections live with their floor: `base` (the strict `Section`, `ConfigError`, dotted keys), `data` (sources,
ingest, the benchmark), `models` (the policy, sampling, the judge), `selection` (breadth, score, depth) and
`training` (the loop, sft, reward, train); this module holds the root `Config` with the run-level sections (Ray,
evaluate and its variants, tune) and the loading. Every name is imported from here (`__all__`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from raybpo.config.base import POOL_HELP, ConfigError, PoolSize, Section, dotted
from raybpo.config.data import FORMATS, BenchmarkConfig, IngestConfig, SourceSpec
from raybpo.config.models import GenerateConfig, JudgeConfig, PolicyConfig, TinyModelConfig
from raybpo.config.selection import BreadthConfig, DepthConfig, ScoreConfig
from raybpo.config.training import LoopConfig, RewardConfig, SftConfig, TrainConfig

__all__ = [
    "FORMATS",
    "STAGE_ORDER",
    "VARIANT_PREFIX",
    "BenchmarkConfig",
    "BreadthConfig",
    "Config",
    "ConfigError",
    "DepthConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "IngestConfig",
    "JudgeConfig",
    "LoopConfig",
    "PolicyConfig",
    "PoolSize",
    "RayConfig",
    "RewardConfig",
    "ScoreConfig",
    "SftConfig",
    "SourceSpec",
    "TinyModelConfig",
    "TrainConfig",
    "TuneConfig",
    "VariantSpec",
    "apply_overrides",
    "load_config",
    "parse_override",
    "variant_stage",
    "with_overrides",
]

# The stage names the config validates, in graph order: raybpo/graph.py holds the stages and checks this list.
STAGE_ORDER = ("ingest", "sft", "reward", "breadth", "generate", "score", "depth", "train", "evaluate")
StageName = Literal[STAGE_ORDER]  # type: ignore[valid-type]
VARIANT_PREFIX = "train-"


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts (or joins) a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None: all of the machine).")
    parallel_stages: int = Field(
        4,
        ge=1,
        description="Stages run at once where the graph allows (sft, reward and breadth after ingest; train and its "
        "variants), sharing the cluster through Ray's resources; 1 runs one at a time in graph order.",
    )


class VariantSpec(Section):
    """A policy trained beside the main one and evaluated the same way (stage `train-<name>`)."""

    selection: Literal["bpo", "random", "uniform", "original"] | None = Field(
        None, description="Train on this depth selection (the depth stage must have run); None: as `train` does."
    )
    overrides: Annotated[dict[str, Any], BeforeValidator(dotted)] = Field(
        default_factory=dict, description="Dotted key -> value applied to the run's config, e.g. train.alpha: 0."
    )

    @model_validator(mode="after")
    def _train_keys_only(self) -> VariantSpec:
        bad = [k for k in self.overrides if not (k == "seed" or k.startswith(("train.", "policy.")))]
        if bad:
            raise ValueError(f"variant overrides may set train.*, policy.* and seed only, not {bad}")
        return self


def variant_stage(name: str) -> str:
    """The stage (and run-dir folder) of the variant `name` of `evaluate.variants`: `train-<name>`."""
    return VARIANT_PREFIX + name


class EvaluateConfig(Section):
    """Win rate of trained policies against the SFT policy on held-out prompts (docs/ALGORITHMS.md 3.4)."""

    judge: Literal["oracle", "reward_model", "judge"] = "oracle"
    reward_model: str | None = Field(
        None,
        description="judge=reward_model: model folder (None: the reward stage's judge/ when reward.judge_model, "
        "else score.reward_model, else the reward stage's model).",
    )
    llm_judge: JudgeConfig | None = Field(None, description="judge=judge: the endpoint (None: score.judge).")
    num_prompts: int | None = Field(None, ge=1, description="Held-out prompts used (None: all).")
    samples_per_prompt: int = Field(1, ge=1, description="Seeded samples per prompt, the same seeds for every policy.")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Level of the normal interval of the win rate.")
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    max_prompt_length: int | None = Field(None, ge=1, description="Prompt tokens kept (the end); None: all.")
    batch_size: int = Field(16, ge=1, description="Responses sampled per generation batch.")
    concurrency: PoolSize = Field(1, description=f"Generation {POOL_HELP}.")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per generation actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per generation actor (and of a reward-model judge).")
    variants: dict[str, VariantSpec] = Field(
        default_factory=dict,
        description="Name -> variant trained as stage `train-<name>` and evaluated beside `train`, e.g. "
        "random: {selection: random}, dpo: {overrides: {train.alpha: 0, train.rho: 1}}.",
    )

    @model_validator(mode="after")
    def _variant_names(self) -> EvaluateConfig:
        allowed = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
        bad = [n for n in self.variants if not n or not set(n) <= allowed or n[0] in "_-"]
        if bad:
            raise ValueError(f"variant names must be lower-case letters, digits, '_' or '-' (a folder name): {bad}")
        return self


class TuneConfig(Section):
    """`raybpo tune`: Ray Tune over config keys, each trial the pipeline's tail (the rules: raybpo/tune/)."""

    search_space: Annotated[dict[str, list[Any]], BeforeValidator(dotted)] = Field(
        default_factory=dict, description="Dotted config key -> values to try, e.g. train.beta0: [0.05, 0.1]."
    )
    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination once; random: `num_samples` distinct combinations (seeded)."
    )
    num_samples: int = Field(1, ge=1, description="search=random: the number of trials (a grid runs each once).")
    metric: str = Field("win_rate", description="Ranks finished trials: win_rate, ci_low, ci_high, or a train metric.")
    mode: Literal["max", "min"] = "max"
    early_stop_metric: str | None = Field(
        "eval_loss", description="ASHA stops weak trials on this train-stage metric (None: no early stopping)."
    )
    early_stop_mode: Literal["max", "min"] = "min"
    grace_period: int = Field(1, ge=1, description="ASHA: optimizer steps a trial trains before it can be stopped.")
    reduction_factor: float = Field(4.0, gt=1.0, description="ASHA: about 1/reduction_factor go on at each rung.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials at once; each needs its Ray Train workers' CPUs.")
    trial_resources: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.0, "memory": 2**20},
        description="A trial driver's resources: no CPU (its stages' workers reserve their own), a token of memory.",
    )

    @model_validator(mode="after")
    def _samples_are_random_draws(self) -> TuneConfig:
        empty = [key for key, values in self.search_space.items() if not values]
        if empty:
            raise ValueError(f"search_space: no values to try for {empty}")
        if self.search == "grid" and self.num_samples != 1:
            raise ValueError(
                "num_samples counts random draws (search: random); a grid runs every combination once "
                "(for repeats, search over the seed: search_space: {seed: [0, 1, 2]})"
            )
        return self


class Config(Section):
    """The whole run: one section per stage of ARCHITECTURE.md, plus the run directory and Ray."""

    run_dir: str = Field("runs/demo", description="Local path or a pyarrow-filesystem URI (e.g. s3://...).")
    seed: int = 0
    stages: list[StageName] = Field(
        default_factory=lambda: list(STAGE_ORDER),
        min_length=1,
        description="The stages `raybpo run` runs, in graph order (e.g. drop breadth..depth for plain beta-DPO).",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    breadth: BreadthConfig = Field(default_factory=BreadthConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    depth: DepthConfig = Field(default_factory=DepthConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @field_validator("run_dir")
    @classmethod
    def _absolute_run_dir(cls, value: str) -> str:
        """A local run directory is made absolute: Ray workers run in other working directories."""
        return value if "://" in value else str(Path(value).expanduser().resolve())

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections (plus `seed`), the identity a stage's manifest records."""
        payload = {"seed": self.seed, **{name: getattr(self, name).model_dump(mode="json") for name in sections}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def parse_override(text: str) -> tuple[str, Any]:
    """`train.beta0=0.2` -> ("train.beta0", 0.2); the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: its value is not valid YAML ({reason})") from err


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (a copy); unknown keys are caught by validation."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        key, value = parse_override(text)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides, validate the whole tree."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded or {}
    return _validated(apply_overrides(data, overrides or []), str(path) if path else "config")


def with_overrides(cfg: Config, overrides: Mapping[str, Any], source: str = "overrides") -> Config:
    """A copy of `cfg` with dotted keys set to values, validated like command-line overrides.

    A wrong key or value raises `ConfigError` naming `source` (where the overrides come from, e.g.
    `tune.search_space`), the dotted key and what is allowed.
    """
    texts = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    try:
        data = apply_overrides(cfg.model_dump(mode="json"), texts)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return _validated(data, source)


def _validated(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (for listing allowed keys)."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        for arg in list(candidates):
            candidates.extend(get_args(arg))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for item in err.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if item["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  unknown key {dotted!r}{hint}; allowed keys here: {', '.join(allowed)}")
        else:
            lines.append(f"  {dotted}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)
