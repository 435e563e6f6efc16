"""The DPO and SFT recipes in-process (no Ray): cached vs live reference, quarantine, the SFT loss."""

import pyarrow as pa
import pytest
import torch

from raybpo.config import PolicyConfig, SftConfig, TinyModelConfig, TrainConfig
from raybpo.data.benchmark import TOPICS
from raybpo.data.schema import make_pair_id
from raybpo.data.splits import split_of
from raybpo.models.logps import collate
from raybpo.models.tiny import build_tiny_model
from raybpo.train.dpo import DpoRecipe
from raybpo.train.prepare import PairEncoder
from raybpo.train.recipe import Workers
from raybpo.train.sft import SftRecipe, response_nll

PAIRS = [
    (f"Describe the {t}.", f"The {t} is {facts[0]} and {facts[1]}.", f"I hate the {t}.") for t, facts in TOPICS.items()
]
CPU = Workers(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [text for pair in PAIRS for text in pair]
    return str(
        build_tiny_model(
            texts,
            TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64),
            tmp_path_factory.mktemp("tiny"),
        )
    )


def _pairs_table(rows=PAIRS) -> pa.Table:
    return pa.Table.from_pylist(
        [{"pair_id": make_pair_id("s", p, c, r), "prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]
    )


def _prepared(table: pa.Table) -> dict:
    columns = table.to_pydict()
    keep = [i for i, reason in enumerate(columns["reason"]) if not reason]
    return {
        "train": {k: [v[i] for i in keep] for k, v in columns.items() if k not in ("split", "reason")},
        "eval": {k: [] for k in columns if k not in ("split", "reason")},
    }


def test_cached_reference_logps_equal_the_adapter_disabled_reference(tiny):
    encode = {"model": tiny, "policy": {}, "max_length": 64, "max_prompt_length": 32, "eval_fraction": 0.0}
    cached = PairEncoder(**encode, reference=True)(_pairs_table())
    live = PairEncoder(**encode, reference=False)(_pairs_table())
    assert None not in cached["ref_chosen_logps"].to_pylist() and set(live["ref_chosen_logps"].to_pylist()) == {None}
    cfg = TrainConfig(alpha=0.6, rho=0.8, lora_target_modules=["q_proj", "v_proj"])
    losses = []
    for table in (cached, live):
        recipe = DpoRecipe(_prepared(table), tiny, PolicyConfig(), cfg, seed=0)
        torch.manual_seed(0)  # the same LoRA initialisation for both
        model = recipe.build_model(torch.device("cpu"))
        for name, param in model.named_parameters():  # LoRA B starts at 0; make the policy differ from ref
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
        loss, metrics = recipe.loss(model, list(range(16)), CPU, training=True)
        loss.backward()
        losses.append((loss.item(), metrics["rewards/margins"].item(), metrics["beta"].item()))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0][2] != pytest.approx(0.1)  # the dynamic beta moved off beta0


def test_pairs_that_do_not_fit_are_quarantined_with_a_reason(tiny):
    rows = [*PAIRS[:3], ("Describe the cat. " * 40, "furry", "no")]
    out = PairEncoder(tiny, {}, max_length=24, max_prompt_length=24, eval_fraction=0.0, reference=True)(
        _pairs_table(rows)
    ).to_pylist()
    assert [bool(o["reason"]) for o in out] == [False, False, False, True]
    assert out[3]["reason"].startswith("does_not_fit: nothing of the response fits")
    assert out[3]["ref_chosen_logps"] is None and out[0]["ref_chosen_logps"] < 0


def test_eval_split_is_a_stable_share_of_pair_ids():
    ids = [make_pair_id("s", str(i), "a", "b") for i in range(2000)]
    share = sum(split_of(i, 0.1) == "eval" for i in ids) / len(ids)
    assert 0.08 < share < 0.12 and [split_of(i, 0.1) for i in ids] == [split_of(i, 0.1) for i in ids]


def test_sft_loss_is_the_mean_response_token_nll(tiny):
    table = PairEncoder(tiny, {}, 64, 32, 0.0, reference=False, examples=True)(_pairs_table())
    recipe = SftRecipe(_prepared(table), tiny, PolicyConfig(), SftConfig(), TrainConfig())
    model = recipe.build_model(torch.device("cpu"))
    loss, _ = recipe.loss(model, [0, 1], CPU, training=True)
    data = recipe.splits["train"]
    by_hand = []
    for i in (0, 1):
        ids = torch.tensor([data["prompt_ids"][i] + data["response_ids"][i]])
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        start = len(data["prompt_ids"][i])
        by_hand += [-logprobs[t - 1, ids[0, t]] for t in range(start, ids.shape[1])]
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), abs=1e-5)
    batch = collate([(data["prompt_ids"][0], data["response_ids"][0])], 0)
    assert response_nll(model, batch).item() > 0
