"""The `reward` stage: Bradley-Terry reward models over several preference sources, on Ray Train.

Modes (docs/ALGORITHMS.md section 2):
- `more`: every micro-batch holds `pairs_per_source_per_batch` pairs of EVERY source; the loss is
  sum_k lambda_k * L_BT(B_k), lambda the min-norm point of the normalised momentum head gradients
  (`MoreWeighting`). The head gradients are averaged over the data-parallel workers before solving,
  so every worker uses the same lambda (and N workers equal one worker with the same global batch).
- `multitask`: the same batches, the plain mean Bradley-Terry loss.
- `single`: one model per source, on that source alone.
- `average`: the single models, evaluated as one ensemble (the mean of their rewards).
Each source is resampled (seeded; truncated or up-sampled) to `samples_per_source` pairs. The trained
model is a Hugging Face sequence-classification folder: `<run_dir>/reward/model/` (or
`models/<source>/` for single and average). Evaluation per source follows in `raybpo.metrics.reward`.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from safetensors.torch import load_file
from torch import nn

from raybpo.artifacts import (
    CHECKPOINTS,
    INGEST,
    REWARD,
    REWARD_JUDGE,
    REWARD_MODEL,
    REWARD_MODELS,
    REWARD_REPORT,
    REWARD_TABLE,
    Parts,
    in_stage,
    read_pairs,
    reward_backbone,
    reward_member,
)
from raybpo.cluster import init_ray
from raybpo.config import Config, LoopConfig, RewardConfig
from raybpo.data.splits import judge_half, split_of
from raybpo.losses import MoreWeighting, bradley_terry_head_grads, bradley_terry_loss
from raybpo.metrics.reward import evaluate_reward_models, plot_lambda, summary, write_reward_report
from raybpo.models.reward import encode_texts, load_reward_model, pooled_and_rewards, reward_head
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
from raybpo.train.export import fit_and_export
from raybpo.train.loop import unwrap
from raybpo.train.recipe import Recipe, Workers

STAGE = REWARD
WEIGHTS = "model.safetensors"


def resample(rows: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """`size` rows: a shuffled truncation, or whole shuffled passes plus a shuffled part (up-sampling)."""
    out: list[int] = []
    while len(out) < size:
        out += [rows[i] for i in rng.permutation(len(rows))]
    return out[:size]


class RewardRecipe(Recipe):
    """Bradley-Terry over multi-source micro-batches; MORE weights or the plain mean."""

    def __init__(self, pairs: dict[str, list], model: str, cfg: RewardConfig, mode: str, half: int | None = None):
        self.pairs, self.model_name, self.cfg, self.mode = pairs, model, cfg, mode
        split = [split_of(pair_id, cfg.eval_fraction) for pair_id in pairs["pair_id"]]
        trains = [
            part == "train" and (half is None or judge_half(pair_id) == half)
            for pair_id, part in zip(pairs["pair_id"], split, strict=True)
        ]
        self.sources = sorted(set(pairs["source"]))
        self.by_source = {
            s: [i for i, (src, train) in enumerate(zip(pairs["source"], trains, strict=True)) if src == s and train]
            for s in self.sources
        }
        empty = [s for s, rows in self.by_source.items() if not rows]
        if empty:
            raise ValueError(f"sources {empty} have no training pairs")
        self.eval_rows = [i for i, part in enumerate(split) if part == "eval"]
        self.num_eval = len(self.eval_rows)
        self.train_lengths = np.zeros(0)
        self.weighting = MoreWeighting(cfg.momentum) if mode == "more" else None
        self.tokenizer = None

    def plan(self, cfg: LoopConfig, seed: int) -> list[list[list[int]]]:
        """Global micro-batches of `p` pairs of every source per worker; worker w's slice is [w*K*p, (w+1)*K*p)."""
        p, workers = self.cfg.pairs_per_source_per_batch, cfg.num_workers
        size = self.cfg.samples_per_source or max(map(len, self.by_source.values()))
        accumulation = cfg.batch_size // (cfg.micro_batch_size * workers)
        steps = []
        for epoch in range(cfg.epochs):
            rng = np.random.default_rng([seed, epoch])
            streams = {s: resample(rows, size, rng) for s, rows in self.by_source.items()}
            micro = [
                [row for w in range(workers) for s in self.sources for row in streams[s][(j * workers + w) * p :][:p]]
                for j in range(size // (workers * p))
            ]
            steps += [micro[i : i + accumulation] for i in range(0, len(micro) - accumulation + 1, accumulation)]
        return steps

    def build_model(self, device: torch.device) -> nn.Module:
        model, self.tokenizer = load_reward_model(self.model_name)
        return model.to(device)

    def rewards(self, model: nn.Module, rows: list[int], device: torch.device):
        """(z_chosen, z_rejected, r_chosen, r_rejected) of `rows` from ONE forward over chosen + rejected."""
        prompts = [self.pairs["prompt"][i] for i in rows]
        responses = [self.pairs["chosen"][i] for i in rows] + [self.pairs["rejected"][i] for i in rows]
        batch = encode_texts(self.tokenizer, prompts * 2, responses, self.cfg.max_length)
        z, r = pooled_and_rewards(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), self.tokenizer.pad_token_id
        )
        n = len(rows)
        return z[:n], z[n:], r[:n], r[n:]

    def loss(self, model, rows, workers: Workers, training: bool):
        if not training:
            rows = [self.eval_rows[i] for i in rows]
        z_chosen, z_rejected, r_chosen, r_rejected = self.rewards(model, rows, workers.device)
        per_pair = bradley_terry_loss(r_chosen, r_rejected)
        metrics: dict[str, torch.Tensor] = {
            "rewards/accuracies": (r_chosen > r_rejected).float().mean().detach(),
            "rewards/margins": (r_chosen - r_rejected).mean().detach(),
        }
        if not training or self.weighting is None:
            loss = per_pair.mean()
            return loss, {**metrics, "loss": loss.detach()}
        sources = [self.pairs["source"][i] for i in rows]
        masks = [torch.tensor([s == k for s in sources], device=workers.device) for k in self.sources]
        head = reward_head(unwrap(model)).weight
        grads = bradley_terry_head_grads(
            [z_chosen[m].detach() for m in masks], [z_rejected[m].detach() for m in masks], head.detach()
        )
        weights = self.weighting.update(workers.mean(grads).cpu()).to(per_pair)
        loss = sum(w * per_pair[m].mean() for w, m in zip(weights, masks, strict=True))
        metrics.update({f"lambda/{k}": w.detach() for k, w in zip(self.sources, weights, strict=True)})
        return loss, {**metrics, "loss": loss.detach()}

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load_model(self, model: nn.Module, directory: Path) -> None:
        missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
        if unexpected or any("score" in k or "classifier" in k for k in missing):
            raise RuntimeError(
                f"checkpoint {directory} does not match the model: missing {missing}, extra {unexpected}"
            )
        model.tie_weights()

    def counts(self) -> dict[str, int]:
        return {"eval": self.num_eval, "train": sum(map(len, self.by_source.values()))}

    def state_dict(self) -> dict[str, Any]:
        return {"more": self.weighting.state_dict()} if self.weighting else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.weighting is not None:
            self.weighting.load_state_dict(state["more"])


