"""The `sft` stage: supervised warm-up of the policy on chosen responses (prompt tokens masked).

On the built-in benchmark the policy is the tiny config-built Llama, trained here from random
weights (all parameters) into a mediocre starting point: it learns the benchmark's language and the
average of its chosen responses, flipped labels and all, so alignment has room to show. A real
model (SmolLM2, a Hub id) can be trained with LoRA adapters instead (`sft.lora`), merged at the end.
The output, `<run_dir>/sft/model/`, is a full Hugging Face model (safetensors): the reference policy
of every later stage.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from raybpo.artifacts import (
    CHECKPOINTS,
    INGEST,
    INGESTED_PAIRS,
    SFT,
    SFT_BASE,
    SFT_MODEL,
    in_stage,
    ingested_pairs,
    prepared_inputs,
    tensorboard,
    training_metrics,
)
from raybpo.cluster import init_ray
from raybpo.config import Config, PolicyConfig, SftConfig, TrainConfig
from raybpo.models.loading import load_causal_lm
from raybpo.models.logps import collate, token_logps
from raybpo.models.lora import ADAPTER_WEIGHTS, add_lora
from raybpo.models.tiny import build_tiny_model
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
from raybpo.train.checkpoint import checkpoint_name
from raybpo.train.export import fit_and_export, prepared_stage_counts
from raybpo.train.prepare import load_prepared, prepare, sequence_lengths
from raybpo.train.recipe import Recipe, Workers

STAGE = SFT
FULL_WEIGHTS = "model.safetensors"


def response_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token (prompt and padding masked)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["response_mask"][:, 1:]
    return -(token_logps(logits, batch["input_ids"]) * mask).sum() / mask.sum().clamp(min=1)


class SftRecipe(Recipe):
    """Next-token loss on (prompt, chosen) examples; all weights, or LoRA adapters."""

    def __init__(
        self, prepared: dict[str, dict[str, list]], base: str, policy: PolicyConfig, cfg: SftConfig, lora: TrainConfig
    ):
        self.splits, self.base, self.policy, self.cfg, self.lora = prepared, base, policy, cfg, lora
        self.train_lengths = sequence_lengths(prepared["train"])
        self.num_eval = len(prepared["eval"]["pair_id"])
        self.pad_id = 0

    def build_model(self, device: torch.device) -> nn.Module:
        model, self.tokenizer = load_causal_lm(self.base, self.policy)
        self.pad_id = self.tokenizer.pad_token_id
        return (add_lora(model, self.lora) if self.cfg.lora else model).to(device)

    def loss(self, model, rows, workers: Workers, training: bool):
        data = self.splits["train" if training else "eval"]
        batch = collate([(data["prompt_ids"][i], data["response_ids"][i]) for i in rows], self.pad_id)
        loss = response_nll(model, {k: v.to(workers.device) for k, v in batch.items()})
        return loss, {"loss": loss.detach()}

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load_model(self, model: nn.Module, directory: Path) -> None:
        if self.cfg.lora:
            set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
            return
        missing, unexpected = model.load_state_dict(load_file(str(directory / FULL_WEIGHTS)), strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"checkpoint {directory} does not match the model: missing {missing}, extra {unexpected}"
            )
        model.tie_weights()


def make_sft_recipe(run_dir: str, base: str, policy: dict, sft: dict, train: dict) -> SftRecipe:
    """Built inside each Ray Train worker: reads the prepared examples of `run_dir`."""
    rd = RunDir(run_dir)
    return SftRecipe(
        load_prepared(rd.path(*prepared_inputs(STAGE)), rd),
        base,
        PolicyConfig.model_validate(policy),
        SftConfig.model_validate(sft),
        TrainConfig.model_validate(train),
    )


def run_sft(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `sft` stage: build or load the base policy, tokenise (prompt, chosen), train, write `sft/model/`."""
    run_dir = RunDir(cfg.run_dir)
    ingest = require_stage(run_dir, INGEST)
    sections = ("policy", "sft", "train") if cfg.sft.lora else ("policy", "sft")
    inputs = {"ingest": stage_identity(ingest)}

    def body(stage_path: str) -> StageCounts:
        base = cfg.policy.model
        if base == "tiny":
            texts = ingested_pairs(run_dir, ["prompt", "chosen", "rejected"])
            with tempfile.TemporaryDirectory() as tmp:
                build_tiny_model(
                    (t for column in texts.columns for t in column.to_pylist()), cfg.policy.tiny, tmp, cfg.seed
                )
                run_dir.upload_dir(tmp, *SFT_BASE)
            base = run_dir.uri_of(*SFT_BASE)
        counts = prepare(
            run_dir.path(*INGESTED_PAIRS),
            run_dir.path(*prepared_inputs(STAGE)),
            run_dir,
            base,
            cfg.policy,
            cfg.sft.max_length,
            cfg.sft.max_prompt_length,
            cfg.sft.eval_fraction,
            reference=False,
            examples=True,
        )
        factory = functools.partial(
            make_sft_recipe,
            cfg.run_dir,
            base,
            cfg.policy.model_dump(mode="json"),
            cfg.sft.model_dump(mode="json"),
            cfg.train.model_dump(mode="json"),
        )
        trained = fit_and_export(
            checkpoint_name(STAGE, cfg.section_hash(*sections), inputs),
            factory,
            cfg.sft,
            cfg.seed,
            run_dir,
            run_dir.uri_of(CHECKPOINTS),
            counts["eval"] > 0,
            folders={SFT_MODEL: cfg.sft.lora},  # LoRA merged: a full model either way
            metrics=training_metrics(STAGE),
            tensorboard=run_dir.uri_of(*tensorboard(STAGE)),
            callbacks=ctx.callbacks,
        )
        return prepared_stage_counts(
            STAGE,
            ingest["rows_out"],
            counts,
            trained,
            ("loss", "eval_loss"),
            {"model": in_stage(SFT_MODEL, folder=True)},
            examples={"train": counts["train"], "eval": counts["eval"]},
            base_model=cfg.policy.model,
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, sections, inputs, body)
