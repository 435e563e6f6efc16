"""MORE vs multitask vs single vs average reward models on the built-in benchmark (CPU): accuracy, ECE, drift.

What is compared (docs/ALGORITHMS.md section 2): four ways to learn rewards from three preference sources
(`helpful`, `concise`, `harmless`) whose hidden utilities agree on facts and insults but disagree on length,
politeness and lists. `more` trains one reward model on micro-batches holding one pair of every source, weighted
by MORE's min-norm lambda; `multitask` trains on the same batches with the plain mean Bradley-Terry loss;
`single` trains one model per source on that source alone; `average` is the ensemble (mean reward) of the three
single models. Every model is scored on every source's held-out pairs: accuracy (r_w > r_l), ECE over all
sources' pairs (10 bins on sigmoid(r_w - r_l)) and reward drift (std over sources of the mean reward).

How: everything goes through raybpo's own stages on one local Ray (2 CPUs). `ingest` generates the benchmark
(`--pairs-per-source` pairs per source) and `sft` trains the tiny Llama with the demo preset's settings; its
held-out split is set to the reward stage's (`--eval-fraction`; both splits are the same hash of `pair_id`), so
the backbone never trains on a pair the reward models are scored on. `reward.model=sft` then makes the reward
model that Llama with last-token pooling and a bias-free one-output head, all weights trained. For each seed and
mode the `reward` stage runs in its own run directory `<run-dir>/seed<k>/<mode>/` holding copies of `ingest/`
and `sft/`, so every model and report stays on disk. The modes share every setting: lr, epochs, 48 pairs per
optimizer step, 1 pair per source per micro-batch, each source resampled to `--samples-per-source` training
pairs per epoch. Only the final checkpoint is evaluated (`checkpoint_every` above the step count), because the
stage would otherwise pick the checkpoint with the lowest loss on the very pairs it reports on. `average` is not
trained again: its members are the `single` run's models, scored by `evaluate_reward_models` as the stage's
`average` mode does (which would retrain the same three models from the same seed). The seed (config `seed`)
drives the head's initialisation and the resampling and order of the pairs; the benchmark data
(`benchmark.seed` 0) and the backbone (sft at seed 0) stay fixed. A rerun with the same `--run-dir` skips every
stage whose manifest is up to date, so adding seeds only trains the new ones.

    .venv/bin/python bench/more_vs_multitask.py --seeds 0 1 2

The default (`--seeds 0`) took about 6 minutes on 2 shared CPU cores; each further seed adds about 4.

OpenMP: with other processes busy on the cores, spinning OpenMP threads slow the tiny model down about 40x, so
the script sets `OMP_WAIT_POLICY=PASSIVE` before torch loads unless the environment sets it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see the module doc

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raybpo.artifacts import read_pairs, reward_member
from raybpo.cli import DEMO_PRESET
from raybpo.config import Config, load_config
from raybpo.metrics.reward import evaluate_reward_models, summary
from raybpo.rundir import RunDir
from raybpo.stages.ingest import ingest
from raybpo.train.reward import run_reward
from raybpo.train.sft import run_sft

TRAINED_MODES = ("more", "multitask", "single")
BATCH_SIZE = 48
PAIRS_PER_SOURCE_PER_BATCH = 1
NUM_CPUS = 2
METRICS = ("mean_accuracy", "worst_accuracy", "ece", "reward_drift")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="Run directory (default: a new temporary folder, kept afterwards).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Reward-training seeds (config `seed`).")
    parser.add_argument("--epochs", type=int, default=3, help="Reward-model epochs.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Reward-model learning rate (AdamW, all weights).")
    parser.add_argument("--pairs-per-source", type=int, default=1200, help="Benchmark pairs generated per source.")
    parser.add_argument("--eval-fraction", type=float, default=0.25, help="Held-out share of the pairs.")
    parser.add_argument("--samples-per-source", type=int, default=600, help="Training pairs per source per epoch.")
    return parser.parse_args()


def config(args: argparse.Namespace, run_dir: Path, *overrides: str) -> Config:
    """The demo preset with the benchmark's sizes, the shared reward settings and `overrides`."""
    return load_config(
        DEMO_PRESET,
        [
            f"run_dir={run_dir}",
            f"ray.num_cpus={NUM_CPUS}",
            f"benchmark.pairs_per_source={args.pairs_per_source}",
            f"sft.eval_fraction={args.eval_fraction}",
            "reward.model=sft",
            f"reward.lr={args.lr}",
            f"reward.epochs={args.epochs}",
            f"reward.batch_size={BATCH_SIZE}",
            f"reward.pairs_per_source_per_batch={PAIRS_PER_SOURCE_PER_BATCH}",
            f"reward.samples_per_source={args.samples_per_source}",
            f"reward.eval_fraction={args.eval_fraction}",
            "reward.checkpoint_every=1000000",
            *overrides,
        ],
    )


def mode_dir(root: Path, base: Path, seed: int, mode: str) -> Path:
    """`<root>/seed<k>/<mode>/` with fresh copies of the base run's `ingest/` and `sft/`."""
    directory = root / f"seed{seed}" / mode
    for stage in ("ingest", "sft"):
        shutil.rmtree(directory / stage, ignore_errors=True)
        shutil.copytree(base / stage, directory / stage)
    return directory


