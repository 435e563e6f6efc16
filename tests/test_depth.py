"""BPO depth: batched per-pair LoRA gradients equal the one-pair-at-a-time loop, the seeded projection, the
selection rule and its baselines, and the stage on a local Ray."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from conftest import benchmark_with_tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from raybpo.artifacts import read_pairs
from raybpo.config import TinyModelConfig
from raybpo.data.schema import PAIR_SCHEMA, prompt_key
from raybpo.models.gradients import (
    adam_precondition,
    batched_pair_gradients,
    lora_factors,
    num_parameters,
    pairwise_loop_gradients,
    warm_up,
)
from raybpo.models.logps import collate_pairs
from raybpo.projection import RademacherProjection
from raybpo.rundir import RunDir, StageCounts, run_stage
from raybpo.selection.clustering import select_random
from raybpo.selection.depth import (
    SELECTIONS,
    DepthError,
    allocation,
    select_bpo,
    select_original,
    select_uniform,
    strategy_score,
)
from raybpo.stages.depth import run_depth

PAD = 0


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def _pairs(n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token-id pairs of very different prompt and response lengths (so batches carry padding)."""
    rng = np.random.default_rng(seed)
    ids = lambda length: rng.integers(1, 64, size=length).tolist()  # noqa: E731
    prompts = [ids(int(rng.integers(2, 12))) for _ in range(n)]
    chosen = [ids(int(rng.integers(1, 15))) for _ in range(n)]
    rejected = [ids(int(rng.integers(1, 15))) for _ in range(n)]
    return prompts, chosen, rejected


LORA_SETTINGS = {
    "rank 4 on q,v": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "rank 8 on attention and MLP": {
        "r": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "rank 1 on o_proj, alpha 4": {"r": 1, "lora_alpha": 4, "target_modules": ["o_proj"]},
}


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("fresh", [False, True], ids=["trained adapter", "fresh adapter"])
@pytest.mark.parametrize("setting", list(LORA_SETTINGS))
def test_batched_pair_gradients_equal_the_one_pair_loop(setting, fresh):
    """Cosine >= 0.999 for every pair, before and after the projection (padding and lengths vary)."""
    lora = LoraConfig(lora_dropout=0.0, bias="none", init_lora_weights=fresh, **LORA_SETTINGS[setting])
    model = get_peft_model(_tiny_llama(), lora).eval()
    prompts, chosen, rejected = _pairs(12)
    batch = collate_pairs(prompts, chosen, rejected, PAD)
    assert (batch["attention_mask"] == 0).any()  # padding present
    batched = batched_pair_gradients(model, batch, beta=0.1)
    loop = torch.stack(list(pairwise_loop_gradients(model, prompts, chosen, rejected, PAD, beta=0.1)))
    assert batched.shape == loop.shape == (12, num_parameters(model))
    assert loop.norm(dim=1).min() > 0
    assert _cosines(batched, loop).min() >= 0.999
    torch.testing.assert_close(batched, loop, rtol=1e-3, atol=1e-6)
    projection = RademacherProjection(num_parameters(model), 256, seed=3)
    assert _cosines(projection.project(batched), projection.project(loop)).min() >= 0.999
    if fresh:  # lora_B = 0: only B has a gradient, A's is exactly zero
        a_size = sum(m.weight.numel() for name, m in lora_factors(model) if ".lora_A." in name)
        assert a_size > 0 and batched.abs().sum() > 0


def test_a_batch_gives_the_same_features_whatever_its_composition():
    """Pair 0's gradient does not depend on which pairs share its batch (no cross-row leakage)."""
    model = get_peft_model(
        _tiny_llama(1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    prompts, chosen, rejected = _pairs(8, seed=5)
    full = batched_pair_gradients(model, collate_pairs(prompts, chosen, rejected, PAD), beta=0.5)
    alone = batched_pair_gradients(model, collate_pairs(prompts[:1], chosen[:1], rejected[:1], PAD), beta=0.5)
    torch.testing.assert_close(full[:1], alone, rtol=1e-4, atol=1e-7)


def test_lora_factors_refuse_non_lora_trainable_parameters():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="no trainable LoRA"):
        lora_factors(
            get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).base_model.model.requires_grad_(False)
        )
    model = get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    for name, param in model.named_parameters():
        if name.endswith("q_proj.base_layer.bias"):
            param.requires_grad_(True)
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="not a bias-free LoRA linear factor"):
        lora_factors(model)


