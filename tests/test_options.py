"""Options the ensemble cannot honour are refused by name when the trainer is built, before any model loads."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from tests.helpers import CPU_ARGS, assert_close_dicts, first_batch, lora_config
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


def _tiny_moe(tokenizer, family="qwen2_moe"):
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_experts_per_tok=1,
    )
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(num_local_experts=3, **common))
    config = Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=3, **common)
    return Qwen2MoeForCausalLM(config)


def _moe_trainer(cls, config_cls, tokenizer, dataset, tmp_path, family="qwen2_moe", peft_config=None, **overrides):
    from tests.helpers import renyi_settings

    kwargs = {**CPU_ARGS, "per_device_train_batch_size": 4, "max_steps": 1, "learning_rate": 1e-2, **overrides}
    args = config_cls(output_dir=str(tmp_path / cls.__name__), **renyi_settings(config_cls, kwargs))
    return cls(
        model=_tiny_moe(tokenizer, family), args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config or lora_config(),
    )


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_k1_equals_sft_trainer_with_the_moe_router_aux_loss(tmp_path, tokenizer, prompt_completion_dataset, family):
    """TRL's defaults add router_aux_loss_coef · aux_loss for MoE models; K = 1 adds exactly the same term."""
    from trl import SFTConfig, SFTTrainer

    from tests.helpers import loss_and_grads

    targets = lora_config(target_modules=["q_proj", "v_proj", "o_proj"])
    stock = _moe_trainer(SFTTrainer, SFTConfig, tokenizer, prompt_completion_dataset, tmp_path, family, targets)
    ours = _moe_trainer(
        RenyiSFTTrainer, RenyiSFTConfig, tokenizer, prompt_completion_dataset, tmp_path, family, targets,
        num_members=1, alpha=-1.0,
    )
    assert stock.aux_loss_enabled and ours.aux_loss_enabled and ours.router_aux_loss_coef > 0
    loss_ref, grads_ref, _ = loss_and_grads(stock, "default", False)
    loss, grads, _ = loss_and_grads(ours, "member_0", False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert_close_dicts(grads, grads_ref, rtol=1e-5, scaled=True)
    # the term is really there: without it the loss differs by coef · aux
    plain = _moe_trainer(
        RenyiSFTTrainer, RenyiSFTConfig, tokenizer, prompt_completion_dataset, tmp_path, family, targets,
        num_members=1, alpha=-1.0, router_aux_loss_coef=0.0,
    )
    loss_plain, _, _ = loss_and_grads(plain, "member_0", False)
    assert float(loss - loss_plain) > 1e-4
    assert ours._metrics["train"]["aux_loss"]


def test_member_chunks_add_the_same_router_aux_loss(tmp_path, tokenizer, prompt_completion_dataset):
    """K = 3: the aux term is the mean of each member's own load-balancing loss, whether or not members are chunked."""
    from tests.helpers import step_grads

    results = []
    for chunk in (None, 1):
        trainer = _moe_trainer(
            RenyiSFTTrainer, RenyiSFTConfig, tokenizer, prompt_completion_dataset, tmp_path, num_members=3,
            member_init_std=0.05, member_chunk_size=chunk, router_aux_loss_coef=0.5,
        )
        results.append(step_grads(trainer, checkpointing=False))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=0)
    for name in grads_a:
        assert_close_dicts(grads_a[name], grads_b[name], rtol=1e-4, scaled=True)


def test_member_aux_loss_is_the_mean_of_each_members_own_loss():
    from trl_renyi.compat import load_balancing_loss
    from trl_renyi.model.lm_head import member_load_balancing_loss

    torch.manual_seed(0)
    config = Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2)
    rows, tokens, members = 2, 5, 3
    layers = [torch.randn(members * rows * tokens, 4) for _ in range(2)]
    mask = torch.ones(members * rows, tokens, dtype=torch.long)
    mask[:, -1] = 0
    got = member_load_balancing_loss(layers, members, rows * tokens, config, mask)
    per_member = [
        load_balancing_loss(
            tuple(layer[k * rows * tokens : (k + 1) * rows * tokens] for layer in layers), 4, 2,
            mask[k * rows : (k + 1) * rows],
        )
        for k in range(members)
    ]  # fmt: skip
    torch.testing.assert_close(got, torch.stack(per_member).mean())
    assert not torch.allclose(got, load_balancing_loss(tuple(layers), 4, 2, mask))  # not the pooled loss


