"""The real SmolLM2-135M-Instruct (the bundled GGUF): converted once into a plain Hugging Face folder, every
model source saving and reloading merged policies, adapters and reward models, and every model-running stage
of the pipeline on a few real HH rows (tests/real.yaml)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from peft import PeftModel

from raybpo.cli import main
from raybpo.config import TinyModelConfig, TrainConfig
from raybpo.data.readers import read_hh
from raybpo.models import loading
from raybpo.models.loading import gguf_path, load_causal_lm, resolve_model_path
from raybpo.models.lora import add_lora
from raybpo.models.reward import load_reward_model
from raybpo.models.tiny import build_tiny_model
from raybpo.rundir import COMPLETE

SMOLLM2 = "smollm2-135m-instruct"
REAL = str(Path(__file__).with_name("real.yaml"))
TEXTS = ["Hello there, how are you today?", "I am fine, thank you for asking."] * 20
TINY = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
LORA = TrainConfig(lora_rank=4, lora_target_modules=["q_proj", "v_proj"])
ROWS = 40  # real HH rows through the pipeline: enough for every stage's splits, few enough to stay quick


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    """The bundled GGUF converted into this session's model cache (conftest points RAYBPO_MODEL_CACHE at it)."""
    return Path(resolve_model_path(SMOLLM2))


def test_the_gguf_is_converted_once_into_a_plain_folder(smollm2_folder, monkeypatch):
    assert (smollm2_folder / COMPLETE).exists() and (smollm2_folder / "model.safetensors").exists()
    assert smollm2_folder.parent == Path(os.environ["RAYBPO_MODEL_CACHE"])
    assert "quantization_config" not in json.loads((smollm2_folder / "config.json").read_text())
    monkeypatch.setattr(loading, "convert_gguf", lambda *_: pytest.fail("converted a second time"))
    assert resolve_model_path(SMOLLM2) == str(smollm2_folder)
    assert resolve_model_path(str(gguf_path(SMOLLM2, None))) == str(smollm2_folder)  # the same file by path
    model, tokenizer = load_causal_lm(SMOLLM2)
    assert getattr(model, "hf_quantizer", None) is None
    hi = [{"role": "user", "content": "Hi"}]
    turn = tokenizer.apply_chat_template(hi, add_generation_prompt=True, tokenize=False)
    assert turn.endswith("<|im_start|>assistant\n")  # the instruct model's own chat template came along


