"""The run report: every finished stage's numbers and plots in `<run_dir>/report/` (Markdown and HTML).

    md, html = write_report("runs/demo")

The report is rebuilt from the manifests and the files the stages wrote, never from a stage's memory, so
it can be written at any time (the pipeline writes it at the end, `raybpo report` on demand). It is not
a stage: it has no manifest and is rewritten whole on every call. Contents:
- a stage table: state (done, not run, or incomplete: a folder without a manifest), rows in / out /
  quarantined, wall time, finish time and the stage's final metrics; quarantine reasons below it;
- breadth's `cluster_sizes.png`; every PNG of `depth/` (pairs per prompt, cluster sizes);
- training: `beta`, `beta/M0`, `rewards/margins` and `filter/kept_fraction` per step of `train` and of
  every variant `train-<name>` (their `metrics.jsonl`) in `training.png`, and a table of final metrics;
- reward models: the reward stage's table, from its manifest's `evaluation` (`raybpo.metrics.reward.reward_table`,
  the table of `reward/report/reward.md`), and its plots (reliability, rewards, lambda);
- evaluation: the win-rate table of `evaluate/evaluation.json` (`raybpo.metrics.winrates.winrate_rows`: the same
  numbers as `evaluate/winrates.md`) and `winrates.png`.
Images are copied into `report/` and linked by relative name, so the folder can be moved and opened
anywhere. `report.md` and `report.html` hold the same blocks; the HTML is one page with inline CSS.
"""

from __future__ import annotations

import html
import json
import math
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from raybpo import graph
from raybpo.artifacts import (
    BREADTH,
    BREADTH_CLUSTER_SIZES,
    DEPTH,
    EVALUATE,
    EVALUATION,
    REPORT,
    REPORT_HTML,
    REPORT_MARKDOWN,
    REWARD,
    REWARD_REPORT,
    TRAIN,
    TUNE,
    WINRATES_PLOT,
    relpath,
    training_metrics,
)
from raybpo.config import VARIANT_PREFIX
from raybpo.metrics.reward import reward_table
from raybpo.metrics.winrates import WINRATE_HEADER, winrate_note, winrate_rows
from raybpo.plots import png_bytes, subplots
from raybpo.rundir import RunDir, read_manifest
from raybpo.tables import markdown_table