def average_evaluation(cfg: Config) -> dict[str, Any]:
    """The `average` ensemble of a finished `single` run's models, evaluated as the stage's `average` mode does."""
    run_dir = RunDir(cfg.run_dir)
    pairs = read_pairs(run_dir)
    members = [run_dir.uri_of(*reward_member(s)) for s in sorted(set(pairs["source"]))]
    return summary(evaluate_reward_models({"average": members}, pairs, cfg.reward))


def seed_rows(
    args: argparse.Namespace, root: Path, base: Path, seed: int, sources: list[str]
) -> tuple[dict[str, dict], dict[str, int]]:
    """({row name: model summary} for every mode at `seed`, held-out pairs per source)."""
    evaluations = {}
    for mode in TRAINED_MODES:
        cfg = config(args, mode_dir(root, base, seed, mode), f"seed={seed}", f"reward.mode={mode}")
        evaluations[mode] = run_reward(cfg).manifest["evaluation"]
        if mode == "single":
            evaluations["average"] = average_evaluation(cfg)
    single = evaluations["single"]
    rows = {"MORE": evaluations["more"]["models"]["model"], "multitask": evaluations["multitask"]["models"]["model"]}
    rows.update({f"single:{s}": single["models"][f"single:{s}"] for s in sources})
    rows["single (own source)"] = own_source_row(single, sources)
    rows["average"] = evaluations["average"]["models"]["average"]
    return rows, single["eval_pairs"]


def own_source_row(single: dict[str, Any], sources: list[str]) -> dict[str, Any]:
    """Each source scored by its own single model (needs the source at test time; no pooled ECE or drift)."""
    accuracies = [single["models"][f"single:{s}"]["per_source"][s]["accuracy"] for s in sources]
    return {
        "per_source": {s: {"accuracy": a} for s, a in zip(sources, accuracies, strict=True)},
        "mean_accuracy": statistics.mean(accuracies),
        "worst_accuracy": min(accuracies),
    }


def more_lambdas(root: Path, seeds: list[int]) -> dict[str, float]:
    """MORE's lambda per source, averaged over the logged steps of every seed."""
    history = [
        json.loads(line)
        for seed in seeds
        for line in (root / f"seed{seed}" / "more" / "reward" / "model.metrics.jsonl").read_text().splitlines()
    ]
    names = sorted({k for h in history for k in h if k.startswith("lambda/")})
    return {n.removeprefix("lambda/"): statistics.mean(h[n] for h in history if n in h) for n in names}


def cell(values: list[float], digits: int) -> str:
    """`mean` for one seed, `mean ± sd` over several; `n/a` when the metric does not apply."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(per_seed: list[dict[str, dict]], sources: list[str]) -> str:
    """Markdown: one row per model, mean ± sd over seeds of each metric."""
    header = ["model", *[f"acc {s}" for s in sources], "mean acc", "worst acc", "ECE", "reward drift"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name in per_seed[0]:
        runs = [rows[name] for rows in per_seed]
        cells = [cell([r["per_source"][s]["accuracy"] for r in runs], 3) for s in sources]
        cells += [cell([r[m] for r in runs if m in r], 4 if m == "ece" else 3) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def standard_errors(per_seed: list[dict[str, dict]], eval_pairs: dict[str, int], sources: list[str]) -> str:
    """sqrt(p (1 - p) / n) per source, p the MORE model's accuracy (mean over seeds), n its held-out pairs."""
    errors = []
    for s in sources:
        p = statistics.mean(rows["MORE"]["per_source"][s]["accuracy"] for rows in per_seed)
        errors.append(f"{s} {math.sqrt(p * (1 - p) / eval_pairs[s]):.3f}")
    return ", ".join(errors)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    root = Path(args.run_dir or tempfile.mkdtemp(prefix="more_vs_multitask-")).resolve()
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("run_dir", "seeds"))
    command = f".venv/bin/python bench/more_vs_multitask.py --seeds {' '.join(map(str, args.seeds))} {flags}"
    print(f"command: {command}\nrun directory: {root}", flush=True)

    base = root / "base"
    base_cfg = config(args, base)
    for stage in (ingest, run_sft):
        result = stage(base_cfg)
        state = "up to date, skipped" if result.skipped else f"{result.manifest['wall_time_s']:.0f} s"
        print(f"{result.manifest['stage']}: {state}", flush=True)

    sources = list(base_cfg.benchmark.sources)
    per_seed = []
    for seed in args.seeds:
        rows, eval_pairs = seed_rows(args, root, base, seed, sources)
        per_seed.append(rows)

    results = {"command": command, "seeds": args.seeds, "eval_pairs": eval_pairs, "per_seed": per_seed}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    lambdas = ", ".join(f"{s} {w:.3f}" for s, w in more_lambdas(root, args.seeds).items())
    print(f"\ncommand: {command}")
    print(f"seeds: {args.seeds} (mean ± sd over seeds where more than one)")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}\n")
    print(table(per_seed, sources))
    print("\nheld-out pairs per source: " + ", ".join(f"{s}: {eval_pairs[s]}" for s in sources))
    print("binomial SE of one accuracy, sqrt(p(1-p)/n) at MORE's p: " + standard_errors(per_seed, eval_pairs, sources))
    print(f"MORE's mean lambda over the logged steps: {lambdas}")
    print(f"results: {root / 'results.json'}; wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
