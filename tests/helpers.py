"""Shared test helpers: CPU-friendly configs and gradient capture."""

import torch
from peft import LoraConfig

CPU_ARGS = dict(
    report_to="none",
    bf16=False,
    use_cpu=True,
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=0,
)


def lora_config(**kwargs):
    base = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    base.update(kwargs)
    return LoraConfig(**base)


def set_random_lora_b(model, seed=123, std=0.05):
    """Give every LoRA B a reproducible random value (same order on two models with the same layout)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def lora_grads(model, adapter):
    return {
        name.replace(f".{adapter}.", ".ADAPTER."): param.grad.detach().clone()
        for name, param in model.named_parameters()
        if f".{adapter}." in name and param.grad is not None
    }


def lora_weights(model, adapter):
    return {
        name.replace(f".{adapter}.", ".ADAPTER."): param.detach().clone()
        for name, param in model.named_parameters()
        if f".{adapter}." in name
    }


def assert_close_dicts(a, b, rtol=1e-5, atol=1e-7, scaled=False):
    """Compare two dicts of tensors; with ``scaled`` the absolute tolerance is ``rtol`` times each tensor's largest
    entry (float32 sums taken in another order differ by that much on entries near zero)."""
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        tol = max(atol, rtol * float(b[key].abs().max())) if scaled else atol
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=tol, msg=lambda m: f"{key}: {m}")
