"""The sweep's results: a console line per trial, the ranked table, best_config.yaml, the summary and manifest."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import ray
import ray.tune
import yaml

from raybpo.artifacts import TUNE
from raybpo.config import Config, TuneConfig, with_overrides
from raybpo.rundir import MANIFEST, RunDir, package_versions
from raybpo.tables import markdown_table
from raybpo.tune.search import SEARCH_SPACE, describe, trial_name
from raybpo.tune.trial import EARLY_STOPPED, FAILED, FINISHED


@dataclass
class TrialRow:
    """One trial in the results table."""

    name: str
    overrides: dict[str, Any]
    status: str
    metric: float | None
    early_stop_metric: float | None
    steps: int | None
    wall_s: float | None
    tail: str
    run_dir: str
    error: str = ""


@dataclass
class TuneSummary:
    """The sweep: its rows best first, the best trial (None when no trial finished with a metric), the files."""

    rows: list[TrialRow]
    best: TrialRow | None
    outputs: dict[str, str]


class TrialLines(ray.tune.Callback):
    """One console line per trial as it ends (with the last train report it sent when it was stopped early)."""

    def __init__(self, metric: str, early_stop_metric: str | None):
        self._metric, self._early = metric, early_stop_metric
        self._last: dict[str, dict] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "step" in result:
            self._last[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("status") == EARLY_STOPPED:
            last = self._last.get(trial.trial_id, {})
            shown = f"early-stopped at step {last.get('step')} ({self._early} {last.get(self._early, math.nan):.4g})"
        else:
            shown = f"{result.get('status')}, {self._metric} {result.get(self._metric, math.nan):.4g}"
        self._print(trial, f"{shown}, {result.get('time_total_s', 0.0):.1f} s")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trial, "failed (the error is in the table)")

    @staticmethod
    def _print(trial: Any, text: str) -> None:
        print(f"{trial_name(trial.config['overrides'])} ({describe(trial.config['overrides'])}): {text}", flush=True)


def early_column(tc: TuneConfig) -> str:
    """The table's training column: the early-stopping metric, or eval_loss without early stopping."""
    return tc.early_stop_metric or "eval_loss"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def trial_row(result: Any, cfg: Config, main: RunDir) -> TrialRow:
    """A trial's row from its Tune result: status, final metric, and the last early-stopping metric it reported."""
    overrides = result.config["overrides"]
    final = result.metrics or {}
    status = FAILED if result.error is not None else final.get("status", FAILED)
    column, early, steps = early_column(cfg.tune), None, None
    frame = result.metrics_dataframe
    if frame is not None and "step" in frame:
        reports = frame[frame["step"].notna()]
        steps = int(reports["step"].max()) if len(reports) else None
        if column in reports and reports[column].notna().any():
            early = _number(reports[column].dropna().iloc[-1])
    if early is None:
        early = _number(final.get(column))
    error = str(result.error).strip().splitlines()[-1][:200] if result.error is not None else ""
    return TrialRow(
        name=trial_name(overrides),
        overrides=overrides,
        status=status,
        metric=_number(final.get(cfg.tune.metric)) if status == FINISHED else None,
        early_stop_metric=early,
        steps=steps,
        wall_s=_number(final.get("time_total_s")),
        tail=final.get("tail", ""),
        run_dir=main.uri_of(TUNE, trial_name(overrides)),
        error=error,
    )


def rank(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Finished trials with a metric best first, then the other finished, early-stopped, failed ones."""
    sign = -1.0 if mode == "max" else 1.0
    order = {FINISHED: 0, EARLY_STOPPED: 1, FAILED: 2}
    return sorted(
        rows, key=lambda r: (order[r.status], r.metric is None, sign * r.metric if r.metric is not None else 0.0)
    )


def table(rows: list[TrialRow], cfg: Config) -> tuple[list[str], list[list[str]]]:
    """The results table's header and cells (best first)."""
    keys = list(cfg.tune.search_space)
    header = ["rank", "trial", *keys, "status", cfg.tune.metric, early_column(cfg.tune)]
    header += ["steps", "wall_s", "tail", "error"]

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [
        [
            str(i),
            r.name,
            *(json.dumps(r.overrides[k]) for k in keys),
            r.status,
            cell(r.metric),
            cell(r.early_stop_metric),
            cell(r.steps),
            cell(r.wall_s),
            r.tail,
            r.error,
        ]
        for i, r in enumerate(rows, start=1)
    ]
    return header, cells


def write_outputs(cfg: Config, main: RunDir, rows: list[TrialRow], first: str, seconds: float) -> TuneSummary:
    """results.csv, results.md, best_config.yaml, summary.json, then manifest.json (last)."""
    best = rows[0] if rows and rows[0].status == FINISHED and rows[0].metric is not None else None
    header, cells = table(rows, cfg)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *cells])
    main.write_bytes(f"{TUNE}/results.csv", buffer.getvalue().encode())
    rule = (
        f"ASHA on {cfg.tune.early_stop_metric} ({cfg.tune.early_stop_mode}) at the train stage's checkpoint steps"
        if cfg.tune.early_stop_metric
        else "no early stopping"
    )
    note = f"Ranked by {cfg.tune.metric} ({cfg.tune.mode}); {rule}; {early_column(cfg.tune)}: the last one reported."
    text = f"# Tune: {len(rows)} trials\n\n{markdown_table(header, cells)}\n\n{note}\n"
    main.write_bytes(f"{TUNE}/results.md", text.encode())
    outputs = {"results": "results.csv", "table": "results.md", "summary": "summary.json"}
    if best is not None:
        best_cfg = with_overrides(cfg, best.overrides, SEARCH_SPACE).model_dump(mode="json")
        comment = f"# best of `raybpo tune` ({cfg.tune.metric} {best.metric:.4g}): {describe(best.overrides)}\n"
        main.write_bytes(f"{TUNE}/best_config.yaml", (comment + yaml.safe_dump(best_cfg, sort_keys=False)).encode())
        outputs["best_config"] = "best_config.yaml"
    summary = {
        "metric": cfg.tune.metric,
        "mode": cfg.tune.mode,
        "early_stopping": rule,
        "search": cfg.tune.search,
        "search_space": cfg.tune.search_space,
        "first_stage": first,
        "best": asdict(best) if best else None,
        "trials": [asdict(r) for r in rows],
        "wall_time_s": round(seconds, 3),
    }
    main.write_json(f"{TUNE}/summary.json", summary)
    failed = sum(r.status == FAILED for r in rows)
    main.write_json(
        f"{TUNE}/{MANIFEST}",
        {
            "stage": TUNE,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"seed": cfg.seed, TUNE: cfg.tune.model_dump(mode="json")},
            "config_hash": cfg.section_hash(TUNE),
            "input_hashes": {},
            "rows_in": len(rows),
            "rows_out": sum(r.status == FINISHED for r in rows),
            "rows_quarantined": failed,
            "quarantine_reasons": {FAILED: failed} if failed else {},
            "final_metrics": {cfg.tune.metric: best.metric} if best else {},
            "best_trial": best.name if best else None,
            "outputs": outputs,
            "wall_time_s": round(seconds, 3),
            "versions": package_versions(),
        },
    )
    return TuneSummary(rows, best, {k: main.uri_of(TUNE, v) for k, v in outputs.items()})