# --------------------------------------------------------------------------- projection


def test_projection_is_reproducible_by_seed_and_independent_of_the_chunk_size():
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    a = RademacherProjection(1000, 128, seed=7).project(x)
    b = RademacherProjection(1000, 128, seed=7, chunk_rows=13).project(x)
    c = RademacherProjection(1000, 128, seed=7, chunk_rows=1000, cache_bytes=0).project(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, RademacherProjection(1000, 128, seed=8).project(x))
    rows = RademacherProjection(1000, 128, seed=7).rows(100, 110)
    assert torch.equal(rows, RademacherProjection(1000, 128, seed=7).rows(0, 1000)[100:110])
    assert torch.allclose(rows.abs(), torch.full_like(rows, 128**-0.5)) and (rows > 0).any() and (rows < 0).any()


def test_projection_entries_are_balanced_signs():
    matrix = RademacherProjection(2000, 512, seed=0).rows(0, 2000)
    assert abs(float((matrix > 0).float().mean()) - 0.5) < 0.005
    column_sums = (matrix > 0).float().mean(0)  # no column (or row) is biased
    row_sums = (matrix > 0).float().mean(1)
    assert column_sums.sub(0.5).abs().max() < 0.06 and row_sums.sub(0.5).abs().max() < 0.1


def test_projection_preserves_norms_and_inner_products_within_the_jl_tolerance():
    d, n = 2048, 60
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3000, generator=generator) * torch.rand(n, 1, generator=generator)
    projected = RademacherProjection(3000, d, seed=11).project(x)
    ratio = projected.norm(dim=1) ** 2 / x.norm(dim=1) ** 2
    assert (ratio - 1).abs().max() < 6 * (2 / d) ** 0.5  # 6 standard deviations of ||Rx||^2 / ||x||^2
    gram, true = projected @ projected.T, x @ x.T
    scale = x.norm(dim=1)[:, None] * x.norm(dim=1)[None, :]
    assert ((gram - true) / scale).abs().max() < 6 * (2 / d) ** 0.5
    assert ((gram - true) / scale).abs().mean() < (2 / d) ** 0.5


# --------------------------------------------------------------------------- LESS warm-up and Adam features


def test_warm_up_trains_the_adapter_and_returns_its_adam_state():
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts, chosen, rejected = _pairs(8)
    batches = [collate_pairs(prompts[i : i + 4], chosen[i : i + 4], rejected[i : i + 4], PAD) for i in (0, 4)]
    exp_avg, exp_avg_sq = warm_up(model, batches, beta=0.1, lr=1e-2)
    assert exp_avg.shape == exp_avg_sq.shape == (num_parameters(model),) and (exp_avg_sq > 0).any()
    assert any(m.weight.abs().sum() > 0 for name, m in lora_factors(model) if ".lora_B." in name)
    grads = torch.randn(3, num_parameters(model))
    expected = (0.9 * exp_avg + 0.1 * grads) / torch.sqrt(0.999 * exp_avg_sq + 0.001 * grads**2 + 1e-8)
    torch.testing.assert_close(adam_precondition(grads, exp_avg, exp_avg_sq), expected)


# --------------------------------------------------------------------------- selection rules


def _synthetic(seed: int = 0, prompts: int = 12, per_prompt: int = 5, k: int = 4):
    rng = np.random.default_rng(seed)
    n = prompts * per_prompt
    keys = np.array([f"p{i // per_prompt:02d}" for i in range(n)])
    ids = np.array([f"{i:04x}" for i in rng.permutation(n)])
    cluster = rng.integers(0, k, size=n)
    similarity = rng.random(n).astype(np.float32)
    gaps = rng.random(n) * 3
    return keys, ids, cluster, similarity, gaps


def test_bpo_keeps_the_top_eta_of_every_cluster_and_a_pair_for_every_prompt():
    keys, ids, cluster, similarity, gaps = _synthetic()
    kept = select_bpo(cluster, similarity, ids, keys, gaps, eta=0.2, k=4)
    for c in range(4):  # the top round_half_up(0.2 * size) by similarity are in
        members = np.flatnonzero(cluster == c)
        top = members[np.argsort(-similarity[members], kind="stable")][: max(1, int(0.2 * len(members) + 0.5))]
        assert kept[top].all()
    assert set(keys[kept]) == set(keys)  # every prompt keeps at least one pair
    by_rule = np.zeros(len(keys), dtype=bool)
    for c in range(4):
        members = np.flatnonzero(cluster == c)
        by_rule[members[np.argsort(-similarity[members], kind="stable")][: max(1, int(0.2 * len(members) + 0.5))]] = 1
    for key in set(keys) - set(keys[by_rule]):  # the added pair is the prompt's largest-gap pair
        rows = np.flatnonzero(keys == key)
        assert kept[rows].sum() == 1 and kept[rows[np.argmax(gaps[rows])]]
    assert np.array_equal(kept, select_bpo(cluster, similarity, ids, keys, gaps, eta=0.2, k=4))  # deterministic


