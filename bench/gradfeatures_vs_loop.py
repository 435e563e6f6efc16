"""Batched per-pair LoRA gradient features against the LESS-style one-pair-at-a-time loop, in one run.

Both sides compute, for the same pairs, the gradient of each pair's DPO loss (beta 0.1, the reference = the
same model with the adapter disabled) with respect to the LoRA parameters, project it with the same seeded
Rademacher projection (`raybpo.projection`, d = `--dim`) and L2-normalise it:

- batched (raybpo): `raybpo.models.gradients.batched_pair_gradients`: one forward of the reference, one forward
  and ONE backward of the policy per batch of `--batch-size` length-sorted pairs; per-sample gradients are
  einsums of the LoRA factors' saved inputs and output gradients; the batch is projected at once.
- loop (LESS): `pairwise_loop_gradients`: per pair a reference forward, a policy forward and a backward,
  `param.grad` flattened; gradients projected 16 at a time, as LESS's `collect_grads` does.

The adapter is a "trained" one (A and B random, peft's `init_lora_weights=False`), as LESS scores a warmed-up
checkpoint, so both sides run the reference forward. Each method runs in its own spawned process, after one
warm-up batch that also fills the projection's chunk cache. Peak memory: on CPU the process's max RSS above its
RSS right after loading the model (so it includes the cached projection), on GPU `torch.cuda.max_memory_allocated`.
Pairs/s is over `--pairs` pairs. The worst-pair cosine compares the two methods' projected features; the
script fails if it is below 0.999. Pair lengths default to the built-in benchmark's (prompts 8-24 tokens,
responses 4-40); `--prompt-tokens` and `--response-tokens` set others (HH-like: 64,256 and 32,256).

    .venv/bin/python bench/gradfeatures_vs_loop.py --model tiny --pairs 256 --batch-size 32 --dim 8192
    python bench/gradfeatures_vs_loop.py --model smollm2-shape --device cuda --pairs 512 --dim 8192  # torch only

Models are built from a config with random weights (no download): `tiny` is the benchmark's policy shape
(hidden 128, 2 layers), `smollm2-shape` SmolLM2-135M's (hidden 576, 30 layers, 9 heads / 3 KV heads),
`llama-1b-shape` Llama-3.2-1B's (hidden 2048, 16 layers, 32 / 8 heads, vocab cut to 32k). Only torch,
transformers and peft are needed, so it runs on a GPU machine without Ray.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 1024},
    "smollm2-shape": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                      "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
    "llama-1b-shape": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
}  # fmt: skip
LOOP_PROJECT_EVERY = 16  # LESS projects its collected per-example gradients 16 at a time


def _current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def build_model(shape: str, device: str, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=1024, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(model, lora).to(device).eval()
    for name, param in model.named_parameters():  # peft's non-default init draws B like A; keep the adapter small
        if ".lora_B." in name:
            param.data.mul_(0.01)
    return model


def make_pairs(n: int, vocab: int, seed: int, prompt: tuple[int, int], response: tuple[int, int]):
    rng = np.random.default_rng(seed)
    draw = lambda lo_hi: rng.integers(3, vocab, size=int(rng.integers(*lo_hi))).tolist()  # noqa: E731
    return [draw(prompt) for _ in range(n)], [draw(response) for _ in range(n)], [draw(response) for _ in range(n)]


def run_method(method: str, args: dict, out: multiprocessing.Queue) -> None:
    """One method in its own process: features (N, d) in the input order, seconds, peak memory (bytes)."""
    from raybpo.models.gradients import batched_pair_gradients, num_parameters, pairwise_loop_gradients
    from raybpo.models.logps import collate_pairs
    from raybpo.projection import RademacherProjection

    torch.set_num_threads(args["threads"])
    torch.set_float32_matmul_precision(args["matmul_precision"])
    device = args["device"]
    model = build_model(args["model"], device, args["seed"])
    prompts, chosen, rejected = make_pairs(
        args["pairs"] + args["batch_size"],
        SHAPES[args["model"]]["vocab_size"],
        args["seed"],
        args["prompt_tokens"],
        args["response_tokens"],
    )
    projection = RademacherProjection(num_parameters(model), args["dim"], seed=args["seed"])

    def batched(rows: list[int]) -> torch.Tensor:
        order = sorted(rows, key=lambda i: len(prompts[i]) + max(len(chosen[i]), len(rejected[i])))
        out_rows = torch.empty(len(rows), args["dim"])
        position = {i: k for k, i in enumerate(rows)}
        for start in range(0, len(order), args["batch_size"]):
            part = order[start : start + args["batch_size"]]
            batch = collate_pairs([prompts[i] for i in part], [chosen[i] for i in part], [rejected[i] for i in part], 0)
            grads = batched_pair_gradients(model, {k: v.to(device) for k, v in batch.items()}, beta=0.1)
            projected = projection.project(grads)
            projected = (projected / projected.norm(dim=1, keepdim=True)).cpu()
            for k, i in enumerate(part):
                out_rows[position[i]] = projected[k]
        return out_rows

    def loop(rows: list[int]) -> torch.Tensor:
        out_rows, pending = [], []
        grads = pairwise_loop_gradients(
            model, [prompts[i] for i in rows], [chosen[i] for i in rows], [rejected[i] for i in rows], 0, beta=0.1
        )
        for grad in grads:
            pending.append(grad)
            if len(pending) == LOOP_PROJECT_EVERY:
                out_rows.append(projection.project(torch.stack(pending)).cpu())
                pending = []
        if pending:
            out_rows.append(projection.project(torch.stack(pending)).cpu())
        features = torch.cat(out_rows)
        return features / features.norm(dim=1, keepdim=True)

    compute = batched if method == "batched" else loop
    baseline_rss = _current_rss()  # after loading the model, before the projection cache and any batch
    compute(list(range(args["pairs"], args["pairs"] + args["batch_size"])))  # warm-up: kernels, projection cache
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    features = compute(list(range(args["pairs"])))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    )
    out.put((method, features.numpy(), seconds, peak, num_parameters(model)))


def _span(text: str) -> tuple[int, int]:
    low, high = (int(v) for v in text.split(","))
    return low, high + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--pairs", type=int, default=256, help="Timed pairs (one more batch warms up first).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=8192, help="Projection dimension d.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--matmul-precision",
        choices=["highest", "high"],
        default="highest",
        help="torch.set_float32_matmul_precision for both methods ('high': TF32 on NVIDIA GPUs).",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=_span,
        default=(8, 24),
        help="LOW,HIGH: prompt lengths drawn uniformly (the benchmark's).",
    )
    parser.add_argument("--response-tokens", type=_span, default=(4, 40), help="LOW,HIGH: response lengths.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = vars(parser.parse_args())

    context = multiprocessing.get_context("spawn")
    results = {}
    for method in ("batched", "loop"):
        queue = context.Queue()
        process = context.Process(target=run_method, args=(method, args, queue))
        process.start()
        name, features, seconds, peak, num_params = queue.get()
        process.join()
        results[name] = {"features": features, "seconds": seconds, "peak_bytes": peak}
        print(f"{name}: {args['pairs'] / seconds:.1f} pairs/s ({seconds:.2f} s), peak memory {peak / 2**20:.0f} MiB")
    a, b = results["batched"]["features"], results["loop"]["features"]
    cosine = np.sum(a.astype(np.float64) * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    speed = {m: args["pairs"] / r["seconds"] for m, r in results.items()}
    device = torch.cuda.get_device_name(0) if args["device"] == "cuda" else f"CPU, {args['threads']} threads"
    summary = {
        "model": args["model"],
        "device": device,
        "lora_parameters": num_params,
        "pairs": args["pairs"],
        "batch_size": args["batch_size"],
        "dim": args["dim"],
        "matmul_precision": args["matmul_precision"],
        "prompt_tokens": args["prompt_tokens"],
        "response_tokens": args["response_tokens"],
        "pairs_per_s": {m: round(v, 2) for m, v in speed.items()},
        "speedup": round(speed["batched"] / speed["loop"], 2),
        "worst_cosine": float(cosine.min()),
        "peak_mib": {m: round(r["peak_bytes"] / 2**20, 1) for m, r in results.items()},
    }
    print(
        f"\n| model | device | LoRA params | d | batch | batched pairs/s | loop pairs/s | speed-up | worst cosine | "
        "peak MiB batched / loop |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"| {args['model']} | {device} | {num_params:,} | {args['dim']} | {args['batch_size']} | "
        f"{speed['batched']:.1f} | {speed['loop']:.1f} | {summary['speedup']:.1f}x | {cosine.min():.6f} | "
        f"{summary['peak_mib']['batched']:.0f} / {summary['peak_mib']['loop']:.0f} |"
    )
    if args["json"]:
        args["json"].write_text(json.dumps(summary, indent=2))
    if cosine.min() < 0.999:
        sys.exit(f"worst-pair cosine {cosine.min():.6f} < 0.999: the batched features do not match the loop")


if __name__ == "__main__":
    main()
