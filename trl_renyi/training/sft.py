"""`RenyiSFTTrainer`: TRL's SFTTrainer training a K-member LoRA ensemble with the α-Rényi objective."""

from __future__ import annotations

import functools

import torch
from trl import SFTTrainer

from trl_renyi.compat import log_num_tokens, trainer_metrics
from trl_renyi.model.layer import get_router
from trl_renyi.stability.votes import answer_choice_votes, sequence_votes
from trl_renyi.training.auto_alpha import sample_rows
from trl_renyi.training.config import RenyiSFTConfig
from trl_renyi.training.construction import (
    construct_ensemble,
    model_init_kwargs_spent,
    resolve_share_prompt,
)
from trl_renyi.training.datasets import report_dropped_examples
from trl_renyi.training.forward import member_forward
from trl_renyi.training.mixin import RenyiEnsembleTrainerMixin
from trl_renyi.training.prompt_sharing import ensemble_collator
from trl_renyi.training.source_routing import SourceMemory
from trl_renyi.training.step import MemberLogLik
from trl_renyi.training.weighted_rows import (
    check_row_routing,
    check_source_routing,
    has_multi_completion,
    lay_out_weighted_rows,
    prepare_multi_completion,
    row_log_likelihood,
    share_prompt_blockers,
    weighted_columns,
)


