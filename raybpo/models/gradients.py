"""Per-pair DPO gradients of a policy's LoRA parameters, a whole batch at once (docs/ALGORITHMS.md 3.3, 4).

For a linear map y = W a without bias, the gradient of a loss with respect to W is sum_t g_t a_t^T over the
tokens t, where g_t = dL/dy_t. A LoRA layer is two such maps (y = B A x * scaling, peft's `lora_A` and
`lora_B` modules), so one batched forward and ONE backward give every sample's gradient: forward hooks keep
each factor's input a (B, T, in), tensor hooks keep its output gradient g (B, T, out), and
`einsum("bto,bti->boi", g, a)` is the per-sample gradient of every row. Padding tokens have g = 0.

A batch holds chosen rows [0, B) and rejected rows [B, 2B) (`collate_pairs`); with the summed loss
sum_i -log sigmoid(beta0 * h_i), row b's gradient plus row B+b's is exactly the gradient of pair b's DPO loss
(rows do not interact in a causal LM). The flattened vector follows the order of `model.named_parameters()`.

`pairwise_loop_gradients` is the LESS-style reference: one backward per pair, `param.grad` flattened. The
batched result must equal it (cosine >= 0.999 per pair; tests/test_depth.py, bench/gradfeatures_vs_loop.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from raybpo.losses import dpo_logits, dpo_loss
from raybpo.models.logps import collate_pairs, pair_logps

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def lora_factors(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The trainable parameters' modules, in `named_parameters()` order: bias-free `nn.Linear` LoRA factors.

    Raises for anything else trainable (a bias, DoRA magnitudes, embeddings): its per-sample gradient is not
    an outer product of one linear layer's input and output gradient.
    """
    modules = dict(model.named_modules())
    factors = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or not isinstance(module, nn.Linear) or module.bias is not None or "lora_" not in name:
            raise ValueError(
                f"trainable parameter {name!r} is not a bias-free LoRA linear factor: gradient features support "
                "plain LoRA (peft LoraConfig, bias='none', no DoRA) on linear layers"
            )
        factors.append((name, module))
    if not factors:
        raise ValueError("the model has no trainable LoRA parameters: add adapters (peft) before computing features")
    return factors


def num_parameters(model: nn.Module) -> int:
    """Length of a flattened gradient: the number of trainable LoRA parameters."""
    return sum(module.weight.numel() for _, module in lora_factors(model))


@contextmanager
def capture_per_sample(factors: list[tuple[str, nn.Linear]]) -> Iterator[dict[nn.Module, list[torch.Tensor]]]:
    """While active, every forward through a factor stores [input, output gradient] for it (by module)."""
    store: dict[nn.Module, list[torch.Tensor]] = {}

    def on_forward(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        store[module] = [inputs[0].detach()]
        output.register_hook(lambda grad: store[module].append(grad.detach()))

    handles = [module.register_forward_hook(on_forward) for _, module in factors]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def per_sample_gradients(factors: list[tuple[str, nn.Linear]], store: dict[nn.Module, list[torch.Tensor]]):
    """(rows, P) per-row gradients from the captured inputs and output gradients (float32)."""
    parts = []
    for name, module in factors:
        if len(store.get(module, ())) != 2:
            raise RuntimeError(f"no input/gradient captured for {name}: was the adapter active in the forward?")
        activation, grad = store[module]
        rows = activation.shape[0]
        activation = activation.reshape(rows, -1, activation.shape[-1]).float()
        grad = grad.reshape(rows, -1, grad.shape[-1]).float()
        parts.append(torch.einsum("bto,bti->boi", grad, activation).reshape(rows, -1))
    return torch.cat(parts, dim=1)


def batched_pair_gradients(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float,
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, P): each pair's gradient of -log sigmoid(beta * h) w.r.t. the LoRA parameters, one backward in all.

    `batch` is a `collate_pairs` batch. `ref_logps` = (chosen, rejected) reference log-probs; None computes
    them with the adapter disabled (the SFT policy), unless the adapter is fresh (`lora_B` all zero, so the
    policy IS the reference and its own detached log-probs are the reference's).
    """
    factors = lora_factors(model)
    if ref_logps is None and not is_fresh_adapter(factors):
        with torch.no_grad(), model.disable_adapter():
            ref_logps = pair_logps(model, batch)
    with capture_per_sample(factors) as store:
        chosen, rejected = pair_logps(model, batch)
        ref_chosen, ref_rejected = ref_logps if ref_logps is not None else (chosen.detach(), rejected.detach())
        loss = dpo_loss(dpo_logits(chosen, rejected, ref_chosen, ref_rejected), beta).sum()
        torch.autograd.grad(loss, [module.weight for _, module in factors])
    rows = per_sample_gradients(factors, store)
    half = rows.shape[0] // 2
    return rows[:half] + rows[half:]


def is_fresh_adapter(factors: list[tuple[str, nn.Linear]]) -> bool:
    """True when every `lora_B` factor is zero (peft's init): the adapted policy equals its reference."""
    return all(not module.weight.any() for name, module in factors if ".lora_B." in name)


def pairwise_loop_gradients(
    model: nn.Module,
    prompts: list[list[int]],
    chosen: list[list[int]],
    rejected: list[list[int]],
    pad_id: int,
    beta: float,
) -> Iterator[torch.Tensor]:
    """The LESS-style reference loop: one forward and one backward per pair, yielding each flattened (P,) grad."""
    factors = lora_factors(model)
    params = [module.weight for _, module in factors]
    device = params[0].device
    for prompt, good, bad in zip(prompts, chosen, rejected, strict=True):
        batch = {k: v.to(device) for k, v in collate_pairs([prompt], [good], [bad], pad_id).items()}
        with torch.no_grad(), model.disable_adapter():
            ref_chosen, ref_rejected = pair_logps(model, batch)
        policy_chosen, policy_rejected = pair_logps(model, batch)
        loss = dpo_loss(dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta).sum()
        grads = torch.autograd.grad(loss, params)
        yield torch.cat([g.reshape(-1).float() for g in grads])


def adam_precondition(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """LESS's Adam feature of each row g: m' / sqrt(v' + eps), m' = 0.9 m + 0.1 g, v' = 0.999 v + 0.001 g^2.

    `exp_avg` (m) and `exp_avg_sq` (v) are a warm-up run's Adam state, flattened like the gradients.
    """
    beta1, beta2 = ADAM_BETAS
    m = beta1 * exp_avg + (1 - beta1) * grads
    v = beta2 * exp_avg_sq + (1 - beta2) * grads.square()
    return m / torch.sqrt(v + ADAM_EPS)


def warm_up(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    beta: float,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A short DPO warm-up of the LoRA adapter (AdamW, one step per batch), as LESS warms up before scoring.

    Trains the adapter in place and returns its Adam state (exp_avg, exp_avg_sq), flattened in the order of
    `lora_factors`, for `adam_precondition`.
    """
    factors = lora_factors(model)
    params = [module.weight for _, module in factors]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    model.train()
    for batch in batches:
        with torch.no_grad(), model.disable_adapter():
            ref = pair_logps(model, batch)
        loss = dpo_loss(dpo_logits(*pair_logps(model, batch), *ref), beta).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    state = [optimizer.state[p] for p in params]
    if not state or "exp_avg" not in state[0]:
        raise ValueError("the warm-up ran no step: give it at least one batch")
    return (
        torch.cat([s["exp_avg"].reshape(-1).float() for s in state]),
        torch.cat([s["exp_avg_sq"].reshape(-1).float() for s in state]),
    )
