"""RenyiDPOTrainer: K = 1 equivalence with DPOTrainer, one reference pass per step, member-batched gradients, the base
model as reference, refused loss types, specialisation on conflicting preferences, metrics, saving and resuming."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel, get_peft_model
from trl import DPOConfig, DPOTrainer

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
    set_random_lora_b,
    step_grads,
)
from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer
from trl_renyi.model.layer import get_router, member_names, router_disabled

PAIRS = [
    ("What colour is the sky?", " It is blue.", " green"),
    ("Say hello.", " Good morning, sir.", " Ahoy matey!"),
    ("What is two plus three?", " Five.", " four"),
    ("Name a colour.", " red", " It is blue."),
    ("What is the capital of France?", " Paris.", " maybe"),
    ("Count to three.", " one two three", " un deux trois"),
    ("What colour is grass?", " green", " purple"),
    ("Say good morning.", " Good morning, sir.", " no"),
]


@pytest.fixture
def preference_dataset():
    return Dataset.from_dict(
        {"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS], "rejected": [r for _, _, r in PAIRS]}
    )


@pytest.fixture
def conversational_preference_dataset():
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _, _ in PAIRS],
            "chosen": [[{"role": "assistant", "content": c.strip()}] for _, c, _ in PAIRS],
            "rejected": [[{"role": "assistant", "content": r.strip()}] for _, _, r in PAIRS],
        }
    )


def make_trainer(cls, config_cls, model, dataset, tokenizer, tmp_path, peft_config=None, **overrides):
    kwargs = dict(CPU_ARGS)
    kwargs.update(per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2, beta=0.5)
    kwargs.update(overrides)
    args = config_cls(output_dir=str(tmp_path / cls.__name__), **renyi_settings(config_cls, kwargs))
    if isinstance(model, PeftModel):
        peft_config = None
    elif peft_config is None:
        peft_config = lora_config()
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)


# ---------------------------------------------------------------------------------------------- K = 1 equals DPOTrainer
@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize(
    "loss_settings", [{"loss_type": "sigmoid"}, {"loss_type": "robust", "label_smoothing": 0.1}], ids=["sigmoid", "robust"]
)
def test_k1_matches_dpo_trainer(make_model, tokenizer, preference_dataset, tmp_path, loss_settings, precompute):
    common = dict(precompute_ref_log_probs=precompute, gradient_checkpointing=True, **loss_settings)
    stock = make_trainer(DPOTrainer, DPOConfig, make_model(), preference_dataset, tokenizer, tmp_path, **common)
    ours = make_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path, num_members=1,
        alpha=-1.0, **common,
    )
    loss_ref, grads_ref, batch_ref = loss_and_grads(stock, "default", True)
    loss, grads, batch = loss_and_grads(ours, "member_0", True)
    assert torch.equal(batch_ref["input_ids"], batch["input_ids"])
    if precompute:
        # both references were precomputed from the base model (stock: its fresh "default" adapter disabled)
        torch.testing.assert_close(batch["ref_chosen_logps"], batch_ref["ref_chosen_logps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert_close_dicts(grads, grads_ref, rtol=1e-5, scaled=True)
    # TRL's metric names carry the ensemble (here the single member) with TRL's values
    logged, logged_ref = ours._metrics["train"], stock._metrics["train"]
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"]:
        assert logged[key] == pytest.approx(logged_ref[key], rel=1e-4, abs=1e-5), key
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]:
        assert logged[f"renyi/member_0/{key}"] == pytest.approx(logged[key], rel=1e-6), key


@pytest.mark.parametrize(
    "settings", [{"ld_alpha": 0.5}, {"f_divergence_type": "js_divergence"}], ids=["ld_alpha", "js_divergence"]
)
def test_k1_matches_dpo_trainer_other_formats_and_options(
    make_model, tokenizer, conversational_preference_dataset, tmp_path, settings
):
    stock = make_trainer(DPOTrainer, DPOConfig, make_model(), conversational_preference_dataset, tokenizer, tmp_path, **settings)
    ours = make_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, make_model(), conversational_preference_dataset, tokenizer, tmp_path,
        num_members=1, **settings,
    )
    loss_ref, grads_ref, _ = loss_and_grads(stock, "default", False)
    loss, grads, _ = loss_and_grads(ours, "member_0", False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_close_dicts(grads, grads_ref, rtol=1e-5, scaled=True)


# ------------------------------------------------------------------------------------ one reference pass per step
def count_forwards(trainer):
    """Record (base_only, rows) for every top-level backbone forward (gradient checkpointing recomputes layers, not
    the backbone call, so each real forward is counted once)."""
    peft_model = trainer.model
    router = get_router(peft_model)
    calls = []
    backbone = peft_model.get_base_model().model
    handle = backbone.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((router.base_only, kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("num_members", [1, 3])
@pytest.mark.parametrize("precompute", [False, True])
def test_reference_forward_runs_once_per_step(make_model, tokenizer, preference_dataset, tmp_path, num_members, precompute):
    trainer = make_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path,
        num_members=num_members, member_init_std=0.05, max_steps=2, gradient_checkpointing=True,
        precompute_ref_log_probs=precompute,
    )
    calls, handle = count_forwards(trainer)
    trainer.train()
    handle.remove()
    pairs = trainer.args.per_device_train_batch_size
    assert trainer.share_prompt  # the default on a model that allows it: one packed row per pair
    reference = [rows for base_only, rows in calls if base_only]
    policy = [rows for base_only, rows in calls if not base_only]
    assert policy == [num_members * pairs] * 2  # chosen and rejected of all K members in one forward per step
    assert reference == ([] if precompute else [pairs] * 2)  # once per step, untiled, whatever K


@pytest.mark.parametrize("variant", ["shared_trunk", "member_chunks"])
def test_shared_trunk_and_member_chunks_match_one_pass(make_model, tokenizer, preference_dataset, tmp_path, variant):
    top_layer = lora_config(
        layers_to_transform=[1],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    settings = dict(num_members=3, member_init_std=0.3, alpha=-0.5, peft_config=top_layer)
    plain = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path,
                         shared_trunk=False, **settings)
    overrides = {} if variant == "shared_trunk" else {"member_chunk_size": 1, "shared_trunk": False}
    other = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path,
                         **overrides, **settings)
    assert (other.shared_trunk_layer == 1) == (variant == "shared_trunk")
    loss_ref, grads_ref = step_grads(plain)
    calls, handle = count_forwards(other)
    loss, grads = step_grads(other)
    handle.remove()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for name in grads_ref:
        assert_close_dicts(grads[name], grads_ref[name], rtol=1e-5, scaled=True)
    # the reference pass is untiled (no trunk tiling) and runs once per step, also across member chunks
    assert [rows for base_only, rows in calls if base_only] == [other.args.per_device_train_batch_size]  # a row a pair
    assert get_router(other.model).trunk_active is False


# --------------------------------------------------------------------------- member-batched = independent per member
def independent_member_gradients(trainer, batch, alpha, loss_type, eps):
    """Loop over members with plain PEFT (no checkpointing, no row routing): sequence log-probs by explicit
    log_softmax, π_ref with PEFT's disable_adapter(), ℓ_ik written out per loss type, r_ik from a float64 softmax,
    and ∂(−ΣJ/N)/∂θ_k = −Σ_i r_ik ∇ℓ_ik / N."""
    model = trainer.model
    beta = trainer.args.beta
    mask = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:]
    names = member_names(trainer.args.num_members)
    pairs = batch["input_ids"].shape[0] // 2

    def sequence_logps():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        return (logp * mask).sum(-1)

    def likelihood(m):
        if loss_type == "robust":
            return ((1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)) / (1 - 2 * eps)
        return (1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)

    def member_loglik(name, ref):
        model.set_adapter(name)
        logps = sequence_logps()
        margin = beta * ((logps[:pairs] - ref[:pairs]) - (logps[pairs:] - ref[pairs:]))
        return likelihood(margin)

    with router_disabled(model):
        model.gradient_checkpointing_disable()
        with torch.no_grad():
            with model.disable_adapter():
                ref = sequence_logps()
            loglik = torch.stack([member_loglik(n, ref) for n in names], dim=-1).double()
        scaled = (1 - alpha) * loglik - math.log(len(names))
        resp = torch.softmax(scaled, dim=-1)
        value = torch.logsumexp(scaled, -1) / (1 - alpha)
        grads = {}
        for k, name in enumerate(names):
            model.zero_grad(set_to_none=True)
            (-(resp[:, k].float() * member_loglik(name, ref)).sum() / pairs).backward()
            grads[name] = lora_grads(model, name)
    return -value.sum() / pairs, loglik, resp, grads


@pytest.mark.parametrize(
    "loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1)], ids=["sigmoid", "cdpo", "robust"]
)
def test_member_batched_gradients_match_independent_loop(
    make_model, tokenizer, preference_dataset, tmp_path, loss_type, eps
):
    alpha, k = -0.5, 4
    trainer = make_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path, num_members=k,
        alpha=alpha, member_init_std=0.3, loss_type=loss_type, label_smoothing=eps, gradient_checkpointing=True,
    )
    model = trainer.model
    loss, batch = backward_first_batch(trainer, gradient_checkpointing=True)
    batched = {name: lora_grads(model, name) for name in member_names(k)}
    model.zero_grad(set_to_none=True)
    ref_loss, loglik, resp, reference = independent_member_gradients(trainer, batch, alpha, loss_type, eps)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    assert (loglik.std(-1) > 1e-3).all()  # members start different, so routing is not uniform
    for name in member_names(k):
        assert_close_dicts(batched[name], reference[name], rtol=1e-5, scaled=True)
    shares = [trainer._metrics["train"][f"renyi/member_{j}/share"][0] for j in range(k)]
    torch.testing.assert_close(torch.tensor(shares, dtype=torch.float64), resp.mean(0), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- the base model is the reference
def base_sequence_logps(base, trainer, dataset):
    """π_ref log-probs of every chosen/rejected completion of ``dataset`` from a plain (never wrapped) base model."""
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_dataset, batch_size=len(dataset),
                                                  collate_fn=trainer.data_collator)))
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)


@pytest.mark.parametrize("prebuilt", [False, True], ids=["peft_config", "peft_model"])
def test_reference_is_the_base_model_also_when_precomputed(make_model, tokenizer, preference_dataset, tmp_path, prebuilt):
    if prebuilt:
        model = get_peft_model(make_model(), lora_config(), adapter_name="member_0")
        model.add_adapter("member_1", lora_config())
        set_random_lora_b(model, std=0.3)  # members far from the base: a copy of one would be a wrong reference
    else:
        model = make_model()
    trainer = make_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, model, preference_dataset, tokenizer, tmp_path, num_members=2,
        member_init_std=0.3, precompute_ref_log_probs=True, max_steps=2,
    )
    # TRL's "ref" adapter copy is gone; only the members are left, all trainable
    assert sorted(trainer.model.peft_config) == ["member_0", "member_1"]
    chosen, rejected = base_sequence_logps(make_model(), trainer, preference_dataset)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_chosen_logps"]), chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_rejected_logps"]), rejected, rtol=1e-5, atol=1e-4)
    # members differ from the base, so the reference is not a member
    with torch.no_grad():
        scores = trainer.score_pairs(preference_dataset)
    assert scores.margins.abs().max() > 1e-2
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(any(f".{name}." in n for n in trainable) for name in member_names(2))


def test_explicit_ref_model_is_honoured(make_model, tokenizer, preference_dataset, tmp_path):
    def first_loss(ref_model):
        args = RenyiDPOConfig(output_dir=str(tmp_path), num_members=2, member_init_std=0.05, beta=0.5,
                              per_device_train_batch_size=4, **CPU_ARGS)
        trainer = RenyiDPOTrainer(model=make_model(), ref_model=ref_model, args=args, train_dataset=preference_dataset,
                                  processing_class=tokenizer, peft_config=lora_config())
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, first_batch(trainer))

    base_reference = first_loss(None)
    torch.testing.assert_close(first_loss(make_model()), base_reference, rtol=1e-5, atol=1e-6)  # a copy of the base
    assert (first_loss(make_model(seed=1)) - base_reference).abs() > 1e-3  # another model is another reference


def test_prebuilt_peft_model_without_members_is_refused(make_model, tokenizer, preference_dataset, tmp_path):
    model = get_peft_model(make_model(), lora_config())  # adapter "default", no members
    with pytest.raises(ValueError, match="member_0"):
        make_trainer(RenyiDPOTrainer, RenyiDPOConfig, model, preference_dataset, tokenizer, tmp_path, num_members=2)


# ------------------------------------------------------------------------------------------------ refused loss types
@pytest.mark.parametrize(
    "loss_type", [["hinge"], ["ipo"], ["sigmoid", "sft"], ["sigmoid", "robust"], ["bco_pair"], ["apo_zero"]]
)
def test_non_likelihood_loss_types_are_refused(make_model, tokenizer, preference_dataset, tmp_path, loss_type):
    with pytest.raises(ValueError, match="log-likelihood"):
        make_trainer(
            RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path, loss_type=loss_type
        )


def test_weighting_and_bad_label_smoothing_are_refused(make_model, tokenizer, preference_dataset, tmp_path):
    with pytest.raises(ValueError, match="use_weighting"):
        make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path,
                     use_weighting=True)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path,
                     loss_type="robust", label_smoothing=0.5)


# ------------------------------------------------------------------------------ specialisation on conflicting labels
NAMES = ["Anna", "Bob", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jon", "Kim", "Lea"]
AGREED = [
    ("What is two plus three?", " Five.", " four"),
    ("What colour is the sky?", " It is blue.", " purple"),
    ("Count to five.", " one two three four five", " six"),
    ("What is the capital of France?", " Paris.", " red"),
]


def preference_rows(triples, swap=False):
    return {
        "prompt": [p for p, _, _ in triples],
        "chosen": [r if swap else c for _, c, r in triples],
        "rejected": [c if swap else r for _, c, r in triples],
    }


def conflict_data():
    """Group A prefers the pirate greeting, group B the formal one, on the same prompts (no group marker); both
    groups agree on AGREED."""
    conflict = [(f"{name} says: please greet me now.", " Ahoy matey!", " Good morning, sir.") for name in NAMES]
    group_a, group_b, agreed = preference_rows(conflict), preference_rows(conflict, swap=True), preference_rows(AGREED)
    full = Dataset.from_dict({key: group_a[key] + group_b[key] + agreed[key] for key in group_a})
    return full, Dataset.from_dict(group_a), Dataset.from_dict(group_b), Dataset.from_dict(agreed)


def train_on_conflict(make_model, tokenizer, tmp_path, alpha, max_steps=100):
    """K = 2, α = 1 for the first half of the steps, then ``alpha``. Members start nearly equal (small random B), the
    warm-up makes both fit the agreed pairs and hedge the conflict; the moderate learning rate lets the split grow
    along the direction all conflicting prompts share (one member per annotator group) rather than prompt by
    prompt, which the bound alone would not prefer (each pair is symmetric). With these settings 11 of seeds 0–11
    split the groups (the other put 3 of 12 prompts on the wrong member); the test runs seed 0, ~8 s on 2 idle
    cores."""
    full, group_a, group_b, agreed = conflict_data()
    trainer = make_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, make_model(init_std=0.3), full, tokenizer, tmp_path, num_members=2,
        alpha=alpha, alpha_warmup_ratio=0.5, member_init_std=0.01, per_device_train_batch_size=len(full),
        max_steps=max_steps, learning_rate=3e-3, lr_scheduler_type="constant", gradient_checkpointing=False,
        logging_steps=10,
    )
    trainer.train()
    return trainer, [trainer.score_pairs(d) for d in (group_a, group_b, agreed)]


def test_members_specialise_on_conflicting_preferences(make_model, tokenizer, tmp_path):
    trainer, (group_a, group_b, agreed) = train_on_conflict(make_model, tokenizer, tmp_path, alpha=-1.0)
    assert trainer.current_alpha() == -1.0
    member_a = group_a.responsibilities.argmax(-1)
    member_b = group_b.responsibilities.argmax(-1)
    top_a, top_b = member_a.mode().values.item(), member_b.mode().values.item()
    assert (member_a == top_a).float().mean() >= 0.9
    assert (member_b == top_b).float().mean() >= 0.9
    assert top_a != top_b
    # every member still prefers the chosen answer where the annotators agree
    assert (agreed.margins > 0).all()


def test_alpha_one_keeps_responsibilities_uniform(make_model, tokenizer, tmp_path):
    trainer, scores = train_on_conflict(make_model, tokenizer, tmp_path, alpha=1.0, max_steps=40)
    for score in scores:
        torch.testing.assert_close(score.responsibilities, torch.full_like(score.responsibilities, 0.5))
    logged = [entry["renyi/routing_entropy"] for entry in trainer.state.log_history if "renyi/routing_entropy" in entry]
    assert logged and all(value == pytest.approx(math.log(2), abs=1e-6) for value in logged)


# ------------------------------------------------------------------------------------------- metrics, saving, resuming
def test_training_logs_ensemble_and_member_metrics(make_model, tokenizer, preference_dataset, tmp_path):
    trainer = make_trainer(
        RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path, num_members=2,
        member_init_std=0.05, max_steps=2,
    )
    trainer.eval_dataset = trainer._prepare_dataset(preference_dataset, tokenizer, trainer.args, "eval")
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "entropy", "mean_token_accuracy", "num_tokens", "renyi/alpha", "renyi/routing_entropy"]
    for name in member_names(2):
        keys += [f"renyi/{name}/rewards/{m}" for m in ("chosen", "rejected", "margins", "accuracies")]
        keys += [f"renyi/{name}/share", f"renyi/{name}/nll"]
    for key in keys:
        assert key in history[0], key
    metrics = trainer.evaluate()
    for key in keys:
        if key != "num_tokens":
            assert f"eval_{key}" in metrics, key
    # the ensemble reward is the mean of the member rewards (uniform weights)
    member_mean = sum(metrics[f"eval_renyi/member_{k}/rewards/margins"] for k in range(2)) / 2
    assert metrics["eval_rewards/margins"] == pytest.approx(member_mean, rel=1e-5, abs=1e-6)


def test_save_and_resume(make_model, tokenizer, preference_dataset, tmp_path):
    settings = dict(num_members=3, max_steps=4, member_init_std=0.05, alpha=0.0, per_device_train_batch_size=2)
    full = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path / "a",
                        **settings)
    full.train()
    final = {n: lora_weights(full.model, n) for n in member_names(3)}
    out = tmp_path / "saved"
    full.save_model(str(out))
    meta = json.loads((out / "renyi_ensemble.json").read_text())
    assert meta["num_members"] == 3 and meta["trainer"] == "RenyiDPOTrainer"
    for k, name in enumerate(member_names(3)):
        assert (out / name / "adapter_model.safetensors").is_file()
        plain = PeftModel.from_pretrained(make_model(), str(out / name))
        assert_close_dicts(lora_weights(plain, "default"), final[name], rtol=1e-6, atol=1e-7)
    assert not (out / "ref").exists()

    first = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path / "b",
                         save_strategy="steps", save_steps=2, **settings)
    first.train()
    checkpoint = tmp_path / "b" / "RenyiDPOTrainer" / "checkpoint-2"
    assert (checkpoint / "member_2" / "adapter_model.safetensors").is_file()
    resumed = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path / "c",
                           **{**settings, "member_init_std": 0.3})
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name in member_names(3):
        assert_close_dicts(lora_weights(resumed.model, name), final[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_step_keeps_its_state_in_its_own_scope_not_in_the_batch(make_model, tokenizer, preference_dataset, tmp_path, chunked):
    """DPO's per-batch values (reference log-probs, packed pairs) live in the step's scope: the batch dict leaves a
    training step with the keys it came with, and no scope outlives its step."""
    overrides = {"member_chunk_size": 1} if chunked else {}
    trainer = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path,
                           num_members=2, member_init_std=0.3, **overrides)  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = first_batch(trainer)
    keys = set(batch)
    trainer.training_step(trainer.model, batch)
    assert set(batch) == keys
    assert trainer._scope is None
    # by hand, outside a step: compute_loss opens no scope and leaves none behind
    trainer.compute_loss(trainer.model, batch).backward()
    assert set(batch) == keys and trainer._scope is None


def test_two_batches_in_one_routing_block_each_get_their_own_reference(make_model, tokenizer, preference_dataset, tmp_path):
    """A hand-written loop inside one ``member_routing`` block: the second batch's loss equals its own step's."""
    trainer = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), preference_dataset, tokenizer, tmp_path,
                           num_members=2, member_init_std=0.3)  # fmt: skip
    trainer.model.eval()
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()][:2]
    with torch.no_grad():
        alone = [trainer.compute_loss(trainer.model, b) for b in batches]
        with trainer.member_routing(trainer.model):
            together = [trainer.compute_loss(trainer.model, b) for b in batches]
    assert not torch.allclose(alone[0], alone[1])
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b)
