"""One prompt pass for every completion of a prompt (share_prompt): the packed layout gives each token the
log-probability of its own unshared sequence, and SFT (multi-annotator rows) and DPO (chosen/rejected) train with
the same loss and gradients as without sharing, with and without checkpointing, padded and padding-free."""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from tests.helpers import CPU_ARGS, PLAIN_OBJECTIVE, assert_close_dicts, lora_config, step_grads
from tests.test_dpo_trainer import PAIRS, make_trainer
from tests.test_multi_annotator import ROWS, randomise_members
from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer, RenyiSFTConfig, RenyiSFTTrainer
from trl_renyi.model.members import member_names
from trl_renyi.model.shared_prompt import pack_preference_pairs, pack_shared_prompts, shared_prompt_refusal


def sequence(generator, prompt, completion, prefix=None):
    ids = (prefix or []) + torch.randint(5, 300, (prompt + completion - len(prefix or []),), generator=generator).tolist()
    return ids, [-100] * prompt + ids[prompt:]


def unshared_log_probs(model, ids, labels):
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    picked = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[:, None])[:, 0]
    return picked * (target != -100)


class Outputs:
    """Per-token outputs of a plain forward, in the fields a fused head returns."""

    def __init__(self, model, inputs):
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1]
        target = inputs["labels"][:, 1:]
        self.label_mask = target != -100
        self.log_probs = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        self.log_probs = self.log_probs * self.label_mask
        self.entropy = self.log_probs.detach()
        self.is_top1 = logits.argmax(-1) == target


def tiny_gpt2(tokenizer):
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()  # no dropout


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_packed_layout_gives_each_token_its_unshared_log_prob(make_model, tokenizer, architecture, implementation,
                                                              padding_free):
    model = (make_model() if architecture == "llama" else tiny_gpt2(tokenizer)).double()
    model.set_attn_implementation(implementation)
    assert shared_prompt_refusal(model) is None
    g = torch.Generator().manual_seed(0)
    a = sequence(g, 7, 4)
    b = sequence(g, 7, 3, prefix=a[0][:7])
    c = sequence(g, 7, 1, prefix=a[0][:7])
    d = sequence(g, 5, 3)
    e = sequence(g, 5, 2, prefix=d[0][:3])  # shares 3 tokens only
    f = sequence(g, 1, 3)  # a one-token prompt
    scored_prompt = (a[0], list(a[0]))  # every token scored: nothing can be shared
    groups = [[a, b, c], [d, e], [f], [scored_prompt, a]]
    packed = pack_shared_prompts(groups, pad_token_id=0, padding_free=padding_free, pad_to_multiple_of=8)
    sequences = [s for group in groups for s in group]
    assert packed.num_sequence_tokens == sum(len(ids) for ids, _ in sequences)
    assert packed.input_ids.numel() < sum(len(ids) for ids, _ in sequences) + 8 * len(groups)
    with torch.no_grad():
        unpacked = packed.unpack(Outputs(model, packed.model_inputs(implementation, torch.float64)), 1)
        for n, (ids, labels) in enumerate(sequences):
            reference = unshared_log_probs(model, ids, labels)
            torch.testing.assert_close(unpacked.log_probs[n, : len(ids) - 1], reference, rtol=0, atol=1e-5)
            assert unpacked.log_probs[n, len(ids) - 1 :].abs().sum() == 0
            assert unpacked.label_mask[n].sum() == sum(1 for label in labels[1:] if label != -100)
    # the example index names the sequence of every scored token
    counts = torch.bincount(packed.example_index[packed.labels != -100], minlength=len(sequences))
    assert counts.tolist() == [sum(1 for label in labels[1:] if label != -100) for _, labels in sequences]


def test_preference_pairs_pack_into_one_row_each(tokenizer):
    g = torch.Generator().manual_seed(1)
    chosen, rejected = sequence(g, 6, 3), None
    rejected = sequence(g, 6, 5, prefix=chosen[0][:6])
    ids = torch.zeros(2, 11, dtype=torch.long)
    ids[0, :9], ids[1, :11] = torch.tensor(chosen[0]), torch.tensor(rejected[0])
    attention = (torch.arange(11) < torch.tensor([[9], [11]])).long()
    completion = ((torch.arange(11) >= 6) & attention.bool()).long()
    packed = pack_preference_pairs(ids, attention, completion, pad_token_id=0)
    assert packed.input_ids.shape == (1, 5 + 4 + 6)  # prompt minus its last token, then two segments
    assert packed.num_sequences == 2 and packed.sequence_length == 11


