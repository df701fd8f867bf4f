"""RenyiSFTTrainer: K = 1 equivalence with SFTTrainer, member-batched gradients, training, saving, resuming."""

import json

import pytest
import torch
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from tests.helpers import (
    CPU_ARGS,
    assert_close_dicts,
    backward_first_batch,
    first_batch,
    lora_config,
    lora_grads,
    lora_weights,
    loss_and_grads,
    renyi_settings,
)
from trl_renyi import RenyiEnsemble, RenyiSFTConfig, RenyiSFTTrainer, renyi_bound
from trl_renyi.model.layer import member_names, router_disabled


def make_trainer(cls, config_cls, model, dataset, tokenizer, tmp_path, peft_config=None, **overrides):
    kwargs = dict(CPU_ARGS)
    kwargs.update(per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2)
    kwargs.update(overrides)
    args = config_cls(output_dir=str(tmp_path / cls.__name__), **renyi_settings(config_cls, kwargs))
    return cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config if peft_config is not None else lora_config(),
    )


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("alpha", [0.5, -1.0])
def test_k1_matches_sft_trainer(
    make_model, tokenizer, prompt_completion_dataset, tmp_path, gradient_checkpointing, padding_free, alpha
):
    common = dict(gradient_checkpointing=gradient_checkpointing, padding_free=padding_free)
    if padding_free:
        common["max_length"] = None
    stock = make_trainer(SFTTrainer, SFTConfig, make_model(), prompt_completion_dataset, tokenizer, tmp_path, **common)
    ours = make_trainer(
        RenyiSFTTrainer,
        RenyiSFTConfig,
        make_model(),
        prompt_completion_dataset,
        tokenizer,
        tmp_path,
        num_members=1,
        alpha=alpha,
        **common,
    )
    loss_ref, grads_ref, batch_ref = loss_and_grads(stock, "default", gradient_checkpointing)
    loss, grads, batch = loss_and_grads(ours, "member_0", gradient_checkpointing)
    assert torch.equal(batch_ref["input_ids"], batch["input_ids"])
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert_close_dicts(grads, grads_ref, rtol=1e-5, scaled=True)


@pytest.mark.parametrize("dataset_name", ["conversational_dataset", "language_modeling_dataset"])
def test_k1_matches_sft_trainer_other_formats(make_model, tokenizer, tmp_path, request, dataset_name):
    dataset = request.getfixturevalue(dataset_name)
    stock = make_trainer(SFTTrainer, SFTConfig, make_model(), dataset, tokenizer, tmp_path)
    ours = make_trainer(RenyiSFTTrainer, RenyiSFTConfig, make_model(), dataset, tokenizer, tmp_path, num_members=1)
    loss_ref, grads_ref, _ = loss_and_grads(stock, "default", False)
    loss, grads, _ = loss_and_grads(ours, "member_0", False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_close_dicts(grads, grads_ref, rtol=1e-5, scaled=True)


def independent_member_gradients(trainer, batch, alpha):
    """Loop over members with plain PEFT (no checkpointing, no row routing): ℓ_ik by explicit log_softmax, then
    ∂(−ΣJ)/∂θ_k = −Σ_i r_ik ∇ℓ_ik with r from an independent float64 softmax."""
    model = trainer.model
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    num_tokens = mask.sum()
    names = member_names(trainer.args.num_members)

    def member_loglik(name):
        model.set_adapter(name)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * mask).sum(-1)

    with router_disabled(model):
        model.gradient_checkpointing_disable()
        with torch.no_grad():
            loglik = torch.stack([member_loglik(n) for n in names], dim=-1).double()
        eps = 1 - alpha
        resp = torch.softmax(eps * loglik, dim=-1)
        value = torch.logsumexp(eps * loglik - torch.log(torch.tensor(float(len(names)))), -1) / eps
        grads = {}
        for k, name in enumerate(names):
            model.zero_grad(set_to_none=True)
            contribution = -(resp[:, k].float() * member_loglik(name)).sum() / num_tokens
            contribution.backward()
            grads[name] = lora_grads(model, name)
        model.set_adapter(names[0])
    return -value.sum() / num_tokens, loglik, grads


@pytest.mark.parametrize("lora_dropout", [0.0])
def test_member_batched_gradients_match_independent_loop(make_model, tokenizer, prompt_completion_dataset, tmp_path, lora_dropout):
    alpha = 0.3
    trainer = make_trainer(
        RenyiSFTTrainer,
        RenyiSFTConfig,
        make_model(),
        prompt_completion_dataset,
        tokenizer,
        tmp_path,
        num_members=4,
        alpha=alpha,
        member_init_std=0.05,
        gradient_checkpointing=True,
    )
    model = trainer.model
    loss, batch = backward_first_batch(trainer, gradient_checkpointing=True)
    batched = {name: lora_grads(model, name) for name in member_names(4)}
    model.zero_grad(set_to_none=True)
    ref_loss, loglik, reference = independent_member_gradients(trainer, batch, alpha)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    # members start different, so their gradients differ
    assert (loglik.std(-1) > 1e-3).all()
    for name in member_names(4):
        assert_close_dicts(batched[name], reference[name], rtol=1e-5, scaled=True)
    # and the routing metrics were logged
    logged = trainer._metrics["train"]
    assert logged["renyi/alpha"] == [alpha]
    shares = [logged[f"renyi/member_{k}/share"][0] for k in range(4)]
    assert abs(sum(shares) - 1) < 1e-5
    expected_resp = torch.softmax((1 - alpha) * loglik, -1).mean(0)
    torch.testing.assert_close(torch.tensor(shares, dtype=torch.float64), expected_resp, rtol=1e-4, atol=1e-6)


