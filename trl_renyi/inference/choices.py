r"""Choice-level predictions of an ensemble: multiple choice and preference pairs.

For a question x with choices :math:`c = 1 \dots C` every member k gives a distribution over the choices,

.. math::

    p_k(c \mid x) = \frac{\exp \ell_k(c)}{\sum_{c'} \exp \ell_k(c')}, \qquad \ell_k(c) = \log p(c \mid x, \theta_k)

(the sequence log-likelihood of the choice's text, optionally divided by its token count). The ensemble predicts the
mixture :math:`p(c) = \sum_k \pi_k p_k(c)` and its uncertainty decomposes
(:func:`~trl_renyi.inference.uncertainty.decompose`)
into total entropy :math:`H[p]`, aleatoric :math:`\sum_k \pi_k H[p_k]` and mutual information (epistemic).

For a preference pair the two choices are (chosen, rejected). Either by likelihood, as above, or by the DPO implicit
reward against a reference model:

.. math::

    p_k(\text{chosen}) = \sigma(m_k), \quad
    m_k = \beta\big[f'(\ell_k(y_w) - \ell_{\text{ref}}(y_w)) - f'(\ell_k(y_l) - \ell_{\text{ref}}(y_l))\big]

with the β, loss type, label smoothing and f-divergence the ensemble was trained with
(:class:`~trl_renyi.preference.PreferenceLikelihood`, recorded in ``renyi_ensemble.json``).

The choices of a question share their prompt: it runs through the model once (K tiled rows), its KV cache is
copied to every choice, and only the choices' own tokens are computed — for short answers after a chat prompt
that is most of the work saved.

Responsibilities per choice use the member log-likelihood that training maximises for that example — the sequence
log-likelihood :math:`\ell_k(c)` (SFT), or :math:`\log p_k(c)` under the reward model (DPO) — at the ensemble's α:
:math:`r_k(c) = \operatorname{softmax}_k(\log \pi_k + (1-\alpha)\,\ell_k(c))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trl_renyi.inference.encoding import encode_prompt_completion, is_conversational
from trl_renyi.inference.scoring import CACHE_KEY, MemberModel, score_completions
from trl_renyi.inference.uncertainty import decompose, mixture_log_prob
from trl_renyi.model.modes import eval_mode
from trl_renyi.objective import renyi_bound
from trl_renyi.preference import PreferenceLikelihood


@dataclass
class ChoicePrediction:
    """The ensemble's prediction for one question with C choices (K members).

    Attributes:
        probs: ``(C,)`` mixture probabilities :math:`\\sum_k \\pi_k p_k(c)` (sum to 1).
        member_probs: ``(K, C)`` each member's normalised choice probabilities.
        entropy: total entropy of ``probs`` (nats).
        aleatoric: :math:`\\sum_k \\pi_k H[p_k]`.
        mutual_information: ``entropy − aleatoric``, the members' disagreement (epistemic).
        member_loglik: ``(C, K)`` the score of each choice under each member (sequence log-likelihood, or the
            reward-model log-probability for preference pairs scored by reward).
        responsibilities: ``(C, K)`` routing weights of each choice at the ensemble's α.
    """

    probs: torch.Tensor
    member_probs: torch.Tensor
    entropy: float
    aleatoric: float
    mutual_information: float
    member_loglik: torch.Tensor
    responsibilities: torch.Tensor

    @property
    def prediction(self) -> int:
        """Index of the most probable choice."""
        return int(self.probs.argmax())

    def to_dict(self) -> dict:
        """The prediction as JSON-ready values."""
        return {
            "probs": self.probs.tolist(),
            "member_probs": self.member_probs.tolist(),
            "prediction": self.prediction,
            "entropy": self.entropy,
            "aleatoric": self.aleatoric,
            "mutual_information": self.mutual_information,
            "member_loglik": self.member_loglik.tolist(),
            "responsibilities": self.responsibilities.tolist(),
        }


def prediction_from_member_log_probs(
    member_log_probs: torch.Tensor, log_weights: torch.Tensor, member_loglik: torch.Tensor, alpha: float
) -> ChoicePrediction:
    """Build a :class:`ChoicePrediction` from normalised member log-probabilities ``(K, C)`` over the choices and the
    per-choice training log-likelihoods ``(C, K)`` that drive the responsibilities."""
    member_log_probs = member_log_probs.double()
    lw = log_weights.double()
    parts = decompose(member_log_probs, lw)
    probs = mixture_log_prob(member_log_probs, lw).exp()
    probs = probs / probs.sum()
    return ChoicePrediction(
        probs=probs.float(),
        member_probs=member_log_probs.exp().float(),
        entropy=float(parts.total),
        aleatoric=float(parts.aleatoric),
        mutual_information=float(parts.mutual_information),
        member_loglik=member_loglik.float(),
        responsibilities=renyi_bound(member_loglik.double(), alpha, lw).responsibilities.float(),
    )


def _as_completion(prompt, choice):
    """A choice in the prompt's format: plain strings stay as they are; with a conversational prompt a plain-string
    choice becomes one assistant message."""
    if is_conversational(prompt) and isinstance(choice, str):
        return [{"role": "assistant", "content": choice}]
    return choice


def _flatten(prompts: Sequence, choices: Sequence[Sequence]) -> tuple[list, list, list[int]]:
    if len(prompts) != len(choices):
        raise ValueError(f"Got {len(prompts)} prompts but {len(choices)} lists of choices.")
    flat_prompts, flat_completions, sizes = [], [], []
    for i, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
        if isinstance(options, (str, dict)) or len(options) < 1:
            raise ValueError(f"choices[{i}] must be a non-empty list of choices, got {options!r}.")
        sizes.append(len(options))
        for option in options:
            flat_prompts.append(prompt)
            flat_completions.append(_as_completion(prompt, option))
    return flat_prompts, flat_completions, sizes


def _shared_prefix(encoded: list[tuple[list[int], int]]) -> int:
    """Length of the token prefix shared by all choices of a question, never past a completion's start."""
    limit = min(start for _, start in encoded)
    first = encoded[0][0]
    length = 0
    while length < limit and all(len(ids) > length and ids[length] == first[length] for ids, _ in encoded):
        length += 1
    return length


