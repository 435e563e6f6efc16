"""One typed config tree for every stage, loaded from YAML with dotted command-line overrides.

    cfg = load_config("demo.yaml", ["train.beta0=0.2", "breadth.eta=0.1"])

Every section forbids unknown keys; a bad key or value raises `ConfigError` naming the dotted key
and what is allowed. Defaults follow docs/ALGORITHMS.md (the papers' settings, or the documented
raybpo rule where a paper is vague).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMATS = ("auto", "hh", "trl", "pku", "ultrafeedback", "judge", "columns")
# The stage names the config validates, in graph order: raybpo/graph.py holds the stages and checks this list.
STAGE_ORDER = ("ingest", "sft", "reward", "breadth", "generate", "score", "depth", "train", "evaluate")
StageName = Literal[STAGE_ORDER]  # type: ignore[valid-type]
VARIANT_PREFIX = "train-"
Format = Literal["auto", "hh", "trl", "pku", "ultrafeedback", "judge", "columns"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts (or joins) a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None: all of the machine).")


class SourceSpec(Section):
    """One preference input: a JSONL / JSONL.gz / Parquet file or folder, or a Hugging Face dataset name."""

    path: str
    format: Format = "auto"
    name: str | None = Field(None, description="The `source` name of its pairs (default: file or dataset name).")
    split: str = Field("train", description="Split of a Hugging Face dataset.")
    subset: str | None = Field(None, description="Config (subset) of a Hugging Face dataset.")
    columns: dict[str, str] | None = Field(
        None, description="format=columns: canonical field -> input column, for prompt, chosen, rejected."
    )
    pku_preference: Literal["better", "safer"] = Field(
        "better", description="PKU-SafeRLHF: use better_response_id or safer_response_id."
    )

    @model_validator(mode="after")
    def _columns_need_mapping(self) -> SourceSpec:
        if self.format == "columns":
            missing = {"prompt", "chosen", "rejected"} - set(self.columns or {})
            if missing:
                raise ValueError(f"format=columns needs a `columns` mapping for {sorted(missing)}")
        return self


class IngestConfig(Section):
    sources: list[SourceSpec] = Field(default_factory=list)
    preset: Literal["none", "benchmark"] = Field("none", description="`benchmark`: generate the built-in data.")
    max_chars: int = Field(20_000, ge=1, description="Rows whose prompt + responses exceed this are quarantined.")
    max_bad_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Fail when a source quarantines more than this share of its rows."
    )
    dedup: bool = True


class BenchmarkConfig(Section):
    """The built-in benchmark: generated prompts and pairs with a known ground-truth utility."""

    seed: int = 0
    sources: list[Literal["helpful", "concise", "harmless"]] = Field(
        default_factory=lambda: ["helpful", "concise", "harmless"], min_length=1
    )
    pairs_per_source: int = Field(600, ge=1)
    train_prompts: int = Field(240, ge=1, description="Distinct training prompts the pairs are drawn over.")
    eval_prompts: int = Field(48, ge=1, description="Held-out prompts, disjoint from the training prompts.")
    high_gap_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of pairs with a high utility gap.")
    low_gap: tuple[float, float] = Field((0.1, 0.6), description="Utility gap range of low-gap pairs.")
    high_gap: tuple[float, float] = Field((1.5, 6.0), description="Utility gap range of high-gap pairs.")
    flip_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of pairs whose label is flipped.")


class TinyModelConfig(Section):
    """The config-built Llama of the built-in benchmark (its tokenizer is trained on the data's text)."""

    vocab_size: int = Field(1024, ge=64)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(512, ge=16)


class PolicyConfig(Section):
    """The policy: `tiny` (built from the data), a local folder, a Hub id, or a GGUF file."""

    model: str = Field("tiny", description="tiny | a local HF folder | a Hub id | smollm2-135m-instruct | x.gguf")
    gguf_file: str | None = Field(None, description="GGUF file name inside a Hub repo or folder given as `model`.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    trust_remote_code: bool = Field(False, description="Never on by default: it runs code from the model repo.")
    use_chat_template: bool = Field(True, description="Apply the tokenizer's chat template when it has one.")


class LoopConfig(Section):
    """Settings every Ray Train loop shares (SFT, DPO, reward models); each stage sets its own values."""

    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1, description="Global batch: all workers, all accumulation steps.")
    micro_batch_size: int = Field(8, ge=1, description="Per worker and forward pass.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_length: int = Field(512, ge=8)
    max_prompt_length: int = Field(256, ge=1)
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Pairs held out (a stable function of pair_id, the same set in every stage at one value).",
    )
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints (and evals).")
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many non-finite losses in a row.")
    num_workers: int = Field(1, ge=1, description="Data-parallel Ray Train workers.")
    cpus_per_worker: int = Field(
        1, ge=1, description="CPUs each Ray Train worker reserves (and torch threads it uses on CPU)."
    )
    use_gpu: bool = False
    max_failures: int = Field(2, ge=0, description="Worker-group restarts before the run fails.")
    log_every: int = Field(10, ge=1, description="Steps between console lines.")

    @model_validator(mode="after")
    def _batch_divides(self) -> LoopConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size * num_workers = {per_step}"
            )
        return self