def test_dropout_is_reproduced_under_gradient_checkpointing(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    def grads(checkpointing, seed=7):
        trainer = make_trainer(
            RenyiSFTTrainer,
            RenyiSFTConfig,
            make_model(),
            prompt_completion_dataset,
            tokenizer,
            tmp_path,
            peft_config=lora_config(lora_dropout=0.3),
            num_members=2,
            member_init_std=0.05,
        )
        model = trainer.model
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model.train()
        batch = first_batch(trainer)
        torch.manual_seed(seed)
        with trainer.member_routing(model):  # the checkpointed backward recomputes the routed forward
            trainer.compute_loss(model, batch).backward()
        return {n: lora_grads(model, n) for n in member_names(2)}

    plain, checkpointed, other_mask = grads(False), grads(True), grads(False, seed=8)
    for name in plain:
        assert_close_dicts(checkpointed[name], plain[name], rtol=1e-5, scaled=True)
    # dropout really acts: another mask gives other gradients
    diff = sum((plain["member_0"][k] - other_mask["member_0"][k]).abs().sum() for k in plain["member_0"])
    assert diff > 1e-4


def test_training_moves_every_member_and_not_the_base(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    trainer = make_trainer(
        RenyiSFTTrainer,
        RenyiSFTConfig,
        make_model(),
        prompt_completion_dataset,
        tokenizer,
        tmp_path,
        num_members=3,
        max_steps=3,
        member_init_std=0.02,
        alpha=0.0,
    )
    model = trainer.model
    before = {n: lora_weights(model, n) for n in member_names(3)}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainer.train()
    for name in member_names(3):
        after = lora_weights(model, name)
        assert max((after[k] - before[name][k]).abs().max() for k in after) > 1e-4, name
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 3
    for key in ["renyi/alpha", "renyi/routing_entropy", "renyi/loglik_std", "renyi/member_2/share",
                "renyi/member_0/nll", "entropy", "mean_token_accuracy", "num_tokens"]:
        assert key in history[0], key
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in history)


def test_save_reload_and_score(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    trainer = make_trainer(
        RenyiSFTTrainer,
        RenyiSFTConfig,
        make_model(),
        prompt_completion_dataset,
        tokenizer,
        tmp_path,
        num_members=2,
        max_steps=2,
        member_init_std=0.05,
        member_weights=[3.0, 1.0],
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    meta = json.loads((out / "renyi_ensemble.json").read_text())
    assert meta["num_members"] == 2 and meta["member_names"] == ["member_0", "member_1"]
    assert meta["member_weights"] == [0.75, 0.25] and meta["alpha"] == trainer.args.alpha == -1.0
    assert "library_version" in meta and "base_model_name_or_path" in meta
    for name in member_names(2):
        assert (out / name / "adapter_model.safetensors").is_file()
        assert (out / name / "adapter_config.json").is_file()

    prompts = ["What colour is the sky?", "Say hello."]
    completions = [" It is blue.", " Ahoy matey!"]
    ensemble = trainer.ensemble
    ensemble.use_chat_template = False  # as the reference below: the strings tokenised as plain text
    live = ensemble.score(prompts, completions)

    # each member loads with plain PEFT and reproduces its column
    for k, name in enumerate(member_names(2)):
        plain = PeftModel.from_pretrained(make_model(), str(out / name))
        enc = tokenizer(prompts[0] + completions[0] + tokenizer.eos_token, return_tensors="pt")
        prompt_len = len(tokenizer(prompts[0])["input_ids"])
        with torch.no_grad():
            logits = plain(**enc).logits[0, :-1]
        targets = enc["input_ids"][0, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)[prompt_len - 1 :].sum()
        torch.testing.assert_close(logp, live.member_loglik[0, k], rtol=1e-5, atol=1e-5)

    reloaded = RenyiEnsemble.from_pretrained(str(out), base_model=make_model(), use_chat_template=False)
    assert reloaded.num_members == 2 and reloaded.member_weights == pytest.approx([0.75, 0.25])
    scores = reloaded.score(prompts, completions)
    torch.testing.assert_close(scores.member_loglik, live.member_loglik, rtol=1e-5, atol=1e-5)
    assert scores.member_loglik.shape == (2, 2)
    expected = renyi_bound(scores.member_loglik, 0.0, torch.tensor([0.75, 0.25]).log()).value
    torch.testing.assert_close(scores.loglik, expected)

    # conversational scoring renders with the chat template like SFTTrainer
    conv = reloaded.score([[{"role": "user", "content": "Say hello."}]], [[{"role": "assistant", "content": "Ahoy"}]])
    assert torch.isfinite(conv.member_loglik).all() and conv.num_tokens.item() >= 2

    # loaded for inference: frozen like PeftModel.from_pretrained; is_trainable=True leaves every member trainable
    assert not any(p.requires_grad for p in reloaded.model.parameters())
    trainable = RenyiEnsemble.from_pretrained(str(out), base_model=make_model(), is_trainable=True)
    names = {n.split(".lora_")[1].split(".")[1] for n, p in trainable.model.named_parameters() if p.requires_grad}
    assert names == {"member_0", "member_1"}


def test_resume_from_checkpoint_restores_all_members(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    settings = dict(num_members=3, max_steps=4, member_init_std=0.05, alpha=0.0, per_device_train_batch_size=2)
    full = make_trainer(
        RenyiSFTTrainer, RenyiSFTConfig, make_model(), prompt_completion_dataset, tokenizer, tmp_path / "a", **settings
    )
    full.train()
    final = {n: lora_weights(full.model, n) for n in member_names(3)}

    first = make_trainer(
        RenyiSFTTrainer,
        RenyiSFTConfig,
        make_model(),
        prompt_completion_dataset,
        tokenizer,
        tmp_path / "b",
        save_strategy="steps",
        save_steps=2,
        **settings,
    )
    first.train()
    checkpoint = tmp_path / "b" / "RenyiSFTTrainer" / "checkpoint-2"
    assert (checkpoint / "member_2" / "adapter_model.safetensors").is_file()
    assert (checkpoint / "renyi_ensemble.json").is_file()

    resumed = make_trainer(
        RenyiSFTTrainer,
        RenyiSFTConfig,
        make_model(seed=5),
        prompt_completion_dataset,
        tokenizer,
        tmp_path / "c",
        **{**settings, "member_init_std": 0.3, "seed": 0},
    )
    # the base model must be the same one; only the LoRA weights come from the checkpoint
    resumed.model.get_base_model().load_state_dict(full.model.get_base_model().state_dict())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name in member_names(3):
        assert_close_dicts(lora_weights(resumed.model, name), final[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_members": 0}, "num_members"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": float("-inf")}, "alpha"),
        ({"member_weights": [1.0, 2.0]}, "member_weights"),
        ({"member_weights": [1.0, -1.0, 1.0, 1.0]}, "member_weights"),
        ({"loglik_reduction": "max"}, "loglik_reduction"),
        ({"alpha_warmup_ratio": 1.5}, "alpha_warmup_ratio"),
        ({"member_init_std": -0.1}, "member_init_std"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        RenyiSFTConfig(output_dir=str(tmp_path), **{**CPU_ARGS, **overrides})


def test_peft_model_without_members_is_refused(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    from peft import get_peft_model

    model = get_peft_model(make_model(), lora_config())  # adapter "default", no members
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=2, **CPU_ARGS)
    with pytest.raises(ValueError, match="member_0"):
        RenyiSFTTrainer(model=model, args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer)


def test_prebuilt_peft_model_with_members_trains(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    from peft import get_peft_model

    model = get_peft_model(make_model(), lora_config(), adapter_name="member_0")
    model.add_adapter("member_1", lora_config())
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=2, max_steps=1, **CPU_ARGS)
    trainer = RenyiSFTTrainer(model=model, args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("member_1" in n for n in trainable) and any("member_0" in n for n in trainable)
    trainer.train()


@pytest.mark.parametrize(
    "config_kwargs, match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "Linear"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unservable_adapters_are_refused(make_model, tokenizer, prompt_completion_dataset, tmp_path, config_kwargs, match):
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=2, **CPU_ARGS)
    with pytest.raises(ValueError, match=match):
        RenyiSFTTrainer(
            model=make_model(),
            args=args,
            train_dataset=prompt_completion_dataset,
            processing_class=tokenizer,
            peft_config=lora_config(**config_kwargs),
        )


def test_k1_matches_sft_trainer_when_the_model_is_given_by_name(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    """Loaded by TRL's own loader at TRL's RNG point, the first adapter's random init is TRL's."""
    path = tmp_path / "tiny"
    make_model().save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    stock = make_trainer(SFTTrainer, SFTConfig, str(path), prompt_completion_dataset, tokenizer, tmp_path)
    ours = make_trainer(
        RenyiSFTTrainer, RenyiSFTConfig, str(path), prompt_completion_dataset, tokenizer, tmp_path, num_members=1
    )
    assert_close_dicts(lora_weights(ours.model, "member_0"), lora_weights(stock.model, "default"), rtol=0, atol=0)
    loss_ref, grads_ref, _ = loss_and_grads(stock, "default", False)
    loss, grads, _ = loss_and_grads(ours, "member_0", False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_close_dicts(grads, grads_ref, rtol=1e-5, scaled=True)

