"""The `train` stage: beta-DPO / DPO / IPO with LoRA on Ray Train (docs/ALGORITHMS.md section 1).

The policy is the SFT model with LoRA adapters; the reference is the same weights with the adapters
disabled (one copy in memory), or its log-probs cached by the prepare pass. `alpha=0, rho=1` is
plain DPO. Metrics use TRL's names (`rewards/chosen`, `rewards/margins`, `logps/chosen`, ...; the
rewards use beta0, as TRL) plus `beta`, `beta/M0`, `beta/sigma` and `filter/kept_fraction`. The eval
loss is the plain loss at beta0 over all eval pairs, comparable across steps and runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from raybpo.artifacts import (
    CHECKPOINTS,
    TRAIN,
    in_stage,
    input_pairs,
    merged_policy,
    policy_adapter,
    prepared_inputs,
    reference_model,
    tensorboard,
    training_metrics,
)
from raybpo.cluster import init_ray
from raybpo.config import Config, PolicyConfig, TrainConfig
from raybpo.losses import BetaDPO, dpo_logits, dpo_loss, ipo_loss
from raybpo.models.loading import load_causal_lm
from raybpo.models.logps import collate_pairs, pair_logps
from raybpo.models.lora import ADAPTER_WEIGHTS, add_lora
from raybpo.rundir import (
    NO_CONTEXT,
    RunDir,
    StageContext,
    StageCounts,
    StageResult,
    run_stage,
    stage_identity,
)
from raybpo.train.checkpoint import checkpoint_name
from raybpo.train.export import fit_and_export, prepared_stage_counts
from raybpo.train.loop import unwrap
from raybpo.train.prepare import load_prepared, prepare, sequence_lengths
from raybpo.train.recipe import Recipe, Workers

STAGE = TRAIN


class DpoRecipe(Recipe):
    """beta-DPO on prepared pairs (token ids, optionally cached reference log-probs)."""

    def __init__(
        self, prepared: dict[str, dict[str, list]], reference: str, policy: PolicyConfig, cfg: TrainConfig, seed: int
    ):
        self.splits = prepared
        self.reference, self.policy, self.cfg = reference, policy, cfg
        self.train_lengths = sequence_lengths(prepared["train"])
        self.num_eval = len(prepared["eval"]["pair_id"])
        self.beta_dpo = BetaDPO(
            beta0=cfg.beta0,
            alpha=cfg.alpha,
            rho=cfg.rho,
            momentum=cfg.momentum,
            eps=cfg.eps,
            loss_type=cfg.loss,
            seed=seed,
            normalization=cfg.kept_normalization,
        )
        self.pad_id = 0

    def build_model(self, device: torch.device) -> nn.Module:
        model, self.tokenizer = load_causal_lm(self.reference, self.policy)
        self.pad_id = self.tokenizer.pad_token_id
        return add_lora(model, self.cfg).to(device)

    def loss(self, model, rows, workers: Workers, training: bool):
        data = self.splits["train" if training else "eval"]
        batch = collate_pairs(
            [data["prompt_ids"][i] for i in rows],
            [data["chosen_ids"][i] for i in rows],
            [data["rejected_ids"][i] for i in rows],
            self.pad_id,
        )
        batch = {k: v.to(workers.device) for k, v in batch.items()}
        policy_chosen, policy_rejected = pair_logps(model, batch)
        if data["ref_chosen_logps"][rows[0]] is not None:
            ref_chosen = torch.tensor([data["ref_chosen_logps"][i] for i in rows], device=workers.device)
            ref_rejected = torch.tensor([data["ref_rejected_logps"][i] for i in rows], device=workers.device)
        else:
            with torch.no_grad(), unwrap(model).disable_adapter():
                ref_chosen, ref_rejected = pair_logps(unwrap(model), batch)
        h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        chosen_rewards = self.cfg.beta0 * (policy_chosen - ref_chosen).detach()
        rejected_rewards = self.cfg.beta0 * (policy_rejected - ref_rejected).detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        if not training:
            plain = dpo_loss if self.cfg.loss == "dpo" else ipo_loss
            loss = plain(h, self.cfg.beta0).mean()
            return loss, {**metrics, "loss": loss.detach()}
        out = self.beta_dpo(h, gather=workers.gather, rank=workers.rank, world_size=workers.world_size)
        metrics.update(
            {
                "loss": out.loss.detach(),
                "beta": torch.as_tensor(float(out.beta)),
                "beta/M0": torch.as_tensor(float(out.m0)),
                "beta/sigma": torch.as_tensor(float(out.sigma)),
                "filter/kept_fraction": torch.as_tensor(float(out.kept_fraction)),
            }
        )
        return out.loss, metrics

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load_model(self, model: nn.Module, directory: Path) -> None:
        set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))

    def state_dict(self) -> dict:
        return {"beta_dpo": self.beta_dpo.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.beta_dpo.load_state_dict(state["beta_dpo"])


def make_dpo_recipe(run_dir: str, stage: str, reference: str, policy: dict, train: dict, seed: int) -> DpoRecipe:
    """Built inside each Ray Train worker: reads the prepared pairs of `stage` in `run_dir`."""
    rd = RunDir(run_dir)
    return DpoRecipe(
        load_prepared(rd.path(*prepared_inputs(stage)), rd),
        reference,
        PolicyConfig.model_validate(policy),
        TrainConfig.model_validate(train),
        seed,
    )


def run_train(
    cfg: Config, ctx: StageContext = NO_CONTEXT, *, stage: str = STAGE, selection: str | None = None
) -> StageResult:
    """The `train` stage: prepare pairs (+ reference log-probs), beta-DPO with LoRA, write `<stage>/policy/`.

    `stage` and `selection` run a variant of `evaluate.variants` (`train-dpo`, `train-random`, ...) beside the
    main run: the same code, their own folder, manifest and checkpoints. `ctx.callbacks` go to its TorchTrainer.
    """
    run_dir = RunDir(cfg.run_dir)
    pairs, pairs_manifest = input_pairs(run_dir, selection)
    pairs_path = run_dir.path(*pairs.parts)
    source = reference_model(cfg, run_dir)
    reference = source.uri
    inputs = {
        "pairs": stage_identity(pairs_manifest) + (f"#{selection}" if selection else ""),
        "reference": source.identity,
    }

    def body(stage_path: str) -> StageCounts:
        return train_policy(cfg, run_dir, stage, pairs_path, reference, inputs, ctx)

    init_ray(cfg.ray)
    return run_stage(run_dir, stage, cfg, ("policy", "train"), inputs, body)


def train_policy(
    cfg: Config, run_dir: RunDir, stage: str, pairs_path: str, reference: str, inputs: dict, ctx: StageContext
) -> StageCounts:
    """The train stage's work: prepare the pairs, fit, export the adapter (and the merged policy), the counts."""
    counts = prepare(
        pairs_path,
        run_dir.path(*prepared_inputs(stage)),
        run_dir,
        reference,
        cfg.policy,
        cfg.train.max_length,
        cfg.train.max_prompt_length,
        cfg.train.eval_fraction,
        reference=cfg.train.precompute_ref_logps,
        num_cpus=cfg.train.cpus_per_worker,
        reference_gpus=cfg.train.num_workers if cfg.train.use_gpu else 0,
    )
    factory = functools.partial(
        make_dpo_recipe,
        cfg.run_dir,
        stage,
        reference,
        cfg.policy.model_dump(mode="json"),
        cfg.train.model_dump(mode="json"),
        cfg.seed,
    )
    folders = {policy_adapter(stage): False}
    if cfg.train.merge:
        folders[merged_policy(stage)] = True
    trained = fit_and_export(
        checkpoint_name(stage, cfg.section_hash("policy", "train"), inputs),
        factory,
        cfg.train,
        cfg.seed,
        run_dir,
        run_dir.uri_of(CHECKPOINTS),
        counts["eval"] > 0,
        folders=folders,
        metrics=training_metrics(stage),
        tensorboard=run_dir.uri_of(*tensorboard(stage)),
        callbacks=ctx.callbacks,
    )
    return prepared_stage_counts(
        stage,
        counts["rows"],
        counts,
        trained,
        FINAL_METRICS,
        {
            "adapter": in_stage(policy_adapter(stage), folder=True),
            **({"merged": in_stage(merged_policy(stage), folder=True)} if cfg.train.merge else {}),
        },
        pairs={"train": counts["train"], "eval": counts["eval"], "input": pairs_path},
        reference=reference,
    )


FINAL_METRICS = (
    "loss",
    "eval_loss",
    "rewards/accuracies",
    "rewards/margins",
    "beta",
    "beta/M0",
    "beta/sigma",
    "filter/kept_fraction",
)