class RenyiSFTTrainer(RenyiEnsembleTrainerMixin, SFTTrainer):
    r"""Drop-in replacement for [`~trl.SFTTrainer`] that trains `num_members` LoRA adapters on one frozen base.

    Every batch is tiled K times and goes through one member-batched forward and backward. With
    \( \ell_{ik} \) the summed log-probability of example i's completion tokens under member k, the loss is

    $$
    \mathcal{L} = -\frac{1}{N_\text{tokens}} \sum_i \frac{1}{1-\alpha}
    \log \sum_k \pi_k \exp\big((1-\alpha)\,\ell_{ik}\big)
    $$

    where \( N_\text{tokens} \) is TRL's own normaliser (the completion tokens of the batch, or
    `num_items_in_batch` under gradient accumulation). K = 1 reproduces SFTTrainer exactly, for every α.
    With `loglik_reduction="mean"`, \( \ell_{ik} \) is the per-token mean and the normaliser the number of
    examples.

    Args:
        model: a model name/path, a `PreTrainedModel` (with `peft_config`), or a `PeftModel` already holding
            adapters `member_0 … member_{K-1}`.
        args: a [`RenyiSFTConfig`] (a plain [`~trl.SFTConfig`] is converted with default ensemble fields).
        peft_config: the `LoraConfig` replicated into every member.
        Other arguments are SFTTrainer's.
    """

    _tag_names = ["trl", "sft", "trl-renyi", "lora-ensemble"]
    _name = "Rényi SFT"

    def __init__(
        self,
        model,
        args: RenyiSFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        built = construct_ensemble(
            model, args, RenyiSFTConfig, "sft", peft_config, processing_class, train_dataset, eval_dataset,
            quantization_config=kwargs.pop("quantization_config", None), compute_loss_func=kwargs.get("compute_loss_func"),
        )  # fmt: skip
        args = built.args
        # multi-annotator rows (prompt + weighted completions): expanded for TRL's tokenisation, routed as configured
        multi = has_multi_completion(built.train_dataset, built.eval_dataset)
        self.dataset_format = built.dataset_format
        self.share_prompt = resolve_share_prompt(
            args, built.model, share_prompt_blockers(args, built.train_dataset, data_collator, regroup=multi)
        )
        built.train_dataset, built.eval_dataset, self.weighted_rows = prepare_multi_completion(
            args, built.train_dataset, built.eval_dataset, self.share_prompt
        )
        check_row_routing(args, self.weighted_rows, self.share_prompt)
        check_source_routing(args)
        # the memory of every source's log-likelihood, filled as TRL prepares the datasets (see _prepare_dataset)
        self.source_memory = SourceMemory([], torch.zeros(0), args.num_members) if args.source_column else None
        vision = bool({"image", "images"} & set(getattr(built.train_dataset, "column_names", None) or []))
        with model_init_kwargs_spent(args, built.loaded_here):
            super().__init__(**built.trl_arguments(data_collator=data_collator, **kwargs))
        self._finish_ensemble_setup()
        self.data_collator = ensemble_collator(
            args, self.data_collator, self.model, self.share_prompt, self.weighted_rows, vision
        )  # TRL refuses a collator of ours under padding_free: it wraps or replaces TRL's

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation (tokenisation, truncation), then what the ensemble reads besides: the examples TRL dropped
        reported (:func:`~trl_renyi.training.datasets.report_dropped_examples`), and multi-annotator rows laid out —
        sources as ids of the source memory, one row per prompt with ``share_prompt``."""
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        report_dropped_examples(dataset, prepared, args, dataset_name)
        if not self.weighted_rows or not hasattr(prepared, "column_names"):
            return prepared
        return lay_out_weighted_rows(prepared, self.source_memory, self.share_prompt, train=dataset_name == "train")

    def _set_signature_columns_if_needed(self):
        """TRL's columns (the model inputs), plus the multi-annotator ones the ensemble's collator reads (weights,
        sources, regrouped completions): the Trainer keeps these when it removes unused dataset columns."""
        super()._set_signature_columns_if_needed()
        if self.weighted_rows:
            extra = weighted_columns(self.share_prompt, self.train_dataset)
            self._signature_columns = [*(c for c in self._signature_columns if c not in extra), *extra]

    def stability_votes(self, count: int, seed: int):
        """``alpha="auto"``: about ``count`` training units — the units the bound is taken over (sources,
        multi-annotator rows, or completions), tokenised as they were trained — as choices among the answers the data
        gives each prompt where it gives some prompt several (:func:`~trl_renyi.stability.votes.answer_choice_votes`),
        else as free text."""
        if self.args.source_column is not None:
            votes = sequence_votes(self.train_dataset, "source")
        else:
            unit = "row" if self.args.multi_annotator_routing == "row" else "completion"
            votes = sequence_votes(sample_rows(self.train_dataset, count, seed), unit)
        return answer_choice_votes(votes) or votes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r"""The α-Rényi loss of one batch, in order: the routed members' ℓ_ik (:meth:`member_loglik`, one
        member-batched forward; TRL's normaliser N carried with it), then :math:`-\frac1N \sum_i J_i` at the α in force plus
        TRL's MoE term (:meth:`ensemble_loss`; inside a step run in member chunks, the chunk's share), and TRL's SFT
        metrics. With K = 1 it is ``SFTTrainer``'s loss, for every α."""
        if return_outputs:  # there are K sets of logits
            raise ValueError("RenyiSFTTrainer does not return logits from compute_loss; use RenyiEnsemble.score for "
                             "per-member scores.")  # fmt: skip
        mode = "train" if self.model.training else "eval"
        step = self.member_loglik(model, inputs, num_items_in_batch)
        loss, measured = self.ensemble_loss(step, mode)
        if measured:
            self.record_metrics(measured, inputs, mode)
        return loss

    def member_loglik(self, model, inputs: dict, num_items_in_batch=None) -> MemberLogLik:
        """A :class:`MemberLogLik` with ℓ ``(N, K_routed)``: each example's summed (or mean) completion log-prob under
        each routed member, from one member-batched forward; multi-annotator rows carry their weights; with TRL's
        normaliser (:meth:`normalise`) and MoE averaging."""
        weights = inputs.get("completion_weights")
        outputs = member_forward(model, inputs, router_logits=self.aux_loss_enabled)
        routed = get_router(self.accelerator.unwrap_model(model)).num_members
        loglik, num_tokens = sequence_log_likelihood(
            outputs.log_probs, inputs["labels"], routed, padding_free_segments(inputs)
        )
        if self.args.loglik_reduction == "mean":
            loglik = loglik / num_tokens.unsqueeze(-1)
        weighted = weights is not None
        if "row_index" in inputs:  # multi_annotator_routing="row": one example per row, its annotations summed
            loglik, num_tokens = row_log_likelihood(loglik, num_tokens, weights, inputs["row_index"])
            weights = None
        step = MemberLogLik(
            loglik=loglik, outputs=outputs, num_tokens=num_tokens, example_weights=weights, weighted=weighted,
            source_ids=inputs.get("source_ids"),
        )  # fmt: skip
        step.normalise = functools.partial(self.normalise, step=step, num_items_in_batch=num_items_in_batch)
        # TRL's SFT: with num_items_in_batch the loss carries the gradient-accumulation average itself
        step.aux_scale = 1.0 / (self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1)
        return step

    def normalise(self, negative_bound_sum, step: MemberLogLik, num_items_in_batch):
        """TRL's normaliser, in TRL's arithmetic: completion tokens of the batch (``num_items_in_batch`` under
        gradient accumulation) for ``loglik_reduction="sum"``; the number of examples for ``"mean"``."""
        if self.args.loglik_reduction == "sum":
            if step.weighted and num_items_in_batch is not None:
                # the Trainer counts the labels' tokens, unweighted; weighted rows train with one micro-batch per
                # step, so this batch's weighted count (summed over processes, as the Trainer sums its count) is it
                num_items_in_batch = step.weighted_sum(step.num_tokens).detach()
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    num_items_in_batch = self.accelerator.reduce(num_items_in_batch.clone(), reduction="sum")
            count = step.weighted_sum(step.num_tokens) if num_items_in_batch is None else num_items_in_batch
            loss = negative_bound_sum / torch.as_tensor(count, device=negative_bound_sum.device).clamp(min=1e-12)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss
        loss = negative_bound_sum / max(float(step.weighted_sum(torch.ones_like(step.num_tokens))), 1e-12)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def record_metrics(self, steps: list[MemberLogLik], inputs, mode: str) -> None:
        """TRL's own SFT metrics from one or several (chunked) forwards: entropy, token accuracy over all members'
        tokens, tokens seen, and TRL's MoE ``aux_loss``."""
        self.log_router_aux_loss(steps, mode)
        totals = torch.zeros(3, device=inputs["input_ids"].device)
        for step in steps:
            outputs = step.outputs
            totals += torch.stack(
                [outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum()]
            ).float().to(totals.device)
        num_valid, entropy_sum, num_correct = self.accelerator.reduce(totals, reduction="sum")
        metrics = trainer_metrics(self, mode)
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        seen = None
        if mode == "train":
            if "num_sequence_tokens" in inputs:  # shared prompts: the tokens of the sequences, as unshared
                local = inputs["num_sequence_tokens"].reshape(())
            elif "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            seen = self.accelerator.gather_for_metrics(local).sum().item()
        log_num_tokens(self, mode, seen)


