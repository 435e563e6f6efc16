"""`raybpo`: one command per stage of the graph (raybpo/graph.py), plus `run`, `demo`, `tune`, `report` and `export`.

Every command takes `--config FILE.yaml`, `--run-dir DIR` and dotted overrides (`train.beta0=0.2`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from raybpo import graph
from raybpo.artifacts import INGEST, INGESTED_PAIRS, REWARD, WINRATES_TABLE, relpath
from raybpo.config import FORMATS, Config, ConfigError, SourceSpec, load_config, variant_stage
from raybpo.data.export import export_trl
from raybpo.metrics.reward import reward_markdown
from raybpo.models.loading import ModelNotFoundError
from raybpo.models.tokenize import TokenizationError
from raybpo.pipeline import StageRun, run_pipeline, summary_table
from raybpo.report import write_report
from raybpo.rundir import ForeignFolderError, RunDir, StageMissingError, StageResult
from raybpo.selection.depth import DepthError
from raybpo.stages.breadth import BreadthError
from raybpo.stages.ingest import IngestError
from raybpo.train.loop import NonFiniteLossError

DEMO_PRESET = str(Path(__file__).parent / "presets" / "demo.yaml")
SOURCE_OPTIONS = ("format", "name", "split", "subset", "pku_preference")
COLUMN_KEYS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")


def parse_source(text: str) -> SourceSpec:
    """`PATH[,format=F][,name=N][,split=S][,subset=X][,pku_preference=safer][,prompt=COL,...]`."""
    path, *options = text.split(",")
    fields: dict = {"path": path}
    columns = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in SOURCE_OPTIONS + COLUMN_KEYS:
            raise ConfigError(
                f"--source {text!r}: bad option {option!r}; options are {', '.join(SOURCE_OPTIONS)} "
                f"(formats: {', '.join(FORMATS)}) and, for format=columns, {', '.join(COLUMN_KEYS)}=COLUMN"
            )
        if key in COLUMN_KEYS:
            columns[key] = value
        else:
            fields[key] = value
    if columns:
        fields["columns"] = columns
    try:
        return SourceSpec.model_validate(fields)
    except ValueError as err:
        raise ConfigError(f"--source {text!r}: {err}") from None


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    return cfg


def _print_result(result: StageResult, run_dir: str) -> None:
    m = result.manifest
    state = "up to date, skipped" if result.skipped else f"done in {m['wall_time_s']:.1f} s"
    print(f"{m['stage']}: {state}")
    print(f"  rows in {m['rows_in']}, out {m['rows_out']}, quarantined {m['rows_quarantined']}", end="")
    print(f", duplicates removed {m['duplicates_removed']}" if "duplicates_removed" in m else "")
    for name, value in m.get("final_metrics", {}).items():
        print(f"  {name}: {value:.4g}")
    for reason, count in m["quarantine_reasons"].items():
        print(f"    {reason}: {count}")
    for name, output in m.get("outputs", {}).items():
        print(f"  {name}: {run_dir.rstrip('/')}/{m['stage']}/{output}")
    print(f"  manifest: {run_dir.rstrip('/')}/{m['stage']}/manifest.json")


def _run_stage(cfg: Config, name: str) -> StageResult:
    result = graph.step(cfg, name).run()
    _print_result(result, cfg.run_dir)
    return result


def cmd_stage(args: argparse.Namespace) -> None:
    """One stage of the graph; `raybpo train --variant NAME` runs the variant's stage `train-NAME`."""
    cfg = _config(args)
    variant = getattr(args, "variant", None)
    if variant is not None and variant not in cfg.evaluate.variants:
        known = ", ".join(cfg.evaluate.variants) or "none"
        raise ConfigError(f"--variant {variant!r}: evaluate.variants has no such entry (it has: {known})")
    _run_stage(cfg, variant_stage(variant) if variant else args.command)


