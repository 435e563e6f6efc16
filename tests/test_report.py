"""The run report: every finished stage's numbers and plots, missing stages listed, and the win-rate table
equal to evaluation.json, in Markdown and HTML that link only images copied beside them."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from raybpo.config import Config
from raybpo.metrics.winrates import WINRATE_HEADER, plot_winrates, winrate_markdown
from raybpo.report import write_report
from raybpo.rundir import RunDir, StageCounts, run_stage

POLICIES = [
    {
        "name": "train",
        "variant": None,
        "selection": "bpo",
        "loss": "dpo",
        "alpha": 0.6,
        "rho": 0.8,
        "beta0": 0.1,
        "loss_label": "beta-DPO (alpha=0.6, rho=0.8, beta0=0.1)",
        "pairs": 120,
        "prompts": 40,
        "comparisons": 30,
        "scored": 29,
        "quarantined": 1,
        "wins": 17,
        "ties": 4,
        "losses": 8,
        "win_rate": 0.655172,
        "ci_low": 0.487301,
        "ci_high": 0.823043,
        "mean_score": 1.2,
        "mean_score_sft": 0.9,
    },
    {
        "name": "train-random",
        "variant": "random",
        "selection": "random",
        "loss": "dpo",
        "alpha": 0.0,
        "rho": 1.0,
        "beta0": 0.1,
        "loss_label": "DPO (beta0=0.1)",
        "pairs": 120,
        "prompts": 97,
        "comparisons": 30,
        "scored": 30,
        "quarantined": 0,
        "wins": 12,
        "ties": 3,
        "losses": 15,
        "win_rate": 0.45,
        "ci_low": 0.2791,
        "ci_high": 0.6209,
        "mean_score": 0.8,
        "mean_score_sft": 0.9,
    },
]
EVALUATION = {
    "judge": "oracle",
    "labelled": "oracle: the benchmark's ground truth",
    "baseline": {"name": "sft", "model": "sft/model"},
    "eval_prompts": 15,
    "prompt_source": "ingest/benchmark/eval_prompts.jsonl",
    "samples_per_prompt": 2,
    "confidence": 0.95,
    "interval": "normal",
    "policies": POLICIES,
}

REWARD_EVALUATION = {  # the reward stage's manifest's `evaluation` (raybpo.metrics.reward.summary) for one source
    "sources": ["a"],
    "eval_pairs": {"a": 25},
    "models": {
        "model": {
            "per_source": {"a": {"accuracy": 0.64, "ece": 0.031, "reward_mean": 0.2, "reward_std": 1.1}},
            "mean_accuracy": 0.64,
            "worst_accuracy": 0.64,
            "ece": 0.031,
            "reward_drift": 0.0,
        }
    },
}


def _stage(run_dir: RunDir, cfg: Config, name: str, files: dict[str, bytes], **extra) -> None:
    def body(stage_path: str) -> StageCounts:
        for relpath, data in files.items():
            run_dir.write_bytes(f"{name}/{relpath}", data)
        return StageCounts(rows_in=10, rows_out=9, rows_quarantined=1, quarantine_reasons={"too_long": 1}, extra=extra)

    run_stage(run_dir, name, cfg, ("train",), {}, body)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A hand-made run dir: ingest, train + a variant, depth, reward, evaluate; sft half-written; no breadth."""
    root = tmp_path_factory.mktemp("report") / "run"
    cfg, run_dir = Config(run_dir=str(root)), RunDir(str(root))
    png = plot_winrates(EVALUATION)
    history = "".join(
        json.dumps({"step": s, "beta": 0.1 + 0.01 * s, "beta/M0": 0.1 * s, "rewards/margins": 0.2 * s}) + "\n"
        for s in range(1, 6)
    ).encode()
    _stage(run_dir, cfg, "ingest", {})
    run_dir.write_bytes("sft/metrics.jsonl", b"")  # a stage that died half-way: no manifest
    for name in ("train", "train-random"):
        final = {"loss": 0.6, "beta": 0.15, "filter/kept_fraction": 0.75}
        _stage(run_dir, cfg, name, {"metrics.jsonl": history}, pairs={"train": 120, "eval": 8}, final_metrics=final)
    _stage(run_dir, cfg, "depth", {"pairs_per_prompt.png": png, "cluster_sizes.png": png})
    _stage(run_dir, cfg, "reward", {"report/reliability.png": png}, evaluation=REWARD_EVALUATION)
    files = {
        "evaluation.json": json.dumps(EVALUATION).encode(),
        "winrates.md": winrate_markdown(EVALUATION).encode(),
        "winrates.png": png,
    }
    _stage(run_dir, cfg, "evaluate", files, final_metrics={"win_rate": 0.655172})
    run_dir.write_bytes("report/stale.txt", b"from an earlier report")
    md, html = write_report(str(root))
    assert (md, html) == (str(root / "report/report.md"), str(root / "report/report.html"))
    return root


