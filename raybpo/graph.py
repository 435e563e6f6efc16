"""The stage graph: the one place that knows the stages, their order, what each depends on, and the variants.

    for step in plan(cfg, until_stage="train"):   # the config's stages in order, evaluate.variants expanded
        step.run()                                 # skipped when its manifest matches

`STAGES` lists every stage once, in the order they run: its name, its function (`run(cfg, ctx) -> StageResult`,
the `StageContext` carrying the Ray Train callbacks of its TorchTrainer runs), the config sections it hashes into
its manifest (with `seed`: what redoes it), the stages whose outputs it reads (`waits_for`: a stage starts once
those are done, so independent stages run at once), and its one line of help. Everything
else derives from it: the pipeline's plan, skip/resume, `--from` / `--until` and summary (raybpo/pipeline.py), the
report's stage table (raybpo/report.py), Tune's "which stages does this key redo" (`Step.reads_key`), the CLI's
stage commands, and the config's stage names (`config.STAGE_ORDER`, checked against `STAGES` below).

Variants: every entry `<name>` of `evaluate.variants` is planned as an ordinary stage `train-<name>` right after
`train`, when the config's stages hold both train and evaluate: the train stage's function on the variant's config
(its overrides applied, validated at planning time) and depth selection, in its own folder with its own manifest,
skipped, resumed and forgotten (`--from train`) like any stage. The evaluate stage then judges `train` and every
`train-<name>` it finds; it trains nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from raybpo.artifacts import BREADTH, DEPTH, EVALUATE, GENERATE, INGEST, REWARD, SCORE, SFT, TRAIN
from raybpo.config import (
    STAGE_ORDER,
    VARIANT_PREFIX,
    Config,
    ConfigError,
    VariantSpec,
    variant_stage,
    with_overrides,
)
from raybpo.rundir import NO_CONTEXT, StageContext, StageResult
from raybpo.stages.breadth import run_breadth
from raybpo.stages.depth import run_depth
from raybpo.stages.evaluate import run_evaluate
from raybpo.stages.generate import run_generate
from raybpo.stages.ingest import ingest
from raybpo.stages.score import run_score
from raybpo.train.dpo import run_train
from raybpo.train.reward import run_reward
from raybpo.train.sft import run_sft

StageFunction = Callable[..., StageResult]  # run(cfg, ctx=NO_CONTEXT) -> StageResult


@dataclass(frozen=True)
class Stage:
    """A stage of the graph."""

    name: str
    run: StageFunction
    #: the config sections it hashes into its manifest (and `seed`): changing one of them redoes it
    sections: tuple[str, ...]
    #: the stages whose outputs it reads, when they ran (all earlier in the order)
    reads: tuple[str, ...]
    #: one line for `raybpo --help` and the stage's own command
    help: str
    #: those of `reads` that it reads only when the config says so (stage -> the condition)
    reads_only_if: Mapping[str, Callable[[Config], bool]] = field(default_factory=dict)

    def reads_for(self, cfg: Config) -> tuple[str, ...]:
        """The stages a run of `cfg` reads the outputs of (its `reads`, less the conditional ones not needed)."""
        return tuple(name for name in self.reads if self.reads_only_if.get(name, lambda _: True)(cfg))


STAGES: tuple[Stage, ...] = (
    Stage(
        INGEST,
        ingest,
        ("ingest", "benchmark"),
        (),
        "parse, validate and deduplicate preference data into canonical pairs",
    ),
    Stage(
        SFT,
        run_sft,
        ("policy", "sft"),  # and train with sft.lora (its LoRA settings); Tune's copy check catches that case
        (INGEST,),
        "supervised warm-up of the policy on chosen responses (Ray Train)",
    ),
    Stage(
        REWARD,
        run_reward,
        ("reward",),
        (INGEST, SFT),
        "reward models over several sources: MORE, multitask, single, average (Ray Train)",
        {SFT: lambda cfg: cfg.reward.model == "sft"},  # the SFT policy as the backbone
    ),
    Stage(
        BREADTH,
        run_breadth,
        ("breadth",),
        (INGEST,),
        "deduplicate and embed prompts, spherical k-means (faiss), keep the top eta per cluster (Ray Data)",
    ),
    Stage(
        GENERATE,
        run_generate,
        ("policy", "generate"),
        (BREADTH, SFT),
        "n candidates per kept prompt: Hugging Face on CPU, vLLM on GPU (Ray Data)",
    ),
    Stage(
        SCORE,
        run_score,
        ("score", "reward"),
        (GENERATE, REWARD),
        "score candidates (reward model, LLM judge, or the benchmark's oracle) and pair them (Ray Data)",
    ),
    Stage(
        DEPTH,
        run_depth,
        ("policy", "depth", "train"),  # train's LoRA and length settings shape the gradient features
        (INGEST, SCORE, SFT),
        "per-pair LoRA gradient features, gradient clustering, BPO pair selection and its baselines (Ray Data)",
    ),
    Stage(
        TRAIN,
        run_train,
        ("policy", "train"),
        (INGEST, DEPTH, SFT),
        "beta-DPO / DPO / IPO training with LoRA (Ray Train); --variant NAME trains an evaluate.variants entry",
    ),
    Stage(
        EVALUATE,
        run_evaluate,
        ("policy", "evaluate"),
        (INGEST, SFT, TRAIN, REWARD),  # and the variants `train-<name>`
        "win rates of the trained policies (train and its variants) against the SFT policy, with the data budget",
    ),
)
ORDER: tuple[str, ...] = tuple(stage.name for stage in STAGES)
VARIANTS_OF = TRAIN  # the stage whose variants `evaluate.variants` plans
JUDGED_BY = EVALUATE  # the stage the variants are trained for

# The config validates stage names (and names the variants' folders) without importing the stages.
if ORDER != STAGE_ORDER or f"{VARIANTS_OF}-" != VARIANT_PREFIX:
    raise RuntimeError(
        f"config.STAGE_ORDER {STAGE_ORDER} must list the graph's stages in order, {ORDER}, and "
        f"config.VARIANT_PREFIX {VARIANT_PREFIX!r} name the variants of {VARIANTS_OF}"
    )


@dataclass(frozen=True)
class Step:
    """A stage as one run plans it: its folder name, the stage it runs, and the config it runs with.

    A variant `train-<name>` runs the train stage with the variant's config and depth selection.
    """

    name: str
    stage: Stage
    cfg: Config
    #: the dotted config keys it depends on: its stage's sections (a variant: also evaluate.variants.<name>)
    keys: tuple[str, ...]
    selection: str | None = None

    @property
    def is_variant(self) -> bool:
        return self.name != self.stage.name

    def run(self, ctx: StageContext = NO_CONTEXT) -> StageResult:
        if self.is_variant:
            return self.stage.run(self.cfg, ctx, stage=self.name, selection=self.selection)
        return self.stage.run(self.cfg, ctx)

    def reads_key(self, key: str) -> bool:
        """Whether setting the dotted config `key` can redo this step (`seed` redoes every one)."""
        return key == "seed" or any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in self.keys)


def variant_config(cfg: Config, name: str, spec: VariantSpec) -> Config:
    """The run's config with a variant's overrides applied (dotted keys, validated like the command line)."""
    return with_overrides(cfg, spec.overrides, f"evaluate.variants.{name}.overrides")


def steps(cfg: Config) -> list[Step]:
    """Every stage of the graph in order, whether the config runs it or not, with the variants after train."""
    out = []
    for stage in STAGES:
        out.append(Step(stage.name, stage, cfg, stage.sections))
        if stage.name == VARIANTS_OF:
            for name, spec in cfg.evaluate.variants.items():
                keys = (*stage.sections, f"evaluate.variants.{name}")
                out.append(Step(variant_stage(name), stage, variant_config(cfg, name, spec), keys, spec.selection))
    return out


def planned(cfg: Config, step: Step) -> bool:
    """Whether a run of `cfg` has `step`: its stage is among the config's stages (a variant: evaluate too)."""
    return step.stage.name in cfg.stages and (not step.is_variant or JUDGED_BY in cfg.stages)


