"""Generation: the cached, left-padded, member-batched decoder against step-by-step references."""

import pytest
import torch

from tests.helpers import lora_config
from trl_renyi import RenyiEnsemble
from trl_renyi.model.layer import member_names, router_disabled
from trl_renyi.model.members import attach_ensemble, build_ensemble

PROMPTS = ["What colour is the sky?", "Say", "What is two plus three? Five. What is the capital of"]


@pytest.fixture
def ensemble(make_model, tokenizer):
    model = build_ensemble(make_model(), lora_config(), 2, seed=0, init_std=0.3)
    # plain-text rendering: the reference computations below tokenise the strings as they are
    return RenyiEnsemble(model, tokenizer, alpha=0.0, member_weights=[0.6, 0.4], use_chat_template=False)


def member_next_log_probs(ensemble, ids, name):
    """Next-token log-probs after ``ids`` with PEFT's plain forward, adapter ``name`` active, no cache, no padding."""
    model = ensemble.model
    with torch.no_grad(), router_disabled(model):
        model.set_adapter(name)
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.double(), -1)


def restore(ensemble):
    ensemble.model.set_adapter("member_0")
    attach_ensemble(ensemble.model, ensemble.num_members)


def entropy(p):
    return -(torch.special.xlogy(p, p)).sum(-1)


def test_mixture_greedy_matches_a_manual_mixture(ensemble, tokenizer):
    max_new = 6
    generated = ensemble.generate(PROMPTS, strategy="mixture", max_new_tokens=max_new, batch_size=3)
    eos = tokenizer.eos_token_id
    log_prior = torch.tensor([0.6, 0.4], dtype=torch.float64).log()
    for prompt, result in zip(PROMPTS, generated):
        ids = tokenizer(prompt)["input_ids"]
        log_w = log_prior.clone()
        tokens, entropies, mis = [], [], []
        for _ in range(max_new):
            lp = torch.stack([member_next_log_probs(ensemble, ids, name) for name in member_names(2)])  # (K, V)
            w = torch.softmax(log_w, 0)
            mixture = w @ lp.exp()
            token = int(mixture.argmax())
            total = entropy(mixture)
            entropies.append(float(total))
            mis.append(float(total - (w * entropy(lp.exp())).sum()))
            tokens.append(token)
            log_w = log_w + lp[:, token]
            ids = ids + [token]
            if token == eos:
                break
        restore(ensemble)
        assert result.token_ids == tokens
        assert result.member is None
        torch.testing.assert_close(result.entropy.double(), torch.tensor(entropies, dtype=torch.float64), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            result.mutual_information.double(), torch.tensor(mis, dtype=torch.float64), rtol=1e-3, atol=1e-5
        )
        torch.testing.assert_close(result.member_posterior.double(), torch.softmax(log_w, 0), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(result.entropy, result.aleatoric + result.mutual_information, rtol=1e-5, atol=1e-5)
        assert result.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert any(float(r.mutual_information.max()) > 1e-3 for r in generated)


@pytest.mark.parametrize("member", [0, 1])
def test_member_generation_equals_peft_generate_with_that_adapter(ensemble, tokenizer, member):
    max_new = 8
    generated = ensemble.generate(PROMPTS, strategy="member", member=member, max_new_tokens=max_new)
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    model = ensemble.model
    with torch.no_grad(), router_disabled(model):
        model.set_adapter(member_names(2)[member])
        reference = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )[:, width:]
    restore(ensemble)
    for result, row in zip(generated, reference.tolist()):
        expected = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
        assert result.token_ids == expected
        assert result.member == member
        assert len(result.entropy) == len(expected) and (result.entropy >= result.aleatoric - 1e-5).all()


def test_routed_generation_follows_the_prompt_posterior(ensemble, tokenizer):
    generated = ensemble.generate(PROMPTS, strategy="routed", max_new_tokens=4)
    log_prior = torch.tensor([0.6, 0.4], dtype=torch.float64).log()
    chosen = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        loglik = torch.zeros(2, dtype=torch.float64)
        for t in range(1, len(ids)):
            for k, name in enumerate(member_names(2)):
                loglik[k] += member_next_log_probs(ensemble, ids[:t], name)[ids[t]]
        chosen.append(int((log_prior + loglik).argmax()))
    restore(ensemble)
    assert [r.member for r in generated] == chosen
    for k in set(chosen):
        same = ensemble.generate([p for p, c in zip(PROMPTS, chosen) if c == k], strategy="member", member=k, max_new_tokens=4)
        assert [r.token_ids for r in same] == [r.token_ids for r, c in zip(generated, chosen) if c == k]


def test_sampling_chat_prompts_and_options(ensemble, tokenizer):
    kwargs = dict(max_new_tokens=5, do_sample=True, seed=3, temperature=0.8)
    first = ensemble.generate(PROMPTS, **kwargs)
    assert [r.token_ids for r in first] == [r.token_ids for r in ensemble.generate(PROMPTS, **kwargs)]
    # top-k = 1 sampling is greedy decoding
    greedy = ensemble.generate(PROMPTS, max_new_tokens=5)
    top1 = ensemble.generate(PROMPTS, max_new_tokens=5, do_sample=True, seed=1, top_k=1)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]
    # chat messages are rendered with the generation prompt
    messages = [[{"role": "user", "content": "Say hello."}]]
    rendered = tokenizer.apply_chat_template(messages[0], add_generation_prompt=True, tokenize=False)
    chat = ensemble.generate(messages, max_new_tokens=4)[0]
    assert chat.token_ids == ensemble.generate([rendered], max_new_tokens=4)[0].token_ids
    flagged = chat.uncertain_tokens(-1.0)
    assert [i for i, _, _ in flagged] == list(range(len(chat.token_ids)))
    with pytest.raises(ValueError, match="strategy"):
        ensemble.generate(PROMPTS, strategy="vote")
    with pytest.raises(ValueError, match="member"):
        ensemble.generate(PROMPTS, strategy="member", member=5)


def test_generation_stops_per_row_at_an_end_token(ensemble, tokenizer):
    free = ensemble.generate(PROMPTS, max_new_tokens=6)
    stop = free[0].token_ids[2]
    ensemble.model.get_base_model().generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    stopped = ensemble.generate(PROMPTS, max_new_tokens=6)
    for before, after in zip(free, stopped):
        ids = before.token_ids
        expected = ids[: ids.index(stop) + 1] if stop in ids else ids
        assert after.token_ids == expected
        assert after.finished == (stop in ids)
        torch.testing.assert_close(after.mutual_information, before.mutual_information[: len(expected)])
    assert stopped[0].finished and len(stopped[0].token_ids) == 3