class _Html(HTMLParser):
    """Tables (rows of cell texts) and image sources of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        else:
            current = None
    return tables


def _check_winrates(table: list[list[str]]) -> None:
    """The rendered win-rate table holds evaluation.json's numbers (to the 3 decimals shown)."""
    assert tuple(table[0]) == WINRATE_HEADER
    column = {name: i for i, name in enumerate(WINRATE_HEADER)}
    assert [row[0] for row in table[1:]] == [p["name"] for p in POLICIES]
    for row, policy in zip(table[1:], POLICIES, strict=True):
        assert int(row[column["pairs"]]) == policy["pairs"] and int(row[column["prompts"]]) == policy["prompts"]
        assert float(row[column["win rate vs SFT"]]) == pytest.approx(policy["win_rate"], abs=5e-4)
        low, high = (float(x) for x in re.fullmatch(r"\[(.+), (.+)\]", row[column["CI"]]).groups())
        assert (low, high) == pytest.approx((policy["ci_low"], policy["ci_high"]), abs=5e-4)
        counts = [int(x) for x in row[column["wins / ties / losses"]].split(" / ")]
        assert counts == [policy["wins"], policy["ties"], policy["losses"]]
        assert row[column["selection"]] == policy["selection"] and row[column["loss"]] == policy["loss_label"]


def test_report_markdown_and_html_show_the_same_win_rates_as_the_json(run):
    md = (run / "report/report.md").read_text()
    page = _Html()
    page.feed((run / "report/report.html").read_text())
    for tables in (_markdown_tables(md), page.tables):
        winrates = [t for t in tables if t and tuple(t[0]) == WINRATE_HEADER]
        assert len(winrates) == 1
        _check_winrates(winrates[0])


def test_report_links_only_images_copied_beside_it(run):
    md = (run / "report/report.md").read_text()
    page = _Html()
    page.feed((run / "report/report.html").read_text())
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert linked == page.images and len(linked) == len(set(linked))
    assert set(linked) == {
        "depth-cluster_sizes.png",
        "depth-pairs_per_prompt.png",
        "training.png",
        "reward-report-reliability.png",
        "evaluate-winrates.png",
    }
    for name in linked:
        assert "/" not in name and (run / "report" / name).stat().st_size > 1000
    assert not (run / "report/stale.txt").exists()  # the report folder is rewritten whole
    assert "<style>" in (run / "report/report.html").read_text()


def test_report_lists_every_stage_with_its_state_and_counts(run):
    stages = {row[0]: row for row in _markdown_tables((run / "report/report.md").read_text())[0][1:]}
    assert list(stages) == [
        "ingest",
        "sft",
        "reward",
        "breadth",
        "generate",
        "score",
        "depth",
        "train",
        "train-random",
        "evaluate",
        "tune",
    ]
    assert stages["sft"][1] == "incomplete (no manifest)"
    assert {s for s, row in stages.items() if row[1] == "not run"} == {"breadth", "generate", "score", "tune"}
    assert stages["ingest"][1:5] == ["done", "10", "9", "1"]
    assert "win_rate 0.6552" in stages["evaluate"][7]
    md = (run / "report/report.md").read_text()
    assert "ingest: too_long (1)" in md and "Not run (breadth has no finished run)." in md
    assert "| model | 0.640 | 0.640 | 0.640 | 0.0310 | 0.000 |" in md  # the reward stage's table


def test_report_of_an_empty_run_lists_every_stage_as_not_run(tmp_path):
    md, html = write_report(RunDir(str(tmp_path / "empty")))
    text = Path(md).read_text()
    assert text.count("| not run |") == 10 and "![" not in text and Path(html).exists()
