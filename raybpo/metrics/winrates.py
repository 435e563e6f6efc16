"""Policy win rates against the SFT policy, free of Ray (docs/ALGORITHMS.md section 3.4).

- outcome of a comparison: 1 when the policy's response scores higher than the SFT response of the same
  prompt and seed, 0 when lower, 0.5 for a tie (equal scores, or the same text);
- win rate: the mean outcome p over the n scored comparisons; its interval is the normal one on that
  mean, p -/+ z * s / sqrt(n), s the sample standard deviation of the outcomes (ddof 1), z the normal
  quantile of (1 + `evaluate.confidence`) / 2, clipped to [0, 1] (n = 1: [0, 1]; n = 0: none);
- a comparison with a failed judgement (either side) is quarantined with the judge's reason, not lost;
- the table (`winrate_rows`, `winrate_note`, `winrate_markdown`) and the plot (`plot_winrates`) of an
  `evaluation.json`, shared by the evaluate stage's `winrates.md` and the run report.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa

from raybpo.data.schema import prompt_key
from raybpo.plots import png_bytes, subplots
from raybpo.tables import markdown_table

BASELINE = "sft"
WIN, TIE, LOSS = 1.0, 0.5, 0.0
COMPARISONS = pa.schema(
    [
        ("policy", pa.string()),
        ("prompt_key", pa.string()),
        ("prompt", pa.string()),
        ("sample", pa.int32()),
        ("response", pa.string()),
        ("sft_response", pa.string()),
        ("score", pa.float64()),
        ("sft_score", pa.float64()),
        ("outcome", pa.float64()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class WinRate:
    """Counts of one policy's comparisons with SFT, the win rate (ties half) and its normal interval."""

    wins: int
    ties: int
    losses: int
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def comparisons(self) -> int:
        return self.wins + self.ties + self.losses


def outcome(score: float, sft_score: float, same_response: bool = False) -> float:
    """1 when the policy's response scores higher, 0 when lower, 0.5 on equal scores or the very same text."""
    if same_response or score == sft_score:
        return TIE
    return WIN if score > sft_score else LOSS


def win_rate(wins: int, ties: int, losses: int, confidence: float) -> WinRate:
    """The mean outcome p (win 1, tie 0.5, loss 0) and the normal interval p -/+ z * s / sqrt(n), in [0, 1].

    s is the sample standard deviation (ddof 1) of the n outcomes and z the normal quantile of
    (1 + confidence) / 2; one comparison gives the whole [0, 1], none gives no rate at all.
    """
    n = wins + ties + losses
    if n == 0:
        return WinRate(wins, ties, losses, None, None, None)
    p = (wins + TIE * ties) / n
    if n == 1:
        return WinRate(wins, ties, losses, p, 0.0, 1.0)
    squares = wins * (WIN - p) ** 2 + ties * (TIE - p) ** 2 + losses * (LOSS - p) ** 2
    half = NormalDist().inv_cdf((1 + confidence) / 2) * math.sqrt(squares / (n - 1) / n)
    return WinRate(wins, ties, losses, p, max(0.0, p - half), min(1.0, p + half))


def compare(responses: pa.Table, policies: list[str], prompts: list[str], samples: int) -> pa.Table:
    """One row per (policy, prompt, sample): both responses and scores, the outcome, or why it has none.

    A comparison whose policy or SFT response has no score (a failed judgement, or no response at all)
    gets a null outcome and that reason: it is quarantined, not dropped.
    """
    index = {(r["origin"], r["prompt_key"], r["candidate"]): r for r in responses.to_pylist()}
    missing = {"score": None, "response": None, "reason": "missing_response"}
    out: dict[str, list] = {name: [] for name in COMPARISONS.names}
    for policy in policies:
        for prompt in prompts:
            key = prompt_key(prompt)
            for sample in range(samples):
                mine = index.get((policy, key, sample), missing)
                base = index.get((BASELINE, key, sample), missing)
                reason = mine["reason"] or base["reason"] or ""
                result = None if reason else outcome(mine["score"], base["score"], mine["response"] == base["response"])
                values = (policy, key, prompt, sample, mine["response"], base["response"])
                values += (mine["score"], base["score"], result, reason)
                for name, value in zip(COMPARISONS.names, values, strict=True):
                    out[name].append(value)
    return pa.table(out, schema=COMPARISONS)


