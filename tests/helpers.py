"""Shared test helpers: CPU-friendly configs and gradient capture."""

import contextlib

import torch
from peft import LoraConfig

from trl_renyi.model.layer import member_names

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

# The bare α-objective (no α warm-up, no responsibility floor), for tests that check the trainer against an
# independent computation at one α; tests of the warm-up and the floor set them explicitly.
PLAIN_OBJECTIVE = dict(alpha_warmup_ratio=0.0, responsibility_floor=0.0)


def renyi_settings(config_cls, settings: dict) -> dict:
    """``settings`` with :data:`PLAIN_OBJECTIVE` underneath when ``config_cls`` is a Renyi config (TRL's configs
    have no such fields)."""
    from trl_renyi.training.config import RenyiEnsembleArguments

    return {**PLAIN_OBJECTIVE, **settings} if issubclass(config_cls, RenyiEnsembleArguments) else dict(settings)


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


def backward_first_batch(trainer, gradient_checkpointing):
    """``compute_loss`` + backward on the trainer's first batch, in train mode: ``(loss, batch)``."""
    model = trainer.model
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        assert model.is_gradient_checkpointing
    model.train()
    batch = first_batch(trainer)
    # an ensemble trainer routes rows to members only inside its routing block, which must hold the backward too
    # (gradient checkpointing recomputes the forward there); stock TRL trainers have none
    routing = trainer.member_routing(model) if hasattr(trainer, "member_routing") else contextlib.nullcontext()
    with routing:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    return loss, batch


def loss_and_grads(trainer, adapter, gradient_checkpointing):
    """One ``compute_loss`` + backward on the first batch (LoRA B randomised): ``(loss, adapter grads, batch)``."""
    set_random_lora_b(trainer.model)
    loss, batch = backward_first_batch(trainer, gradient_checkpointing)
    return loss.detach(), lora_grads(trainer.model, adapter), batch


def step_grads(trainer, checkpointing=True):
    """One ``training_step`` on the first batch: ``(loss, {member: LoRA grads})``."""
    model = trainer.model
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        assert model.is_gradient_checkpointing
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() before the first step
    batch = first_batch(trainer)
    loss = trainer.training_step(model, batch)
    return loss.detach(), {name: lora_grads(model, name) for name in member_names(trainer.args.num_members)}


def run_script(path, *argv) -> int:
    """Run a script's ``__main__`` (``python path argv…``) in this process and return its exit code."""
    import runpy
    import sys

    saved, sys.argv = sys.argv, [str(path), *map(str, argv)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    finally:
        sys.argv = saved
    return 0
