"""The `generate` stage (Ray Data): n candidate responses per kept prompt, plus its original responses.

For every prompt the breadth stage kept, the SFT policy samples `generate.n` responses; sample i of a
prompt is drawn with the seed `sample_seed(seed, prompt_key, i)`, so its text depends on nothing else
(not the batch, the actor, nor a rerun). The original chosen and rejected responses of the prompt's
pairs join the pool (docs/ALGORITHMS.md section 3.2). Two backends, one output schema:

- `hf` (CPU or GPU): an actor pool of Hugging Face models (`raybpo.models.generation.HfGenerator`, drawing with
  `sample_seeded`), `concurrency` actors with `num_gpus` each; Ray Data retries a crashed actor's batch.
- `vllm` (GPU clusters): Ray Data's LLM API (`ray.data.llm.build_processor` with a
  `vLLMEngineProcessorConfig`), one request per sample with its seed in the sampling parameters. Both
  backends sample from the same token ids: CPU actors (`VllmRequests`) tokenise each prompt with the
  policy's tokenizer as the HF backend does (`prompt_token_ids`: the chat template when it has one, one
  BOS), and the engine gets them as `tokenized_prompt`, Ray's chat-template and tokenize stages off.

Output `<run_dir>/generate/candidates/` (`CANDIDATE_SCHEMA`): prompt_key, prompt, candidate (index), origin
(`policy`, `chosen` or `rejected`), response, seed (null for originals).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Dataset

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
from raybpo.cluster import actor_pool, init_ray, max_actors
from raybpo.config import Config, GenerateConfig, PolicyConfig
from raybpo.data.schema import CANDIDATE_SCHEMA, prompt_key, stored_response
from raybpo.models.generation import HfGenerator, prompt_token_ids, sample_seed
from raybpo.models.loading import load_tokenizer
from raybpo.models.tokenize import uses_chat_template
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


VLLM_REQUEST_SCHEMA = pa.schema(
    [
        ("prompt_key", pa.string()),
        ("prompt", pa.string()),
        ("candidate", pa.int32()),
        ("seed", pa.int64()),
        ("plain", pa.bool_()),
        ("tokenized_prompt", pa.list_(pa.int64())),
        (
            "sampling_params",
            pa.struct(
                [
                    ("n", pa.int64()),
                    ("seed", pa.int64()),
                    ("temperature", pa.float64()),
                    ("top_p", pa.float64()),
                    ("max_tokens", pa.int64()),
                ]
            ),
        ),
    ]
)


def vllm_requests(
    row: dict[str, Any], prompt_ids: list[int], plain: bool, seed: int, cfg: GenerateConfig
) -> list[dict[str, Any]]:
    """One vLLM request per sample (`cfg.n`) of a prompt: its token ids, and sampling parameters with the sample's seed.

    `seed` and `plain` (the prompt was rendered without a chat template) ride along for `vllm_candidate`,
    since the engine stage consumes `sampling_params`."""
    requests = []
    for i in range(cfg.n):
        sample = sample_seed(seed, row["prompt_key"], i)
        requests.append(
            {
                "prompt_key": row["prompt_key"],
                "prompt": row["prompt"],
                "candidate": i,
                "seed": sample,
                "plain": plain,
                "tokenized_prompt": list(prompt_ids),
                "sampling_params": {
                    "n": 1,
                    "seed": sample,
                    "temperature": cfg.temperature,
                    "top_p": cfg.top_p,
                    "max_tokens": cfg.max_new_tokens,
                },
            }
        )
    return requests


class VllmRequests:
    """Ray Data actor: prompts (prompt, prompt_key) -> `vllm_requests` rows, tokenised with the policy's
    tokenizer (loaded once, on the actor's node, from the model URI) exactly as the HF backend tokenises."""

    def __init__(self, model: str, policy: dict, generate: dict, seed: int):
        self.policy = PolicyConfig.model_validate(policy)
        self.cfg = GenerateConfig.model_validate(generate)
        self.seed = seed
        self.tokenizer = load_tokenizer(model, self.policy)
        self.plain = not uses_chat_template(self.tokenizer, self.policy.use_chat_template)

    def prompt_ids(self, prompt: str) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt, self.policy.use_chat_template, self.cfg.max_prompt_length)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [
            request
            for row in batch.select(["prompt", "prompt_key"]).to_pylist()
            for request in vllm_requests(row, self.prompt_ids(row["prompt"]), self.plain, self.seed, self.cfg)
        ]
        return pa.Table.from_pylist(rows, schema=VLLM_REQUEST_SCHEMA)


def vllm_request_dataset(prompts: Dataset, model: str, policy: PolicyConfig, cfg: GenerateConfig, seed: int) -> Dataset:
    """The vLLM backend's requests (`VLLM_REQUEST_SCHEMA`) of the prompts, tokenised in CPU actors."""
    return prompts.map_batches(
        VllmRequests,
        fn_constructor_kwargs={
            "model": model,
            "policy": policy.model_dump(mode="json"),
            "generate": cfg.model_dump(mode="json"),
            "seed": seed,
        },
        batch_format="pyarrow",
        batch_size=max(1, cfg.batch_size // cfg.n),
        compute=actor_pool((1, max_actors(cfg.concurrency))),
    )


def vllm_candidate(row: dict[str, Any]) -> dict[str, Any]:
    """A candidate row from a vLLM result (its text as the HF backend stores it: `sample_seeded`)."""
    text = row["generated_text"]
    return {
        "prompt_key": row["prompt_key"],
        "prompt": row["prompt"],
        "candidate": row["candidate"],
        "origin": "policy",
        "response": stored_response(row["prompt"], text) if row["plain"] else text,
        "seed": row["seed"],
    }


def as_candidates(batch: pa.Table) -> pa.Table:
    """A batch with exactly `CANDIDATE_SCHEMA`'s columns and types (row-wise maps infer int64, not int32)."""
    return batch.select(CANDIDATE_SCHEMA.names).cast(CANDIDATE_SCHEMA)


def vllm_processor(model: str, cfg: GenerateConfig):
    """The Ray Data LLM processor of the vLLM backend (needs the [gpu] extra and GPUs to run).

    Its rows are `vllm_request_dataset`'s: the engine stage gets their `tokenized_prompt`, so Ray's
    chat-template and tokenize stages are off; Ray's detokenize stage decodes the sampled ids as the HF
    backend does (`batch_decode`, special tokens skipped). The engine echoes a request's `prompt` text."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=dict(cfg.engine_kwargs),
        concurrency=cfg.concurrency,
        batch_size=cfg.batch_size,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=True,
    )
    return build_processor(config, postprocess=vllm_candidate)


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
            requests = vllm_request_dataset(source, model, cfg.policy, cfg.generate, cfg.seed)
            sampled = vllm_processor(model, cfg.generate)(requests).map_batches(as_candidates, batch_format="pyarrow")
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
                compute=actor_pool(cfg.generate.concurrency),
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