# ------------------------------------------------------------------------------------------------ trainers, exact
def sft_trainer(model, dataset, tokenizer, tmp_path, **overrides):
    kwargs = dict(CPU_ARGS, **PLAIN_OBJECTIVE)
    kwargs.update(per_device_train_batch_size=8, max_steps=1, learning_rate=1e-2, num_members=2, alpha=-1.0)
    kwargs.update(overrides)
    args = RenyiSFTConfig(output_dir=str(tmp_path / "sft"), **kwargs)
    return RenyiSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           peft_config=lora_config())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"gradient_checkpointing": True}, {"padding_free": True, "max_length": None}, {"loglik_reduction": "mean"}],
    ids=["padded", "checkpointing", "padding_free", "mean"],
)
def test_sft_shared_prompt_equals_unshared(make_model, tokenizer, tmp_path, overrides):
    results = []
    for share in (True, False):
        trainer = sft_trainer(make_model(), Dataset.from_dict(ROWS), tokenizer, tmp_path, share_prompt=share,
                              **overrides)
        assert trainer.share_prompt is share
        randomise_members(trainer.model)
        results.append(step_grads(trainer, checkpointing=overrides.get("gradient_checkpointing", False)))
        if share:  # one packed row per prompt (or one row for all in padding-free mode)
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
            assert batch["input_ids"].shape[0] == (1 if overrides.get("padding_free") else len(ROWS["prompt"]))
    (loss_s, grads_s), (loss_u, grads_u) = results
    torch.testing.assert_close(loss_s, loss_u, rtol=1e-5, atol=0)
    for name in member_names(2):
        assert any(g.abs().sum() > 0 for g in grads_u[name].values())
        assert_close_dicts(grads_s[name], grads_u[name], rtol=1e-5, scaled=True)


def test_sft_shared_prompt_logs_the_unshared_token_count(make_model, tokenizer, tmp_path):
    counts = []
    for share in (True, False):
        trainer = sft_trainer(make_model(), Dataset.from_dict(ROWS), tokenizer, tmp_path, share_prompt=share)
        trainer.train()
        counts.append(trainer.state.log_history[0]["num_tokens"])
    assert counts[0] == counts[1] > 0


def long_prompt_pairs():
    prefix = "Human: tell me about the weather today, please, in a few words. Assistant: sure. Human: "
    return Dataset.from_dict({
        "prompt": [prefix + p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
        "rejected": [r for _, _, r in PAIRS],
    })  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"gradient_checkpointing": True},
        {"precompute_ref_log_probs": True},
        {"ld_alpha": 0.5},
        {"max_length": 24, "truncation_mode": "keep_end"},  # prompts cut differently: little or nothing is shared
        {"member_chunk_size": 1, "shared_trunk": False},
    ],
    ids=["padded", "checkpointing", "precompute", "ld_alpha", "keep_end", "member_chunks"],
)
def test_dpo_shared_prompt_equals_unshared(make_model, tokenizer, tmp_path, overrides):
    results = []
    for share in (True, False):
        trainer = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), long_prompt_pairs(), tokenizer, tmp_path,
                               num_members=3, member_init_std=0.05, alpha=-1.0, share_prompt=share, **overrides)
        assert trainer.share_prompt is share
        results.append(step_grads(trainer, checkpointing=overrides.get("gradient_checkpointing", False)))
    (loss_s, grads_s), (loss_u, grads_u) = results
    torch.testing.assert_close(loss_s, loss_u, rtol=1e-5, atol=0)
    for name in member_names(3):
        assert any(g.abs().sum() > 0 for g in grads_u[name].values())
        assert_close_dicts(grads_s[name], grads_u[name], rtol=1e-5, scaled=True)