def summarize(comparisons: pa.Table, policy: str, confidence: float) -> dict[str, Any]:
    """A policy's counts, win rate, interval and mean scores (of its scored comparisons)."""
    rows = [r for r in comparisons.to_pylist() if r["policy"] == policy]
    scored = [r for r in rows if not r["reason"]]
    outcomes = Counter(r["outcome"] for r in scored)
    rate = win_rate(outcomes[WIN], outcomes[TIE], outcomes[LOSS], confidence)
    return {
        "comparisons": len(rows),
        "scored": len(scored),
        "quarantined": len(rows) - len(scored),
        "wins": rate.wins,
        "ties": rate.ties,
        "losses": rate.losses,
        "win_rate": rate.win_rate,
        "ci_low": rate.ci_low,
        "ci_high": rate.ci_high,
        "mean_score": float(np.mean([r["score"] for r in scored])) if scored else None,
        "mean_score_sft": float(np.mean([r["sft_score"] for r in scored])) if scored else None,
    }


WINRATE_HEADER = ("policy", "selection", "loss", "pairs", "prompts", "win rate vs SFT", "CI", "wins / ties / losses")


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def winrate_rows(evaluation: dict[str, Any]) -> list[list[str]]:
    """The win-rate table's cells (WINRATE_HEADER), one row per policy, numbers to 3 decimals."""
    return [
        [
            p["name"],
            p["selection"],
            p["loss_label"],
            str(p["pairs"]),
            str(p["prompts"]),
            _rate(p["win_rate"]),
            f"[{_rate(p['ci_low'])}, {_rate(p['ci_high'])}]",
            f"{p['wins']} / {p['ties']} / {p['losses']}",
        ]
        for p in evaluation["policies"]
    ]


def winrate_note(evaluation: dict[str, Any]) -> str:
    """What the table's numbers are: judge, prompts, samples, the interval and the quarantine."""
    level = f"{evaluation['confidence']:.0%}"
    quarantined = sum(p["quarantined"] for p in evaluation["policies"])
    return (
        f"Judge: {evaluation['labelled']}. {evaluation['eval_prompts']} held-out prompts "
        f"({evaluation['prompt_source']}) x {evaluation['samples_per_prompt']} seeded sample(s), "
        "the same seeds for the policy and SFT. "
        f"Win rate = mean outcome (win 1, tie 0.5, loss 0); CI = {level} normal interval on that mean, clipped to "
        f"[0, 1]. Pairs and prompts: the data the policy was trained on. Comparisons quarantined (judge failures): "
        f"{quarantined}."
    )


def winrate_markdown(evaluation: dict[str, Any]) -> str:
    table = markdown_table(WINRATE_HEADER, winrate_rows(evaluation))
    return "# Win rates against the SFT policy\n\n" + table + "\n\n" + winrate_note(evaluation) + "\n"


def plot_winrates(evaluation: dict[str, Any]) -> bytes:
    """Horizontal bars of the win rates with their intervals, and the 0.5 line (PNG bytes)."""

    policies = evaluation["policies"]
    labels = [f"{p['name']}\n{p['pairs']} pairs, {p['prompts']} prompts" for p in policies]
    rates = [p["win_rate"] if p["win_rate"] is not None else np.nan for p in policies]
    errors = [
        [r - p["ci_low"] if p["ci_low"] is not None else 0 for r, p in zip(rates, policies, strict=True)],
        [p["ci_high"] - r if p["ci_high"] is not None else 0 for r, p in zip(rates, policies, strict=True)],
    ]
    fig, ax = subplots(figsize=(7, 1.2 + 0.7 * len(policies)))
    ax.barh(range(len(policies)), rates, xerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.axvline(0.5, color="k", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(policies)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel=f"win rate vs SFT ({evaluation['confidence']:.0%} CI)", title=evaluation["labelled"])
    fig.tight_layout()
    return png_bytes(fig)
