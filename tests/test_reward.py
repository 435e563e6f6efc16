"""Reward models with MORE: exact multi-worker lambda, resume after a crash, save and reload, the
benchmark's sources. The reward stage on real HH rows runs in tests/test_real_model.py (tests/real.yaml)."""

import functools
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import benchmark_with_tiny_llama, crash_once
from safetensors.torch import load_file

from raybpo.artifacts import read_pairs
from raybpo.config import Config, RewardConfig, TinyModelConfig
from raybpo.metrics.reward import score_pairs
from raybpo.models.reward import load_reward_model, pooled_and_rewards, reward_head
from raybpo.rundir import RunDir
from raybpo.train.loop import fit
from raybpo.train.reward import RewardRecipe, make_reward_recipe, resample, run_reward, train_at_once


def _benchmark_run(root: Path, pairs_per_source: int) -> tuple[Config, str]:
    """A run dir with the benchmark ingested, and a tiny Llama built on its text as the reward backbone."""
    tiny = TinyModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128)
    return benchmark_with_tiny_llama(root, tiny, ("prompt", "chosen", "rejected"), pairs_per_source=pairs_per_source)


@pytest.fixture(scope="module")
def benchmark_run(ray_session, tmp_path_factory):
    """A run dir with 3 x 200 benchmark pairs ingested, and a tiny Llama to use as the reward backbone."""
    return _benchmark_run(tmp_path_factory.mktemp("reward"), 200)


def _reward_fit(cfg, backbone, name, workers, per_source, factory=None):
    reward = RewardConfig(
        lr=1e-3,
        batch_size=12,
        micro_batch_size=3 * per_source,
        num_workers=workers,
        pairs_per_source_per_batch=per_source,
        samples_per_source=48,
        checkpoint_every=4,
        eval_fraction=0.0,
        log_every=1,
    )
    args = (cfg.run_dir, backbone, reward.model_dump(mode="json"), "more", ["concise", "harmless", "helpful"])
    factory = factory(*args) if factory else functools.partial(make_reward_recipe, *args)
    result = fit(name, factory, reward, 0, str(Path(cfg.run_dir) / "checkpoints"), has_eval=False)
    return result, load_file(str(Path(result.checkpoint.path) / "model.safetensors"))  # local storage: in place


def test_more_lambda_is_identical_on_two_workers_and_survives_a_crash(benchmark_run, tmp_path):
    cfg, backbone = benchmark_run
    one_result, one = _reward_fit(cfg, backbone, "rm-one", workers=1, per_source=2)
    marker = tmp_path / "crashed"
    two_result, two = _reward_fit(
        cfg,
        backbone,
        "rm-two",
        workers=2,
        per_source=1,
        # Rank 1 fails in step 6 (2 loss calls a step). Not in step 5: Ray Train takes a report when it next polls
        # the workers, so a crash right after the step-4 checkpoint's report could come before the checkpoint was
        # taken (seen once on a loaded machine); step 5's report waits until step 4's was taken.
        factory=lambda *a: crash_once(make_reward_recipe, str(marker), 11, *a),
    )
    assert marker.exists() and two_result.return_value["resumed_from"] == [4]
    one_history, two_history = one_result.return_value["history"], two_result.return_value["history"]
    assert [h["step"] for h in one_history] == [h["step"] for h in two_history] == list(range(1, 13))
    for a, b in zip(one_history, two_history, strict=True):
        lambdas = [k for k in a if k.startswith("lambda/")]
        assert len(lambdas) == 3 and sum(a[k] for k in lambdas) == pytest.approx(1.0)
        for key in [*lambdas, "loss"]:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key  # float32 all-reduce order differs
    assert len({round(h["lambda/helpful"], 3) for h in two_history}) > 1  # lambda really moves
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-4, rtol=1e-3)  # Adam amplifies float noise


def test_more_and_multitask_beat_chance_on_every_source(ray_session, tmp_path):
    """Both modes, seed 0, the last checkpoint, 100 held-out pairs per source; the two stages run at once, each
    in a run dir of its own on the same ingested benchmark (one CPU each).

    `concise` (short answers, no politeness) is the hard source for this from-scratch 2-layer backbone:
    across seeds its accuracy was 0.50-0.56 (the others 0.62-0.75), so the seed is fixed (training is
    deterministic on CPU) and the bars are chance per source and 0.6 on the mean.
    """
    cfg, backbone = _benchmark_run(tmp_path, 400)
    runs = {}
    for mode in ("more", "multitask"):
        run = cfg.model_copy(deep=True, update={"run_dir": str(tmp_path / mode)})
        shutil.copytree(Path(cfg.run_dir) / "ingest", tmp_path / mode / "ingest")
        run.reward = RewardConfig(
            mode=mode,
            model=backbone,
            lr=2e-3,
            epochs=4,
            batch_size=24,
            eval_fraction=0.25,
            checkpoint_every=1000,
            max_length=64,
        )
        runs[mode] = run
    with ThreadPoolExecutor(max_workers=2) as pool:
        manifests = dict(zip(runs, pool.map(lambda run: run_reward(run).manifest, runs.values()), strict=True))
    for mode, manifest in manifests.items():
        models = manifest["evaluation"]["models"]["model"]
        assert min(manifest["evaluation"]["eval_pairs"].values()) >= 90
        for source, metrics in models["per_source"].items():
            assert metrics["accuracy"] > 0.5, (mode, source, metrics)
            assert 0.0 <= metrics["ece"] < 0.5
        assert models["mean_accuracy"] > 0.6, (mode, models["mean_accuracy"])
        report = Path(runs[mode].run_dir) / "reward" / "report"
        table = (report / "reward.md").read_text()
        for source in ("concise", "harmless", "helpful"):
            assert f"acc {source}" in table
        assert f"{models['ece']:.4f}" in table and (report / "reliability.png").stat().st_size > 1000
        assert (report / "lambda.png").exists() == (mode == "more")
        saved = json.loads((report / "reward.json").read_text())
        assert saved["models"]["model"]["mean_accuracy"] == pytest.approx(models["mean_accuracy"])


