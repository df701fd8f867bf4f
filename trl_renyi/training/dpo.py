r"""`RenyiDPOTrainer`: TRL's DPOTrainer training a K-member LoRA ensemble with the α-Rényi objective.

For pair i (prompt x, chosen :math:`y_w`, rejected :math:`y_l`) and member k the DPO margin is

.. math::

    m_{ik} = \beta\Big[\big(\log\pi_k(y_w|x) - \log\pi_\text{ref}(y_w|x)\big)
                     - \big(\log\pi_k(y_l|x) - \log\pi_\text{ref}(y_l|x)\big)\Big]

and the member's log-likelihood of the preference label is minus TRL's own per-pair loss at that margin:

* ``"sigmoid"``: :math:`\ell_{ik} = \log\sigma(m_{ik})` (Bradley–Terry); with ``label_smoothing`` ε > 0 the expected
  log-likelihood under ε label noise, :math:`(1-\varepsilon)\log\sigma(m) + \varepsilon\log\sigma(-m)` (cDPO);
* ``"robust"``: TRL's unbiased estimate :math:`\big((1-\varepsilon)\log\sigma(m) - \varepsilon\log\sigma(-m)\big)/(1-2\varepsilon)`.

The loss is :math:`-\sum_i J_i(\alpha) / N_\text{pairs}`, so K = 1 equals DPOTrainer. π_ref is the frozen base model
(every member switched off), computed once per batch for all K members, or read from the batch with
``precompute_ref_log_probs=True``.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader
from trl import DPOTrainer

from trl_renyi.compat import (
    disable_gradient_checkpointing,
    dpo_trainer_accepts_ensemble,
    log_num_tokens,
    quiet_checkpointing_alias,
    trainer_metrics,
)
from trl_renyi.model.layer import get_router
from trl_renyi.model.modes import eval_mode
from trl_renyi.model.saved_format import PREFERENCE_FIELD
from trl_renyi.model.shared_prompt import (
    attention_implementation,
    pack_preference_pairs,
)
from trl_renyi.preference import (
    LIKELIHOOD_LOSS_TYPES,
    PreferenceLikelihood,
    pair_log_likelihood,
)
from trl_renyi.stability.votes import pair_votes
from trl_renyi.training.auto_alpha import sample_rows
from trl_renyi.training.config import RenyiDPOConfig
from trl_renyi.training.construction import (
    construct_ensemble,
    model_init_kwargs_spent,
    resolve_share_prompt,
)
from trl_renyi.training.datasets import report_dropped_examples
from trl_renyi.training.forward import base_forward, member_forward
from trl_renyi.training.mixin import RenyiEnsembleTrainerMixin
from trl_renyi.training.step import PreferenceLogLik

logger = logging.getLogger(__name__)

# batch keys that are not model inputs (TRL's own list)
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def check_likelihood_loss(args) -> None:
    """Refuse DPO settings under which a member's per-pair term is not a log-likelihood of the preference."""
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if len(loss_types) != 1 or loss_types[0] not in LIKELIHOOD_LOSS_TYPES:
        raise ValueError(
            f"RenyiDPOTrainer needs loss_type to be exactly one of {list(LIKELIHOOD_LOSS_TYPES)}, got {loss_types}. "
            "The α-Rényi bound J_i = 1/(1−α)·log Σ_k π_k·exp((1−α)·ℓ_ik) mixes the members through exp(ℓ_ik), the "
            "probability member k gives pair i's preference label, and routes the pair with r_ik ∝ π_k·exp((1−α)·ℓ_ik). "
            "So each member's per-pair term must be a log-likelihood ℓ_ik = log p(y_w ≻ y_l | x, θ_k): 'sigmoid' "
            "(Bradley–Terry log σ(m)) and 'robust' (its label-noise-corrected estimate) are; hinge, IPO, EXO, NCA, "
            "BCO, SPPO, AOT, APO, DiscoPOP, SFT and combinations of several losses are margins, regressions or "
            "sums whose exp(−loss) is no probability of the preference, and a mixture of them means nothing."
        )
    if args.alpha == "auto" and (args.f_divergence_type != "reverse_kl" or args.ld_alpha is not None):
        raise ValueError(
            "alpha='auto' measures the stability criterion with the Bradley–Terry likelihood log σ(m) of the plain DPO "
            f"margin; with f_divergence_type={args.f_divergence_type!r} and ld_alpha={args.ld_alpha!r} the trained "
            "margin is another one. Set alpha to a number, or use the reverse KL without ld_alpha."
        )
    PreferenceLikelihood.from_config(args)  # β, the smoothing and the divergence, checked by their one definition
    if args.use_weighting:
        raise ValueError(
            "use_weighting (WPO) rescales each pair's loss by the policy's own sequence probabilities, which turns "
            "the per-pair term into something other than a log-likelihood; RenyiDPOTrainer refuses it."
        )
    if loss_types[0] == "sigmoid" and args.label_smoothing > 0:
        logger.warning(
            "loss_type='sigmoid' with label_smoothing=%s: each member's likelihood is the label-smoothed (cDPO) "
            "expected log-likelihood (1−ε)·log σ(m) + ε·log σ(−m). TRL's own 'sigmoid' loss ignores "
            "label_smoothing, so with num_members=1 this differs from DPOTrainer; use loss_type='robust' for TRL's "
            "label-noise estimator.",
            args.label_smoothing,
        )


