"""Uncertainty decomposition, scoring and multiple-choice prediction against independent per-member computations."""

import math

import numpy as np
import pytest
import torch

from tests.helpers import lora_config
from trl_renyi import RenyiEnsemble
from trl_renyi.inference.baseline import SingleModel
from trl_renyi.inference.choices import choice_log_likelihoods
from trl_renyi.inference.uncertainty import decompose
from trl_renyi.model.layer import member_names, router_disabled
from trl_renyi.model.members import build_ensemble

PROMPTS = ["What colour is the sky?", "Say hello.", "What is two plus three?"]
COMPLETIONS = [" It is blue.", " Ahoy matey!", " Five."]
# one token each (+ eos), so the members' disagreement, not the choices' lengths, decides the choice probabilities
CHOICES = [[" blue", " sky"], [" two", " three", " blue"], [" sky", " two", " three", " blue"]]


def make_ensemble(make_model, tokenizer, num_members=3, init_std=0.3, weights=None, alpha=0.5):
    model = build_ensemble(make_model(), lora_config(), num_members, seed=0, init_std=init_std)
    # plain-text rendering: the independent computations below tokenise the strings as they are
    return RenyiEnsemble(model, tokenizer, alpha=alpha, member_weights=weights, use_chat_template=False)


def make_members_identical(ensemble):
    with torch.no_grad():
        params = dict(ensemble.model.named_parameters())
        for name, param in params.items():
            if ".member_0." in name:
                for k in range(1, ensemble.num_members):
                    params[name.replace(".member_0.", f".member_{k}.")].copy_(param)


def plain_log_probs(ensemble, prompt, completion, adapter):
    """``(T_c, V)`` next-token log-probs at the completion positions and the completion ids, with PEFT's own forward
    and ``adapter`` active (``None``: adapters disabled)."""
    tokenizer, model = ensemble.tokenizer, ensemble.model
    ids = tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt")["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad(), router_disabled(model):
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=ids).logits
            model.set_adapter("member_0")
    log_probs = torch.log_softmax(logits[0, start - 1 : -1].double(), -1)
    return log_probs, ids[0, start:]


