"""The Ray Train stages' sections (sft, reward, train) and the loop settings they share (ALGORITHMS.md 1, 2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raybpo.config.base import Section


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
    max_failures: int = Field(2, ge=0, description="Worker-group restarts after a worker error before the run fails.")
    max_preemption_failures: int = Field(
        20,
        ge=-1,
        description="Restarts after a node preemption (a spot reclaim), counted apart from max_failures; -1: no limit.",
    )
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
