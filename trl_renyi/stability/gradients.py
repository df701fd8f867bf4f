r"""The gradient passes of the stability criterion: votes in, a :class:`~trl_renyi.stability.criterion.GradientTable`
out (the per-example gradients of one LoRA adapter, sketched; :mod:`trl_renyi.model.per_example`).

Every pass is a padded batch of independent sequences, one forward with the adapter's layers recorded, and one
backward per set of targets; log-probabilities are computed at the scored positions only (the backbone, then the LM
head on those positions). The model runs in evaluation mode, without gradient checkpointing, and with the adapter's
weights requiring gradients; every setting is restored afterwards and no parameter's ``.grad`` is touched.

* choices: one sequence per (item, option); :math:`s_c` its summed log-probability, :math:`p = \operatorname{softmax}(s)`
  over the item's options, and the score vectors :math:`g_c = \nabla s_c - \sum_{c'} p_{c'} \nabla s_{c'}`;
* free text: one sequence per vote; the data vector is the gradient of the observed completion's log-probability, and
  ``fisher_samples`` + ``null_samples`` completions are drawn token by token from the model along the same prefix
  (:math:`\tilde y_t \sim p_\theta(\cdot \mid x, y_{<t})`), their gradients estimating the Fisher and, held apart,
  the null;
* pairs: chosen and rejected sequences, the margin :math:`m = \beta[(s_w - s_w^{ref}) - (s_l - s_l^{ref})]` with the
  base model as reference, :math:`\nabla m = \beta(\nabla s_w - \nabla s_l)`; outcomes "chosen preferred"
  (:math:`\sigma(-m)\nabla m`, probability :math:`\sigma(m)`) and "rejected preferred" (:math:`-\sigma(m)\nabla m`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from trl_renyi.compat import disable_gradient_checkpointing, quiet_checkpointing_alias
from trl_renyi.model.layer import base_model_only, member_routing
from trl_renyi.model.lm_head import supports_completion_head
from trl_renyi.model.modes import eval_mode, is_activation_checkpointing
from trl_renyi.model.per_example import LoraGradientCapture, adapter_requires_grad
from trl_renyi.model.shared_prompt import (
    attention_implementation,
    pack_shared_prompts,
    shared_prompt_refusal,
)
from trl_renyi.stability.criterion import GradientTable
from trl_renyi.stability.votes import ChoiceVotes, PairVotes, SequenceVotes

#: tokens per gradient batch (rows × padded length)
TOKENS_PER_BATCH = 512


def _router(model):
    return getattr(model, "member_router", None)


def active_adapter(model, adapter: str | None) -> str:
    """The adapter to measure: ``adapter``, or the model's one active PEFT adapter."""
    if adapter is not None:
        return adapter
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
    active = [a for a in active if a]
    if len(active) != 1:
        raise ValueError(f"name the adapter to measure: the model has {len(active)} active adapters {active}")
    return active[0]