def test_decompose_matches_entropies_and_kl_form():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=(3, 5))  # (K, N, C)
    w = np.array([0.5, 0.3, 0.2])
    parts = decompose(torch.tensor(np.log(p)), torch.tensor(np.log(w)))
    mixture = np.einsum("k,knc->nc", w, p)
    total = -(mixture * np.log(mixture)).sum(-1)
    aleatoric = np.einsum("k,kn->n", w, -(p * np.log(p)).sum(-1))
    kl = np.einsum("k,kn->n", w, (p * (np.log(p) - np.log(mixture))).sum(-1))  # MI = Σ_k w_k KL(p_k ‖ p̄)
    np.testing.assert_allclose(parts.total.numpy(), total, rtol=1e-10)
    np.testing.assert_allclose(parts.aleatoric.numpy(), aleatoric, rtol=1e-10)
    np.testing.assert_allclose(parts.mutual_information.numpy(), kl, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose((parts.aleatoric + parts.mutual_information).numpy(), total, rtol=1e-10)
    same = decompose(torch.tensor(np.log(np.repeat(p[:1], 3, 0))), torch.tensor(np.log(w)))
    assert same.mutual_information.abs().max() < 1e-12


def test_identical_members_have_zero_mutual_information(make_model, tokenizer):
    ensemble = make_ensemble(make_model, tokenizer)
    make_members_identical(ensemble)
    scores = ensemble.score(PROMPTS, COMPLETIONS)
    assert scores.mutual_information.abs().max() < 1e-6
    assert scores.mutual_information_max.abs().max() < 1e-6
    assert scores.loglik_std.max() < 1e-4
    torch.testing.assert_close(scores.entropy, scores.aleatoric, rtol=0, atol=1e-5)
    # the members are not the base model: their log-likelihood differs from it
    base = SingleModel.base_of(ensemble).score(PROMPTS, COMPLETIONS).member_loglik[:, 0]
    assert (scores.member_loglik[:, 0] - base).abs().min() > 1e-2
    for prediction in ensemble.predict_choices(PROMPTS, CHOICES):
        assert abs(prediction.mutual_information) < 1e-6
        torch.testing.assert_close(prediction.member_probs[0], prediction.member_probs[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("conversational", [False, True])
def test_scores_match_independent_member_forwards(make_model, tokenizer, conversational):
    ensemble = make_ensemble(make_model, tokenizer, weights=[0.5, 0.3, 0.2])
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        completions = [[{"role": "assistant", "content": c.strip()}] for c in COMPLETIONS]
        scores = ensemble.score(prompts, completions, batch_size=2)
        # the chat rendering: user turn + generation prompt, the completion being the assistant's turn
        assert scores.num_tokens.tolist() == [
            len(tokenizer(c.strip() + "<|im_end|>\n")["input_ids"]) for c in COMPLETIONS
        ]
        return
    scores = ensemble.score(PROMPTS, COMPLETIONS, batch_size=2)  # two batches, right padding
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        member = [plain_log_probs(ensemble, prompt, completion, name) for name in member_names(3)]
        targets = member[0][1]
        lp = torch.stack([m[0] for m in member])  # (K, T, V)
        loglik = lp.gather(-1, targets[None, :, None].expand(3, -1, 1)).squeeze(-1).sum(-1)
        torch.testing.assert_close(scores.member_loglik[i].double(), loglik, rtol=1e-5, atol=1e-4)
        mixture = torch.einsum("k,ktv->tv", w, lp.exp())
        total = -(mixture * mixture.log()).sum(-1)
        aleatoric = torch.einsum("k,kt->t", w, -(lp.exp() * lp).sum(-1))
        mi = total - aleatoric
        assert scores.mutual_information[i].item() == pytest.approx(mi.mean().item(), rel=1e-4, abs=1e-6)
        assert scores.mutual_information_max[i].item() == pytest.approx(mi.max().item(), rel=1e-4, abs=1e-6)
        assert scores.entropy[i].item() == pytest.approx(total.mean().item(), rel=1e-4)
        assert scores.aleatoric[i].item() == pytest.approx(aleatoric.mean().item(), rel=1e-4)
        assert scores.loglik[i].item() == pytest.approx(torch.logsumexp(w.log() + loglik, 0).item(), rel=1e-5)
        expected_r = torch.softmax(w.log() + 0.5 * loglik, 0)
        torch.testing.assert_close(scores.responsibilities[i].double(), expected_r, rtol=1e-4, atol=1e-6)
    assert (scores.mutual_information > 1e-3).all()


def test_scores_come_back_in_the_order_given(make_model, tokenizer):
    # batches are formed by length (shortest first); every field must still follow the caller's order
    ensemble = make_ensemble(make_model, tokenizer)
    prompts = [PROMPTS[i] for i in (2, 0, 1, 2, 1)]
    completions = [COMPLETIONS[i] for i in (0, 2, 1, 1, 0)]
    one_by_one = [ensemble.score([p], [c]) for p, c in zip(prompts, completions)]
    for batch_size in (2, 5):
        scores = ensemble.score(prompts, completions, batch_size=batch_size)
        for field in ("member_loglik", "num_tokens", "mutual_information", "mutual_information_max", "responsibilities"):
            expected = torch.cat([getattr(single, field) for single in one_by_one])
            torch.testing.assert_close(getattr(scores, field), expected, rtol=1e-5, atol=1e-5, msg=field)


@pytest.mark.parametrize("conversational", [False, True])
def test_shared_prompt_choice_scores_equal_whole_sequence_scores(make_model, tokenizer, conversational):
    ensemble = make_ensemble(make_model, tokenizer)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if conversational else PROMPTS
    flat_prompts = [p for p, options in zip(prompts, CHOICES) for _ in options]
    flat_choices = [c for options in CHOICES for c in options]
    if conversational:
        flat_choices = [[{"role": "assistant", "content": c}] for c in flat_choices]
    whole = ensemble.score(flat_prompts, flat_choices, batch_size=4)
    # one group of questions with prompts of different lengths (left-padded), and one question per group
    for batch_size in (16, 1):
        loglik, num_tokens, sizes = choice_log_likelihoods(ensemble.members, prompts, CHOICES, batch_size=batch_size)
        assert sizes == [2, 3, 4]
        torch.testing.assert_close(loglik, whole.member_loglik, rtol=1e-5, atol=1e-4)
        assert num_tokens.tolist() == whole.num_tokens.tolist()


@pytest.mark.parametrize("length_normalize", [False, True])
def test_predict_choices_against_member_likelihoods(make_model, tokenizer, length_normalize):
    weights = [0.2, 0.3, 0.5]
    ensemble = make_ensemble(make_model, tokenizer, weights=weights)
    predictions = ensemble.predict_choices(PROMPTS, CHOICES, length_normalize=length_normalize, batch_size=8)
    assert [len(p.probs) for p in predictions] == [2, 3, 4]
    w = torch.tensor(weights, dtype=torch.float64)
    for prompt, options, prediction in zip(PROMPTS, CHOICES, predictions):
        assert prediction.probs.sum().item() == pytest.approx(1.0, abs=1e-6)
        scores = torch.zeros(3, len(options), dtype=torch.float64)
        for c, option in enumerate(options):
            for k, name in enumerate(member_names(3)):
                lp, targets = plain_log_probs(ensemble, prompt, option, name)
                token = lp.gather(-1, targets[:, None]).squeeze(-1)
                scores[k, c] = token.mean() if length_normalize else token.sum()
        member_probs = torch.softmax(scores, -1)
        torch.testing.assert_close(prediction.member_probs.double(), member_probs, rtol=1e-4, atol=1e-6)
        mixture = w @ member_probs
        torch.testing.assert_close(prediction.probs.double(), mixture, rtol=1e-4, atol=1e-6)
        entropy = lambda p: -(torch.special.xlogy(p, p)).sum(-1)  # noqa: E731
        assert prediction.entropy == pytest.approx(entropy(mixture).item(), rel=1e-4, abs=1e-6)
        assert prediction.aleatoric == pytest.approx((w * entropy(member_probs)).sum().item(), rel=1e-4, abs=1e-6)
        kl = (w * (member_probs * (member_probs.log() - mixture.log())).sum(-1)).sum()  # MI = Σ_k w_k KL(p_k ‖ p̄)
        assert prediction.mutual_information == pytest.approx(kl.item(), rel=1e-3, abs=1e-6)
        assert prediction.prediction == int(mixture.argmax())
    assert all(p.mutual_information > 1e-3 for p in predictions)


def test_single_model_baseline_is_the_base_with_adapters_off(make_model, tokenizer):
    ensemble = make_ensemble(make_model, tokenizer)
    base = SingleModel.base_of(ensemble)
    assert base.num_members == 1 and base.member_names == ["base"]
    scores = base.score(PROMPTS, COMPLETIONS)
    # the ensemble's adapters are untouched: every member stays trainable
    trainable = {n for n, p in ensemble.model.named_parameters() if p.requires_grad}
    assert all(any(f".{name}." in n for n in trainable) for name in member_names(3))
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        lp, targets = plain_log_probs(ensemble, prompt, completion, None)
        assert scores.member_loglik[i, 0].item() == pytest.approx(lp.gather(-1, targets[:, None]).sum().item(), rel=1e-5)
    assert scores.mutual_information.abs().max() == 0 and (scores.responsibilities == 1).all()
    prediction = base.predict_choices(PROMPTS[:1], CHOICES[:1])[0]
    assert prediction.mutual_information == 0 and math.isclose(float(prediction.probs.sum()), 1.0, abs_tol=1e-6)