def cmd_ingest(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.source:
        cfg.ingest.sources = [*cfg.ingest.sources, *(parse_source(s) for s in args.source)]
    if args.preset:
        cfg.ingest.preset = args.preset
    _run_stage(cfg, INGEST)


def cmd_reward(args: argparse.Namespace) -> None:
    print(reward_markdown(_run_stage(_config(args), REWARD).manifest["evaluation"]))


STAGE_COMMANDS = {INGEST: cmd_ingest, REWARD: cmd_reward}  # the others: cmd_stage


def _run_pipeline(cfg: Config, from_stage: str | None = None, until_stage: str | None = None) -> None:
    """Run the stage graph with a line per stage as it ends, then the one-screen summary."""

    def progress(index: int, total: int, run: StageRun) -> None:
        print(f"\n[{index}/{total}] ", end="")
        _print_result(StageResult(run.manifest, run.skipped), cfg.run_dir)

    result = run_pipeline(cfg, from_stage, until_stage, on_stage=progress)
    print("\n" + summary_table(result))
    run_dir = RunDir(cfg.run_dir)
    if result.report and run_dir.exists(*WINRATES_TABLE):
        print("\n" + run_dir.read_bytes(relpath(WINRATES_TABLE)).decode())


def cmd_run(args: argparse.Namespace) -> None:
    _run_pipeline(_config(args), args.from_stage, args.until_stage)


def cmd_demo(args: argparse.Namespace) -> None:
    """The whole pipeline on the built-in benchmark, offline (the demo preset, plus any overrides)."""
    cfg = load_config(args.config or DEMO_PRESET, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    _run_pipeline(cfg, args.from_stage, args.until_stage)


def cmd_report(args: argparse.Namespace) -> None:
    markdown, html = write_report(_config(args).run_dir)
    print(f"report: {markdown}\nHTML:   {html}")


def cmd_tune(args: argparse.Namespace) -> None:
    from raybpo.tune import run_tune

    run_tune(_config(args))


def cmd_export(args: argparse.Namespace) -> None:
    count = export_trl(args.pairs, args.out)
    print(f"wrote {count} pairs in TRL preference format to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raybpo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, handler: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="YAML config file (see jobs/configs/)")
        sub.add_argument("--run-dir", help="run directory: a local path or a URI such as s3://bucket/run")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
        sub.set_defaults(handler=handler)
        return sub

    for name, help_text, handler in (
        ("run", "the whole stage graph (ingest to evaluate, then the report), skipping finished stages", cmd_run),
        ("demo", "`raybpo run` on the built-in offline benchmark (the demo preset)", cmd_demo),
    ):
        sub = add(name, help_text, handler)
        stages = f"a stage ({', '.join(graph.ORDER)}) or a variant's train-<name>"
        sub.add_argument("--from", dest="from_stage", metavar="STAGE", help=f"redo {stages} and all after it")
        sub.add_argument("--until", dest="until_stage", metavar="STAGE", help=f"stop after {stages}")
    stage_commands = {s.name: add(s.name, s.help, STAGE_COMMANDS.get(s.name, cmd_stage)) for s in graph.STAGES}
    stage_commands[INGEST].add_argument(
        "--source",
        action="append",
        metavar="PATH_OR_DATASET[,format=F][,name=N]",
        help="a JSONL, JSONL.gz or Parquet file or folder, or a Hugging Face dataset name (repeatable)",
    )
    stage_commands[INGEST].add_argument(
        "--preset", choices=["benchmark"], help="generate and ingest the built-in benchmark"
    )
    stage_commands[graph.VARIANTS_OF].add_argument(
        "--variant", metavar="NAME", help="train the variant NAME of evaluate.variants (stage train-NAME) instead"
    )
    add("report", "write report/report.md and report.html from every finished stage", cmd_report)
    add("tune", "Ray Tune over any config keys (train + evaluate tail), ASHA early stopping", cmd_tune)
    export = commands.add_parser("export", help="write a pairs folder as TRL preference JSONL")
    export.add_argument("pairs", help=f"a pairs folder, e.g. RUN_DIR/{relpath(INGESTED_PAIRS)}")
    export.add_argument("out", help="output .jsonl path")
    export.set_defaults(handler=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # faiss logs each CPU build it tries (ModuleNotFoundError lines) at INFO before loading the generic one
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        args.handler(args)
    except (
        ConfigError,
        IngestError,
        BreadthError,
        DepthError,
        StageMissingError,
        ForeignFolderError,
        ModelNotFoundError,
        TokenizationError,
        NonFiniteLossError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