class PairScores(NamedTuple):
    """Per-pair, per-member scores of a preference dataset (see :meth:`RenyiDPOTrainer.score_pairs`).

    Attributes:
        margins: ``(N, K)`` the DPO margins m_ik = β·Δ (implicit reward of chosen minus rejected).
        loglik: ``(N, K)`` ℓ_ik, the members' log-likelihoods of the preference labels.
        responsibilities: ``(N, K)`` r_ik at the trainer's current α (and responsibility floor), as in training.
    """

    margins: torch.Tensor
    loglik: torch.Tensor
    responsibilities: torch.Tensor


class RenyiDPOTrainer(RenyiEnsembleTrainerMixin, DPOTrainer):
    r"""Drop-in replacement for [`~trl.DPOTrainer`] that trains `num_members` LoRA adapters on one frozen base.

    Chosen and rejected sequences of all K members go through one member-batched forward and backward; the
    reference log-probs come from one no-grad pass of the base model per batch (all members off), or from the
    dataset with `precompute_ref_log_probs=True`. With \( \ell_{ik} \) minus TRL's per-pair loss at member k's
    margin (`loss_type` `"sigmoid"` or `"robust"`), the loss is

    $$
    \mathcal{L} = -\frac{1}{N_\text{pairs}} \sum_i \frac{1}{1-\alpha}
    \log \sum_k \pi_k \exp\big((1-\alpha)\,\ell_{ik}\big)
    $$

    so K = 1 reproduces DPOTrainer for every α. Metrics keep TRL's names for the ensemble (rewards of the
    π-weighted member mean) and add `renyi/member_k/rewards/…` per member plus the routing metrics.

    Args:
        model: a model name/path, a `PreTrainedModel` (with `peft_config`), or a `PeftModel` already holding
            adapters `member_0 … member_{K-1}`. In every case the reference is the base model.
        ref_model: an explicit reference model (rarely wanted: leave `None` for the base model).
        args: a [`RenyiDPOConfig`] (a plain [`~trl.DPOConfig`] is converted with default ensemble fields).
        peft_config: the `LoraConfig` replicated into every member.
        Other arguments are DPOTrainer's.
    """

    _tag_names = ["trl", "dpo", "trl-renyi", "lora-ensemble"]
    _name = "Rényi DPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: RenyiDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        built = construct_ensemble(
            model, args, RenyiDPOConfig, "dpo", peft_config, processing_class, train_dataset, eval_dataset,
            quantization_config=quantization_config, spends_init_kwargs=not isinstance(ref_model, str),
            check_config=check_likelihood_loss,
        )  # fmt: skip
        self.dataset_format = built.dataset_format
        self.share_prompt = resolve_share_prompt(built.args, built.model, {})
        with dpo_trainer_accepts_ensemble(built.model, ref_model), model_init_kwargs_spent(built.args, built.loaded_here):
            super().__init__(**built.trl_arguments(
                ref_model=ref_model, data_collator=data_collator, compute_metrics=compute_metrics, callbacks=callbacks,
                optimizers=optimizers,
            ))  # fmt: skip
        self._finish_ensemble_setup()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation, reporting the pairs it dropped (:func:`~trl_renyi.training.datasets.
        report_dropped_examples`)."""
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        report_dropped_examples(dataset, prepared, args, dataset_name)
        return prepared

    # ------------------------------------------------------------------ forward passes
    @staticmethod
    def _model_inputs(inputs: dict) -> dict:
        kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        kwargs["labels"] = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return kwargs

    @property
    def likelihood(self) -> PreferenceLikelihood:
        """Each member's likelihood of a preference label, as ``self.args`` says now (read at use): β, loss type,
        label smoothing, f-divergence, LD weighting (:mod:`trl_renyi.preference`, shared with scoring)."""
        return PreferenceLikelihood.from_config(self.args, self.ref_model)

    def _completion_outputs(self, model, inputs: dict, forward, num_members: int):
        """``forward(model, model_inputs)`` over the batch's 2B chosen/rejected rows, in the layout TRL's collator
        made; with ``share_prompt`` the rows run as one packed row per pair (the prompt once, see
        :mod:`trl_renyi.model.shared_prompt`) and the outputs are moved back to the 2B rows."""
        if not self.share_prompt:
            return forward(model, self._model_inputs(inputs))
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor's tokenizer
        layout = self._once(
            "packed pairs",
            inputs["input_ids"],
            lambda: pack_preference_pairs(
                inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], tokenizer.pad_token_id or 0
            ),
        )
        base = self.accelerator.unwrap_model(model).get_base_model()
        packed = layout.model_inputs(attention_implementation(base), base.dtype)
        packed["use_cache"] = False
        return layout.unpack(forward(model, packed), num_members)

    def compute_ref_log_probs(self, model, inputs):
        """π_ref log-probs ``(chosen (B,), rejected (B,))`` of one batch: the base model with every member switched
        off (or ``ref_model`` when one was given), one no-grad pass serving all K members. TRL calls this hook for
        ``precompute_ref_log_probs`` too, so the precomputed reference is the base model as well.
        """
        kwargs = self._model_inputs(inputs)
        with (
            torch.no_grad(),
            quiet_checkpointing_alias(),  # TRL's helper reads transformers' deprecated alias
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            if self.ref_model is not None:
                log_probs = self.ref_model(**kwargs, fused_lm_head=True).log_probs
            else:
                log_probs = self._completion_outputs(model, inputs, base_forward, 1).log_probs
        return self.likelihood.sequence_logps(log_probs, inputs["completion_mask"]).chunk(2, dim=0)

    def _reference_logps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps and "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        # once per step, also when members are processed in chunks
        return self._once("reference", inputs["input_ids"], lambda: self.compute_ref_log_probs(self.model, inputs))

    def stability_votes(self, count: int, seed: int):
        """``alpha="auto"``: about ``count`` training pairs as :class:`~trl_renyi.stability.PairVotes` at this β."""
        return pair_votes(sample_rows(self.train_dataset, count, seed), self.likelihood.beta)

    def _ensemble_metadata(self, model) -> dict:
        """The ensemble's metadata with the preference likelihood it was trained with (β, loss type, smoothing,
        divergence, LD weighting, reference), which scoring it by reward reads back."""
        return {**super()._ensemble_metadata(model), PREFERENCE_FIELD: self.likelihood.to_metadata()}

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r"""The α-Rényi loss of one batch of pairs, in order: the routed members' ℓ_ik (:meth:`member_loglik`: one
        member-batched forward of the chosen and rejected rows, each member's margin against the base model's
        reference, minus TRL's per-pair loss), then :math:`-\frac1N \sum_i J_i` at the α in force plus TRL's MoE term
        (:meth:`ensemble_loss`; inside a step run in member chunks, the chunk's share), and TRL's DPO metrics. With
        K = 1 it is ``DPOTrainer``'s loss, for every α."""
        if return_outputs:  # there are K sets of logits
            raise ValueError("RenyiDPOTrainer does not return logits from compute_loss; evaluate without "
                             "compute_metrics, and use score_pairs() or RenyiEnsemble.score for per-member scores.")  # fmt: skip
        mode = "train" if self.model.training else "eval"
        step = self.member_loglik(model, inputs)
        loss, measured = self.ensemble_loss(step, mode)
        if measured:
            self.record_metrics(measured, inputs, mode)
        return loss

    def member_loglik(self, model, inputs: dict) -> PreferenceLogLik:
        """A :class:`PreferenceLogLik` with ℓ ``(B, K_routed)``: one member-batched forward of the 2B chosen/rejected
        rows, then each member's margin against the shared reference and its per-pair log-likelihood
        (:attr:`likelihood`), with TRL's normaliser (the pairs, times the loss weight)."""
        ref_chosen, ref_rejected = self._reference_logps(inputs)
        num_members = get_router(self.accelerator.unwrap_model(model)).num_members
        outputs = self._completion_outputs(
            model, inputs, functools.partial(member_forward, router_logits=self.aux_loss_enabled), num_members
        )
        rows = inputs["input_ids"].shape[0]
        likelihood = self.likelihood
        per_token = outputs.log_probs.reshape(num_members, rows, -1)
        chosen_logps, rejected_logps = likelihood.sequence_logps(per_token, inputs["completion_mask"]).chunk(2, dim=1)
        chosen_logratios = chosen_logps - ref_chosen.to(chosen_logps.device)
        rejected_logratios = rejected_logps - ref_rejected.to(rejected_logps.device)
        margins = likelihood.margins(chosen_logratios, rejected_logratios)  # (K, B)
        loglik = likelihood.loglik(margins).T
        weight = self.loss_weights[0]
        return PreferenceLogLik(
            normalise=lambda negative_bound_sum: negative_bound_sum / max(loglik.shape[0], 1) * weight,
            loglik=loglik,
            outputs=outputs,
            margins=margins.detach().T,
            chosen_logratios=chosen_logratios.detach().T,
            rejected_logratios=rejected_logratios.detach().T,
            chosen_logps=chosen_logps.detach().T,
            rejected_logps=rejected_logps.detach().T,
        )

    def record_metrics(self, steps: list[PreferenceLogLik], inputs: dict, mode: str) -> None:
        """TRL's DPO metrics for the ensemble (rewards of the π-weighted member mean), the same per member under
        ``renyi/member_k/``, TRL's token metrics (entropy, chosen-token accuracy) over all members' rows, and TRL's
        MoE ``aux_loss``; from one or several (chunked) forwards."""
        self.log_router_aux_loss(steps, mode)
        metrics = trainer_metrics(self, mode)
        device = inputs["input_ids"].device
        pair_stats = torch.stack(
            [
                torch.cat([getattr(step, key) for step in steps], dim=-1).float()
                for key in ("chosen_logratios", "rejected_logratios", "chosen_logps", "rejected_logps")
            ],
            dim=-1,
        )  # (B, K, 4)
        pair_stats = self.accelerator.gather(pair_stats)
        beta = self.likelihood.beta
        chosen_rewards, rejected_rewards = beta * pair_stats[..., 0], beta * pair_stats[..., 1]
        weights = self.objective.log_weights.to(pair_stats.device).exp()
        ensemble_chosen, ensemble_rejected = chosen_rewards @ weights, rejected_rewards @ weights
        metrics["rewards/chosen"].append(ensemble_chosen.mean().item())
        metrics["rewards/rejected"].append(ensemble_rejected.mean().item())
        metrics["rewards/accuracies"].append((ensemble_chosen > ensemble_rejected).float().mean().item())
        metrics["rewards/margins"].append((ensemble_chosen - ensemble_rejected).mean().item())
        metrics["logps/chosen"].append((pair_stats[..., 2] @ weights).mean().item())
        metrics["logps/rejected"].append((pair_stats[..., 3] @ weights).mean().item())
        member_means = torch.stack(
            [chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards, (chosen_rewards > rejected_rewards).float()]
        ).mean(dim=1)  # (4, K)
        for k, name in enumerate(self.member_names):
            chosen, rejected, margin, accuracy = member_means[:, k].tolist()
            metrics[f"renyi/{name}/rewards/chosen"].append(chosen)
            metrics[f"renyi/{name}/rewards/rejected"].append(rejected)
            metrics[f"renyi/{name}/rewards/margins"].append(margin)
            metrics[f"renyi/{name}/rewards/accuracies"].append(accuracy)

        # token metrics over every member's rows: entropy of all completion tokens, top-1 accuracy of chosen ones
        completion = inputs["completion_mask"][:, 1:].bool()
        chosen_rows = torch.zeros_like(completion)
        chosen_rows[: completion.shape[0] // 2] = True
        totals = torch.zeros(4, device=device)
        for step in steps:
            outputs = step.outputs
            copies = outputs.entropy.shape[0] // completion.shape[0]
            mask = completion.repeat(copies, 1)
            chosen_mask = mask & chosen_rows.repeat(copies, 1)
            entropy = outputs.entropy[:, -mask.shape[1] :].detach()
            top1 = outputs.is_top1[:, -mask.shape[1] :]
            totals += torch.stack(
                [(entropy * mask).sum(), mask.sum(), (top1 & chosen_mask).sum(), chosen_mask.sum()]
            ).float().to(device)
        totals = self.accelerator.gather(totals[None]).sum(0)
        entropy_sum, num_tokens, correct, num_chosen = totals.tolist()
        metrics["entropy"].append(entropy_sum / num_tokens if num_tokens > 0 else 0.0)
        metrics["mean_token_accuracy"].append(correct / num_chosen if num_chosen > 0 else 0.0)
        seen = None
        if mode == "train":
            seen = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        log_num_tokens(self, mode, seen)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_pairs(self, dataset=None, batch_size: int | None = None) -> PairScores:
        """Margins, member log-likelihoods and responsibilities (at the current α) of every pair of ``dataset``.

        ``dataset`` is a preference dataset in any format DPOTrainer accepts (prepared or not); default: the eval
        dataset. The reference comes from the base model (or the precomputed columns when present). Nothing is
        logged and the model's train/eval mode is restored.
        """
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("score_pairs needs a dataset (or an eval_dataset on the trainer).")
        if "prompt_ids" not in dataset.column_names:
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, "score")
        keep = {"prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"}
        dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
        loader = DataLoader(
            dataset, batch_size=batch_size or self.args.per_device_eval_batch_size, collate_fn=self.data_collator
        )
        margins, logliks = [], []
        with eval_mode(self.model):
            for batch in loader:
                with self.member_routing(self.model):  # one step per batch: its reference and layout computed once
                    step = self.member_loglik(self.model, self._prepare_inputs(batch))
                logliks.append(step.loglik.float().cpu())
                margins.append(step.margins.float().cpu())
        loglik = torch.cat(logliks)
        bound = self.objective.bound(loglik, self.current_alpha())
        return PairScores(margins=torch.cat(margins), loglik=loglik, responsibilities=bound.responsibilities)


__all__ = ["LIKELIHOOD_LOSS_TYPES", "PairScores", "RenyiDPOTrainer", "pair_log_likelihood"]
