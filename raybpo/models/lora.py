"""LoRA adapters (peft) on a causal LM: the train stage's policy, the depth stage's gradient features, `sft.lora`.

The adapters sit on `train.lora_target_modules` with rank `train.lora_rank` and scale `train.lora_alpha`, no
dropout (exact and reproducible) and no bias. A saved adapter's weights are `ADAPTER_WEIGHTS` in its folder
(peft's `save_pretrained`), what the training loops' checkpoints hold and reload.
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from raybpo.config import TrainConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(cfg: TrainConfig) -> LoraConfig:
    """LoRA adapters on `cfg.lora_target_modules`, no dropout (exact and reproducible), no bias."""
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """`model` wrapped with fresh adapters of `lora_config(cfg)` (peft's init: `lora_B` = 0)."""
    return get_peft_model(model, lora_config(cfg))
