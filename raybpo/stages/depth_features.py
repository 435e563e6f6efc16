"""The depth stage's gradient features on Ray (docs/ALGORITHMS.md 3.3 and 4): an actor pool over the pairs.

`GradientFeaturizer` (a Ray Data actor) loads the policy once: the reference with the train stage's LoRA
adapters, fresh (A seeded by `seed + ADAPTER_SEED_OFFSET`, B = 0) or the LESS-style warm-up's (`warm_up_task`,
a Ray task). Per batch of length-sorted pairs it takes every pair's DPO-loss gradient from one forward and one
backward (`batched_pair_gradients`), optionally Adam-preconditions it, projects it (`raybpo.projection`) and
L2-normalises it; the norm before the projection is `grad_norm`. A pair that cannot fit gets a `does_not_fit`
reason and no feature. `compute_features` runs the pool over a table of pairs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import safetensors.torch
import torch

from raybpo.cluster import actor_blocks, actor_pool
from raybpo.config import Config, DepthConfig, PolicyConfig, TrainConfig
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
from raybpo.projection import RademacherProjection

PAIR_TEXT = ("prompt", "chosen", "rejected")
ADAPTER_SEED_OFFSET = 17  # the fresh adapter's A is drawn from torch.manual_seed(seed + this)


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
    blocks = actor_blocks(table, depth.batch_size, depth.concurrency)
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
        batch_size=blocks[0].num_rows,  # one batch per block (the first block is a whole one)
        compute=actor_pool(depth.concurrency),
        num_cpus=depth.num_cpus,
        num_gpus=depth.num_gpus,
        udf_modifying_row_count=False,
    )
    refs = featured.materialize().to_arrow_refs()
    return pa.concat_tables(ray.get(refs)).sort_by("pair_id")
