"""The `generate` stage (Ray Data): n candidate responses per kept prompt, plus its original responses.

For every prompt the breadth stage kept, the SFT policy samples `generate.n` responses; sample i of a
prompt is drawn with the seed `sample_seed(seed, prompt_key, i)`, so its text depends on nothing else
(not the batch, the actor, nor a rerun). The original chosen and rejected responses of the prompt's
pairs join the pool (docs/ALGORITHMS.md section 3.2). Two backends, one output schema:

- `hf` (CPU or GPU): an actor pool of Hugging Face models (`raybpo.models.generation.HfGenerator`, drawing with
  `sample_seeded`), `concurrency` actors with `num_gpus` each; Ray Data retries a crashed actor's batch.
- `vllm` (GPU clusters): Ray Data's LLM API (`ray.data.llm.build_processor` with a
  `vLLMEngineProcessorConfig`): the same prompts as chat messages, one request per sample with its
  seed in the sampling parameters.

Output `<run_dir>/generate/candidates/` (`CANDIDATE_SCHEMA`): prompt_key, prompt, candidate (index), origin
(`policy`, `chosen` or `rejected`), response, seed (null for originals).
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from raybpo.artifacts import (
    BREADTH,
    BREADTH_PROMPTS,
    CANDIDATES,
    GENERATE,
    in_stage,
    ingested_pairs,
    read_table,
    reference_model,
)
from raybpo.cluster import init_ray
from raybpo.config import Config, GenerateConfig
from raybpo.data.schema import CANDIDATE_SCHEMA, prompt_key, prompt_messages
from raybpo.models.generation import HfGenerator, sample_seed
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

STAGE = GENERATE
ROWS_PER_FILE = 250_000


def vllm_requests(row: dict[str, Any], n: int, seed: int, cfg: dict) -> list[dict[str, Any]]:
    """One vLLM request per sample of a prompt: chat messages and sampling parameters with its seed."""
    messages = prompt_messages(row["prompt"]) or [{"role": "user", "content": row["prompt"]}]
    return [
        {
            "prompt_key": row["prompt_key"],
            "prompt": row["prompt"],
            "candidate": i,
            "messages": messages,
            "sampling_params": {
                "n": 1,
                "seed": sample_seed(seed, row["prompt_key"], i),
                "temperature": cfg["temperature"],
                "top_p": cfg["top_p"],
                "max_tokens": cfg["max_new_tokens"],
            },
        }
        for i in range(n)
    ]


def vllm_processor(model: str, cfg: GenerateConfig):
    """The Ray Data LLM processor of the vLLM backend (needs the [gpu] extra and GPUs to run)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=dict(cfg.engine_kwargs),
        concurrency=cfg.concurrency,
        batch_size=cfg.batch_size,
    )
    return build_processor(
        config,
        preprocess=lambda row: {
            k: row[k] for k in ("prompt_key", "prompt", "candidate", "messages", "sampling_params")
        },
        postprocess=lambda row: {
            "prompt_key": row["prompt_key"],
            "prompt": row["prompt"],
            "candidate": row["candidate"],
            "origin": "policy",
            "response": row["generated_text"],
            "seed": row["sampling_params"]["seed"],
        },
    )


def original_candidates(pairs: pa.Table, kept: dict[str, str], n: int) -> pa.Table:
    """The distinct chosen and rejected responses of each kept prompt's pairs, numbered after the samples."""
    out: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA.names}
    seen: set[tuple[str, str]] = set()
    counters: dict[str, int] = {}
    for prompt, chosen, rejected in zip(*(pairs[c].to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True):
        key = prompt_key(prompt)
        if key not in kept:
            continue
        for origin, response in (("chosen", chosen), ("rejected", rejected)):
            if (key, response) in seen:
                continue
            seen.add((key, response))
            index = n + counters.get(key, 0)
            counters[key] = counters.get(key, 0) + 1
            values = (key, kept[key], index, origin, response, None)
            for name, value in zip(CANDIDATE_SCHEMA.names, values, strict=True):
                out[name].append(value)
    return pa.table(out, schema=CANDIDATE_SCHEMA)


def run_generate(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `generate` stage: candidates for the breadth stage's kept prompts into `generate/candidates/`."""
    run_dir = RunDir(cfg.run_dir)
    breadth = require_stage(run_dir, BREADTH)
    reference = reference_model(cfg, run_dir)
    model = reference.uri
    inputs = {"breadth": stage_identity(breadth), "policy": reference.identity}

    def body(stage_path: str) -> StageCounts:
        prompts = read_table(run_dir, BREADTH_PROMPTS, ["prompt", "prompt_key", "kept"])
        prompts = prompts.filter(pc.field("kept")).select(["prompt", "prompt_key"]).sort_by("prompt_key")
        kept = dict(zip(prompts["prompt_key"].to_pylist(), prompts["prompt"].to_pylist(), strict=True))
        source = ray.data.from_arrow(prompts)
        if cfg.generate.backend == "vllm":
            requests = source.flat_map(
                functools.partial(vllm_requests, n=cfg.generate.n, seed=cfg.seed, cfg=cfg.generate.model_dump())
            )
            sampled = vllm_processor(model, cfg.generate)(requests)
        else:
            sampled = source.map_batches(
                HfGenerator,
                fn_constructor_kwargs={
                    "model": model,
                    "policy": cfg.policy.model_dump(mode="json"),
                    "generate": cfg.generate.model_dump(mode="json"),
                    "seed": cfg.seed,
                },
                batch_format="pyarrow",
                batch_size=max(1, cfg.generate.batch_size // cfg.generate.n),
                compute=ray.data.ActorPoolStrategy(size=cfg.generate.concurrency),
                num_cpus=cfg.generate.num_cpus,
                num_gpus=cfg.generate.num_gpus,
            )
        pairs = ingested_pairs(run_dir, ["prompt", "chosen", "rejected"])
        originals = original_candidates(pairs, kept, cfg.generate.n)
        candidates = sampled.union(ray.data.from_arrow(originals)).materialize()
        candidates.write_parquet(run_dir.path(*CANDIDATES), filesystem=run_dir.fs, min_rows_per_file=ROWS_PER_FILE)
        sampled_count = candidates.count() - originals.num_rows
        return StageCounts(
            rows_in=len(kept),
            rows_out=candidates.count(),
            extra={
                "prompts": len(kept),
                "sampled": sampled_count,
                "originals": originals.num_rows,
                "backend": cfg.generate.backend,
                "model": model,
                "outputs": {"candidates": in_stage(CANDIDATES, folder=True)},
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("policy", "generate"), inputs, body)