def test_k1_equals_dpo_trainer_with_the_moe_router_aux_loss(tmp_path, tokenizer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.helpers import loss_and_grads
    from tests.test_dpo_trainer import PAIRS

    preference_dataset = Dataset.from_dict({key: [p[i] for p in PAIRS] for i, key in enumerate(("prompt", "chosen", "rejected"))})

    targets = lora_config(target_modules=["q_proj", "v_proj"])
    stock = _moe_trainer(DPOTrainer, DPOConfig, tokenizer, preference_dataset, tmp_path, peft_config=targets)
    ours = _moe_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, tokenizer, preference_dataset, tmp_path, peft_config=targets, num_members=1
    )
    assert stock.aux_loss_enabled and ours.aux_loss_enabled
    loss_ref, grads_ref, _ = loss_and_grads(stock, "default", False)
    loss, grads, _ = loss_and_grads(ours, "member_0", False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_close_dicts(grads, grads_ref, rtol=1e-4, scaled=True)


def test_fused_expert_moe_trains_with_all_linear_and_names_what_stays_frozen(
    tmp_path, tokenizer, prompt_completion_dataset, caplog
):
    """Mixtral's experts and router are fused parameters: with "all-linear" the members adapt the linear layers."""
    with caplog.at_level("WARNING", logger="trl_renyi.model.members"):
        trainer = _moe_trainer(
            RenyiSFTTrainer, RenyiSFTConfig, tokenizer, prompt_completion_dataset, tmp_path, "mixtral",
            num_members=2, max_steps=2,
        )
    assert "['k_proj', 'o_proj', 'q_proj', 'v_proj']" in caplog.text and "stay frozen" in caplog.text
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if "lora_" in n and not torch.equal(before[n], p)]
    assert any(".member_0." in n for n in moved) and any(".member_1." in n for n in moved)


def test_unservable_targets_are_refused_with_targets_that_work(tmp_path, tokenizer, prompt_completion_dataset):
    """An explicit parameter target (PEFT's ParamWrapper) cannot be member-batched: the error names what works."""
    config = lora_config(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    with pytest.raises(ValueError, match=r"Targets that work here: target_modules=\['k_proj', 'o_proj', 'q_proj'"):
        _moe_trainer(
            RenyiSFTTrainer, RenyiSFTConfig, tokenizer, prompt_completion_dataset, tmp_path, "mixtral",
            peft_config=config, num_members=1,
        )


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


def test_settings_set_on_trainer_args_after_construction_are_the_ones_trained_with(tmp_path, tokenizer, make_model, prompt_completion_dataset):
    """``Trainer.hyperparameter_search`` sets a trial's values with ``setattr(trainer.args, ...)`` after construction:
    α, the floor, the warm-up and the mixture weights are read from ``args`` at use, so the loss equals that of a
    trainer built with those values; a value the built ensemble cannot honour is refused by name."""
    def build(**settings):
        args = RenyiSFTConfig(output_dir=str(tmp_path / "run"), num_members=3, member_init_std=0.05, max_steps=4,
                              per_device_train_batch_size=4, gradient_checkpointing=False, **{**CPU_ARGS, **settings})  # fmt: skip
        return RenyiSFTTrainer(model=make_model(), args=args, train_dataset=prompt_completion_dataset,
                               processing_class=tokenizer, peft_config=lora_config())  # fmt: skip

    searched = build(alpha=-1.0, responsibility_floor=0.1, alpha_warmup_ratio=0.5)
    trial = dict(alpha=0.3, responsibility_floor=0.25, alpha_warmup_ratio=0.0, member_weights=[0.2, 0.3, 0.5])
    for key, value in trial.items():
        setattr(searched.args, key, value)
    built = build(**trial)
    with torch.no_grad():
        losses = [t.compute_loss(t.model, first_batch(t)).item() for t in (searched, built)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert searched.current_alpha() == built.current_alpha() == 0.3
    with torch.no_grad():
        plain = build(alpha=-1.0, responsibility_floor=0.1, alpha_warmup_ratio=0.0)
        assert plain.compute_loss(plain.model, first_batch(plain)).item() != pytest.approx(losses[0], rel=1e-6)
    searched.args.responsibility_floor = 1.5
    with pytest.raises(ValueError, match=r"responsibility_floor must lie in \[0, 1\)"):
        searched.compute_loss(searched.model, first_batch(searched))
    searched.args.responsibility_floor = 0.1
    searched.args.num_members = 5
    with pytest.raises(ValueError, match="num_members was 3 when the trainer was built"):
        searched.train()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_compute_loss_refuses_to_return_outputs_by_name(tmp_path, tokenizer, make_model, prompt_completion_dataset, kind):
    """``compute_loss(..., return_outputs=True)`` (what ``prediction_step`` asks for with ``compute_metrics``) has K
    sets of logits to return: refused with the scoring API to use instead, not a wrong single set."""
    from datasets import Dataset

    if kind == "sft":
        config, trainer_cls, data = RenyiSFTConfig, RenyiSFTTrainer, prompt_completion_dataset
    else:
        config, trainer_cls = RenyiDPOConfig, RenyiDPOTrainer
        data = Dataset.from_dict({"prompt": ["Hi"] * 4, "chosen": [" Hello."] * 4, "rejected": [" Bye."] * 4})
    args = config(output_dir=str(tmp_path / "run"), num_members=2, max_steps=1, per_device_train_batch_size=2,
                  gradient_checkpointing=False, **CPU_ARGS)  # fmt: skip
    trainer = trainer_cls(model=make_model(), args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=lora_config())  # fmt: skip
    batch = first_batch(trainer)
    with torch.no_grad():
        assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
        with pytest.raises(ValueError, match=f"{trainer_cls.__name__} does not return logits.*RenyiEnsemble.score"):
            trainer.compute_loss(trainer.model, batch, return_outputs=True)
