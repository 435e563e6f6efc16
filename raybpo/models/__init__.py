"""Policies and tokenizers: loading, the tiny config-built model, LoRA, tokenisation, batched log-probs."""
