"""The Ray Train loop: exact multi-worker behaviour, restart after a worker failure, the NaN guard, checkpoints.

All runs share one small benchmark run directory, a tiny config-built reference model and its
prepared pairs (token ids + cached reference log-probs).
"""

import functools
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from conftest import crash_once
from safetensors.torch import load_file, save_file

from raybpo.config import Config, TinyModelConfig
from raybpo.models.lora import ADAPTER_WEIGHTS
from raybpo.models.tiny import build_tiny_model
from raybpo.rundir import RunDir
from raybpo.stages.ingest import ingest
from raybpo.train.checkpoint import STATE_FILE, Checkpointer
from raybpo.train.dpo import DpoRecipe, make_dpo_recipe
from raybpo.train.loop import NonFiniteLossError, Optimization, count_bad_steps, fit, optimizer_step
from raybpo.train.prepare import prepare
from raybpo.train.recipe import Workers, step_plan

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the recipes below run in Ray workers


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    """(config, reference model path): 240 benchmark pairs, prepared for DPO with cached reference log-probs."""
    root = tmp_path_factory.mktemp("training")
    cfg = Config(run_dir=str(root / "run"))
    cfg.ingest.preset = "benchmark"
    cfg.benchmark.pairs_per_source = 80
    ingest(cfg)
    run_dir = RunDir(cfg.run_dir)
    texts = [json.loads(line)["chosen"] for line in (root / "run/ingest/benchmark/helpful.jsonl").open()]
    reference = str(
        build_tiny_model(
            texts, TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64), root / "tiny", seed=0
        )
    )
    cfg.policy.model = reference
    cfg.train.eval_fraction = 0.0
    counts = prepare(
        run_dir.path("ingest", "pairs"),
        run_dir.path("train", "prepared"),
        run_dir,
        reference,
        cfg.policy,
        128,
        64,
        0.0,
        reference=True,
    )
    assert counts == {"rows": 240, "train": 240, "eval": 0, "does_not_fit": 0}
    return cfg, reference


def _fit(cfg: Config, name: str, factory=None, **train):
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-2, "epochs": 1, **train})})
    factory = factory or functools.partial(
        make_dpo_recipe,
        cfg.run_dir,
        "train",
        cfg.policy.model,
        cfg.policy.model_dump(mode="json"),
        cfg.train.model_dump(mode="json"),
        cfg.seed,
    )
    result = fit(name, factory, cfg.train, cfg.seed, str(Path(cfg.run_dir) / "checkpoints"), has_eval=False)
    return result, load_file(str(Path(result.checkpoint.path) / ADAPTER_WEIGHTS))  # local storage: read in place


SETTINGS = {"batch_size": 16, "checkpoint_every": 4, "kept_normalization": "global", "alpha": 0.6, "rho": 0.8}


@pytest.fixture(scope="module")
def two_workers(prepared, tmp_path_factory):
    """Two workers whose rank 1 fails in step 6, after the step-4 checkpoint: Ray Train restarts the group and it
    resumes there. (The marker file that says the failure happened, the fit's result, the adapter weights.)"""
    cfg, _ = prepared
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    train = cfg.train.model_copy(update={"lr": 1e-2, "num_workers": 2, "micro_batch_size": 4, **SETTINGS})
    factory = crash_once(
        make_dpo_recipe,
        str(marker),
        11,
        cfg.run_dir,
        "train",
        cfg.policy.model,
        cfg.policy.model_dump(mode="json"),
        train.model_dump(mode="json"),
        cfg.seed,
    )
    return marker, *_fit(cfg, "two-workers-crash-once", factory, num_workers=2, micro_batch_size=4, **SETTINGS)


