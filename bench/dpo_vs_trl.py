"""raybpo's DPO training step against TRL's `DPOTrainer` on CPU: pairs per second, first-batch loss, FLOP/s.

Both sides train the same tiny Llama (built on the benchmark's own text) with the same LoRA adapter (rank 8,
alpha 16, no dropout, q/k/v/o_proj) starting from the same adapter weights, the same global batch in one
forward (no gradient accumulation), AdamW at the same learning rate, gradient clipping at 1.0, float32, on the
same token ids: TRL gets the pairs as standard-format text with the BOS token written in front of the prompt,
and the script checks that TRL's own tokenisation equals raybpo's `encode_pair` for every pair.

- raybpo: the loop's own step without Ray (`raybpo.train.loop.optimizer_step` and `Optimization`):
  `DpoRecipe.loss` (collate_pairs, ONE forward over chosen and rejected, dpo_logits, BetaDPO), backward, the
  finite check, clipping, AdamW and the warm-up/cosine schedule, on the loop's length-bucketed batches
  (`step_plan`, micro_batch_size = batch_size where raybpo's default would accumulate micro-batches of 8).
  Reference log-probs are computed once beforehand as the prepare pass does (length-sorted batches of
  `REF_BATCH` pairs); that pass is timed and reported separately and amortised over one epoch. Plain DPO
  (alpha=0, rho=1) and raybpo's default beta-DPO (alpha=0.6, rho=0.8).
- TRL: `DPOTrainer(peft_config=...)`, sigmoid loss, beta=0.1, activation (gradient) checkpointing and bf16 off
  (TRL turns both on by default), its random batches. By default the reference is the adapter-disabled model,
  run inside every step; a second run uses `precompute_ref_log_probs=True`.

Throughput: the wall time of `--steps` optimizer steps after `WARMUP_STEPS` warm-up steps, from the end of one
step to the end of the next, so batch fetching and collation are included and trainer construction and
tokenisation are not. The first-batch loss is taken on raybpo's first length-bucketed batch before any update;
TRL computes it with its own `compute_loss` (fused-LM-head log-probs, its reference) on the same pairs, collated
by its own collator from its own tokenisation. LoRA's B matrices start at zero, which makes every DPO loss
exactly log 2, so every run starts from one adapter with B drawn from N(0, B_INIT_STD^2) instead. FLOPs:
`FlopCounterMode` over forward and backward of that first batch (the reference forward included when the step
runs it), per padded token, times the padded tokens of the timed steps; the peak is the best time of a
1024x1024 float32 `torch.matmul`, measured before and after the runs in the same process.

    .venv/bin/python bench/dpo_vs_trl.py --pairs 960 --steps 30 --batch-size 32 --seed 0 --threads 2

OpenMP: with other processes busy on the cores, spinning OpenMP threads stall each other at every parallel
region (each tiny op here is one: a forward became 40x slower on this 2-core machine), so the script sets
`OMP_WAIT_POLICY=PASSIVE` before torch loads unless the environment sets it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see the module doc

import argparse
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
import trl
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedTokenizerBase, PrinterCallback, TrainerCallback

from raybpo.config import BenchmarkConfig, PolicyConfig, TinyModelConfig, TrainConfig
from raybpo.data.benchmark import EVAL_PROMPTS, generate
from raybpo.models.loading import load_causal_lm
from raybpo.models.logps import collate_pairs, pair_logps
from raybpo.models.lora import lora_config
from raybpo.models.tiny import build_tiny_model
from raybpo.models.tokenize import encode_pair
from raybpo.train.dpo import DpoRecipe
from raybpo.train.loop import Optimization, optimizer_step
from raybpo.train.prepare import REF_BATCH, sequence_lengths
from raybpo.train.recipe import Workers, step_plan

WARMUP_STEPS = 2
LR = 5e-4
BETA = 0.1
MAX_LENGTH = 512
MAX_PROMPT_LENGTH = 256
MAX_GRAD_NORM = 1.0
B_INIT_STD = 0.1
LOSS_TOLERANCE = 1e-4
MATMUL_SIZE = 1024
IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
CPU = torch.device("cpu")


@dataclass
class Run:
    """What one timed training run measured."""

    method: str
    seconds: float  # the timed steps
    first_loss: float
    flops_per_token: float  # FlopCounterMode on the first batch / its padded tokens
    tokens: np.ndarray  # (padded, real) token counts of each timed step
    ref_pass_s: float = 0.0  # a reference pass outside the step (0: the step runs the reference itself)
    plain_dpo: bool = True  # the loss is sigmoid DPO at beta=0.1, comparable with TRL's

    @property
    def padding(self) -> float:
        return 1.0 - self.tokens[:, 1].sum() / self.tokens[:, 0].sum()

    @property
    def flops_per_s(self) -> float:
        return self.flops_per_token * self.tokens[:, 0].sum() / self.seconds


# ---------------------------------------------------------------------------------------------- shared set-up


def benchmark_rows(pairs: int, seed: int) -> list[dict[str, Any]]:
    """About `pairs` rows (prompt, chosen, rejected, ...) of the built-in benchmark, spread over its sources."""
    files = generate(BenchmarkConfig(seed=seed, pairs_per_source=max(1, pairs // 3)))
    return [json.loads(line) for name, data in files.items() if name != EVAL_PROMPTS for line in data.splitlines()]


def encode_rows(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """raybpo's prepared training columns, token ids only (`reference_pass` adds the log-probs)."""
    pairs = [
        encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], MAX_LENGTH, MAX_PROMPT_LENGTH) for r in rows
    ]
    return {
        "pair_id": [f"{i:08x}" for i in range(len(rows))],
        "prompt_ids": [p.prompt for p in pairs],
        "chosen_ids": [p.chosen for p in pairs],
        "rejected_ids": [p.rejected for p in pairs],
    }


