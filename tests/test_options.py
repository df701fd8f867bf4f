"""Options the ensemble cannot honour are refused by name when the trainer is built, before any model loads."""

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from tests.helpers import CPU_ARGS, lora_config
from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer, RenyiSFTConfig, RenyiSFTTrainer

MISSING_MODEL = "/nonexistent/model-that-would-fail-to-load"


@pytest.mark.parametrize(
    ("field", "value"),
    [("loss_type", "dft"), ("label_smoothing_factor", 0.1), ("use_liger_kernel", True), ("activation_offloading", True)],
)
def test_sft_refuses_options_by_name_before_loading(tmp_path, field, value):
    args = RenyiSFTConfig(output_dir=str(tmp_path), **CPU_ARGS, **{field: value})
    with pytest.raises(ValueError, match=rf"^{field}="):
        RenyiSFTTrainer(model=MISSING_MODEL, args=args, peft_config=lora_config())


def test_sft_refuses_compute_loss_func(tmp_path):
    args = RenyiSFTConfig(output_dir=str(tmp_path), **CPU_ARGS)
    with pytest.raises(ValueError, match="^compute_loss_func="):
        RenyiSFTTrainer(model=MISSING_MODEL, args=args, peft_config=lora_config(), compute_loss_func=lambda *a, **k: 0)


def test_dpo_refuses_options_through_the_same_path(tmp_path):
    args = RenyiDPOConfig(output_dir=str(tmp_path), activation_offloading=True, **CPU_ARGS)
    with pytest.raises(ValueError, match="^activation_offloading="):
        RenyiDPOTrainer(model=MISSING_MODEL, args=args, peft_config=lora_config())


def _tiny_moe(tokenizer):
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        num_experts=2, num_experts_per_tok=1,
    )
    return Qwen2MoeForCausalLM(config)


def test_moe_router_aux_loss_is_refused_by_name(tmp_path, tokenizer, prompt_completion_dataset):
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=1, **CPU_ARGS)
    with pytest.raises(ValueError, match="^router_aux_loss_coef=.*router_aux_loss_coef=0.0"):
        RenyiSFTTrainer(
            model=_tiny_moe(tokenizer), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
            peft_config=lora_config(target_modules=["q_proj", "v_proj"]),
        )
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=1, router_aux_loss_coef=0.0, **CPU_ARGS)
    trainer = RenyiSFTTrainer(
        model=_tiny_moe(tokenizer), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
        peft_config=lora_config(target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.aux_loss_enabled is False


def test_load_best_model_at_end_restores_every_member(tmp_path, tokenizer, make_model, prompt_completion_dataset):
    from safetensors.torch import load_file

    from tests.helpers import lora_weights
    from trl_renyi.model.layer import member_names

    kwargs = dict(CPU_ARGS)
    kwargs.update(save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1)
    args = RenyiSFTConfig(
        output_dir=str(tmp_path), num_members=2, max_steps=3, learning_rate=5e-2, per_device_train_batch_size=4,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True, **kwargs,
    )  # greater_is_better on the loss makes an early checkpoint the best one, not the last
    trainer = RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=prompt_completion_dataset, eval_dataset=prompt_completion_dataset,
        processing_class=tokenizer, peft_config=lora_config(),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    for name in member_names(2):
        saved = load_file(f"{best}/{name}/adapter_model.safetensors")
        last = load_file(f"{tmp_path}/checkpoint-3/{name}/adapter_model.safetensors")
        current = lora_weights(trainer.model, name)
        assert len(saved) == len(current)
        for key, value in saved.items():
            match = [v for k, v in current.items() if k.replace(".ADAPTER", "") == key]
            assert match, key
            torch.testing.assert_close(match[0].cpu(), value)
        assert any(not torch.equal(saved[k], last[k]) for k in saved)
