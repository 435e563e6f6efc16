"""SFT, then beta-DPO, on the built-in benchmark: the policy's samples on held-out prompts get better.

A real, seeded end-to-end check through `raybpo demo` (its preset and manifests, with the stages cut to ingest,
sft and train, so train learns from every ingested pair for one epoch; tests/test_pipeline.py runs the whole
graph): the tiny policy is trained from scratch by `sft`, aligned by `train`, and both are sampled
on the benchmark's held-out prompts and scored by its ground-truth utility. Paired by prompt and
sampling seed, the trained policy must beat the SFT policy by a clear margin.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from raybpo.cli import main
from raybpo.data import benchmark
from raybpo.models.generation import sample_responses
from raybpo.models.loading import load_causal_lm


def _utilities(model_dir: Path, prompts: list[str], seeds: range) -> np.ndarray:
    model, tokenizer = load_causal_lm(str(model_dir))
    return np.array(
        [
            benchmark.mean_utility(prompt, response)
            for seed in seeds
            for prompt, response in zip(
                prompts,
                sample_responses(model, tokenizer, prompts, max_new_tokens=40, temperature=0.7, seed=seed),
                strict=True,
            )
        ]
    )


@pytest.mark.usefixtures("ray_session")
def test_sft_then_beta_dpo_raises_held_out_utility(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "seed=1", "stages=[ingest,sft,train]", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "ingest: done" in out and "sft: done" in out and "train: done" in out
    sft = json.loads((run / "sft/manifest.json").read_text())
    train = json.loads((run / "train/manifest.json").read_text())
    assert sft["rows_out"] == 1800 and sft["final_metrics"]["eval_loss"] < 2.0
    assert train["final_metrics"]["beta"] != pytest.approx(0.1)  # beta-DPO's dynamic beta moved off beta0
    assert train["final_metrics"]["filter/kept_fraction"] == pytest.approx(0.75)  # floor(16 * 0.8) / 16
    assert (run / "train/policy/adapter/adapter_model.safetensors").exists()

    prompts = [json.loads(line)["prompt"] for line in (run / "ingest/benchmark/eval_prompts.jsonl").open()]
    before = _utilities(run / "sft/model", prompts, range(6))
    after = _utilities(run / "train/policy/merged", prompts, range(6))
    gain = after - before
    standard_error = gain.std() / np.sqrt(len(gain))
    print(
        f"held-out utility: sft {before.mean():.3f}, beta-DPO {after.mean():.3f}, gain {gain.mean():.3f} "
        f"+- {standard_error:.3f}"
    )
    assert gain.mean() > 3 * standard_error and gain.mean() > 0.1
