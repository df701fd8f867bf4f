r"""Text generation from an ensemble, with per-token uncertainty.

All K members decode together: the prompts (left-padded) are tiled K times, one member-batched forward fills a
KV cache of K·B rows, and each step feeds one new token per prompt (tiled) through that cache. At step t every member
gives a next-token distribution :math:`p_k(\cdot \mid x, y_{<t})` and the ensemble's belief in each member is the
posterior given the text produced so far,

.. math::

    w_k(t) \propto \pi_k \, p_k(y_{<t} \mid x) = \pi_k \prod_{s<t} p_k(y_s \mid x, y_{<s}).

Strategies:

* ``"mixture"``: draw :math:`y_t` from the Bayesian model average :math:`\sum_k w_k(t)\, p_k(\cdot)`. Token by
  token this samples exactly from the sequence mixture :math:`\sum_k \pi_k p_k(y \mid x)`.
* ``"member"``: draw from one given member (identical to generating with that adapter alone).
* ``"routed"``: draw from the member with the highest posterior given the prompt,
  :math:`\arg\max_k \log \pi_k + \log p_k(x)` (the prompt's own log-likelihood, first token excluded).

Whatever the strategy, every step reports the ensemble's uncertainty about the next token under the weights
:math:`w(t)` (:func:`~trl_renyi.inference.uncertainty.decompose`): total entropy, aleatoric part and mutual information. High
mutual information marks the tokens where members disagree — the spans to flag or abstain on.

Decoding options follow ``transformers``' ``generate``: greedy by default; with ``do_sample`` the distribution is
processed by ``transformers``' temperature, top-k and top-p warpers before sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trl_renyi.inference.encoding import encode_prompt
from trl_renyi.inference.scoring import CACHE_KEY, MemberModel
from trl_renyi.inference.uncertainty import decompose, mixture_log_prob
from trl_renyi.model.modes import eval_mode

STRATEGIES = ("mixture", "member", "routed")
MEASURES = ("entropy", "aleatoric", "mutual_information")


@dataclass
class GeneratedText:
    """One generated continuation and its per-token uncertainty (T generated tokens, K members).

    Attributes:
        text: the decoded continuation (special tokens skipped).
        token_ids: the T generated token ids (a final eos included).
        tokens: each token decoded on its own, to align the per-token values with text.
        entropy: ``(T,)`` total entropy of the ensemble's next-token distribution at each step (nats).
        aleatoric: ``(T,)`` its aleatoric part :math:`\\sum_k w_k H[p_k]`.
        mutual_information: ``(T,)`` its epistemic part (members' disagreement).
        member_posterior: ``(K,)`` :math:`w_k \\propto \\pi_k p_k(y \\mid x)` after the whole continuation.
        member: the member that produced the tokens (``"member"`` / ``"routed"``), ``None`` for the mixture.
        finished: whether generation stopped at an end-of-sequence token (else at ``max_new_tokens``).
    """

    text: str
    token_ids: list[int]
    tokens: list[str]
    entropy: torch.Tensor
    aleatoric: torch.Tensor
    mutual_information: torch.Tensor
    member_posterior: torch.Tensor
    member: int | None
    finished: bool

    def uncertain_tokens(self, threshold: float, measure: str = "mutual_information") -> list[tuple[int, str, float]]:
        """``(position, token, value)`` of the tokens whose ``measure`` exceeds ``threshold``."""
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}.")
        values = getattr(self, measure)
        return [(i, self.tokens[i], float(v)) for i, v in enumerate(values) if float(v) > threshold]

    def to_dict(self) -> dict:
        """The generation as JSON-ready values."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "entropy": self.entropy.tolist(),
            "aleatoric": self.aleatoric.tolist(),
            "mutual_information": self.mutual_information.tolist(),
            "member_posterior": self.member_posterior.tolist(),
            "member": self.member,
            "finished": self.finished,
        }