def _perturbed_lora(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA with non-zero B, so merging changes the weights."""
    model = add_lora(model, LORA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def _check_saves_and_reloads(source: str, out: Path) -> None:
    """Merged policy, adapter and a reward model on `source` save as plain folders and reload to the same outputs."""
    model, tokenizer = load_causal_lm(source)
    ids = torch.tensor([tokenizer("Hello there, how are you?")["input_ids"]])
    policy = _perturbed_lora(model)
    with torch.no_grad():
        expected = policy(ids).logits
    policy.save_pretrained(out / "adapter", safe_serialization=True)
    policy.merge_and_unload().save_pretrained(out / "merged", safe_serialization=True)
    tokenizer.save_pretrained(out / "merged")
    merged, _ = load_causal_lm(str(out / "merged"))
    adapter = PeftModel.from_pretrained(load_causal_lm(source)[0], out / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
        assert torch.allclose(adapter(ids).logits, expected, atol=1e-5)
    reward, reward_tokenizer = load_reward_model(source)
    reward.save_pretrained(out / "reward", safe_serialization=True)
    reward_tokenizer.save_pretrained(out / "reward")
    again, _ = load_reward_model(str(out / "reward"))
    with torch.no_grad():
        assert torch.allclose(reward(ids).logits, again(ids).logits, atol=1e-5)


@pytest.mark.parametrize("source", ["bundled", "gguf_file", "tiny_folder"])
def test_every_model_source_saves_and_reloads(source, smollm2_folder, tmp_path):
    name = {
        "bundled": SMOLLM2,
        "gguf_file": str(gguf_path(SMOLLM2, None)),
        "tiny_folder": str(build_tiny_model(TEXTS, TINY, tmp_path / "tiny", seed=0)),
    }[source]
    _check_saves_and_reloads(name, tmp_path / "out")


def test_a_hub_id_saves_and_reloads(tmp_path):
    """A Hub id resolved from a filled Hugging Face cache (offline), in a process of its own: the hub client
    reads its cache location at import."""
    snapshot = tmp_path / "hub" / "models--raybpo--tiny-llama" / "snapshots" / ("0" * 40)
    build_tiny_model(TEXTS, TINY, snapshot, seed=0)
    (tmp_path / "hub" / "models--raybpo--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--raybpo--tiny-llama" / "refs" / "main").write_text("0" * 40)
    script = (
        "import sys; from pathlib import Path; from tests.test_real_model import _check_saves_and_reloads; "
        "_check_saves_and_reloads('raybpo/tiny-llama', Path(sys.argv[1]))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "merged" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def real_run(ray_session, smollm2_folder, hh_lines, tmp_path_factory) -> Path:
    """tests/real.yaml on ROWS real HH rows with short prompts (generation and lengths stay small)."""
    root = tmp_path_factory.mktemp("real")
    rows = [line for line in hh_lines if len(read_hh(json.loads(line))["prompt"]) < 400][:ROWS]
    with gzip.open(root / "hh.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    source = json.dumps([{"path": str(root / "hh.jsonl.gz"), "format": "hh", "name": "hh"}])
    run = root / "run"
    assert main(["run", "--config", REAL, "--run-dir", str(run), f"ingest.sources={source}"]) == 0
    return run


def _manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def test_every_model_running_stage_works_on_smollm2(real_run):
    run = real_run
    ingest = _manifest(run, "ingest")
    assert ingest["rows_out"] + ingest["rows_quarantined"] == ROWS and ingest["rows_out"] >= ROWS - 5
    reward = _manifest(run, "reward")
    assert reward["mode"] == "more" and set(reward["evaluation"]["models"]) == {"model", "judge"}
    assert reward["evaluation"]["eval_pairs"]["hh"] >= 15  # half of the rows held out, judged by both halves
    for half in reward["evaluation"]["models"].values():
        metrics = half["per_source"]["hh"]
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
        assert np.isfinite(metrics["reward_std"]) and metrics["reward_std"] > 0  # the rewards differ by pair
    assert (run / "reward/model/model.safetensors").exists() and (run / "reward/judge/model.safetensors").exists()
    candidates = pads.dataset(run / "generate/candidates").to_table().to_pydict()
    assert "policy" in candidates["origin"] and all(isinstance(r, str) for r in candidates["response"])
    score = _manifest(run, "score")
    assert score["scorer"] == "reward_model" and score["pairs"] > 0
    features = pads.dataset(run / "depth/features").to_table()
    assert features.num_rows > 0
    train = _manifest(run, "train")
    assert train["steps"] >= 1 and train["rows_out"] > 0
    evaluate = _manifest(run, "evaluate")
    assert evaluate["rows_in"] > 0 and 0.0 <= evaluate["win_rate"] <= 1.0
    assert "#judge#" in json.dumps(evaluate)  # judged by reward/judge/, the half that scored no candidate


def test_the_trained_policy_and_sft_model_reload_from_the_run(real_run):
    """The merged policy equals base + adapter; the SFT model (LoRA merged) loads as a plain model."""
    run = real_run
    merged, tokenizer = load_causal_lm(str(run / "train/policy/merged"))
    base, _ = load_causal_lm(str(run / "sft/model"))
    adapter = PeftModel.from_pretrained(base, run / "train/policy/adapter")
    ids = torch.tensor([tokenizer("Human: hi there\n\nAssistant:")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)
