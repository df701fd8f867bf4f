r"""Choice-level predictions of an ensemble: multiple choice and preference pairs.

For a question x with choices :math:`c = 1 \dots C` every member k gives a distribution over the choices,

.. math::

    p_k(c \mid x) = \frac{\exp \ell_k(c)}{\sum_{c'} \exp \ell_k(c')}, \qquad \ell_k(c) = \log p(c \mid x, \theta_k)

(the sequence log-likelihood of the choice's text, optionally divided by its token count). The ensemble predicts the
mixture :math:`p(c) = \sum_k \pi_k p_k(c)` and its uncertainty decomposes (:func:`~trl_renyi.uncertainty.decompose`)
into total entropy :math:`H[p]`, aleatoric :math:`\sum_k \pi_k H[p_k]` and mutual information (epistemic).

For a preference pair the two choices are (chosen, rejected). Either by likelihood, as above, or by the DPO implicit
reward against a reference model:

.. math::

    p_k(\text{chosen}) = \sigma(m_k), \quad
    m_k = \beta\big[(\ell_k(y_w) - \ell_{\text{ref}}(y_w)) - (\ell_k(y_l) - \ell_{\text{ref}}(y_l))\big].

Responsibilities per choice use the member log-likelihood that training maximises for that example — the sequence
log-likelihood :math:`\ell_k(c)` (SFT), or :math:`\log p_k(c)` under the reward model (DPO) — at the ensemble's α:
:math:`r_k(c) = \operatorname{softmax}_k(\log \pi_k + (1-\alpha)\,\ell_k(c))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoding import is_conversational
from .objective import renyi_bound
from .uncertainty import decompose, mixture_log_prob


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


def predict_choices(
    ensemble,
    prompts: Sequence,
    choices: Sequence[Sequence],
    length_normalize: bool = False,
    batch_size: int = 8,
    show_progress: bool | None = None,
) -> list[ChoicePrediction]:
    """Multiple-choice predictions: one :class:`ChoicePrediction` per prompt, each over its own list of choices.

    All (prompt, choice) pairs are scored in member-batched forwards by ``ensemble.score``. With
    ``length_normalize`` a choice's score is its mean per-token log-likelihood instead of the sum.
    """
    flat_prompts, flat_completions, sizes = _flatten(prompts, choices)
    scores = ensemble.score(flat_prompts, flat_completions, batch_size=batch_size, show_progress=show_progress)
    loglik = scores.member_loglik.double()  # (M, K)
    choice_scores = loglik / scores.num_tokens.clamp(min=1).double().unsqueeze(-1) if length_normalize else loglik
    log_weights = ensemble.log_weights
    out, start = [], 0
    for size in sizes:
        block = choice_scores[start : start + size]  # (C, K)
        member_log_probs = torch.log_softmax(block.T, dim=-1)  # (K, C)
        out.append(prediction_from_member_log_probs(member_log_probs, log_weights, loglik[start : start + size], ensemble.alpha))
        start += size
    return out


def predict_preferences(
    ensemble,
    prompts: Sequence,
    chosen: Sequence,
    rejected: Sequence,
    reference=None,
    beta: float = 0.1,
    batch_size: int = 8,
    show_progress: bool | None = None,
) -> list[ChoicePrediction]:
    """Preference predictions over (chosen, rejected), choice 0 being the chosen response.

    Without ``reference`` the two responses are compared by likelihood (as :func:`predict_choices`). With a reference
    scorer (e.g. ``SingleModel.base_of(ensemble)``, the base model DPO uses as π_ref) each member's preference is the
    DPO implicit reward model :math:`p_k(\\text{chosen}) = \\sigma(m_k)` with strength ``beta``.
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(f"Got {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses.")
    if reference is None:
        pairs = [[c, r] for c, r in zip(chosen, rejected, strict=True)]
        return predict_choices(ensemble, prompts, pairs, batch_size=batch_size, show_progress=show_progress)
    flat_prompts, flat_completions, _ = _flatten(prompts, [[c, r] for c, r in zip(chosen, rejected, strict=True)])
    if reference.num_members != 1:
        raise ValueError(f"The reference must be one model (e.g. SingleModel.base_of(ensemble)), got {reference.num_members} members.")
    policy = ensemble.score(flat_prompts, flat_completions, batch_size=batch_size, show_progress=show_progress)
    ref = reference.score(flat_prompts, flat_completions, batch_size=batch_size, show_progress=show_progress)
    diff = (policy.member_loglik.double() - ref.member_loglik.double()).view(len(prompts), 2, -1)  # (N, 2, K)
    margins = float(beta) * (diff[:, 0] - diff[:, 1])  # (N, K)
    out = []
    for m in margins:
        loglik = torch.stack([F.logsigmoid(m), F.logsigmoid(-m)])  # (2, K): log p_k(chosen), log p_k(rejected)
        out.append(prediction_from_member_log_probs(loglik.T, ensemble.log_weights, loglik, ensemble.alpha))
    return out
