"""The scoring core: a model seen as K member distributions behind a plain forward function, and completion scoring.

Choice prediction (:mod:`trl_renyi.inference.choices`), generation (:mod:`trl_renyi.inference.generation`) and the
scorer classes (:mod:`trl_renyi.inference.ensemble`, :mod:`trl_renyi.inference.baseline`) meet here: a scorer hands
the helpers a :class:`MemberModel` (its forward function, tokenizer and mixture weights), so the helpers never call
back into the class that uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.modeling_outputs import CausalLMOutputWithPast

from trl_renyi.inference.encoding import collate_scoring_batch, encode_prompt_completion
from trl_renyi.inference.uncertainty import decompose
from trl_renyi.model.modes import eval_mode
from trl_renyi.objective import floored_renyi_bound, renyi_bound

# the KV cache's keyword (input and output): ``cache`` in recent transformers, ``past_key_values`` before
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class MemberModel:
    """A model seen as K member distributions: what scoring, choice prediction and generation need of a scorer.

    Attributes:
        model: the module (its device, its train / eval mode and its ``generation_config``).
        forward: ``forward(batch, **model_kwargs)``, the model's output for ``batch`` (B rows, no gradients) with
            ``logits`` shaped ``(K, B, T', V)``; ``model_kwargs`` (a KV cache, ``use_cache``, ``logits_to_keep``) go to
            the model as they are.
        tokenizer: the tokenizer (``None`` when the scorer has none).
        member_names: the K member names, in the order of the logits' first dimension.
        log_weights: ``(K,)`` log mixture weights log π_k.
        alpha: the Rényi order of the reported responsibilities.
        responsibility_floor: λ of the reported responsibilities ``(1−λ)·r_ik + λ·π_k``.
        chat: whether plain-string prompts (and completions) are rendered with the tokenizer's chat template.
    """

    model: torch.nn.Module
    forward: Callable
    tokenizer: object
    member_names: list[str]
    log_weights: torch.Tensor
    alpha: float
    responsibility_floor: float
    chat: bool

    @property
    def num_members(self) -> int:
        """K, the number of members."""
        return len(self.member_names)

    @property
    def device(self) -> torch.device:
        """The device the model's parameters live on."""
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's padding id (its end-of-sequence id when it has none)."""
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class ScoreResult:
    """Per-example scores of prompt/completion pairs under every member and the mixture (N examples, K members).

    Attributes:
        member_loglik: ``(N, K)`` ℓ_ik, summed log-probability of the completion under member k.
        loglik: ``(N,)`` mixture log-likelihood ``log Σ_k π_k p_ik``.
        responsibilities: ``(N, K)`` routing weights ``softmax_k(log π_k + (1-α) ℓ_ik)`` at the ensemble's α.
        num_tokens: ``(N,)`` completion tokens scored.
        mutual_information: ``(N,)`` mean per-token mutual information (epistemic) over the completion.
        mutual_information_max: ``(N,)`` its maximum over the completion tokens.
        entropy: ``(N,)`` mean per-token total predictive entropy.
        aleatoric: ``(N,)`` mean per-token expected member entropy.
        loglik_std: ``(N,)`` standard deviation of ℓ_ik across members.
    """

    member_loglik: torch.Tensor
    loglik: torch.Tensor
    responsibilities: torch.Tensor
    num_tokens: torch.Tensor
    mutual_information: torch.Tensor
    mutual_information_max: torch.Tensor
    entropy: torch.Tensor
    aleatoric: torch.Tensor
    loglik_std: torch.Tensor


def score_completions(
    members: MemberModel, prompts, completions, batch_size: int = 8, show_progress: bool | None = None
) -> ScoreResult:
    """Score completions under every member in member-batched forwards (no gradients; see ``EnsembleScorer.score``)."""
    if members.tokenizer is None:
        raise ValueError("This ensemble has no tokenizer; pass one to RenyiEnsemble or from_pretrained.")
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
    tokenizer, chat = members.tokenizer, members.chat
    encoded = [encode_prompt_completion(tokenizer, p, c, chat) for p, c in zip(prompts, completions, strict=True)]
    # batches of similar lengths: little padding, and the completions' columns (the only ones that go through the
    # LM head) line up; results come back in the caller's order
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), encoded[i][1]))
    starts = range(0, len(encoded), batch_size)
    if show_progress is None:
        show_progress = len(encoded) > 4 * batch_size
    fields: dict[str, list[torch.Tensor]] = {}
    with eval_mode(members.model):
        for start in tqdm(starts, desc="scoring", disable=not show_progress):
            batch = collate_scoring_batch([encoded[i] for i in order[start : start + batch_size]], members.pad_token_id)
            for key, value in _score_batch(members, batch).items():
                fields.setdefault(key, []).append(value)
    inverse = torch.argsort(torch.tensor(order))
    out = {key: torch.cat(values)[inverse] for key, values in fields.items()}
    bound = floored_renyi_bound(out["member_loglik"], members.alpha, members.log_weights, members.responsibility_floor)
    out["responsibilities"] = bound.responsibilities
    out["loglik"] = renyi_bound(out["member_loglik"], 0.0, members.log_weights).value
    out["loglik_std"] = out["member_loglik"].std(dim=-1, unbiased=False)
    return ScoreResult(**out)


def _score_batch(members: MemberModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # only the columns that predict a completion token go through the LM head (prompts are often most tokens)
    scored = (batch["labels"][:, 1:] != -100).any(0).nonzero().flatten()
    first, last = (int(scored[0]), int(scored[-1])) if len(scored) else (0, 0)
    logits = members.forward(batch, use_cache=False, logits_to_keep=torch.arange(first, last + 1)).logits  # (K, B, T', V)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    labels = batch["labels"][:, 1 + first : 2 + last].to(log_probs.device)
    mask = labels != -100
    token_lp = log_probs.gather(-1, labels.clamp(min=0)[None, ..., None].expand(members.num_members, -1, -1, 1))
    token_lp = token_lp.squeeze(-1) * mask  # (K, B, T-1)
    member_loglik = token_lp.sum(-1).T.cpu()  # (B, K)
    parts = decompose(log_probs, members.log_weights.to(log_probs.device))  # each (B, T-1)
    num_tokens = mask.sum(-1).clamp(min=1)
    mean = lambda x: ((x * mask).sum(-1) / num_tokens).cpu()
    return {
        "member_loglik": member_loglik,
        "num_tokens": mask.sum(-1).cpu(),
        "mutual_information": mean(parts.mutual_information),
        "mutual_information_max": parts.mutual_information.masked_fill(~mask, 0.0).amax(-1).cpu(),
        "entropy": mean(parts.total),
        "aleatoric": mean(parts.aleatoric),
    }