def _eos_ids(members: MemberModel) -> list[int]:
    ids = set()
    if members.tokenizer.eos_token_id is not None:
        ids.add(int(members.tokenizer.eos_token_id))
    config_eos = getattr(getattr(members.model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    return sorted(ids)


def _resolve_member(members: MemberModel, member) -> int:
    if isinstance(member, str) and member in members.member_names:
        return members.member_names.index(member)
    if isinstance(member, int) and not isinstance(member, bool) and 0 <= member < members.num_members:
        return member
    raise ValueError(
        f"strategy='member' needs `member`: an index in [0, {members.num_members}) or one of "
        f"{members.member_names}, got {member!r}."
    )


def _warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if not do_sample:
        return processors
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k > 0:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask


def prompt_log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` log-likelihood of each (left-padded) prompt under each member from its logits ``(K, B, T, V)``:
    the sum of :math:`\\log p_k(x_t \\mid x_{<t})` over the prompt's tokens after its first."""
    targets = input_ids[:, 1:]
    mask = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    out = []
    for member_logits in logits:  # one member at a time bounds the float32 log-softmax memory
        log_probs = torch.log_softmax(member_logits[:, :-1].float(), dim=-1)
        token = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        out.append((token * mask).sum(-1))
    return torch.stack(out, dim=-1)


@torch.no_grad()
def generate(
    members: MemberModel,
    prompts: Sequence,
    strategy: str = "mixture",
    member: int | str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    show_progress: bool | None = None,
) -> list[GeneratedText]:
    """Generate a continuation for every prompt: chat messages rendered with the generation prompt; plain strings as
    one user message when ``members.chat`` (the tokenizer has a chat template, unless ``use_chat_template=False``),
    else as plain text.

    Args:
        members: the model as K member distributions (``RenyiEnsemble.members``, ``SingleModel.members``).
        strategy: ``"mixture"``, ``"member"`` or ``"routed"`` (see the module docstring).
        member: the member (index or name) for ``strategy="member"``.
        max_new_tokens: maximum number of generated tokens per prompt.
        do_sample, temperature, top_k, top_p: sampling options, as in ``transformers``; greedy when not sampling.
        seed: seed of the sampling generator (reproducible sampling).
        batch_size: prompts per member-batched pass.
    """
    if members.tokenizer is None:
        raise ValueError("This ensemble has no tokenizer; pass one to RenyiEnsemble or from_pretrained.")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    fixed_member = _resolve_member(members, member) if strategy == "member" else None
    if strategy != "member" and member is not None:
        raise ValueError(f"`member` only applies to strategy='member' (got strategy={strategy!r}).")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    processors = _warpers(do_sample, temperature, top_k, top_p)
    tokenizer = members.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chat = members.chat
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("Every prompt must encode to at least one token.")
    generator = None
    if do_sample:
        generator = torch.Generator(device=members.device)
        generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**63))
    if show_progress is None:
        show_progress = len(encoded) > batch_size
    results: list[GeneratedText] = []
    with eval_mode(members.model):
        for start in tqdm(range(0, len(encoded), batch_size), desc="generating", disable=not show_progress):
            results += _generate_batch(
                members,
                encoded[start : start + batch_size],
                strategy,
                fixed_member,
                max_new_tokens,
                do_sample,
                processors,
                generator,
                pad_id,
                _eos_ids(members),
            )
    return results


def _generate_batch(members: MemberModel, rows, strategy, fixed_member, max_new_tokens, do_sample, processors, generator, pad_id, eos_ids):
    device = members.device
    input_ids, attention_mask = _left_pad(rows, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = len(rows)
    rows_index = torch.arange(batch, device=device)
    # the routed strategy needs every prompt position's logits (prompt likelihood), the others the last one only
    outputs = members.forward(
        {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids},
        use_cache=True,
        logits_to_keep=0 if strategy == "routed" else 1,
    )
    log_prior = members.log_weights.to(device=device, dtype=torch.float32)
    if strategy == "routed":
        chosen = (log_prior + prompt_log_likelihood(outputs.logits, input_ids, attention_mask)).argmax(-1)
    elif strategy == "member":
        chosen = torch.full((batch,), fixed_member, device=device, dtype=torch.long)
    else:
        chosen = None
    step_log_probs = torch.log_softmax(outputs.logits[:, :, -1].float(), dim=-1)  # (K, B, V)
    cache = getattr(outputs, CACHE_KEY)
    del outputs
    log_posterior = log_prior.expand(batch, -1).clone()  # (B, K): log π_k + log p_k(generated so far)
    sequences = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    records = {key: [[] for _ in range(batch)] for key in ("token", *MEASURES)}
    for step in range(max_new_tokens):
        weights = log_posterior - torch.logsumexp(log_posterior, dim=-1, keepdim=True)
        parts = decompose(step_log_probs, weights.T)
        if chosen is None:
            scores = mixture_log_prob(step_log_probs, weights.T)
        else:
            scores = step_log_probs[chosen, rows_index]
        scores = processors(sequences, scores)
        if do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)
        else:
            next_tokens = scores.argmax(-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        active = ~finished
        for i in active.nonzero().flatten().tolist():
            records["token"][i].append(int(next_tokens[i]))
            records["entropy"][i].append(float(parts.total[i]))
            records["aleatoric"][i].append(float(parts.aleatoric[i]))
            records["mutual_information"][i].append(float(parts.mutual_information[i]))
        token_log_probs = step_log_probs[:, rows_index, next_tokens].T  # (B, K)
        log_posterior = torch.where(active[:, None], log_posterior + token_log_probs, log_posterior)
        finished = finished | torch.isin(next_tokens, eos)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
        if finished.all() or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        outputs = members.forward(
            {"input_ids": next_tokens[:, None], "attention_mask": attention_mask, "position_ids": position_ids},
            use_cache=True,
            **{CACHE_KEY: cache},
        )
        cache = getattr(outputs, CACHE_KEY)
        step_log_probs = torch.log_softmax(outputs.logits[:, :, -1].float(), dim=-1)
        del outputs
    posterior = torch.softmax(log_posterior, dim=-1).cpu()
    tokenizer = members.tokenizer
    out = []
    for i in range(batch):
        ids = records["token"][i]
        out.append(
            GeneratedText(
                text=tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                tokens=[tokenizer.decode([t]) for t in ids],
                entropy=torch.tensor(records["entropy"][i]),
                aleatoric=torch.tensor(records["aleatoric"][i]),
                mutual_information=torch.tensor(records["mutual_information"][i]),
                member_posterior=posterior[i],
                member=None if chosen is None else int(chosen[i]),
                finished=bool(ids) and ids[-1] in eos_ids,
            )
        )
    return out
