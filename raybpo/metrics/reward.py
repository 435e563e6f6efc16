"""Reward-model metrics, free of Ray: accuracy, ECE and reward drift per source, and the reward report.

`evaluate_reward_models` (called by the reward stage on each source's held-out pairs, the `eval` split, a
stable function of `pair_id`): for every model (or ensemble, whose reward is the mean of its members'):
accuracy (r_w > r_l), ECE with equal-width bins on sigmoid(r_w - r_l) (top-label), and the mean and std of
the rewards (reward drift between sources). `write_reward_report` writes them as `reward.json`, `reward.md`,
a reliability diagram and reward distributions (PNG).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raybpo.config import RewardConfig
from raybpo.data.splits import split_of
from raybpo.losses import expected_calibration_error, preference_accuracy
from raybpo.models.reward import encode_texts, load_reward_model
from raybpo.plots import png_bytes, subplots
from raybpo.tables import markdown_table

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


def evaluate_reward_models(members: dict[str, list[str]], pairs: dict[str, list], cfg: RewardConfig) -> dict[str, Any]:
    """{model name: {source: metrics}} on each source's eval split; an ensemble averages its members (model folders
    or their URIs, resolved where this runs)."""
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

    out.mkdir(parents=True, exist_ok=True)
    (out / "reward.json").write_text(json.dumps(summary(evaluation), indent=2, sort_keys=True))
    (out / "reward.md").write_text("# Reward models\n\n" + reward_markdown(evaluation))

    models, sources = evaluation["models"], evaluation["sources"]
    fig, axes = subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items(), strict=True):
        for source in sources:
            centers, accuracy = reliability(np.array(m["per_source"][source]["margins"]))
            ax.plot(centers, accuracy, marker="o", label=source)
        ax.plot([0.5, 1], [0.5, 1], "k--", linewidth=1)
        ax.set(title=f"{name} (ECE {m['ece']:.3f})", xlabel="confidence sigmoid(|r_w - r_l|)", ylabel="accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "reliability.png").write_bytes(png_bytes(fig))

    fig, axes = subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False)
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

    names = sorted({k for h in history for k in h if k.startswith("lambda/")})
    fig, ax = subplots(figsize=(6, 3.5))
    for name in names:
        points = [(h["step"], h[name]) for h in history if name in h and math.isfinite(h[name])]
        ax.plot(*zip(*points, strict=True), label=name.removeprefix("lambda/"))
    ax.set(title="MORE loss weights", xlabel="step", ylabel="lambda", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.write_bytes(png_bytes(fig))