def test_dpo_shared_prompt_metrics_equal_unshared(make_model, tokenizer, tmp_path):
    logs = []
    for share in (True, False):
        trainer = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, make_model(), long_prompt_pairs(), tokenizer, tmp_path,
                               num_members=2, member_init_std=0.05, max_steps=2, share_prompt=share)
        trainer.train()
        logs.append(trainer.state.log_history[1])
    for key in ("loss", "rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy", "num_tokens",
                "renyi/member_1/rewards/accuracies"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------------------------------ when it cannot share
def test_share_prompt_true_is_refused_by_name_where_it_cannot_be_exact(make_model, tokenizer, tmp_path):
    model = make_model()
    model.config._attn_implementation = "flex_attention"
    assert "attn_implementation" in shared_prompt_refusal(model)
    with pytest.raises(ValueError, match="share_prompt=True cannot be honoured: attn_implementation"):
        make_trainer(RenyiDPOTrainer, RenyiDPOConfig, model, long_prompt_pairs(), tokenizer, tmp_path, share_prompt=True)
    with pytest.raises(ValueError, match="share_prompt=True cannot be honoured: a custom data_collator"):
        args = RenyiSFTConfig(output_dir=str(tmp_path / "x"), **CPU_ARGS, share_prompt=True)
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        RenyiSFTTrainer(model=make_model(), args=args, train_dataset=Dataset.from_dict(ROWS), processing_class=tokenizer,
                        peft_config=lora_config(), data_collator=DataCollatorForLanguageModeling(pad_token_id=0))


def test_unset_share_prompt_falls_back_where_it_cannot_share(make_model, tokenizer, tmp_path):
    model = make_model()
    model.config._attn_implementation = "flex_attention"
    trainer = make_trainer(RenyiDPOTrainer, RenyiDPOConfig, model, long_prompt_pairs(), tokenizer, tmp_path)
    assert trainer.share_prompt is False
    other = sft_trainer(make_model(), Dataset.from_dict(ROWS), tokenizer, tmp_path,
                        train_sampling_strategy="group_by_length")
    assert other.share_prompt is False  # multi-annotator rows cannot be sampled by the length of single sequences


def test_share_prompt_must_be_a_boolean(tmp_path):
    with pytest.raises(ValueError, match="share_prompt"):
        RenyiDPOConfig(output_dir=str(tmp_path), **CPU_ARGS, share_prompt="yes")


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_mixture_of_experts_models_do_not_share(tokenizer, family):
    """Their load-balancing loss counts tokens: with the prompt once, it would differ from the unshared one."""
    from tests.test_options import _tiny_moe

    assert "mixture of experts" in shared_prompt_refusal(_tiny_moe(tokenizer, family))


# ------------------------------------------------------------------------------- a prefix shared by a batch's rows
SYSTEM = "You are a terse assistant. Answer in as few words as you can, and never explain yourself."


def system_prompt_rows():
    from tests.conftest import COMPLETIONS, PROMPTS

    return Dataset.from_dict({
        "prompt": [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in PROMPTS],
        "completion": [[{"role": "assistant", "content": c.strip()}] for c in COMPLETIONS],
    })  # fmt: skip


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_batches_share_their_common_system_prompt_exactly(make_model, tokenizer, tmp_path, checkpointing):
    from trl_renyi.training.prompt_sharing import SharedPrefixCollator

    results = []
    for share in (True, False):
        trainer = sft_trainer(make_model(), system_prompt_rows(), tokenizer, tmp_path, share_prompt=share,
                              gradient_checkpointing=checkpointing)
        assert isinstance(trainer.data_collator, SharedPrefixCollator) is share
        randomise_members(trainer.model)
        if share:
            examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
            batch = trainer.data_collator(examples)
            assert batch["input_ids"].shape[0] == 1  # one packed row: the system prompt once
            assert batch["input_ids"].numel() < 0.75 * sum(len(e["input_ids"]) for e in examples)
        results.append(step_grads(trainer, checkpointing=checkpointing))
    (loss_s, grads_s), (loss_u, grads_u) = results
    torch.testing.assert_close(loss_s, loss_u, rtol=1e-5, atol=0)
    for name in member_names(2):
        assert_close_dicts(grads_s[name], grads_u[name], rtol=1e-5, scaled=True)


def test_batches_without_a_long_common_prefix_keep_trls_layout(make_model, tokenizer, tmp_path, prompt_completion_dataset):
    trainer = sft_trainer(make_model(), prompt_completion_dataset, tokenizer, tmp_path)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == len(examples) and "example_index" not in batch
    assert batch["attention_mask"].dim() == 2  # TRL's own collation
