"""The BPO stages' sections (ALGORITHMS.md 3): breadth, the scoring of candidates, depth."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raybpo.config.base import POOL_HELP, PoolSize, Section
from raybpo.config.models import JudgeConfig


class BreadthConfig(Section):
    method: Literal["cluster", "random", "all"] = "cluster"
    embedder: str = "all-MiniLM-L6-v2"
    num_clusters: int | None = Field(None, ge=1, description="K_b; None: about `prompts_per_cluster` each.")
    prompts_per_cluster: int = Field(50, ge=1)
    eta: float = Field(0.10, gt=0.0, le=1.0, description="eta_b: kept share of every cluster.")
    batch_size: int = Field(256, ge=1)
    concurrency: PoolSize = Field(1, description=f"Embedding {POOL_HELP}.")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per embedding actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per embedding actor.")


class ScoreConfig(Section):
    scorer: Literal["reward_model", "judge", "oracle"] = "reward_model"
    reward_model: str | None = Field(None, description="Model to score with (default: the reward stage's).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: Literal["uniform", "all"] = "uniform"
    min_gap: float = Field(0.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs of the reward-model scoring actor.")


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
    concurrency: PoolSize = Field(1, description=f"Gradient-feature {POOL_HELP}.")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per gradient-feature actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per gradient-feature actor.")

    @model_validator(mode="after")
    def _preconditioning_needs_warmup(self) -> DepthConfig:
        if self.adam_preconditioning and self.warmup_steps == 0:
            raise ValueError("adam_preconditioning needs the optimizer state of a warm-up: set warmup_steps > 0")
        return self