def make_reward_recipe(
    run_dir: str, model: str, reward: dict, mode: str, sources: list[str], half: int | None = None
) -> RewardRecipe:
    """Built inside each Ray Train worker: reads the ingested pairs of `run_dir`."""
    return RewardRecipe(read_pairs(RunDir(run_dir), sources), model, RewardConfig.model_validate(reward), mode, half)


def train_reward_model(
    cfg: Config,
    run_dir: RunDir,
    mode: str,
    sources: list[str],
    out: Parts,
    name: str,
    half: int | None = None,
    callbacks: Sequence[Any] = (),
) -> dict:
    """Train one reward model on `sources` (one `judge_half` of their pairs, or all) into `out` below the run
    directory (its metric history beside it, `<out>.metrics.jsonl`); returns the history and the pair counts.
    `callbacks` go to its TorchTrainer."""
    micro = cfg.reward.pairs_per_source_per_batch * len(sources)
    if cfg.reward.batch_size % (micro * cfg.reward.num_workers):
        raise ValueError(
            f"reward.batch_size={cfg.reward.batch_size} must be a multiple of pairs_per_source_per_batch * "
            f"{len(sources)} sources * num_workers = {micro * cfg.reward.num_workers}"
        )
    reward = cfg.reward.model_copy(update={"micro_batch_size": micro})
    factory = functools.partial(
        make_reward_recipe,
        cfg.run_dir,
        reward_backbone(cfg, run_dir).uri,
        reward.model_dump(mode="json"),
        mode,
        sources,
        half,
    )
    # The held-out pairs are the evaluation's test set, so no checkpoint is chosen on them: the last is kept.
    trained = fit_and_export(
        name,
        factory,
        reward,
        cfg.seed,
        run_dir,
        run_dir.uri_of(CHECKPOINTS),
        False,
        folders={out: False},
        metrics=(*out[:-1], f"{out[-1]}.metrics.jsonl"),
        callbacks=callbacks,
    )
    return {"history": trained.history, "eval_pairs": trained.counts["eval"], "train_pairs": trained.counts["train"]}


