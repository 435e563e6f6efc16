"""The `depth` stage of BPO (docs/ALGORITHMS.md 3.3 and 4): pick response pairs by clustering their gradients.

    score/candidate_pairs -> per-pair LoRA gradient of the DPO loss (batched, Ray Data actor pool)
        -> seeded Rademacher projection to d, L2-normalised -> depth/features/
        -> spherical k-means (faiss, K_g) -> top eta_g of every cluster (+ one pair for every prompt left out)
        -> depth/selections/{bpo, random, uniform, original}/ at the same budget

- Features (`GradientFeaturizer`, `depth.concurrency` actors with `depth.num_gpus` GPUs each): the policy is
  the SFT model (the reference) with the train stage's LoRA adapters (`train.lora_*`), fresh (peft's init
  with `lora_B` = 0, A seeded by `seed`, so every actor holds the same adapter) or warmed up
  (`depth.warmup_steps` > 0: a short DPO run with AdamW on a seeded sample of the pairs, as LESS warms up).
  Pairs are tokenised as the train stage does (`encode_pair`); one that cannot fit is quarantined
  (`does_not_fit`). Per batch of `depth.batch_size` length-sorted pairs, `batched_pair_gradients` gives every
  pair's gradient from one forward and one backward; optional LESS Adam preconditioning; the projection
  (`raybpo.projection`); the norm before projection is kept as `grad_norm` (the `norm` strategy ranks by it).
- **raybpo rule** (selection, `bpo`): K_g = `depth.num_clusters`, else about `depth.pairs_per_cluster` pairs
  per cluster. In every cluster pairs are ranked by the strategy's score (`centroid`: cosine similarity to the
  centroid; `norm`: gradient norm; `boundary`: minus the similarity; `random`: a seeded uniform draw), ties by
  pair_id, and the top `keep_count(size, eta_g)` kept (`raybpo.clustering`). Every prompt with no kept pair then
  gets its largest-gap pair (ties by pair_id). With `depth.budget`, a selection above it is cut to the budget:
  each prompt's best-scored pair first, then the rest by score, globally. A prompt's pair count is its
  allocation (dynamic depth).
- Baselines at the same budget (the number of pairs `bpo` kept): `random` (pairs drawn uniformly from every
  featured pair), `uniform` (the same number of pairs for every prompt: budget // prompts each, the remainder
  to prompts drawn at random; a prompt takes its largest-gap pairs first, and a prompt with too few pairs
  leaves its share to the others), and `original` (the ingested (n, 2) data: one pair per prompt, prompts
  drawn at random, more pairs per prompt only when the prompts run out).

Outputs: `depth/features/` (pair_id, prompt_key, grad_norm, feature as float16/float32 vectors),
`depth/selections/<name>/` (canonical pairs plus prompt_key, allocation, cluster, similarity, grad_norm), the
plots `pairs_per_prompt.png` (the paper's Figure 4: pairs per prompt of bpo against uniform; `original` has
one per prompt) and
`cluster_sizes.png`. The train stage trains on `selections/<depth.selection>`. Counts: rows_in = candidate
pairs = featured + quarantined; featured = selected + not selected (in the manifest).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import safetensors.torch
import torch

from raybpo.artifacts import (
    CANDIDATE_PAIRS,
    DEPTH,
    DEPTH_CLUSTER_SIZES,
    DEPTH_FEATURES,
    DEPTH_FEATURES_FILE,
    DEPTH_PAIRS_PER_PROMPT,
    DEPTH_QUARANTINE,
    DEPTH_WARMUP,
    INGEST,
    SCORE,
    depth_selection,
    depth_selection_file,
    in_stage,
    ingested_pairs,
    read_table,
    reference_model,
    relpath,
)
from raybpo.cluster import init_ray
from raybpo.clustering import (
    KMEANS_NITER,
    assign_to_centroids,
    keep_count,
    num_clusters,
    plot_cluster_sizes,
    rank_within_clusters,
    spherical_kmeans,
)
from raybpo.config import Config, DepthConfig, PolicyConfig, TrainConfig
from raybpo.data.schema import PAIR_SCHEMA, prompt_key
from raybpo.models.gradients import (
    adam_precondition,
    batched_pair_gradients,
    num_parameters,
    warm_up,
)
from raybpo.models.loading import load_causal_lm
from raybpo.models.logps import collate_pairs
from raybpo.models.lora import add_lora
from raybpo.models.tokenize import TokenizationError, encode_pair
from raybpo.plots import png_bytes, pyplot
from raybpo.projection import RademacherProjection
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

log = logging.getLogger(__name__)

STAGE = DEPTH
SELECTIONS = ("bpo", "random", "uniform", "original")
RANDOM_STREAM, UNIFORM_STREAM, ORIGINAL_STREAM, STRATEGY_STREAM, WARMUP_STREAM = 1, 2, 3, 4, 5
BLOCKS_PER_ACTOR = 4
# The train settings the features depend on (the adapters and the tokenisation), part of the stage's identity;
# the rest of `train` (learning rate, beta-DPO, ...) does not redo the stage.
TRAIN_KEYS = {"lora_rank", "lora_alpha", "lora_target_modules", "max_length", "max_prompt_length"}
ADAPTER_SEED_OFFSET = 17  # the fresh adapter's A is drawn from torch.manual_seed(seed + this)
SELECTION_SCHEMA = pa.schema(
    [
        *PAIR_SCHEMA,
        pa.field("prompt_key", pa.string(), nullable=False),
        pa.field("allocation", pa.int64(), nullable=False),
        pa.field("cluster", pa.int64()),
        pa.field("similarity", pa.float32()),
        pa.field("grad_norm", pa.float32()),
    ]
)


class DepthError(RuntimeError):
    """The depth stage cannot select: no pairs, or a budget below the number of prompts."""


# --------------------------------------------------------------------------- selection (pure functions)


def strategy_score(strategy: str, similarity: np.ndarray, grad_norm: np.ndarray, seed: int) -> np.ndarray:
    """Higher is better: `centroid` similarity, `norm` gradient norm, `boundary` -similarity, `random` a draw."""
    if strategy == "centroid":
        return np.asarray(similarity, dtype=np.float64)
    if strategy == "norm":
        return np.asarray(grad_norm, dtype=np.float64)
    if strategy == "boundary":
        return -np.asarray(similarity, dtype=np.float64)
    if strategy == "random":
        return np.random.default_rng([seed, STRATEGY_STREAM]).random(len(similarity))
    raise ValueError(f"unknown depth strategy {strategy!r}; expected centroid, norm, boundary or random")


def _best_per_group(groups: np.ndarray, score: np.ndarray, ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Indices (among `candidates`) of the highest-score row of every group, ties by smallest id."""
    order = candidates[np.lexsort((ids[candidates], -score[candidates], groups[candidates]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    return order[first]


def select_bpo(
    cluster: np.ndarray,
    score: np.ndarray,
    pair_ids: np.ndarray,
    prompt_keys: np.ndarray,
    gaps: np.ndarray,
    eta: float,
    k: int,
    budget: int | None = None,
) -> np.ndarray:
    """The raybpo selection rule of the module docstring: top eta per cluster, a pair for every prompt, budget."""
    pair_ids, prompt_keys = np.asarray(pair_ids, dtype=str), np.asarray(prompt_keys, dtype=str)
    _, prompt = np.unique(prompt_keys, return_inverse=True)
    rank = rank_within_clusters(cluster, score, pair_ids)
    kept = rank < keep_count(np.bincount(cluster, minlength=k), eta)[cluster]
    missing = ~np.isin(prompt, prompt[kept])
    kept[_best_per_group(prompt, np.asarray(gaps, dtype=np.float64), pair_ids, np.flatnonzero(missing))] = True
    if budget is None or kept.sum() <= budget:
        return kept
    prompts = len(np.unique(prompt))
    if budget < prompts:
        raise DepthError(f"depth.budget={budget} is below the {prompts} prompts, each of which keeps a pair")
    guaranteed = _best_per_group(prompt, score, pair_ids, np.flatnonzero(kept))
    rest = np.setdiff1d(np.flatnonzero(kept), guaranteed)
    rest = rest[np.lexsort((pair_ids[rest], -score[rest]))][: budget - len(guaranteed)]
    out = np.zeros(len(kept), dtype=bool)
    out[guaranteed] = out[rest] = True
    return out


def select_random(n: int, count: int, seed: int) -> np.ndarray:
    """`count` of `n` pairs, uniform without replacement, from (seed, RANDOM_STREAM)."""
    kept = np.zeros(n, dtype=bool)
    kept[np.random.default_rng([seed, RANDOM_STREAM]).choice(n, size=min(count, n), replace=False)] = True
    return kept


def select_uniform(prompt_keys: np.ndarray, gaps: np.ndarray, pair_ids: np.ndarray, count: int, seed: int):
    """The same number of pairs for every prompt (largest gaps first); see the module docstring."""
    prompt_keys, pair_ids = np.asarray(prompt_keys, dtype=str), np.asarray(pair_ids, dtype=str)
    keys, prompt = np.unique(prompt_keys, return_inverse=True)
    order = np.lexsort((pair_ids, -np.asarray(gaps, dtype=np.float64), prompt))  # by prompt, gap descending
    members = np.split(order, np.searchsorted(prompt[order], np.arange(1, len(keys))))
    quota = np.full(len(keys), count // len(keys))
    quota[np.random.default_rng([seed, UNIFORM_STREAM]).permutation(len(keys))[: count % len(keys)]] += 1
    available = np.array([len(m) for m in members])
    while (short := np.minimum(quota, available)).sum() < min(count, available.sum()):
        spare = count - short.sum()
        room = np.flatnonzero(available > short)
        quota = short.copy()
        quota[room[: min(spare, len(room))]] += 1
    kept = np.zeros(len(prompt_keys), dtype=bool)
    for rows, take in zip(members, np.minimum(quota, available), strict=True):
        kept[rows[:take]] = True
    return kept


def select_original(prompt_keys: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` of the ingested pairs: one per prompt (prompts in a seeded random order) before any second one."""
    n = len(prompt_keys)
    order = np.random.default_rng([seed, ORIGINAL_STREAM]).permutation(n)
    seen: Counter[str] = Counter()
    turn = np.empty(n, dtype=np.int64)
    for i in order:
        turn[i] = seen[prompt_keys[i]]
        seen[prompt_keys[i]] += 1
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    kept = np.zeros(n, dtype=bool)
    kept[np.lexsort((position, turn))[:count]] = True
    return kept


def allocation(prompt_keys: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Every row's prompt's number of kept pairs."""
    counts = Counter(np.asarray(prompt_keys)[kept].tolist())
    return np.array([counts.get(k, 0) for k in prompt_keys], dtype=np.int64)


# --------------------------------------------------------------------------- Ray Data gradient features


def _load_policy(reference: str, policy: PolicyConfig, train: TrainConfig, seed: int, device: torch.device):
    """The reference model with the train stage's LoRA adapters (A seeded, B = 0), on `device`, eval mode."""
    model, tokenizer = load_causal_lm(reference, policy)
    torch.manual_seed(seed + ADAPTER_SEED_OFFSET)
    model = add_lora(model, train).to(device)
    model.eval()
    return model, tokenizer


def _encode(tokenizer, rows: list[dict], train: TrainConfig, policy: PolicyConfig):
    """(encoded pairs, reasons): a pair that cannot fit gets `does_not_fit: ...` and no ids."""
    encoded, reasons = [], []
    for row in rows:
        try:
            pair = encode_pair(
                tokenizer,
                row["prompt"],
                row["chosen"],
                row["rejected"],
                train.max_length,
                train.max_prompt_length,
                policy.use_chat_template,
            )
            encoded.append(pair)
            reasons.append("")
        except TokenizationError as err:
            encoded.append(None)
            reasons.append(f"does_not_fit: {err}")
    return encoded, reasons


class GradientFeaturizer:
    """Ray Data actor: candidate pairs -> (pair_id, grad_norm, feature, reason), the policy loaded once."""

    def __init__(self, reference: str, policy: dict, train: dict, depth: dict, seed: int, warmup: bytes | None):
        self.policy, self.train = PolicyConfig.model_validate(policy), TrainConfig.model_validate(train)
        self.depth = DepthConfig.model_validate(depth)
        self.device = torch.device("cuda" if self.depth.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":  # TF32 matmuls: 1.8x on an H100, features still at cosine 0.9999997
            torch.set_float32_matmul_precision("high")
        self.model, self.tokenizer = _load_policy(reference, self.policy, self.train, seed, self.device)
        self.adam = None
        if warmup is not None:
            from peft import set_peft_model_state_dict

            state = safetensors.torch.load(warmup)
            adam = {name: state.pop(name) for name in ("exp_avg", "exp_avg_sq")}
            set_peft_model_state_dict(self.model, state)
            if self.depth.adam_preconditioning:
                self.adam = (adam["exp_avg"].to(self.device), adam["exp_avg_sq"].to(self.device))
        self.projection = RademacherProjection(num_parameters(self.model), self.depth.projection_dim, seed)
        self.dtype = np.float16 if self.depth.dtype == "float16" else np.float32

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        encoded, reasons = _encode(self.tokenizer, rows, self.train, self.policy)
        features = np.zeros((len(rows), self.depth.projection_dim), dtype=self.dtype)
        norms = np.zeros(len(rows), dtype=np.float32)
        ok = sorted((i for i, e in enumerate(encoded) if e is not None), key=lambda i: _length(encoded[i]))
        for start in range(0, len(ok), self.depth.batch_size):
            index = ok[start : start + self.depth.batch_size]
            projected, norm = self.features([encoded[i] for i in index])
            features[index], norms[index] = projected.astype(self.dtype), norm
        flat = pa.array(features.reshape(-1))
        return pa.table(
            {
                "pair_id": batch["pair_id"],
                "grad_norm": norms,
                "feature": pa.FixedSizeListArray.from_arrays(flat, self.depth.projection_dim),
                "reason": reasons,
            }
        )

    def features(self, pairs: list) -> tuple[np.ndarray, np.ndarray]:
        """Unit projected features (B, d) and the gradient norms (B,) of a batch of encoded pairs."""
        batch = {k: v.to(self.device) for k, v in _collate(pairs, self.tokenizer.pad_token_id).items()}
        grads = batched_pair_gradients(self.model, batch, self.depth.beta0)
        if self.adam is not None:
            grads = adam_precondition(grads, *self.adam)
        norm = grads.norm(dim=1)
        projected = self.projection.project(grads)
        projected = projected / projected.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return projected.cpu().numpy(), norm.cpu().numpy()


def _length(pair) -> int:
    return len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))


@ray.remote
def warm_up_task(reference: str, policy: dict, train: dict, depth: dict, seed: int, pairs: list[dict]) -> bytes:
    """The LESS-style warm-up (`raybpo.models.gradients.warm_up`) on `pairs`: the adapter's weights and the Adam
    state (`exp_avg`, `exp_avg_sq`) as one safetensors blob, which the actors load and the stage keeps."""
    from peft import get_peft_model_state_dict

    policy_cfg, train_cfg = PolicyConfig.model_validate(policy), TrainConfig.model_validate(train)
    depth_cfg = DepthConfig.model_validate(depth)
    device = torch.device("cuda" if depth_cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_policy(reference, policy_cfg, train_cfg, seed, device)
    encoded = [e for e in _encode(tokenizer, pairs, train_cfg, policy_cfg)[0] if e is not None]
    size = depth_cfg.batch_size
    batches = [
        {k: v.to(device) for k, v in _collate(encoded[i : i + size], tokenizer.pad_token_id).items()}
        for i in range(0, len(encoded), size)
    ]
    exp_avg, exp_avg_sq = warm_up(model, batches, depth_cfg.beta0, depth_cfg.warmup_lr)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return safetensors.torch.save({**state, "exp_avg": exp_avg.cpu(), "exp_avg_sq": exp_avg_sq.cpu()})


def _collate(pairs: list, pad_id: int) -> dict[str, torch.Tensor]:
    return collate_pairs([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], pad_id)


def compute_features(pairs: pa.Table, reference: str, cfg: Config, warmup: bytes | None) -> pa.Table:
    """pair_id, grad_norm, feature, reason for every candidate pair, from an actor pool on Ray Data."""
    order = np.argsort(
        [len(p) + max(len(c), len(r)) for p, c, r in zip(*(pairs[k].to_pylist() for k in PAIR_TEXT), strict=True)],
        kind="stable",
    )
    table = pairs.select(["pair_id", *PAIR_TEXT]).take(order)
    depth = cfg.depth
    batches = -(-table.num_rows // depth.batch_size)
    per_block = depth.batch_size * max(1, -(-batches // (depth.concurrency * BLOCKS_PER_ACTOR)))
    blocks = [table.slice(start, per_block) for start in range(0, table.num_rows, per_block)]
    featured = ray.data.from_arrow(blocks).map_batches(
        GradientFeaturizer,
        fn_constructor_kwargs={
            "reference": reference,
            "policy": cfg.policy.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json"),
            "depth": depth.model_dump(mode="json"),
            "seed": cfg.seed,
            "warmup": warmup,
        },
        batch_format="pyarrow",
        batch_size=per_block,
        compute=ray.data.ActorPoolStrategy(size=depth.concurrency),
        num_cpus=depth.num_cpus,
        num_gpus=depth.num_gpus,
        udf_modifying_row_count=False,
    )
    refs = featured.materialize().to_arrow_refs()
    return pa.concat_tables(ray.get(refs)).sort_by("pair_id")


PAIR_TEXT = ("prompt", "chosen", "rejected")


# --------------------------------------------------------------------------- the stage


def plot_pairs_per_prompt(allocations: dict[str, np.ndarray]) -> bytes:
    """PNG: histogram of pairs per prompt for each selection (BPO's dynamic depth against the baselines)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max(int(a.max()) for a in allocations.values() if len(a))
    bins = np.arange(0.5, top + 1.5)
    for name, counts in allocations.items():
        ax.hist(counts, bins=bins, alpha=0.55, label=f"{name} ({int(counts.sum())} pairs)")
    ax.set(title="pairs per prompt", xlabel="pairs selected for the prompt", ylabel="prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _feature_matrix(column: pa.ChunkedArray) -> np.ndarray:
    flat = column.combine_chunks()
    return flat.flatten().to_numpy(zero_copy_only=False).reshape(len(flat), flat.type.list_size).astype(np.float32)


def _stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 3),
        "max": int(values.max()),
    }


def _selection_table(pairs: pa.Table, kept: np.ndarray, extra: dict[str, Any]) -> pa.Table:
    keys = np.asarray(pairs["prompt_key"].to_pylist(), dtype=str)
    columns = {name: pairs[name] for name in PAIR_SCHEMA.names}
    columns["prompt_key"] = pairs["prompt_key"]
    columns["allocation"] = pa.array(allocation(keys, kept))
    for name in ("cluster", "similarity", "grad_norm"):
        columns[name] = pa.array(extra[name]) if name in extra else pa.nulls(pairs.num_rows)
    table = pa.table(columns).cast(SELECTION_SCHEMA)
    return table.filter(pa.array(kept)).sort_by([("prompt_key", "ascending"), ("pair_id", "ascending")])


def run_depth(cfg: Config, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """The `depth` stage: gradient features, clustering, the BPO selection and its baselines (module doc)."""
    run_dir = RunDir(cfg.run_dir)
    score = require_stage(run_dir, SCORE)
    ingest = require_stage(run_dir, INGEST)
    source = reference_model(cfg, run_dir)
    reference = source.local()
    inputs = {
        "score": stage_identity(score),
        "ingest": stage_identity(ingest),
        "reference": source.identity,
        "train_lora_and_lengths": json.dumps(cfg.train.model_dump(mode="json", include=TRAIN_KEYS), sort_keys=True),
    }
    depth = cfg.depth

    def body(stage_path: str) -> StageCounts:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        pairs = read_table(run_dir, CANDIDATE_PAIRS).sort_by("pair_id")
        if pairs.num_rows == 0:
            raise DepthError(f"{run_dir.uri_of(*CANDIDATE_PAIRS)} holds no pairs: nothing to select from")
        pairs = pairs.append_column("prompt_key", pa.array([prompt_key(p) for p in pairs["prompt"].to_pylist()]))

        warmup = None
        if depth.warmup_steps:
            sample = np.random.default_rng([cfg.seed, WARMUP_STREAM]).choice(
                pairs.num_rows, size=min(pairs.num_rows, depth.warmup_steps * depth.batch_size), replace=False
            )
            rows = pairs.select(list(PAIR_TEXT)).take(np.sort(sample)).to_pylist()
            warmup = ray.get(
                # DEFAULT: inside a Tune trial the task must not join the trial's (CPU-less) placement group
                warm_up_task.options(num_gpus=depth.num_gpus, scheduling_strategy="DEFAULT").remote(
                    reference,
                    cfg.policy.model_dump(mode="json"),
                    cfg.train.model_dump(mode="json"),
                    depth.model_dump(mode="json"),
                    cfg.seed,
                    rows,
                )
            )
            run_dir.write_bytes(relpath(DEPTH_WARMUP), warmup)
            log.info("depth: warm-up of %d steps on %d pairs", -(-len(rows) // depth.batch_size), len(rows))
            timings["warmup"] = time.perf_counter() - started

        started = time.perf_counter()
        features = compute_features(pairs, reference, cfg, warmup)
        timings["features"] = time.perf_counter() - started
        bad = pc.not_equal(features["reason"], "")
        quarantined = features.filter(bad)
        featured_ids = features.filter(pc.invert(bad))
        pairs = pairs.filter(pc.is_in(pairs["pair_id"], featured_ids["pair_id"]))  # both sorted by pair_id
        if pairs.num_rows == 0:
            raise DepthError("no candidate pair fits train.max_length: raise it or shorten the responses")
        x = _feature_matrix(featured_ids["feature"])
        grad_norm = featured_ids["grad_norm"].to_numpy()
        run_dir.makedirs(*DEPTH_FEATURES)
        pq.write_table(
            pa.table(
                {
                    "pair_id": pairs["pair_id"],
                    "prompt_key": pairs["prompt_key"],
                    "grad_norm": featured_ids["grad_norm"],
                    "feature": featured_ids["feature"],
                }
            ),
            run_dir.path(*DEPTH_FEATURES_FILE),
            filesystem=run_dir.fs,
        )
        if quarantined.num_rows:
            pq.write_table(
                quarantined.drop_columns(["feature", "grad_norm"]),
                run_dir.path(*DEPTH_QUARANTINE),
                filesystem=run_dir.fs,
            )

        started = time.perf_counter()
        import faiss

        use_gpu = depth.num_gpus > 0 and faiss.get_num_gpus() > 0
        n = pairs.num_rows
        k = num_clusters(n, depth.num_clusters, depth.pairs_per_cluster)
        centroids, objective = spherical_kmeans(x, k, cfg.seed, use_gpu=use_gpu)
        cluster, similarity = assign_to_centroids(x, centroids)
        pair_ids = np.asarray(pairs["pair_id"].to_pylist(), dtype=str)
        keys = np.asarray(pairs["prompt_key"].to_pylist(), dtype=str)
        gaps = (pc.subtract(pairs["score_chosen"], pairs["score_rejected"])).fill_null(0.0).to_numpy()
        score = strategy_score(depth.strategy, similarity, grad_norm, cfg.seed)
        kept = {"bpo": select_bpo(cluster, score, pair_ids, keys, gaps, depth.eta, k, depth.budget)}
        budget = int(kept["bpo"].sum())
        kept["random"] = select_random(n, budget, cfg.seed)
        kept["uniform"] = select_uniform(keys, gaps, pair_ids, budget, cfg.seed)
        original = ingested_pairs(run_dir).sort_by("pair_id")
        original = original.append_column(
            "prompt_key", pa.array([prompt_key(p) for p in original["prompt"].to_pylist()])
        )
        original_keys = np.asarray(original["prompt_key"].to_pylist(), dtype=str)
        kept_original = select_original(original_keys, budget, cfg.seed)
        timings["cluster_select"] = time.perf_counter() - started

        extra = {"cluster": cluster, "similarity": similarity, "grad_norm": grad_norm}
        tables = {name: _selection_table(pairs, kept[name], extra) for name in ("bpo", "random", "uniform")}
        tables["original"] = _selection_table(original, kept_original, {})
        for name, table in tables.items():
            run_dir.makedirs(*depth_selection(name))
            pq.write_table(table, run_dir.path(*depth_selection_file(name)), filesystem=run_dir.fs)

        per_prompt = {
            name: np.array(list(Counter(table["prompt_key"].to_pylist()).values())) for name, table in tables.items()
        }
        run_dir.write_bytes(
            relpath(DEPTH_PAIRS_PER_PROMPT),
            plot_pairs_per_prompt({name: per_prompt[name] for name in ("bpo", "uniform")}),
        )
        sizes = np.bincount(cluster, minlength=k)
        kept_per_cluster = np.bincount(cluster[kept["bpo"]], minlength=k)
        non_empty = sizes > 0
        run_dir.write_bytes(
            relpath(DEPTH_CLUSTER_SIZES),
            plot_cluster_sizes(sizes[non_empty], kept_per_cluster[non_empty], depth.eta, depth.strategy, unit="pairs"),
        )
        selected = tables[depth.selection].num_rows
        prompts_total = len(np.unique(keys))
        log.info(
            "depth: %d candidate pairs (%d prompts) -> %d clusters -> %d pairs kept by bpo; %s trains on %d",
            n,
            prompts_total,
            k,
            budget,
            depth.selection,
            selected,
        )
        reasons = Counter(r.split(":", 1)[0] for r in quarantined["reason"].to_pylist())
        feature_seconds = timings["features"]
        return StageCounts(
            rows_in=n + quarantined.num_rows,
            rows_out=selected,
            rows_quarantined=quarantined.num_rows,
            quarantine_reasons=dict(reasons),
            extra={
                "featured": n,
                "selection": depth.selection,
                "selected": selected,
                "not_selected": None if depth.selection == "original" else n - selected,
                "budget": budget,
                "prompts": prompts_total,
                "selections": {
                    name: {
                        "pairs": table.num_rows,
                        "prompts": len(per_prompt[name]),
                        "pairs_per_prompt": _stats(per_prompt[name]),
                    }
                    for name, table in tables.items()
                },
                "strategy": depth.strategy,
                "eta": depth.eta,
                "num_clusters": k,
                "empty_clusters": int((~non_empty).sum()),
                "kmeans": {
                    "backend": "faiss-gpu" if use_gpu else "faiss-cpu",
                    "niter": KMEANS_NITER,
                    "objective": round(objective, 6),
                },
                "features": {
                    "projection_dim": depth.projection_dim,
                    "dtype": depth.dtype,
                    "warmup_steps": depth.warmup_steps,
                    "adam_preconditioning": depth.adam_preconditioning,
                    "pairs_per_second": round((n + quarantined.num_rows) / max(feature_seconds, 1e-9), 2),
                },
                "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
                "outputs": {
                    "features": in_stage(DEPTH_FEATURES, folder=True),
                    **{f"selection_{name}": in_stage(depth_selection(name), folder=True) for name in tables},
                    "pairs_per_prompt": in_stage(DEPTH_PAIRS_PER_PROMPT),
                    "cluster_sizes": in_stage(DEPTH_CLUSTER_SIZES),
                    **({"quarantine": in_stage(DEPTH_QUARANTINE)} if quarantined.num_rows else {}),
                    **({"warmup": in_stage(DEPTH_WARMUP)} if warmup is not None else {}),
                },
            },
        )

    init_ray(cfg.ray)
    return run_stage(run_dir, STAGE, cfg, ("policy", "depth"), inputs, body)