def sequence_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor, num_members: int, segments=None):
    """Per-example, per-member completion log-likelihoods from a member-batched fused-head output.

    Args:
        log_probs: ``(K·B, T−1)`` per-token log-probs (0 where the label is -100), rows ``k·B…`` of member k.
        labels: ``(B, T)`` the untiled labels.
        segments: ``(B, T)`` example index of every token for padding-free batches (several examples in one row);
            ``None`` when each row is one example.

    Returns:
        ``(loglik (N, K), num_tokens (N,))`` for the N examples with at least one completion token.
    """
    shifted = labels[:, 1:]
    mask = shifted != -100
    lp = log_probs.float().reshape(num_members, *shifted.shape)
    if segments is None:
        loglik, num_tokens = lp.sum(-1).T, mask.sum(-1).float()
    else:
        seg = segments[:, 1:].reshape(-1).long()
        count = int(seg.max()) + 1 if seg.numel() else 0
        loglik = lp.new_zeros(num_members, count).index_add_(1, seg, lp.reshape(num_members, -1)).T
        num_tokens = lp.new_zeros(count).index_add_(0, seg, mask.reshape(-1).float())
    keep = num_tokens > 0
    if not bool(keep.all()):
        loglik, num_tokens = loglik[keep], num_tokens[keep]
    return loglik, num_tokens


def padding_free_segments(inputs: dict) -> torch.Tensor | None:
    """Example index of every token of a padding-free or shared-prompt batch, or ``None`` for padded batches."""
    if "example_index" in inputs:
        return inputs["example_index"]
    if "seq_idx" in inputs and inputs["seq_idx"] is not None:
        return inputs["seq_idx"]
    if "position_ids" in inputs and "attention_mask" not in inputs:
        starts = (inputs["position_ids"] == 0).long()
        return starts.reshape(-1).cumsum(0).reshape(starts.shape) - 1
    return None