class RewardConfig(LoopConfig):
    """Bradley-Terry reward models over several sources, with MORE weights (docs/ALGORITHMS.md section 2)."""

    mode: Literal["more", "multitask", "single", "average"] = "more"
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Backbone: all-MiniLM-L6-v2 (bundled), `sft` (the sft stage's model), a folder or Hub id.",
    )
    samples_per_source: int | None = Field(
        None, ge=1, description="Each source resampled (truncated or up-sampled) to this size; None: the largest."
    )
    pairs_per_source_per_batch: int = Field(1, ge=1, description="Pairs of every source in each micro-batch.")
    momentum: float = Field(0.99, gt=0.0, le=1.0, description="MORE head-gradient momentum (weight on new).")
    ece_bins: int = Field(10, ge=2)
    judge_model: bool = Field(
        False,
        description="Train two models on disjoint halves of the training pairs: `model/` scores candidates, "
        "`judge/` judges evaluate (judge=reward_model), so no policy is judged by the model that scored its pairs.",
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> RewardConfig:
        """Replaces LoopConfig's check: the micro-batch is set from the sources (p pairs of each)."""
        per_step = self.pairs_per_source_per_batch * self.num_workers
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of pairs_per_source_per_batch * num_workers = "
                f"{per_step} (and of that times the number of sources)"
            )
        if self.judge_model and self.mode not in ("more", "multitask"):
            raise ValueError(f"judge_model needs mode more or multitask (one model per half), not {self.mode!r}")
        return self

    lr: float = Field(2e-5, gt=0.0)
    batch_size: int = Field(48, ge=1)
    micro_batch_size: int = Field(3, ge=1, description="Set by the stage: pairs_per_source_per_batch * sources.")
    max_length: int = Field(256, ge=8)


class SftConfig(LoopConfig):
    enabled: bool = True
    lr: float = Field(3e-3, gt=0.0)
    epochs: int = Field(3, ge=1)
    lora: bool = Field(False, description="Train LoRA adapters (then merge) instead of all weights.")


class BreadthConfig(Section):
    method: Literal["cluster", "random", "all"] = "cluster"
    embedder: str = "all-MiniLM-L6-v2"
    num_clusters: int | None = Field(None, ge=1, description="K_b; None: about `prompts_per_cluster` each.")
    prompts_per_cluster: int = Field(50, ge=1)
    eta: float = Field(0.10, gt=0.0, le=1.0, description="eta_b: kept share of every cluster.")
    batch_size: int = Field(256, ge=1)
    concurrency: int = Field(1, ge=1, description="Embedding actor pool size.")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per embedding actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per embedding actor.")


class GenerateConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    n: int = Field(8, ge=1, description="Candidates sampled per kept prompt.")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    max_prompt_length: int | None = Field(
        None, ge=1, description="Prompt tokens kept (the END, as training truncates); None: the whole prompt."
    )
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per generation actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments.")


class JudgeConfig(Section):
    url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = Field("RAYBPO_JUDGE_API_KEY", description="Name of the variable holding the key.")
    prompt: str = (
        "Rate the assistant's response to the user's prompt from 1 to 10. "
        "Answer with the number only.\n\nPrompt:\n{prompt}\n\nResponse:\n{response}"
    )
    concurrency: int = Field(8, ge=1)
    requests_per_second: float = Field(5.0, gt=0.0)
    timeout_s: float = Field(60.0, gt=0.0)
    max_retries: int = Field(4, ge=0)


