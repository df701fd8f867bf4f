"""Memory-bounded member chunks and the shared trunk give the same loss and gradients as the plain pass."""

import pytest
import torch

from tests.helpers import CPU_ARGS, assert_close_dicts, first_batch, lora_config, step_grads
from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
from trl_renyi.model.layer import get_router


def build(make_model, tokenizer, dataset, tmp_path, peft_config=None, **overrides):
    settings = dict(CPU_ARGS)
    settings.update(per_device_train_batch_size=4, max_steps=1, num_members=4, alpha=0.2, member_init_std=0.05)
    settings.update(overrides)
    args = RenyiSFTConfig(output_dir=str(tmp_path / "out"), **settings)
    return RenyiSFTTrainer(
        model=make_model(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config or lora_config(),
    )


@pytest.mark.parametrize("chunk, floor", [(1, 0.0), (3, 0.0), (1, 0.25)])
def test_member_chunks_match_one_pass(make_model, tokenizer, prompt_completion_dataset, tmp_path, chunk, floor):
    plain = build(make_model, tokenizer, prompt_completion_dataset, tmp_path, responsibility_floor=floor)
    chunked = build(
        make_model, tokenizer, prompt_completion_dataset, tmp_path, member_chunk_size=chunk, responsibility_floor=floor
    )
    loss_ref, grads_ref = step_grads(plain)
    loss, grads = step_grads(chunked)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for name in grads_ref:
        assert_close_dicts(grads[name], grads_ref[name], rtol=1e-5, scaled=True)
    # the routing metrics are logged once per step in both modes
    assert chunked._metrics["train"]["renyi/member_3/share"] == pytest.approx(
        plain._metrics["train"]["renyi/member_3/share"], rel=1e-5
    )


def test_shared_trunk_matches_full_tiling(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    config = lora_config(layers_to_transform=[1], target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    full = build(make_model, tokenizer, prompt_completion_dataset, tmp_path, peft_config=config, shared_trunk=False)
    trunk = build(make_model, tokenizer, prompt_completion_dataset, tmp_path, peft_config=config)
    assert trunk.shared_trunk_layer == 1 and full.shared_trunk_layer is None
    loss_ref, grads_ref = step_grads(full)
    loss, grads = step_grads(trunk)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for name in grads_ref:
        assert_close_dicts(grads[name], grads_ref[name], rtol=1e-5, scaled=True)
    assert get_router(trunk.model).trunk_active is False  # reset after the step

    # the bottom layer really ran once: count the rows it saw
    seen = []
    layer0 = trunk.model.get_base_model().model.layers[0]
    handle = layer0.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    step_grads(trunk, checkpointing=False)
    handle.remove()
    assert seen and all(rows == 4 for rows in seen)


def test_shared_trunk_with_chunks(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    config = lora_config(layers_to_transform=[1], target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    full = build(make_model, tokenizer, prompt_completion_dataset, tmp_path, peft_config=config, shared_trunk=False)
    both = build(make_model, tokenizer, prompt_completion_dataset, tmp_path, peft_config=config, member_chunk_size=2)
    loss_ref, grads_ref = step_grads(full)
    loss, grads = step_grads(both)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for name in grads_ref:
        assert_close_dicts(grads[name], grads_ref[name], rtol=1e-5, scaled=True)


def test_trunk_not_used_when_bottom_layer_adapted(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    trainer = build(make_model, tokenizer, prompt_completion_dataset, tmp_path)
    assert trainer.shared_trunk_layer is None


def test_invalid_chunk_size_and_floor(tmp_path):
    with pytest.raises(ValueError, match="member_chunk_size"):
        RenyiSFTConfig(output_dir=str(tmp_path), member_chunk_size=0, **CPU_ARGS)
    with pytest.raises(ValueError, match="responsibility_floor"):
        RenyiSFTConfig(output_dir=str(tmp_path), responsibility_floor=1.0, **CPU_ARGS)


def test_responsibility_floor_mixes_in_the_alpha_one_bound(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    from trl_renyi.objective import renyi_bound

    losses = {}
    for floor in (0.0, 0.4):
        trainer = build(make_model, tokenizer, prompt_completion_dataset, tmp_path, responsibility_floor=floor, alpha=-1.0)
        trainer.model.train()
        batch = first_batch(trainer)
        with torch.no_grad():
            losses[floor] = trainer.compute_loss(trainer.model, batch)
            step = trainer.member_loglik(trainer.model, batch)
            loglik = step.loglik
        tokens = step.num_tokens.sum()
    at_alpha = -renyi_bound(loglik, -1.0).value.sum() / tokens
    at_one = -renyi_bound(loglik, 1.0).value.sum() / tokens
    torch.testing.assert_close(losses[0.0], at_alpha, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses[0.4], 0.6 * at_alpha + 0.4 * at_one, rtol=1e-5, atol=0)