def index_of(every: list[Step], name: str, option: str = "stage") -> int:
    """Where the step called `name` (a stage or a variant) is in `every`, else a clear error naming them all."""
    names = [s.name for s in every]
    if name not in names:
        raise ConfigError(f"{option} {name!r} is not a stage; the stages are {', '.join(names)}")
    return names.index(name)


def plan(cfg: Config, from_stage: str | None = None, until_stage: str | None = None) -> list[Step]:
    """The steps a run of `cfg` has, in graph order, cut after `until_stage` (a stage or a variant)."""
    every = steps(cfg)
    if from_stage is not None and not planned(cfg, every[index_of(every, from_stage, "--from")]):
        raise ConfigError(f"--from {from_stage!r}: the config's stages ({', '.join(cfg.stages)}) do not include it")
    last = index_of(every, until_stage, "--until") if until_stage is not None else len(every) - 1
    return [step for step in every[: last + 1] if planned(cfg, step)]


def waits_for(steps: Sequence[Step]) -> dict[str, tuple[str, ...]]:
    """For every step of a plan, the steps of the plan it must wait for: those of the stages it reads (with the
    variants `train-<name>` counting as train). The others may run at the same time (raybpo/pipeline.py)."""
    return {
        step.name: tuple(other.name for other in steps if other.stage.name in step.stage.reads_for(step.cfg))
        for step in steps
    }


def step(cfg: Config, name: str) -> Step:
    """One step by name (`train`, or a variant `train-<name>`), whether or not the config's stages have it."""
    every = steps(cfg)
    return every[index_of(every, name)]