def test_two_workers_restarted_after_a_failure_equal_one_worker_with_the_same_global_batch(prepared, two_workers):
    """The same global batches on one worker and on two (one of which failed and was restarted from the step-4
    checkpoint): the same adapter, and the same gathered margins, so the same M0, sigma and beta at every step.
    (That a resumed run ends exactly as an uninterrupted one is checked with equal manifests by the killed-driver
    test of tests/test_pipeline.py and the preempted node of tests/test_cluster.py.)"""
    cfg, _ = prepared
    one_result, one = _fit(cfg, "one-worker", num_workers=1, micro_batch_size=8, **SETTINGS)
    _, two_result, two = two_workers
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=2e-6, rtol=1e-4)
    one_history, two_history = one_result.return_value["history"], two_result.return_value["history"]
    assert [h["step"] for h in one_history] == [h["step"] for h in two_history]
    for a, b in zip(one_history, two_history, strict=True):  # the same gathered margins: same M0, sigma, beta
        for key in ("beta", "beta/M0", "beta/sigma", "filter/kept_fraction", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert any(abs(h["beta"] - 0.1) > 1e-4 for h in two_history)  # the dynamic beta really moved
    assert two_history[-1]["filter/kept_fraction"] == pytest.approx(0.75)  # floor(8 * 0.8) / 8 per micro-batch


def test_failed_worker_is_restarted_and_resumes_from_its_checkpoint(two_workers):
    marker, result, _ = two_workers
    assert marker.exists()  # the failure happened
    assert result.return_value["resumed_from"] == [4]  # the restarted group resumed at the step-4 checkpoint
    steps = [h["step"] for h in result.return_value["history"]]
    assert steps == sorted(set(steps))  # the history came back with the checkpoint, without repeats


class NanLoss(DpoRecipe):
    """Non-finite losses on optimizer steps 2 and 3, then on every step from step 10 on."""

    def loss(self, model, rows, workers, training):
        loss, metrics = super().loss(model, rows, workers, training)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in (3, 4, 5, 6) or self.calls >= 19:  # micro-batches of steps 2, 3 and 10 on (2 per step)
            loss = loss * float("nan")
        return loss, metrics


def _nan_recipe(attempts: str, *args) -> NanLoss:
    with open(attempts, "a") as log:  # one line per training attempt
        log.write("attempt\n")
    recipe = make_dpo_recipe(*args)
    recipe.__class__ = NanLoss
    return recipe


def test_non_finite_steps_are_skipped_then_stop_the_run(prepared, tmp_path):
    """Steps 2 and 3 are skipped and the run goes on (the guard's count starts again at a finite step); three in
    a row (10, 11, 12) stop it, with the guard's own error and no retry (`max_failures` 2 would replay the same
    steps from the step-8 checkpoint). That checkpoint's history shows the skipped steps."""
    cfg, _ = prepared
    settings = {**SETTINGS, "num_workers": 1, "micro_batch_size": 8, "max_bad_steps": 3, "max_failures": 2}
    train = cfg.train.model_copy(update={"lr": 1e-2, **settings}).model_dump(mode="json")
    attempts = tmp_path / "attempts"
    args = (str(attempts), cfg.run_dir, "train", cfg.policy.model, cfg.policy.model_dump(mode="json"), train, cfg.seed)
    with pytest.raises(NonFiniteLossError, match=r"^nan-steps: 3 optimizer steps in a row .* the last at step 12"):
        _fit(cfg, "nan-steps", functools.partial(_nan_recipe, *args), log_every=1, **settings)
    assert attempts.read_text().splitlines() == ["attempt"]
    states = [json.loads(p.read_text()) for p in (Path(cfg.run_dir) / "checkpoints/nan-steps").glob("*/" + STATE_FILE)]
    state = max(states, key=lambda s: s["step"])
    assert state["step"] == 8 and state["bad_steps"] == 0
    history = {h["step"]: h for h in state["history"]}
    assert [s for s, h in history.items() if h["grad_norm"] != h["grad_norm"]] == [2, 3]
    assert sorted(history) == list(range(1, 9)) and all(
        h["grad_norm"] == h["grad_norm"] for s, h in history.items() if s > 3
    )


def test_a_batch_with_an_infinite_logit_is_skipped_and_training_ends_as_without_it(prepared):
    """beta-DPO in one process, six steps of eight pairs: step 3's batch carries an -inf logit (a pair's cached
    reference log-prob is +inf). That step is skipped and leaves no trace (M0, sigma, the draw's step count as
    they were), so training ends with the same adapter and statistics as a run that never saw the batch (its
    schedule advanced once in its place)."""
    cfg, _ = prepared
    train = cfg.train.model_copy(update={"lr": 1e-2, **SETTINGS, "micro_batch_size": 8, "batch_size": 8})
    workers = Workers(rank=0, world_size=1, device=torch.device("cpu"))
    plan = [[list(range(8 * step, 8 * step + 8))] for step in range(6)]
    args = (cfg.run_dir, "train", cfg.policy.model, cfg.policy.model_dump(mode="json"), train.model_dump(mode="json"))

    def run(broken: bool) -> tuple[DpoRecipe, dict[str, torch.Tensor], list[bool]]:
        recipe = make_dpo_recipe(*args, cfg.seed)
        if broken:
            recipe.splits["train"]["ref_chosen_logps"][17] = float("inf")
        torch.manual_seed(0)  # the same LoRA initialisation
        opt = Optimization.build(recipe.build_model(workers.device), train, len(plan))
        finite = []
        for step, micro_batches in enumerate(plan):
            if step == 2 and not broken:
                opt.scheduler.step()  # never sees the batch
                continue
            finite.append(optimizer_step(recipe, opt, micro_batches, workers, train).finite)
        return recipe, {name: p.detach().clone() for name, p in opt.model.named_parameters() if p.requires_grad}, finite

    broken_recipe, broken_weights, broken_finite = run(broken=True)
    clean_recipe, clean_weights, clean_finite = run(broken=False)
    assert broken_finite == [True, True, False, True, True, True] and all(clean_finite)
    assert broken_recipe.state_dict() == clean_recipe.state_dict()
    assert math.isfinite(broken_recipe.beta_dpo.m0) and broken_recipe.beta_dpo.steps == 5
    for name, weight in clean_weights.items():
        torch.testing.assert_close(broken_weights[name], weight, atol=0, rtol=0)


def test_bad_step_counter():
    assert count_bad_steps(True, 4, 5, step=10) == 0
    assert count_bad_steps(False, 3, 5, step=10) == 4
    with pytest.raises(NonFiniteLossError, match=r"5 optimizer steps in a row.*the last at step 10"):
        count_bad_steps(False, 4, 5, step=10)


def test_step_plan_is_the_same_global_batches_for_any_worker_count():
    lengths = list(range(100))
    one = step_plan(lengths, Config().train.model_copy(update={"batch_size": 16, "micro_batch_size": 8}), seed=1)
    two = step_plan(
        lengths,
        Config().train.model_copy(update={"batch_size": 16, "micro_batch_size": 4, "num_workers": 2}),
        seed=1,
    )
    assert one == two and len(one) == 6 and all(len(step) == 2 and len(step[0]) == 8 for step in one)


def test_the_reference_pass_asks_for_the_gpus_training_will_use_and_tokenising_for_none():
    from raybpo.train.prepare import encoder_resources

    on_gpus = encoder_resources(reference=True, reference_gpus=8, num_cpus=4)
    assert on_gpus["num_gpus"] == 1 and (on_gpus["compute"].min_size, on_gpus["compute"].max_size) == (1, 8)
    for cpu_only in (encoder_resources(True, 0, 4), encoder_resources(False, 8, 4)):
        assert "num_gpus" not in cpu_only and cpu_only["compute"].max_size == 1 and cpu_only["num_cpus"] == 4


class _Recipe:
    """The checkpoint side of a recipe: its model as safetensors, and a state of plain numbers."""

    def __init__(self) -> None:
        self.state = {"m0": 0.0, "steps": 0}

    def save_model(self, model, directory):
        save_file(model.state_dict(), str(directory / "model.safetensors"))

    def load_model(self, model, directory):
        model.load_state_dict(load_file(str(directory / "model.safetensors")))

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


class _RunsCode:
    """A pickle payload that would create `path` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _optimized(seed: int):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    torch.manual_seed(seed)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_a_checkpoint_restores_the_loop_state_and_rng_and_a_tampered_one_runs_no_code(tmp_path):
    model, optimizer, scheduler = _optimized(0)
    recipe = _Recipe()
    recipe.state = {"m0": 0.25, "steps": 3}
    torch.manual_seed(7)
    np.random.seed(7)
    Checkpointer.save(tmp_path, recipe, model, optimizer, scheduler, {"step": 3})
    Checkpointer.save_rng(tmp_path, rank=0)
    expected = (torch.rand(3), np.random.rand(3))

    fresh, fresh_optimizer, fresh_scheduler = _optimized(1)
    fresh_recipe = _Recipe()
    assert Checkpointer.load(tmp_path, fresh_recipe, fresh, fresh_optimizer, fresh_scheduler, rank=0) == {"step": 3}
    assert fresh_recipe.state == {"m0": 0.25, "steps": 3} and fresh_scheduler.last_epoch == scheduler.last_epoch
    torch.testing.assert_close(fresh.weight, model.weight)
    moments = fresh_optimizer.state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(moments, optimizer.state_dict()["state"][0]["exp_avg"])
    torch.testing.assert_close(torch.rand(3), expected[0])  # both RNGs continue where the checkpoint was taken
    np.testing.assert_array_equal(np.random.rand(3), expected[1])

    ran = tmp_path / "code-ran"
    torch.save({"optimizer": _RunsCode(ran)}, tmp_path / "optim.pt")  # write access to the checkpoint storage
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Checkpointer.load(tmp_path, fresh_recipe, fresh, fresh_optimizer, fresh_scheduler, rank=0)
    assert not ran.exists()