STAGES = (*graph.ORDER, TUNE)  # the stage graph, then the sweep (a folder with a manifest too)
TRAINING_METRICS = ("beta", "beta/M0", "rewards/margins", "filter/kept_fraction")
STAGE_METRICS = ("loss", "eval_loss", "win_rate")
FINAL_COLUMNS = ("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "beta", "filter/kept_fraction")
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; } h2 { margin-top: 2em; color: #234; }
table { border-collapse: collapse; margin: 1em 0; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; } th { background: #f3f5f7; }
tr:nth-child(even) td { background: #fafafa; } img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
p.note { color: #555; font-size: 90%; } figure { margin: 1em 0; } figcaption { color: #666; font-size: 85%; }
"""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    name: str  # a file in report/
    caption: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


Block = Heading | Text | Table | Image | Bullets


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Table):
            out.append(markdown_table(block.header, block.rows))
        elif isinstance(block, Image):
            out.append(f"![{block.caption}]({block.name})")
        else:
            out.append("\n".join(f"- {item}" for item in block.items))
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{e(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            out.append(f'<p class="note">{e(block.text)}</p>')
        elif isinstance(block, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            alt = e(block.caption)
            out.append(f'<figure><img src="{e(block.name)}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
        else:
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )


def stage_folders(run_dir: RunDir) -> list[str]:
    """The known stages in pipeline order, with the variants `train-<name>` found on disk after `train`."""
    infos = run_dir.fs.get_file_info(pafs.FileSelector(run_dir.root, allow_not_found=True))
    variants = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
    variants = [name for name in variants if name.startswith(VARIANT_PREFIX)]
    at = STAGES.index(graph.VARIANTS_OF) + 1
    return [*STAGES[:at], *variants, *STAGES[at:]]


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_blocks(run_dir: RunDir, stages: list[str], manifests: dict[str, dict | None]) -> list[Block]:
    rows, reasons = [], []
    for stage in stages:
        m = manifests[stage]
        if m is None:
            state = "incomplete (no manifest)" if run_dir.exists(stage) else "not run"
            rows.append([stage, state, "", "", "", "", "", ""])
            continue
        final = m.get("final_metrics", {})
        shown = [k for k in STAGE_METRICS if k in final] or list(final)[:3]
        metrics = ", ".join(f"{k} {_number(final[k])}" for k in shown)
        rows.append(
            [
                stage,
                "done",
                str(m["rows_in"]),
                str(m["rows_out"]),
                str(m["rows_quarantined"]),
                f"{m['wall_time_s']:.1f}",
                m["created_at"],
                metrics,
            ]
        )
        reasons += [f"{stage}: {reason} ({count})" for reason, count in m.get("quarantine_reasons", {}).items()]
    header = (
        "stage",
        "state",
        "rows in",
        "rows out",
        "quarantined",
        "wall time (s)",
        "finished (UTC)",
        "final metrics",
    )
    blocks: list[Block] = [Heading("Stages"), Table(header, rows)]
    if reasons:
        blocks += [Text("Quarantined rows by reason (kept with their reason in each stage's quarantine/):")]
        blocks += [Bullets(reasons)]
    return blocks


def plot_training(histories: dict[str, list[dict[str, Any]]]) -> bytes:
    """beta, beta/M0, rewards/margins and filter/kept_fraction per step, one line per train stage (PNG)."""

    fig, axes = subplots(2, 2, figsize=(10, 6))
    for ax, metric in zip(axes.flat, TRAINING_METRICS, strict=True):
        for stage, history in histories.items():
            points = [(h["step"], h[metric]) for h in history if isinstance(h.get(metric), float | int)]
            points = [(s, v) for s, v in points if math.isfinite(v)]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=stage)
        ax.set(title=metric, xlabel="step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _pngs(run_dir: RunDir, *parts: str) -> list[str]:
    """Run-dir relative paths of the PNGs below a folder, sorted."""
    if not run_dir.exists(*parts):
        return []
    infos = run_dir.fs.get_file_info(pafs.FileSelector(run_dir.path(*parts), recursive=True))
    found = [posixpath.relpath(i.path, run_dir.root) for i in infos if i.type == pafs.FileType.File]
    return sorted(p for p in found if p.endswith(".png"))


def training_blocks(run_dir: RunDir, stages: list[str], manifests: dict[str, dict | None]) -> list[Block]:
    """The training section: trajectories of every finished train stage (`training.png`) and final metrics."""
    blocks: list[Block] = [Heading("Training: beta and margin trajectories")]
    if not stages:
        return [*blocks, Text("Not run (train has no finished run).")]
    histories = {
        stage: [
            json.loads(line)
            for line in run_dir.read_bytes(relpath(training_metrics(stage))).decode().splitlines()
            if line
        ]
        for stage in stages
        if run_dir.exists(*training_metrics(stage))
    }
    if histories:
        run_dir.write_bytes(f"{REPORT}/training.png", plot_training(histories))
        blocks.append(Image("training.png", "beta, beta/M0, reward margin and kept fraction per step"))
    header = ("stage", "objective", "alpha", "rho", "beta0", "pairs (train / eval)", "steps", *FINAL_COLUMNS)
    rows = []
    for stage in stages:
        m = manifests[stage] or {}
        train = m.get("config", {}).get("train", {})
        pairs = m.get("pairs", {})
        final = m.get("final_metrics", {})
        rows.append(
            [
                stage,
                str(train.get("loss", "")),
                _number(train.get("alpha", "")),
                _number(train.get("rho", "")),
                _number(train.get("beta0", "")),
                f"{pairs.get('train', '')} / {pairs.get('eval', '')}",
                str(m.get("steps", "")),
                *(_number(final[k]) if k in final else "" for k in FINAL_COLUMNS),
            ]
        )
    return [*blocks, Table(header, rows)]


def write_report(run_dir: RunDir | str) -> tuple[str, str]:
    """Write `report/report.md` and `report/report.html` (and the images they show); returns both paths."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_dir.remove(REPORT)
    stages = stage_folders(run_dir)
    manifests = {stage: read_manifest(run_dir, stage) for stage in stages}
    done = {stage for stage, m in manifests.items() if m is not None}
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    blocks: list[Block] = [Heading(f"raybpo report: {run_dir.uri}", 1), Text(f"Written {when} (UTC).")]
    blocks += stage_blocks(run_dir, stages, manifests)

    def image(source: str, caption: str) -> Image:
        name = source.replace("/", "-")
        run_dir.write_bytes(f"{REPORT}/{name}", run_dir.read_bytes(source))
        return Image(name, caption)

    def not_run(*needed: str) -> list[Block]:
        return [Text(f"Not run ({', '.join(needed)} has no finished run).")]

    blocks.append(Heading("Breadth: prompts and clusters"))
    if BREADTH in done and run_dir.exists(*BREADTH_CLUSTER_SIZES):
        blocks.append(image(relpath(BREADTH_CLUSTER_SIZES), "breadth: cluster sizes and kept prompts per cluster"))
    else:
        blocks += not_run(BREADTH)

    blocks.append(Heading("Depth: pairs per prompt"))
    depth_images = _pngs(run_dir, DEPTH) if DEPTH in done else []
    blocks += [image(p, p) for p in depth_images] or not_run(DEPTH)

    blocks += training_blocks(run_dir, [s for s in stages if s.startswith(TRAIN) and s in done], manifests)

    blocks.append(Heading("Reward models"))
    if REWARD in done:
        if "evaluation" in manifests[REWARD]:
            header, rows = reward_table(manifests[REWARD]["evaluation"])
            blocks.append(Table(tuple(header), rows))
        blocks += [image(p, p) for p in _pngs(run_dir, *REWARD_REPORT)]
    else:
        blocks += not_run(REWARD)

    blocks.append(Heading("Evaluation: win rates against the SFT policy"))
    if EVALUATE in done:
        evaluation = run_dir.read_json(relpath(EVALUATION))
        blocks += [Table(WINRATE_HEADER, winrate_rows(evaluation)), Text(winrate_note(evaluation))]
        if run_dir.exists(*WINRATES_PLOT):
            blocks.append(image(relpath(WINRATES_PLOT), "win rates against SFT with their intervals"))
    else:
        blocks += not_run(EVALUATE)

    title = f"raybpo report: {run_dir.uri}"
    run_dir.write_bytes(relpath(REPORT_MARKDOWN), to_markdown(blocks).encode())
    run_dir.write_bytes(relpath(REPORT_HTML), to_html(blocks, title).encode())
    return run_dir.uri_of(*REPORT_MARKDOWN), run_dir.uri_of(*REPORT_HTML)