def test_bpo_budget_caps_the_count_and_keeps_one_pair_per_prompt():
    keys, ids, cluster, similarity, gaps = _synthetic()
    free = select_bpo(cluster, similarity, ids, keys, gaps, eta=0.5, k=4)
    capped = select_bpo(cluster, similarity, ids, keys, gaps, eta=0.5, k=4, budget=15)
    assert free.sum() > 15 and capped.sum() == 15 and not (capped & ~free).any()
    assert set(keys[capped]) == set(keys)
    assert select_bpo(cluster, similarity, ids, keys, gaps, eta=0.5, k=4, budget=1000).sum() == free.sum()
    with pytest.raises(DepthError, match="below the 12 prompts"):
        select_bpo(cluster, similarity, ids, keys, gaps, eta=0.5, k=4, budget=11)


def test_strategies_rank_differently():
    keys, ids, cluster, similarity, gaps = _synthetic(1)
    norms = np.random.default_rng(2).random(len(keys))
    chosen = {
        s: select_bpo(cluster, strategy_score(s, similarity, norms, 0), ids, keys, gaps, 0.3, 4)
        for s in ("centroid", "norm", "boundary", "random")
    }
    assert len({tuple(np.flatnonzero(v)) for v in chosen.values()}) == 4
    members = np.flatnonzero(cluster == 0)
    assert chosen["boundary"][members[np.argmin(similarity[members])]]
    assert chosen["norm"][members[np.argmax(norms[members])]]
    with pytest.raises(ValueError, match="unknown depth strategy"):
        strategy_score("nearest", similarity, norms, 0)


def test_baselines_have_the_same_budget():
    keys, ids, _, _, gaps = _synthetic(prompts=10, per_prompt=4)
    for budget in (7, 10, 23, 40):
        assert select_random(len(keys), budget, 0).sum() == budget
        uniform = select_uniform(keys, gaps, ids, budget, 0)
        assert uniform.sum() == budget
        per_prompt = np.bincount(np.unique(keys, return_inverse=True)[1][uniform], minlength=10)
        assert per_prompt.max() - per_prompt.min() <= 1  # the same number for every prompt (+-1 for the remainder)
    uneven = np.array(["a"] * 1 + ["b"] * 6 + ["c"] * 6)  # "a" has one pair only: its share goes to the others
    uniform = select_uniform(uneven, np.arange(13.0), np.array([f"{i:02d}" for i in range(13)]), 9, 0)
    assert uniform.sum() == 9 and uniform[0] and uniform[1:7].sum() == 4
    assert uniform[7:][np.argsort(-np.arange(7.0, 13.0))][:4].all()  # the largest gaps first