def test_save_and_reload_give_identical_rewards(benchmark_run, tmp_path):
    cfg, backbone = benchmark_run
    model, tokenizer = load_reward_model(backbone)
    torch.nn.init.normal_(reward_head(model).weight, std=0.5)
    model.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "rm")
    pairs = read_pairs(RunDir(cfg.run_dir))
    prompts, chosen, rejected = pairs["prompt"][:40], pairs["chosen"][:40], pairs["rejected"][:40]
    r_chosen, r_rejected = score_pairs(tmp_path / "rm", prompts, chosen, rejected, max_length=64)
    recipe = RewardRecipe(pairs, str(tmp_path / "rm"), RewardConfig(max_length=64), "multitask")
    reloaded = recipe.build_model(torch.device("cpu")).eval()
    with torch.no_grad():
        z_chosen, _, live_chosen, live_rejected = recipe.rewards(reloaded, list(range(40)), torch.device("cpu"))
        assert torch.allclose(reward_head(reloaded)(z_chosen)[:, 0], live_chosen, atol=1e-5)  # z is the pooled input
    np.testing.assert_allclose(r_chosen, live_chosen.numpy(), atol=1e-5)
    np.testing.assert_allclose(r_rejected, live_rejected.numpy(), atol=1e-5)
    assert np.std(r_chosen) > 0  # scores differ from pair to pair, so the comparison means something


def test_pooled_features_enter_the_head(benchmark_run):
    _, backbone = benchmark_run
    model, tokenizer = load_reward_model(backbone)
    batch = tokenizer(["short", "a much longer text here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        z, r = pooled_and_rewards(model, batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id)
        assert z.shape == (2, model.config.hidden_size)
        torch.testing.assert_close(reward_head(model)(z)[:, 0], r)


def test_resample_truncates_or_upsamples_each_source():
    rng = np.random.default_rng(0)
    assert sorted(resample(list(range(10)), 10, rng)) == list(range(10))
    up = resample(list(range(4)), 10, rng)
    assert len(up) == 10 and sorted(up[:4]) == [0, 1, 2, 3] and sorted(up[4:8]) == [0, 1, 2, 3]
    assert len(set(resample(list(range(100)), 30, rng))) == 30


def test_judge_halves_split_the_training_pairs(benchmark_run):
    """reward.judge_model: the scorer and the judge train on disjoint halves whose union is every training pair."""
    cfg, backbone = benchmark_run
    pairs = read_pairs(RunDir(cfg.run_dir))
    recipes = [RewardRecipe(pairs, backbone, RewardConfig(), "multitask", half) for half in (None, 0, 1)]
    everything, first, second = ({s: set(rows) for s, rows in r.by_source.items()} for r in recipes)
    for source, rows in everything.items():
        assert first[source].isdisjoint(second[source]) and first[source] | second[source] == rows
        assert 0.4 < len(first[source]) / len(rows) < 0.6
    assert recipes[1].eval_rows == recipes[0].eval_rows  # both are judged on the same held-out pairs
    with pytest.raises(ValueError, match="judge_model needs mode more or multitask"):
        RewardConfig(mode="single", judge_model=True)


def test_reward_models_train_at_once_and_a_failure_is_raised_after_all_end():
    started, release = threading.Barrier(2, timeout=30), threading.Event()
    ended = []

    def job(name, fail=False):
        started.wait()  # both run at the same time, or this times out
        release.wait(timeout=30)
        ended.append(name)
        if fail:
            raise ValueError(f"{name} failed")
        return {"name": name}

    release.set()
    assert train_at_once({"a": functools.partial(job, "a"), "b": functools.partial(job, "b")}) == {
        "a": {"name": "a"},
        "b": {"name": "b"},
    }
    ended.clear()
    with pytest.raises(ValueError, match="judge failed"):
        train_at_once({"judge": functools.partial(job, "judge", True), "model": functools.partial(job, "model")})
    assert sorted(ended) == ["judge", "model"]