@contextmanager
def measuring(model, adapter: str, checkpointing_kwargs: dict | None = None):
    """The model as one adapter, in evaluation mode, without gradient checkpointing (switched on again afterwards with
    ``checkpointing_kwargs``, e.g. the trainer's ``gradient_checkpointing_kwargs``), its weights requiring gradients."""
    router = _router(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        if is_activation_checkpointing(base):
            stack.enter_context(quiet_checkpointing_alias())
            stack.enter_context(disable_gradient_checkpointing(base, checkpointing_kwargs))
        stack.enter_context(adapter_requires_grad(model, adapter))
        if router is not None:
            if adapter not in router.member_names:
                raise ValueError(f"{adapter!r} is not a member of this ensemble ({router.member_names})")
            stack.enter_context(member_routing(model, names=[adapter]))
        else:
            active = getattr(model, "active_adapters", [])
            if active and list(active) != [adapter]:
                raise ValueError(f"adapter {adapter!r} is not the active adapter ({list(active)}); call set_adapter first")
        stack.enter_context(torch.enable_grad())
        yield


@contextmanager
def reference_model(model):
    """The base model with every adapter switched off (DPO's reference)."""
    if _router(model) is not None:
        with base_model_only(model):
            yield
    else:
        with model.disable_adapter():
            yield


def _pad(sequences: list[list[int]], labels: list[list[int]], pad_id: int, device):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    lab = torch.full((len(sequences), width), -100, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(sequences, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return ids.to(device), lab.to(device), mask.to(device)


def _batches(lengths: list[int], tokens: int = TOKENS_PER_BATCH):
    """Index batches of sequences sorted by length, each within ``tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batch, width = [], 0
    for i in order:
        if batch and max(width, lengths[i]) * (len(batch) + 1) > tokens:
            yield batch
            batch, width = [], 0
        batch.append(i)
        width = max(width, lengths[i])
    if batch:
        yield batch


def position_logits(model, inputs: dict):
    """``(logits (n, V), row (n,), target (n,), position (n,))`` at the positions whose next-token label is scored
    (``inputs``: ``input_ids``, ``labels`` and the attention inputs; ``position`` is the flat index into the shifted
    ``(rows, T − 1)`` grid)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"]
    shifted = labels[:, 1:]
    mask = shifted != -100
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    head = base.get_output_embeddings()
    backbone = getattr(base, base.base_model_prefix, None)
    if backbone is not None and supports_completion_head(base):
        hidden = backbone(**model_inputs, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][mask])
    else:
        logits = model(**model_inputs, use_cache=False).logits[:, :-1][mask]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)[mask]
    position = torch.arange(shifted.numel(), device=labels.device).view_as(shifted)[mask]
    return (logits if logits.dtype == torch.float64 else logits.float()), rows, shifted[mask], position


def _row_sums(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return values.new_zeros(num_rows).index_add(0, rows, values)


def _sequence_scores(model, capture, sequences, labels, pad_id, device, progress):
    """``(s (N,), ∇s (N, D))`` for sequences scored on their labelled tokens."""
    scores = torch.zeros(len(sequences), dtype=torch.float64)
    grads = torch.zeros(len(sequences), capture.dim, dtype=torch.float64 if _is_double(model) else torch.float32)
    for batch in _batches([len(s) for s in sequences]):
        ids, lab, mask = _pad([sequences[i] for i in batch], [labels[i] for i in batch], pad_id, device)
        capture.clear()
        with capture:
            logits, rows, target, _ = position_logits(model, {"input_ids": ids, "attention_mask": mask, "labels": lab})
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
        sums = _row_sums(log_probs, rows, len(batch))
        grads[batch] = capture.per_example(sums.sum(), len(batch), retain_graph=False).to(grads.dtype).cpu()
        scores[batch] = sums.detach().double().cpu()
        capture.clear()
        if progress is not None:
            progress(len(batch))
    return scores, grads


def _is_double(model) -> bool:
    return next(model.parameters()).dtype == torch.float64


def _pad_id(tokenizer) -> int:
    return int(getattr(tokenizer, "pad_token_id", None) or 0)


def _padded(lists: list[list], fill) -> torch.Tensor:
    width = max(len(x) for x in lists)
    return torch.tensor([list(x) + [fill] * (width - len(x)) for x in lists])


def _table(vectors, fisher, groups, unit_names, capture) -> GradientTable:
    """``groups``: per vote group ``(unit, weight, observed indices, observed counts, null indices, null probs)``."""
    unit, weight, observed, counts, null, probs = zip(*groups)
    return GradientTable(
        vectors=vectors,
        fisher_weights=torch.as_tensor(fisher, dtype=torch.float64),
        group_unit=torch.as_tensor(unit, dtype=torch.long),
        group_weight=torch.as_tensor(weight, dtype=torch.float64),
        observed_index=_padded(observed, -1).long(),
        observed_count=_padded(counts, 0).double(),
        null_index=_padded(null, -1).long(),
        null_probs=_padded(probs, 0.0).double(),
        unit_names=list(unit_names),
        num_parameters=capture.num_parameters,
        exact=capture.sketch.exact,
    )


def _option_differences_shared(model, capture, items, votes, pad_id, device, progress):
    """Per item ``(s (C,), d (C, D))`` with :math:`d_c = \nabla(s_c - s_0)`, each item's prompt run once for all its
    options (:mod:`trl_renyi.model.shared_prompt`): one forward per batch of items, one backward per option after the
    first."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation, dtype = attention_implementation(base), next(model.parameters()).dtype
    out_dtype = torch.float64 if _is_double(model) else torch.float32
    results = {}
    lengths = [len(votes.prompt_ids[i]) + sum(len(o) + 1 for o in votes.option_ids[i]) for i in items]
    for batch in _batches(lengths):
        chosen = [items[b] for b in batch]
        groups, owner = [], []
        for position, item in enumerate(chosen):
            prompt = list(votes.prompt_ids[item])
            group = []
            for option in votes.option_ids[item]:
                group.append((prompt + list(option), [-100] * len(prompt) + list(option), len(owner)))
                owner.append((position, len(group) - 1))
            groups.append(group)
        packed = pack_shared_prompts(groups, pad_id).to(device)
        inputs = packed.model_inputs(implementation, dtype)
        capture.clear()
        with capture:
            logits, _, target, position = position_logits(model, inputs)
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
        sequence = packed.example_index[:, 1:].reshape(-1)[position]
        sums = log_probs.new_zeros(len(owner)).index_add(0, sequence, log_probs)
        widest = max(len(votes.option_ids[item]) for item in chosen)
        differences = torch.zeros(len(chosen), widest, capture.dim, dtype=out_dtype)
        first = {p: n for n, (p, c) in enumerate(owner) if c == 0}
        for option in range(1, widest):
            terms = [sums[n] - sums[first[p]] for n, (p, c) in enumerate(owner) if c == option]
            grads = capture.per_example(torch.stack(terms).sum(), len(chosen), retain_graph=option < widest - 1)
            differences[:, option] = grads.to(out_dtype).cpu()
        capture.clear()
        for position, item in enumerate(chosen):
            count = len(votes.option_ids[item])
            numbers = [n for n, (p, _) in enumerate(owner) if p == position]
            results[item] = (sums[numbers].detach().double().cpu(), differences[position, :count])
        if progress is not None:
            progress(len(owner))
    return results


def _option_differences_unshared(model, capture, items, votes, pad_id, device, progress):
    """As :func:`_option_differences_shared`, one sequence per (item, option)."""
    sequences, labels, spans = [], [], {}
    for item in items:
        start = len(sequences)
        for option in votes.option_ids[item]:
            sequences.append(list(votes.prompt_ids[item]) + list(option))
            labels.append([-100] * len(votes.prompt_ids[item]) + list(option))
        spans[item] = slice(start, len(sequences))
    scores, grads = _sequence_scores(model, capture, sequences, labels, pad_id, device, progress)
    return {item: (scores[span], grads[span] - grads[span.start]) for item, span in spans.items()}


def choice_table(
    model, tokenizer, votes: ChoiceVotes, adapter=None, sketch_dim=4096, seed=0, progress=None, share_prompt=None,
    checkpointing_kwargs=None, item_cache: dict | None = None,
):  # fmt: skip
    """The :class:`GradientTable` of choice votes (exact Fisher). ``share_prompt``: run each item's prompt once for
    all its options (default: wherever the model takes the shared layout, see
    :func:`~trl_renyi.model.shared_prompt.shared_prompt_refusal`). ``item_cache``: a dict that keeps each item's
    option scores and gradients, so that measuring the same items of the same model again with other units (per vote,
    per group, per annotator) runs no second forward; pass the same dict with the same ``sketch_dim`` and ``seed``."""
    adapter = active_adapter(model, adapter)
    device = next(model.parameters()).device
    items = sorted(set(votes.group_item))  # items without a vote (e.g. after subsampling units) are not scored
    if share_prompt is None:
        share_prompt = shared_prompt_refusal(model) is None
    capture = LoraGradientCapture(model, adapter, sketch_dim, seed)
    differences = _option_differences_shared if share_prompt else _option_differences_unshared
    cache = item_cache if item_cache is not None else {}
    key = {item: (tuple(votes.prompt_ids[item]), tuple(map(tuple, votes.option_ids[item])), capture.dim, seed) for item in items}
    missing = [item for item in items if key[item] not in cache]
    if progress is not None:
        progress(sum(len(votes.option_ids[item]) for item in items if item not in missing))
    if missing:
        with measuring(model, adapter, checkpointing_kwargs):
            computed = differences(model, capture, missing, votes, _pad_id(tokenizer), device, progress)
        cache.update({key[item]: value for item, value in computed.items()})
    per_item = {item: cache[key[item]] for item in items}
    blocks, probs, start, offset = [], [], {}, 0
    for item in items:
        scores, d = per_item[item]
        p = torch.softmax(scores, dim=0)
        blocks.append(d - (p.to(d.dtype)[:, None] * d).sum(0))  # g_c = ∇s_c − Σ_c' p_c' ∇s_c'
        probs.append(p)
        start[item] = offset
        offset += len(p)
    vectors, probs = torch.cat(blocks), torch.cat(probs)
    owner = torch.cat([torch.full((len(votes.option_ids[item]),), k) for k, item in enumerate(items)])
    item_weight = torch.zeros(len(items), dtype=torch.float64)  # Σ over the item's votes of their weights
    position = {item: k for k, item in enumerate(items)}
    groups = []
    for item, counts, weight, unit in zip(votes.group_item, votes.group_counts, votes.group_weight, votes.group_unit):
        item_weight[position[item]] += weight * sum(counts)
        span = list(range(start[item], start[item] + len(counts)))
        groups.append((unit, weight, span, counts, span, probs[span[0] : span[-1] + 1].tolist()))
    fisher = probs * item_weight[owner]
    table = _table(vectors, fisher, groups, votes.unit_names, capture)
    table.details["option_probs"] = {i: probs[start[i] : start[i] + len(votes.option_ids[i])].tolist() for i in items}
    return table


def sequence_table(
    model, tokenizer, votes: SequenceVotes, adapter=None, sketch_dim=4096, seed=0, fisher_samples=2, null_samples=2,
    progress=None, checkpointing_kwargs=None,
):  # fmt: skip
    """The :class:`GradientTable` of free-text votes (Fisher and null from completions sampled along each prefix).

    Votes on the same sequence (several annotators giving one answer) share its gradients: the sequence is scored
    once, its Fisher weighs all their votes, and each of them redraws its null outcome from the same pool of
    ``null_samples`` sampled completions."""
    if fisher_samples < 1 or null_samples < 1:
        raise ValueError("free-text votes need at least one Fisher sample and one null sample per vote")
    adapter = active_adapter(model, adapter)
    device = next(model.parameters()).device
    capture = LoraGradientCapture(model, adapter, sketch_dim, seed)
    distinct: dict[tuple, int] = {}
    sequence_of = [distinct.setdefault((tuple(i), tuple(l)), len(distinct)) for i, l in zip(votes.input_ids, votes.labels)]
    first_vote = {}
    for v, s in enumerate(sequence_of):
        first_vote.setdefault(s, v)
    sequences = [votes.input_ids[first_vote[s]] for s in range(len(distinct))]
    labels = [votes.labels[first_vote[s]] for s in range(len(distinct))]
    draws = 1 + fisher_samples + null_samples
    dtype = torch.float64 if _is_double(model) else torch.float32
    vectors = torch.zeros(len(sequences) * draws, capture.dim, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sampled_tokens: list = [None] * len(sequences)  # per sequence: (draws − 1, completion tokens), for checks
    with measuring(model, adapter, checkpointing_kwargs):
        for batch in _batches([len(s) for s in sequences]):
            ids, lab, mask = _pad([sequences[i] for i in batch], [labels[i] for i in batch], _pad_id(tokenizer), device)
            capture.clear()
            with capture:
                logits, rows, target, _ = position_logits(model, {"input_ids": ids, "attention_mask": mask, "labels": lab})
            log_probs = torch.log_softmax(logits, dim=-1)
            sampled = torch.multinomial(log_probs.detach().exp().cpu(), draws - 1, replacement=True, generator=generator)
            targets = [target] + [sampled[:, j].to(target.device) for j in range(draws - 1)]
            for position, sequence in enumerate(batch):
                sampled_tokens[sequence] = sampled[rows.cpu() == position].T.tolist()
            for j, tokens in enumerate(targets):
                chosen = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
                grads = capture.per_example(chosen.sum(), len(batch), retain_graph=j < draws - 1)
                vectors[torch.as_tensor(batch) * draws + j] = grads.to(dtype).cpu()
            capture.clear()
            if progress is not None:
                progress(len(batch))
    fisher = torch.zeros(len(vectors), dtype=torch.float64)
    groups = []
    for weight, unit, s in zip(votes.vote_weight, votes.vote_unit, sequence_of):
        fisher[s * draws + 1 : s * draws + 1 + fisher_samples] += weight / fisher_samples
        first_null = s * draws + 1 + fisher_samples
        null = list(range(first_null, first_null + null_samples))
        groups.append((unit, weight, [s * draws], [1], null, [1.0 / null_samples] * null_samples))
    table = _table(vectors, fisher, groups, votes.unit_names, capture)
    table.details["sampled_tokens"] = [sampled_tokens[s] for s in sequence_of]
    return table


def pair_table(
    model, tokenizer, votes: PairVotes, adapter=None, sketch_dim=4096, seed=0, progress=None, checkpointing_kwargs=None
):  # fmt: skip
    """The :class:`GradientTable` of preference pairs (exact Bernoulli Fisher)."""
    adapter = active_adapter(model, adapter)
    device = next(model.parameters()).device
    sequences, labels = [], []
    for prompt, chosen, rejected in zip(votes.prompt_ids, votes.chosen_ids, votes.rejected_ids):
        for completion in (chosen, rejected):
            sequences.append(list(prompt) + list(completion))
            labels.append([-100] * len(prompt) + list(completion))
    capture = LoraGradientCapture(model, adapter, sketch_dim, seed)
    pad = _pad_id(tokenizer)
    with measuring(model, adapter, checkpointing_kwargs):
        scores, grads = _sequence_scores(model, capture, sequences, labels, pad, device, progress)
        with torch.no_grad(), reference_model(model):
            reference = torch.zeros(len(sequences), dtype=torch.float64)
            for batch in _batches([len(s) for s in sequences]):
                ids, lab, mask = _pad([sequences[i] for i in batch], [labels[i] for i in batch], pad, device)
                logits, rows, target, _ = position_logits(model, {"input_ids": ids, "attention_mask": mask, "labels": lab})
                log_probs = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
                reference[batch] = _row_sums(log_probs, rows, len(batch)).double().cpu()
    delta = (scores - reference).view(-1, 2)
    margin = votes.beta * (delta[:, 0] - delta[:, 1])
    grad_margin = votes.beta * (grads[0::2] - grads[1::2])
    p_chosen = torch.sigmoid(margin)
    vectors = torch.empty(2 * len(margin), grads.shape[1], dtype=grads.dtype)
    vectors[0::2] = (1 - p_chosen).to(grads.dtype)[:, None] * grad_margin
    vectors[1::2] = -p_chosen.to(grads.dtype)[:, None] * grad_margin
    weights = torch.as_tensor(votes.vote_weight, dtype=torch.float64)
    fisher = torch.stack([weights * p_chosen, weights * (1 - p_chosen)], dim=1).reshape(-1)
    groups = [
        (unit, weight, [2 * v], [1], [2 * v, 2 * v + 1], [float(p_chosen[v]), float(1 - p_chosen[v])])
        for v, (unit, weight) in enumerate(zip(votes.vote_unit, votes.vote_weight))
    ]
    table = _table(vectors, fisher, groups, votes.unit_names, capture)
    table.details["margins"] = margin.tolist()
    return table


def gradient_table(
    model, tokenizer, votes, adapter=None, sketch_dim=4096, seed=0, fisher_samples=2, null_samples=2, progress=None,
    share_prompt=None, checkpointing_kwargs=None, item_cache=None,
):  # fmt: skip
    """The table of any kind of votes (``share_prompt``, ``item_cache``: see :func:`choice_table`;
    ``checkpointing_kwargs``: see :func:`measuring`)."""
    common = dict(adapter=adapter, sketch_dim=sketch_dim, seed=seed, progress=progress, checkpointing_kwargs=checkpointing_kwargs)
    if isinstance(votes, ChoiceVotes):
        return choice_table(model, tokenizer, votes, share_prompt=share_prompt, item_cache=item_cache, **common)
    if isinstance(votes, SequenceVotes):
        return sequence_table(model, tokenizer, votes, fisher_samples=fisher_samples, null_samples=null_samples, **common)
    if isinstance(votes, PairVotes):
        return pair_table(model, tokenizer, votes, **common)
    raise TypeError(f"votes must be ChoiceVotes, SequenceVotes or PairVotes, got {type(votes).__name__}")


def sequence_count(votes) -> int:
    """How many sequences the gradient pass runs (for progress bars)."""
    if isinstance(votes, ChoiceVotes):
        return sum(len(votes.option_ids[item]) for item in set(votes.group_item))
    if isinstance(votes, PairVotes):
        return 2 * len(votes.prompt_ids)
    return len({(tuple(i), tuple(l)) for i, l in zip(votes.input_ids, votes.labels)})