class ScoreConfig(Section):
    scorer: Literal["reward_model", "judge", "oracle"] = "reward_model"
    reward_model: str | None = Field(None, description="Model to score with (default: the reward stage's).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: Literal["uniform", "all"] = "uniform"
    min_gap: float = Field(0.0, ge=0.0)


class DepthConfig(Section):
    """BPO depth selection by clustering per-pair LoRA gradient features (docs/ALGORITHMS.md 3.3 and 4)."""

    selection: Literal["bpo", "random", "uniform", "original"] = Field(
        "bpo", description="The selection the train stage uses; every one is written at the same budget."
    )
    strategy: Literal["centroid", "norm", "boundary", "random"] = Field(
        "centroid", description="Ranking in a gradient cluster: nearest the centroid, largest norm, farthest, random."
    )
    projection_dim: int = Field(8192, ge=1, description="d of the Rademacher projection (LESS: 8192).")
    num_clusters: int | None = Field(None, ge=1, description="K_g; None: about `pairs_per_cluster` pairs each.")
    pairs_per_cluster: int = Field(50, ge=1)
    eta: float = Field(0.10, gt=0.0, le=1.0, description="eta_g: kept share of every cluster.")
    budget: int | None = Field(None, ge=1, description="Optional cap on the number of pairs kept (global ranking).")
    beta0: float = Field(0.1, gt=0.0, description="beta of the DPO loss whose gradients are the features.")
    batch_size: int = Field(32, ge=1, description="Pairs per batched forward/backward.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage type of the feature vectors.")
    warmup_steps: int = Field(0, ge=0, description="LESS-style DPO warm-up steps of the adapter before features.")
    warmup_lr: float = Field(1e-4, gt=0.0)
    adam_preconditioning: bool = Field(False, description="LESS's Adam features from the warm-up's optimizer state.")
    concurrency: int = Field(1, ge=1, description="Gradient-feature actors.")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per gradient-feature actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per gradient-feature actor.")

    @model_validator(mode="after")
    def _preconditioning_needs_warmup(self) -> DepthConfig:
        if self.adam_preconditioning and self.warmup_steps == 0:
            raise ValueError("adam_preconditioning needs the optimizer state of a warm-up: set warmup_steps > 0")
        return self


class TrainConfig(LoopConfig):
    """beta-DPO / DPO / IPO with LoRA (docs/ALGORITHMS.md section 1)."""

    loss: Literal["dpo", "ipo"] = "dpo"
    beta0: float = Field(0.1, gt=0.0)
    alpha: float = Field(0.6, ge=0.0, description="beta-DPO: 0 disables the dynamic beta.")
    rho: float = Field(0.8, gt=0.0, le=1.0, description="beta-DPO: kept fraction; 1 disables filtering.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="beta-DPO: momentum of M0 and sigma.")
    eps: float = Field(1e-6, gt=0.0)
    kept_normalization: Literal["worker", "global"] = Field(
        "worker",
        description="Divide a worker's kept loss by its own kept count (the paper's code) or by the global "
        "count / workers (N workers then equal one worker exactly).",
    )
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    precompute_ref_logps: bool = Field(True, description="Reference log-probs in one Ray Data pass, cached.")
    merge: bool = Field(True, description="Also write the merged model (Hugging Face format, safetensors).")


def _flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"train": {"alpha": 0}} -> {"train.alpha": 0}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dotted(value: Any) -> Any:
    """`{train: {alpha: 0}}` (what a dotted command-line override builds) is `{train.alpha: 0}`."""
    return _flatten_keys(value) if isinstance(value, dict) else value


class VariantSpec(Section):
    """A policy trained beside the main one and evaluated the same way (stage `train-<name>`)."""

    selection: Literal["bpo", "random", "uniform", "original"] | None = Field(
        None, description="Train on this depth selection (the depth stage must have run); None: as `train` does."
    )
    overrides: Annotated[dict[str, Any], BeforeValidator(_dotted)] = Field(
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
    concurrency: int = Field(1, ge=1, description="Generation actor pool size.")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per generation actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per generation actor.")
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
    """`raybpo tune`: Ray Tune over config keys, each trial the pipeline's tail (the rules: raybpo/tune.py)."""

    search_space: Annotated[dict[str, list[Any]], BeforeValidator(_dotted)] = Field(
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
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


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