@torch.no_grad()
def reference_pass(model: nn.Module, columns: dict[str, list], pad_id: int) -> float:
    """Add `ref_*_logps` to `columns` as raybpo's prepare pass computes them; returns its seconds."""
    start = time.perf_counter()
    order = np.argsort(sequence_lengths(columns), kind="stable").tolist()
    chosen, rejected = [0.0] * len(order), [0.0] * len(order)
    for first in range(0, len(order), REF_BATCH):
        rows = order[first : first + REF_BATCH]
        batch = collate_pairs(*([columns[k][i] for i in rows] for k in IDS), pad_id)
        for i, c, r in zip(rows, *(x.tolist() for x in pair_logps(model, batch)), strict=True):
            chosen[i], rejected[i] = c, r
    columns["ref_chosen_logps"], columns["ref_rejected_logps"] = chosen, rejected
    return time.perf_counter() - start


def make_recipe(columns: dict[str, list], model_dir: Path, cfg: TrainConfig, seed: int) -> DpoRecipe:
    return DpoRecipe({"train": columns, "eval": {"pair_id": []}}, str(model_dir), PolicyConfig(), cfg, seed)


def initial_adapter(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The adapter every run starts from: peft's A, and B ~ N(0, B_INIT_STD^2) so that the policy != reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * B_INIT_STD)
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def matmul_peak(n: int = MATMUL_SIZE, repeats: int = 20) -> float:
    """FLOP/s of the fastest of `repeats` float32 n x n matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def probe(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """(loss, FLOPs) of one forward and backward; the gradients are dropped again."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item(), float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- raybpo


def batch_tokens(columns: dict[str, list], rows: list[int]) -> tuple[int, int]:
    """(padded, real) token counts of the (2B, L) `collate_pairs` batch of `rows`."""
    prompt, chosen, rejected = (columns[k] for k in IDS)
    length = max(len(prompt[i]) + max(len(chosen[i]), len(rejected[i])) for i in rows)
    return 2 * len(rows) * length, sum(2 * len(prompt[i]) + len(chosen[i]) + len(rejected[i]) for i in rows)


def raybpo_plan(columns: dict[str, list], cfg: TrainConfig, seed: int, steps: int) -> list[list[int]]:
    """The rows of the loop's first `steps` optimizer steps (one micro-batch each: micro_batch_size == batch_size)."""
    return [micro[0] for micro in step_plan(sequence_lengths(columns), cfg, seed)][:steps]


def run_raybpo(
    method: str,
    columns: dict[str, list],
    model_dir: Path,
    adapter: dict[str, torch.Tensor],
    cfg: TrainConfig,
    plan: list[list[int]],
    seed: int,
) -> Run:
    recipe = make_recipe(columns, model_dir, cfg, seed)
    model = recipe.build_model(CPU)
    set_peft_model_state_dict(model, adapter)
    loss, flops = probe(model, lambda: recipe.loss(model, plan[0], Workers(0, 1, CPU), training=True)[0])
    recipe.load_state_dict({"beta_dpo": {"m0": 0.0, "sigma": 0.0, "steps": 0}})  # undo the probe's update

    opt, workers = Optimization.build(model, cfg, len(plan)), Workers(0, 1, CPU)
    ends = []
    for rows in plan:
        optimizer_step(recipe, opt, [rows], workers, cfg)
        ends.append(time.perf_counter())
    return Run(
        method,
        seconds=ends[-1] - ends[WARMUP_STEPS - 1],
        first_loss=loss,
        flops_per_token=flops / batch_tokens(columns, plan[0])[0],
        tokens=np.array([batch_tokens(columns, rows) for rows in plan[WARMUP_STEPS:]]),
        plain_dpo=cfg.alpha == 0.0 and cfg.rho == 1.0,
    )


# ---------------------------------------------------------------------------------------------- TRL


class StepEnds(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.times.append(time.perf_counter())


class TokenCounter:
    """Wraps a collator and records each batch's (padded, real) token counts, in order."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate
        self.counts: list[tuple[int, int]] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(examples)
        self.counts.append((batch["input_ids"].numel(), int(batch["attention_mask"].sum())))
        return batch


class TimedDPOTrainer(trl.DPOTrainer):
    """`DPOTrainer` that records how long its reference log-prob precompute (run in `__init__`) took."""

    ref_pass_s = 0.0

    def _precompute_ref_logps(self, dataset, name, batch_size):
        start = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        self.ref_pass_s += time.perf_counter() - start
        return out


def trl_trainer(
    rows: list[dict[str, Any]],
    model_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    precompute: bool,
    args: argparse.Namespace,
) -> TimedDPOTrainer:
    """A DPOTrainer on the text rows (TRL tokenises them in here) with `cfg`'s LoRA, the settings of the module doc."""
    model, tokenizer = load_causal_lm(str(model_dir))
    text = [
        {"prompt": tokenizer.bos_token + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows
    ]
    config = trl.DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=WARMUP_STEPS + args.steps,
        learning_rate=LR,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=precompute,
        activation_checkpointing=False,
        bf16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    peft_config = lora_config(cfg)
    dataset = datasets.Dataset.from_list(text)
    return TimedDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )


def run_trl(method: str, trainer: TimedDPOTrainer, adapter: dict[str, torch.Tensor], first_rows: list[int]) -> Run:
    model = trainer.model
    set_peft_model_state_dict(model, adapter)
    first = trainer.data_collator([trainer.train_dataset[i] for i in first_rows])
    loss, flops = probe(model, lambda: trainer.compute_loss(model, first))

    ends, counter = StepEnds(), TokenCounter(trainer.data_collator)
    trainer.add_callback(ends)
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics although logging is off
    trainer.data_collator = counter
    trainer.train()
    timed = len(ends.times) - WARMUP_STEPS
    return Run(
        method,
        seconds=ends.times[-1] - ends.times[WARMUP_STEPS - 1],
        first_loss=loss,
        flops_per_token=flops / first["input_ids"].numel(),
        tokens=np.array(counter.counts[WARMUP_STEPS : WARMUP_STEPS + timed]),
        ref_pass_s=trainer.ref_pass_s,
    )


def check_same_tokens(trainer: trl.DPOTrainer, columns: dict[str, list]) -> None:
    """TRL's tokenisation of the text rows must equal raybpo's `encode_pair` ids, pair by pair."""
    for key in IDS:
        if trainer.train_dataset[key] != columns[key]:
            raise SystemExit(f"TRL's {key} differ from raybpo's encode_pair ids: the runs would not be comparable")


# ---------------------------------------------------------------------------------------------- report


def table(runs: list[Run], batch_size: int, num_pairs: int, peak: float) -> str:
    """Markdown table; ratios and loss differences are against the first run (TRL's default)."""

    def pairs_per_s(run: Run, with_ref: bool) -> float:
        seconds_per_pair = run.seconds / (batch_size * len(run.tokens))
        return 1.0 / (seconds_per_pair + (run.ref_pass_s / num_pairs if with_ref else 0.0))

    base = runs[0]
    lines = [
        "| method | pairs/s (step) | vs TRL | pairs/s incl. ref pass | vs TRL | padding | first-batch loss "
        "| abs diff vs TRL | GFLOP/s | % of matmul peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        step, total = pairs_per_s(run, False), pairs_per_s(run, True)
        diff = f"{abs(run.first_loss - base.first_loss):.1e}" if run.plain_dpo and run is not base else "n/a"
        lines.append(
            f"| {run.method} | {step:.1f} | {step / pairs_per_s(base, False):.2f}x | {total:.1f} "
            f"| {total / pairs_per_s(base, True):.2f}x | {run.padding:.0%} | {run.first_loss:.6f} | {diff} "
            f"| {run.flops_per_s / 1e9:.2f} | {run.flops_per_s / peak:.1%} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=960, help="Benchmark pairs, split evenly over the 3 sources.")
    parser.add_argument("--steps", type=int, default=30, help=f"Timed optimizer steps, after {WARMUP_STEPS} warm-up.")
    parser.add_argument("--batch-size", type=int, default=32, help="Pairs per optimizer step (one forward).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
    return parser.parse_args()


def quiet() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # TRL's precompute progress bar
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames TRL still uses
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main() -> None:
    args = parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items())
    print(f"command: .venv/bin/python bench/dpo_vs_trl.py {flags}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl-") as tmp:
        runs, num_pairs, peak = compare(args, Path(tmp))
    print(table(runs, args.batch_size, num_pairs, peak))
    worst = max(abs(run.first_loss - runs[0].first_loss) for run in runs if run.plain_dpo)
    print(
        f"\nfirst-batch loss: max abs diff vs TRL {worst:.2e} (tolerance {LOSS_TOLERANCE}); "
        f"log 2 = {math.log(2):.6f} would mean policy == reference"
    )
    if worst >= LOSS_TOLERANCE:
        raise SystemExit(f"first-batch losses differ by {worst:.2e} >= {LOSS_TOLERANCE}")


def compare(args: argparse.Namespace, work: Path) -> tuple[list[Run], int, float]:
    """Build the model and data in `work`, run the four methods; returns (runs, pairs, matmul peak FLOP/s)."""
    rows = benchmark_rows(args.pairs, args.seed)
    texts = [t for r in rows for t in (r["prompt"], r["chosen"], r["rejected"])]
    model_dir = build_tiny_model(texts, TinyModelConfig(), work / "model", args.seed)
    reference, tokenizer = load_causal_lm(str(model_dir))
    columns = encode_rows(rows, tokenizer)
    ref_pass_s = reference_pass(reference, columns, tokenizer.pad_token_id)

    steps = WARMUP_STEPS + args.steps
    dpo = TrainConfig(
        lr=LR,
        weight_decay=0.0,
        batch_size=args.batch_size,
        micro_batch_size=args.batch_size,
        epochs=math.ceil(steps / (len(rows) // args.batch_size)),
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        max_grad_norm=MAX_GRAD_NORM,
        beta0=BETA,
        alpha=0.0,
        rho=1.0,
    )
    beta_dpo = dpo.model_copy(update={"alpha": TrainConfig().alpha, "rho": TrainConfig().rho})
    plan = raybpo_plan(columns, dpo, args.seed, steps)
    torch.manual_seed(args.seed)
    adapter = initial_adapter(make_recipe(columns, model_dir, dpo, args.seed).build_model(CPU), args.seed)
    peak = matmul_peak()
    print(f"{len(rows)} pairs, batch {args.batch_size}; timing ...", flush=True)

    runs = []
    for precompute in (False, True):
        trainer = trl_trainer(rows, model_dir, work / f"trl-{precompute}", dpo, precompute, args)
        check_same_tokens(trainer, columns)
        method = "TRL DPOTrainer" + (" (precompute_ref_log_probs)" if precompute else "")
        runs.append(run_trl(method, trainer, adapter, plan[0]))
    for method, cfg in (("raybpo DPO (alpha=0, rho=1)", dpo), ("raybpo beta-DPO (alpha=0.6, rho=0.8)", beta_dpo)):
        run = run_raybpo(method, columns, model_dir, adapter, cfg, plan, args.seed)
        run.ref_pass_s = ref_pass_s
        runs.append(run)
    peak = max(peak, matmul_peak())
    print(f"matmul peak (best before and after the runs): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"\nreference pass over {len(rows)} pairs: raybpo {ref_pass_s:.2f} s, "
        f"TRL precompute {runs[1].ref_pass_s:.2f} s ('incl. ref pass' amortises it over one epoch)\n"
    )
    return runs, len(rows), peak


if __name__ == "__main__":
    main()
