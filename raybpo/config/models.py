"""The models floor's sections: the policy (and the tiny benchmark model), sampling, the LLM judge."""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Any, Literal

from pydantic import Field, field_validator

from raybpo.config.base import POOL_HELP, PoolSize, Section


class TinyModelConfig(Section):
    """The config-built Llama of the built-in benchmark (its tokenizer is trained on the data's text)."""

    vocab_size: int = Field(1024, ge=64)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(512, ge=16)


class PolicyConfig(Section):
    """The policy: `tiny` (built from the data), a local folder, a Hub id, or a GGUF file."""

    model: str = Field("tiny", description="tiny | a local HF folder | a Hub id | smollm2-135m-instruct | x.gguf")
    gguf_file: str | None = Field(None, description="GGUF file name inside a Hub repo or folder given as `model`.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    trust_remote_code: bool = Field(False, description="Never on by default: it runs code from the model repo.")
    use_chat_template: bool = Field(True, description="Apply the tokenizer's chat template when it has one.")


class GenerateConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    n: int = Field(8, ge=1, description="Candidates sampled per kept prompt.")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    max_prompt_length: int | None = Field(
        None, ge=1, description="Prompt tokens kept (the END, as training truncates); None: the whole prompt."
    )
    batch_size: int = Field(16, ge=1)
    concurrency: PoolSize = Field(1, description=f"Generation {POOL_HELP} (vLLM: engine replicas).")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per generation actor (its torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0.0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


class JudgeConfig(Section):
    url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="OpenAI-compatible endpoint: https, or plain http only to this machine (the key goes with it).",
    )
    model: str = "gpt-4o-mini"
    api_key_env: str = Field("RAYBPO_JUDGE_API_KEY", description="Name of the variable holding the key.")
    prompt: str = (
        "Rate the assistant's response to the user's prompt from 1 to 10. "
        "Answer with the number only.\n\nPrompt:\n{prompt}\n\nResponse:\n{response}"
    )
    concurrency: int = Field(8, ge=1)
    requests_per_second: float = Field(5.0, gt=0.0)
    timeout_s: float = Field(60.0, gt=0.0)
    max_retries: int = Field(4, ge=0)

    @field_validator("url")
    @classmethod
    def _no_plain_http_off_this_machine(cls, url: str) -> str:
        """The API key travels in every request's header: plain http only to a loopback address."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return url
        if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
            return url
        raise ValueError(f"judge url {url!r} must be https:// (plain http:// only to localhost or 127.0.0.1)")