def _question_groups(questions: list[list[tuple[list[int], int]]], prefixes: list[int], batch_size: int) -> list[list[int]]:
    """Questions in groups whose choices together stay within ``batch_size`` rows (at least one question per group).

    Questions are taken in order of their shared prefix's length (then their longest choice), so a group's prefixes
    need little left padding and its choices little right padding.
    """
    order = sorted(range(len(questions)), key=lambda q: (prefixes[q], max(len(ids) for ids, _ in questions[q])))
    groups, group, rows = [], [], 0
    for q in order:
        size = len(questions[q])
        if group and rows + size > batch_size:
            groups.append(group)
            group, rows = [], 0
        group.append(q)
        rows += size
    groups.append(group)
    return groups


@torch.no_grad()
def _score_group(
    members: MemberModel, questions: list[list[tuple[list[int], int]]], prefixes: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(member_loglik (M, K), num_tokens (M,))`` of the M choices of a few questions (``prefixes``: the length of
    each question's shared prefix), their prompts computed once."""
    device = members.device
    rows = [(q, ids, start) for q, encoded in enumerate(questions) for ids, start in encoded]
    # 1. every question's shared prefix, left-padded, through all members: KV cache of K·Q rows
    width = max(prefixes)
    prefix_ids = torch.full((len(questions), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(questions), width), dtype=torch.long)
    for q, (encoded, length) in enumerate(zip(questions, prefixes, strict=True)):
        prefix_ids[q, width - length :] = torch.tensor(encoded[0][0][:length])
        prefix_mask[q, width - length :] = 1
    position_ids = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    out = members.forward(
        {"input_ids": prefix_ids, "attention_mask": prefix_mask, "position_ids": position_ids}, use_cache=True, logits_to_keep=1
    )
    last_log_probs = torch.log_softmax(out.logits[:, :, -1].float(), dim=-1)  # (K, Q, V): predicts each suffix's 1st token
    cache = getattr(out, CACHE_KEY)
    del out
    # 2. the cache copied to every choice (member-major, as the model tiles the choice rows)
    owner = torch.tensor([q for q, _, _ in rows], device=device)
    num_questions = len(questions)
    cache.reorder_cache(torch.cat([k * num_questions + owner for k in range(members.num_members)]))
    # 3. the choices' own tokens, right-padded, after their prefix
    suffixes = [(ids[prefixes[q] :], start - prefixes[q]) for q, ids, start in rows]
    span = max(len(ids) for ids, _ in suffixes)
    suffix_ids = torch.full((len(rows), span), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(rows), span), dtype=torch.long)
    scored = torch.zeros((len(rows), span), dtype=torch.bool)
    for j, (ids, start) in enumerate(suffixes):
        suffix_ids[j, : len(ids)] = torch.tensor(ids)
        suffix_mask[j, : len(ids)] = 1
        scored[j, start : len(ids)] = True
    lengths = torch.tensor(prefixes)[owner.cpu()]
    batch = {
        "input_ids": suffix_ids,
        "attention_mask": torch.cat([prefix_mask[owner.cpu()], suffix_mask], dim=-1),
        "position_ids": lengths[:, None] + torch.arange(span)[None],
    }
    log_probs = last_log_probs[:, owner, None]  # (K, M, 1, V)
    if span > 1:  # logits at suffix positions 0 … span-2 predict suffix tokens 1 … span-1
        kwargs = {"use_cache": True, "logits_to_keep": torch.arange(span - 1), CACHE_KEY: cache}
        logits = members.forward(batch, **kwargs).logits
        log_probs = torch.cat([log_probs, torch.log_softmax(logits.float(), dim=-1)], dim=2)
    targets = suffix_ids.to(log_probs.device)
    token = log_probs.gather(-1, targets[None, ..., None].expand(log_probs.shape[0], -1, -1, 1)).squeeze(-1)
    scored = scored.to(token.device)
    return (token * scored).sum(-1).T.cpu(), scored.sum(-1).cpu()


def choice_log_likelihoods(
    members: MemberModel, prompts: Sequence, choices: Sequence[Sequence], batch_size: int = 8, show_progress: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sequence log-likelihoods of every choice under every member, prompts shared within a question.

    Returns ``(member_loglik (M, K), num_tokens (M,), sizes)`` for the M choices in order (``sizes``: choices per
    question). Tokenisation is exactly that of :meth:`RenyiEnsemble.score` (TRL's prompt/completion rendering).
    """
    if members.tokenizer is None:
        raise ValueError("This model has no tokenizer; pass one to RenyiEnsemble or from_pretrained.")
    flat_prompts, flat_completions, sizes = _flatten(prompts, choices)
    tokenizer = members.tokenizer
    pad_id = members.pad_token_id
    chat = members.chat
    encoded = [encode_prompt_completion(tokenizer, p, c, chat) for p, c in zip(flat_prompts, flat_completions, strict=True)]
    questions, start = [], 0
    for size in sizes:
        questions.append(encoded[start : start + size])
        start += size
    prefixes = [_shared_prefix(q) for q in questions]
    if 0 in prefixes:  # nothing to share (e.g. empty prompts): score the pairs whole
        scores = score_completions(members, flat_prompts, flat_completions, batch_size, show_progress)
        return scores.member_loglik, scores.num_tokens, sizes
    groups = _question_groups(questions, prefixes, batch_size)
    if show_progress is None:
        show_progress = len(groups) > 4
    first_row = [0]
    for size in sizes:
        first_row.append(first_row[-1] + size)
    loglik, num_tokens, rows = [], [], []
    with eval_mode(members.model):
        for group in tqdm(groups, desc="scoring choices", disable=not show_progress):
            ll, n = _score_group(members, [questions[q] for q in group], [prefixes[q] for q in group], pad_id)
            loglik.append(ll)
            num_tokens.append(n)
            rows.extend(row for q in group for row in range(first_row[q], first_row[q + 1]))
    inverse = torch.argsort(torch.tensor(rows))  # back to the order of the choices given
    return torch.cat(loglik)[inverse], torch.cat(num_tokens)[inverse], sizes


def predict_choices(
    members: MemberModel,
    prompts: Sequence,
    choices: Sequence[Sequence],
    length_normalize: bool = False,
    batch_size: int = 8,
    show_progress: bool | None = None,
) -> list[ChoicePrediction]:
    """Multiple-choice predictions: one :class:`ChoicePrediction` per prompt, each over its own list of choices.

    The choices are scored in member-batched forwards, each prompt computed once (:func:`choice_log_likelihoods`;
    ``batch_size`` counts choices). With ``length_normalize`` a choice's score is its mean per-token log-likelihood
    instead of the sum.
    """
    member_loglik, num_tokens, sizes = choice_log_likelihoods(members, prompts, choices, batch_size, show_progress)
    loglik = member_loglik.double()  # (M, K)
    choice_scores = loglik / num_tokens.clamp(min=1).double().unsqueeze(-1) if length_normalize else loglik
    log_weights = members.log_weights
    out, start = [], 0
    for size in sizes:
        block = choice_scores[start : start + size]  # (C, K)
        member_log_probs = torch.log_softmax(block.T, dim=-1)  # (K, C)
        out.append(prediction_from_member_log_probs(member_log_probs, log_weights, loglik[start : start + size], members.alpha))
        start += size
    return out


def predict_preferences(
    members: MemberModel,
    prompts: Sequence,
    chosen: Sequence,
    rejected: Sequence,
    reference=None,
    likelihood: PreferenceLikelihood | None = None,
    batch_size: int = 8,
    show_progress: bool | None = None,
) -> list[ChoicePrediction]:
    r"""Preference predictions over (chosen, rejected), choice 0 being the chosen response.

    Without ``reference`` the two responses are compared by likelihood (as :func:`predict_choices`). With a reference
    model (e.g. ``SingleModel.base_of(ensemble).members``, the base model DPO uses as π_ref) each member's preference
    is the DPO implicit reward model at the margin :math:`m_k` of ``likelihood`` (the ensemble's own
    :class:`~trl_renyi.preference.PreferenceLikelihood`: β, divergence): ``member_probs`` are :math:`\sigma(\pm m_k)`
    and ``member_loglik`` the training log-likelihoods ℓ(m_k) (chosen) and ℓ(−m_k) (rejected) — the same function
    training used, so scoring the training pairs reproduces the trainer's ℓ.
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(f"Got {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses.")
    if reference is None:
        pairs = [[c, r] for c, r in zip(chosen, rejected, strict=True)]
        return predict_choices(members, prompts, pairs, batch_size=batch_size, show_progress=show_progress)
    if likelihood is None:
        raise ValueError("scoring preferences by reward needs the preference likelihood (β, loss type, divergence)")
    likelihood.check_scorable()
    if reference.num_members != 1:
        raise ValueError(
            f"The reference must be one model (e.g. SingleModel.base_of(ensemble)), got {reference.num_members} members."
        )
    pairs = [[c, r] for c, r in zip(chosen, rejected, strict=True)]
    policy, _, _ = choice_log_likelihoods(members, prompts, pairs, batch_size, show_progress)
    ref, _, _ = choice_log_likelihoods(reference, prompts, pairs, batch_size, show_progress)
    diff = (policy.double() - ref.double()).view(len(prompts), 2, -1)  # (N, 2, K) log-ratios
    margins = likelihood.margins(diff[:, 0], diff[:, 1])  # (N, K)
    out = []
    for m in margins:
        member_log_probs = torch.stack([F.logsigmoid(m), F.logsigmoid(-m)], dim=-1)  # (K, 2)
        loglik = torch.stack([likelihood.loglik(m), likelihood.loglik(-m)])  # (2, K)
        out.append(prediction_from_member_log_probs(member_log_probs, members.log_weights, loglik, members.alpha))
    return out
