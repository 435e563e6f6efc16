"""Ray Data pass before training: tokenise pairs once and (optionally) cache reference log-probs.

Each actor loads the tokenizer (and, for reference log-probs, the reference policy) once, encodes
its rows with `encode_pair`, and runs the reference in length-sorted micro-batches. The output,
`<stage>/prepared/`, holds per pair its token ids, its split (`train` or `eval`, a stable function
of `pair_id`) and `ref_chosen_logps` / `ref_rejected_logps`, so every training step needs one
forward of the policy only. A pair whose response cannot fit the length limits is quarantined with
its reason, never silently dropped.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import torch

from raybpo.cluster import actor_pool
from raybpo.config import PolicyConfig
from raybpo.data.splits import split_of
from raybpo.models.loading import load_causal_lm, load_tokenizer
from raybpo.models.logps import collate_pairs, pair_logps
from raybpo.models.tokenize import TokenizationError, encode_example, encode_pair
from raybpo.rundir import RunDir

IDS = pa.list_(pa.int32())
PREPARED_PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("split", pa.string()),
        ("prompt_ids", IDS),
        ("chosen_ids", IDS),
        ("rejected_ids", IDS),
        ("ref_chosen_logps", pa.float64()),
        ("ref_rejected_logps", pa.float64()),
        ("reason", pa.string()),
    ]
)
PREPARED_EXAMPLES = pa.schema(
    [
        ("pair_id", pa.string()),
        ("split", pa.string()),
        ("prompt_ids", IDS),
        ("response_ids", IDS),
        ("reason", pa.string()),
    ]
)
REF_BATCH = 16


class PairEncoder:
    """Ray Data actor: pairs -> token ids (+ reference log-probs of the model at `reference`, on the actor's GPU
    when Ray gave it one)."""

    def __init__(
        self,
        model: str,
        policy: dict,
        max_length: int,
        max_prompt_length: int,
        eval_fraction: float,
        reference: bool,
        examples: bool = False,
    ):
        policy_cfg = PolicyConfig.model_validate(policy)
        self.use_chat_template = policy_cfg.use_chat_template
        self.limits = (max_length, max_prompt_length)
        self.eval_fraction = eval_fraction
        self.examples = examples
        self.model = None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if reference:
            self.model, self.tokenizer = load_causal_lm(model, policy_cfg)
            self.model.to(self.device)
        else:
            self.tokenizer = load_tokenizer(model, policy_cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: dict[str, list] = {name: [] for name in (PREPARED_EXAMPLES if self.examples else PREPARED_PAIRS).names}
        for row in rows:
            out["pair_id"].append(row["pair_id"])
            out["split"].append(split_of(row["pair_id"], self.eval_fraction))
            try:
                if self.examples:
                    ids = encode_example(
                        self.tokenizer, row["prompt"], row["chosen"], *self.limits, self.use_chat_template
                    )
                    encoded = {"prompt_ids": ids[0], "response_ids": ids[1]}
                else:
                    pair = encode_pair(
                        self.tokenizer,
                        row["prompt"],
                        row["chosen"],
                        row["rejected"],
                        *self.limits,
                        self.use_chat_template,
                    )
                    encoded = {"prompt_ids": pair.prompt, "chosen_ids": pair.chosen, "rejected_ids": pair.rejected}
                reason = ""
            except TokenizationError as err:
                encoded, reason = {}, f"does_not_fit: {err}"
            for name in out:
                if name.endswith("_ids"):
                    out[name].append(encoded.get(name))
            out["reason"].append(reason)
        if not self.examples:
            out["ref_chosen_logps"], out["ref_rejected_logps"] = self._reference(out)
        return pa.table(out, schema=PREPARED_EXAMPLES if self.examples else PREPARED_PAIRS)

    @torch.no_grad()
    def _reference(self, out: dict[str, list]) -> tuple[list, list]:
        n = len(out["pair_id"])
        chosen, rejected = [None] * n, [None] * n
        if self.model is None:
            return chosen, rejected
        ok = [i for i in range(n) if not out["reason"][i]]
        ok.sort(key=lambda i: len(out["prompt_ids"][i]) + max(len(out["chosen_ids"][i]), len(out["rejected_ids"][i])))
        for start in range(0, len(ok), REF_BATCH):
            rows = ok[start : start + REF_BATCH]
            batch = collate_pairs(
                [out["prompt_ids"][i] for i in rows],
                [out["chosen_ids"][i] for i in rows],
                [out["rejected_ids"][i] for i in rows],
                self.tokenizer.pad_token_id,
            )
            batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
            logps_c, logps_r = pair_logps(self.model, batch)
            for i, c, r in zip(rows, logps_c.tolist(), logps_r.tolist(), strict=True):
                chosen[i], rejected[i] = c, r
        return chosen, rejected


def encoder_resources(reference: bool, reference_gpus: int, num_cpus: float) -> dict[str, Any]:
    """The encoder pool's Ray Data options: for a reference pass on GPUs, 1 to `reference_gpus` actors of one GPU
    each; otherwise one actor of `num_cpus` CPUs (tokenising, or the reference pass on CPU)."""
    if reference and reference_gpus:
        return {"compute": actor_pool((1, reference_gpus)), "num_gpus": 1, "num_cpus": num_cpus}
    return {"compute": actor_pool(1), "num_cpus": num_cpus}


def prepare(
    pairs_uri: str,
    out_dir: str,
    run_dir: RunDir,
    model: str,
    policy: PolicyConfig,
    max_length: int,
    max_prompt_length: int,
    eval_fraction: float,
    reference: bool,
    examples: bool = False,
    num_cpus: float = 1.0,
    reference_gpus: int = 0,
) -> dict[str, int]:
    """Encode the pairs at `pairs_uri` into `out_dir` (below the run dir); returns row counts. With `reference`
    and `reference_gpus`, the reference pass runs on up to that many actors of one GPU each (the GPUs the
    training run will use); else one actor of `num_cpus` CPUs encodes."""
    encoder = functools.partial(
        PairEncoder,
        model=model,
        policy=policy.model_dump(mode="json"),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        eval_fraction=eval_fraction,
        reference=reference,
        examples=examples,
    )
    # The read runs to the end first: an encoder actor may ask for every CPU of the cluster
    # (train.cpus_per_worker), and Ray Data would then wait forever for a CPU to list the files on.
    pairs = ray.data.read_parquet(pairs_uri, filesystem=run_dir.fs).materialize()
    encoded = pairs.map_batches(
        encoder.func,
        fn_constructor_kwargs=encoder.keywords,
        batch_format="pyarrow",
        batch_size=256,
        **encoder_resources(reference, reference_gpus, num_cpus),
    ).materialize()
    encoded.write_parquet(out_dir, filesystem=run_dir.fs)
    table = pads.dataset(out_dir, filesystem=run_dir.fs, format="parquet").to_table(columns=["split", "reason"])
    bad = pc.not_equal(table["reason"], "")
    return {
        "rows": table.num_rows,
        "train": int(pc.sum(pc.and_(pc.invert(bad), pc.equal(table["split"], "train"))).as_py() or 0),
        "eval": int(pc.sum(pc.and_(pc.invert(bad), pc.equal(table["split"], "eval"))).as_py() or 0),
        "does_not_fit": int(pc.sum(bad).as_py() or 0),
    }


def load_prepared(out_dir: str, run_dir: RunDir) -> dict[str, dict[str, list]]:
    """The prepared rows that fit, by split: column name -> python list (token ids as lists)."""
    table = pads.dataset(out_dir, filesystem=run_dir.fs, format="parquet").to_table()
    table = table.filter(pc.equal(table["reason"], "")).sort_by("pair_id")
    return {
        split: table.filter(pc.equal(table["split"], split)).drop_columns(["split", "reason"]).to_pydict()
        for split in ("train", "eval")
    }


def sequence_lengths(columns: dict[str, list]) -> np.ndarray:
    """Token count of the longest sequence each row contributes (for length bucketing)."""
    responses = [k for k in ("chosen_ids", "rejected_ids", "response_ids") if k in columns]
    return np.array([len(p) + max(len(columns[k][i]) for k in responses) for i, p in enumerate(columns["prompt_ids"])])