def train_at_once(jobs: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Run the stage's reward-model trainings at once (each its own Ray Train run, which waits for its workers'
    resources while the cluster has none free); their results by name, the first error raised after all end."""
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="reward") as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


def run_reward(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `reward` stage: train (MORE / multitask / single models), evaluate per source, write the report."""
    run_dir = RunDir(cfg.run_dir)
    ingest = require_stage(run_dir, INGEST)
    inputs = {"ingest": stage_identity(ingest)}
    if cfg.reward.model == "sft":
        inputs["sft"] = reward_backbone(cfg, run_dir).identity
    mode = cfg.reward.mode

    def body(stage_path: str) -> StageCounts:
        pairs = read_pairs(run_dir)
        sources = sorted(set(pairs["source"]))
        identity = checkpoint_name(STAGE, cfg.section_hash("reward"), inputs)
        train = functools.partial(train_reward_model, cfg, run_dir, callbacks=ctx.callbacks)
        if mode in ("more", "multitask") and cfg.reward.judge_model:
            outputs = {"model": REWARD_MODEL, "judge": REWARD_JUDGE}
            runs = train_at_once(
                {
                    name: functools.partial(train, mode, sources, outputs[name], f"{identity}-{name}", half)
                    for half, name in enumerate(outputs)
                }
            )
            members = {name: [run_dir.uri_of(*parts)] for name, parts in outputs.items()}
        elif mode in ("more", "multitask"):
            runs = {"model": train(mode, sources, REWARD_MODEL, identity)}
            members = {"model": [run_dir.uri_of(*REWARD_MODEL)]}
        else:
            runs = train_at_once(
                {
                    f"models/{s}": functools.partial(train, "single", [s], reward_member(s), f"{identity}-{s}")
                    for s in sources
                }
            )
            models = [run_dir.uri_of(*reward_member(s)) for s in sources]
            members = (
                {f"single:{s}": [m] for s, m in zip(sources, models, strict=True)}
                if mode == "single"
                else {"average": models}
            )
        # The models are scored on the held-out pairs in a Ray task, where they are loaded (not in the driver).
        evaluate = ray.remote(evaluate_reward_models).options(
            num_cpus=cfg.reward.cpus_per_worker,
            scheduling_strategy="DEFAULT",  # outside a Tune trial's group
        )
        evaluation = ray.get(evaluate.remote(members, pairs, cfg.reward))
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report"
            write_reward_report(evaluation, report)
            lambdas = {
                k: [h for h in run["history"] if any(m.startswith("lambda/") for m in h)] for k, run in runs.items()
            }
            if mode == "more":
                plot_lambda(lambdas["model"], report / "lambda.png")
            run_dir.upload_dir(report, *REWARD_REPORT)
        eval_pairs = sum(r["eval_pairs"] for r in runs.values())
        return StageCounts(
            rows_in=len(pairs["pair_id"]),
            rows_out=len(pairs["pair_id"]),
            extra={
                "mode": mode,
                "sources": sources,
                "train_pairs": {k: r["train_pairs"] for k, r in runs.items()},
                "eval_pairs": eval_pairs,
                "evaluation": summary(evaluation),
                "outputs": {
                    **(
                        {"model": in_stage(REWARD_MODEL, folder=True)}
                        if mode in ("more", "multitask")
                        else {"models": in_stage(REWARD_MODELS, folder=True)}
                    ),
                    **({"judge": in_stage(REWARD_JUDGE, folder=True)} if "judge" in runs else {}),
                    "report": in_stage(REWARD_TABLE),
                },
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("reward",), inputs, body)