def test_original_takes_one_pair_per_prompt_before_a_second():
    keys = np.array(["a", "a", "a", "b", "c", "c", "d"])
    assert set(keys[select_original(keys, 4, 0)]) == {"a", "b", "c", "d"}
    six = select_original(keys, 6, 0)
    assert six.sum() == 6 and np.array_equal(six, select_original(keys, 6, 0))
    assert allocation(keys, six).tolist()[3] == 1


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def depth_run(ray_session, tmp_path_factory):
    """The benchmark ingested, a tiny policy, and candidate pairs standing in for the score stage."""
    tiny = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64)
    cfg, cfg.policy.model = benchmark_with_tiny_llama(tmp_path_factory.mktemp("depth"), tiny, pairs_per_source=40)
    cfg.train.max_length, cfg.train.max_prompt_length = 96, 48
    cfg.depth.projection_dim, cfg.depth.batch_size, cfg.depth.pairs_per_cluster = 128, 8, 12
    cfg.depth.eta = 0.2
    pairs = read_pairs(RunDir(cfg.run_dir))
    prompts = sorted(set(pairs["prompt"]))[:15]
    rows = [
        {**{k: pairs[k][i] for k in ("pair_id", "prompt", "chosen", "rejected")}, "gap": (i % 7) / 2}
        for i in range(len(pairs["prompt"]))
        if pairs["prompt"][i] in prompts
    ]

    def score(stage_path: str) -> StageCounts:  # candidate pairs with known gaps stand in for the score stage
        table = pa.table(
            {
                "pair_id": [r["pair_id"] for r in rows],
                "prompt": [r["prompt"] for r in rows],
                "chosen": [r["chosen"] for r in rows],
                "rejected": [r["rejected"] for r in rows],
                "source": ["bpo:test"] * len(rows),
                "score_chosen": [r["gap"] for r in rows],
                "score_rejected": [0.0] * len(rows),
                "meta": ["{}"] * len(rows),
            },
            schema=PAIR_SCHEMA,
        )
        pads.write_dataset(table, f"{stage_path}/candidate_pairs", format="parquet")
        return StageCounts(rows_in=len(rows), rows_out=len(rows))

    run_stage(RunDir(cfg.run_dir), "score", cfg, ("score",), {}, score)
    return cfg, rows, run_depth(cfg).manifest


def test_depth_stage_writes_features_and_selections_at_one_budget(depth_run):
    cfg, rows, m = depth_run
    run = RunDir(cfg.run_dir)
    features = pads.dataset(run.path("depth", "features")).to_table()
    assert m["rows_in"] == len(rows) == features.num_rows + m["rows_quarantined"] == m["featured"]
    vectors = np.stack(features["feature"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert vectors.shape == (len(rows), 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
    assert set(features["pair_id"].to_pylist()) == {r["pair_id"] for r in rows}
    budget = m["budget"]
    prompts = {prompt_key(r["prompt"]) for r in rows}
    for name in SELECTIONS:
        table = pads.dataset(run.path("depth", "selections", name)).to_table()
        assert table.num_rows == budget == m["selections"][name]["pairs"], name
        counts = {k: table["prompt_key"].to_pylist().count(k) for k in set(table["prompt_key"].to_pylist())}
        assert all(
            a == counts[k]
            for k, a in zip(table["prompt_key"].to_pylist(), table["allocation"].to_pylist(), strict=True)
        )
    bpo = pads.dataset(run.path("depth", "selections", "bpo")).to_table()
    assert set(bpo["prompt_key"].to_pylist()) == prompts  # every prompt keeps a pair
    assert m["rows_out"] == budget and m["not_selected"] == m["featured"] - budget
    assert run.path("depth", "pairs_per_prompt.png") and RunDir(cfg.run_dir).exists("depth", "cluster_sizes.png")
    assert m["features"]["pairs_per_second"] > 0 and m["num_clusters"] == round(len(rows) / 12)


def test_depth_features_do_not_depend_on_actors_or_batch_size(depth_run, tmp_path):
    """Same seed, same features with 2 actors and another batch size (the adapter init is seeded)."""
    cfg, _, _ = depth_run
    first = pads.dataset(RunDir(cfg.run_dir).path("depth", "features")).to_table().sort_by("pair_id")
    other = cfg.model_copy(deep=True)
    other.depth.concurrency, other.depth.batch_size = 2, 3
    other.depth.dtype = "float32"
    run_depth(other)
    second = pads.dataset(RunDir(cfg.run_dir).path("depth", "features")).to_table().sort_by("pair_id")
    a = np.stack(first["feature"].to_numpy(zero_copy_only=False)).astype(np.float32)
    b = np.stack(second["feature"].to_numpy(zero_copy_only=False))
    assert np.abs(a - b).max() < 2e-3  # float16 storage of the first run
    again = json.loads(RunDir(cfg.run_dir).read_bytes("depth/manifest.json"))
    assert again["budget"] == depth_run[2]["budget"]


def test_depth_warm_up_with_adam_preconditioning(depth_run):
    cfg, _, _ = depth_run
    other = cfg.model_copy(deep=True)
    other.depth.warmup_steps, other.depth.adam_preconditioning, other.depth.selection = 2, True, "uniform"
    other.depth.budget = 20
    m = run_depth(other).manifest
    assert m["features"]["adam_preconditioning"] and RunDir(cfg.run_dir).exists("depth", "warmup.safetensors")
    assert m["budget"] <= 20 and m["rows_out"] == m["budget"] and m["selection"] == "uniform"
