"""The ensemble logic shared by RenyiSFTTrainer and RenyiDPOTrainer (one mixin, not two copies).

It builds (or validates) the K-member PeftModel before TRL's trainer sees it, turns a ``(B, K)`` matrix of
per-example member log-likelihoods into the α-Rényi loss and logs routing metrics through TRL's ``_metrics``. Saving,
loading and publishing are inherited from :class:`~trl_renyi.training.persistence.EnsemblePersistenceMixin`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from peft import PeftConfig, PeftModel
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from trl_renyi.compat import create_model_from_path, trainer_metrics
from trl_renyi.model.layer import (
    base_model_only,
    get_router,
    member_names,
    member_routing,
    routed_members,
)
from trl_renyi.model.lm_head import add_completion_lm_head
from trl_renyi.model.loading import check_vocabulary, is_embedded, load_causal_lm, load_tokenizer
from trl_renyi.model.members import (
    attach_ensemble,
    build_ensemble,
    register_members_with_zero3,
    tile_for_members,
)
from trl_renyi.model.saved_format import ALPHA_METRIC, SHARE_METRIC
from trl_renyi.model.shared_prompt import model_inputs_only, shared_prompt_refusal
from trl_renyi.model.trunk import enable_shared_trunk
from trl_renyi.objective import (
    RenyiBound,
    alpha_at_step,
    floored_renyi_bound,
    normalized_log_weights,
    routing_entropy,
    source_renyi_bound,
)
from trl_renyi.training.config import RenyiEnsembleArguments
from trl_renyi.training.datasets import report_dropped_examples
from trl_renyi.training.persistence import EnsemblePersistenceMixin
from trl_renyi.training.step import MemberLogLik


def coerce_config(args, config_class, model_name: str, suffix: str):
    """Return ``args`` as ``config_class``: a default one when ``None``, converted from plain TRL/HF arguments."""
    if args is None:
        return config_class(output_dir=f"{model_name.split('/')[-1]}-{suffix}")
    if isinstance(args, config_class):
        return args
    if isinstance(args, TrainingArguments):
        values = args.to_dict()
        values["hub_token"] = args.hub_token
        known = set(config_class.__dataclass_fields__)
        return config_class(**{k: v for k, v in values.items() if k in known})
    raise TypeError(f"args must be a {config_class.__name__}, got {type(args).__name__}.")


logger = logging.getLogger(__name__)


def is_activation_checkpointing(model) -> bool:
    """Whether the model recomputes activations in backward (transformers 5 renamed ``is_gradient_checkpointing``)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model.get_base_model() if isinstance(model, PeftModel) else model), name):
            return bool(getattr(model, name))
    return False


class RenyiEnsembleTrainerMixin(EnsemblePersistenceMixin):
    """Mixed into TRL trainers, before the TRL class in the bases. Saves and checkpoints are published atomically."""

    # ------------------------------------------------------------------ construction
    @staticmethod
    @contextlib.contextmanager
    def _model_init_kwargs_applied(args, loaded_here: bool):
        """Around TRL's constructor: a model this trainer loaded by name has already used ``args.model_init_kwargs``,
        so TRL, which only sees the instance, must not warn that they "will be ignored". They are restored after."""
        kwargs = args.model_init_kwargs
        if loaded_here:
            args.model_init_kwargs = None
        try:
            yield
        finally:
            args.model_init_kwargs = kwargs

    @staticmethod
    def _prepare_ensemble_model(model, args: RenyiEnsembleArguments, peft_config, processing_class):
        """Return ``(ensemble PeftModel, processing_class)`` to hand to TRL's constructor (with no peft_config)."""
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError(
                    "Pass either a PeftModel holding the member_* adapters or a base model with peft_config, not both."
                )
            return attach_ensemble(model, args.num_members), processing_class
        if peft_config is None:
            raise ValueError(
                "peft_config is required: a LoraConfig replicated into num_members LoRA members (or pass a PeftModel "
                "that already holds adapters member_0 … member_{K-1})."
            )
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}.")
        # Same seeding point as TRL: the first adapter's init draws from the RNG right after set_seed(args.seed).
        set_seed(args.seed)
        if isinstance(model, str):
            name = model
            init_kwargs = dict(args.model_init_kwargs or {})
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            if is_embedded(name):
                model = load_causal_lm(name, dtype=init_kwargs.pop("dtype", "float32"), **init_kwargs)
                if processing_class is None:
                    processing_class = load_tokenizer(name)
            else:  # TRL's own loader, in TRL's order, so that K = 1 by name is TRL to the bit
                model = create_model_from_path(name, **init_kwargs)
        peft_model = build_ensemble(model, peft_config, args.num_members, args.seed, args.member_init_std)
        return peft_model, processing_class

    @staticmethod
    def _resolve_share_prompt(args: RenyiEnsembleArguments, model, blockers: dict[str, bool]) -> bool:
        """Whether to run one prompt pass for all completions of a prompt (``args.share_prompt``; ``None``: wherever it
        is exact). ``blockers`` maps a reason to whether it applies; ``share_prompt=True`` with a reason is refused."""
        if args.share_prompt is False:
            return False
        reason = shared_prompt_refusal(model) or next((why for why, applies in blockers.items() if applies), None)
        if reason is None:
            return True
        if args.share_prompt:
            raise ValueError(f"share_prompt=True cannot be honoured: {reason}. Set share_prompt=False or leave it unset.")
        logger.info("share_prompt is off: %s.", reason)
        return False

    def _finish_ensemble_setup(self) -> None:
        args: RenyiEnsembleArguments = self.args
        self.member_names = member_names(args.num_members)
        self._renyi_log_weights = normalized_log_weights(args.num_members, args.member_weights)
        # TRL may have touched PEFT's active adapter (which freezes the others): every member trains.
        peft_model = self.accelerator.unwrap_model(self.model)
        check_vocabulary(peft_model, self.processing_class)  # before a token id past the embeddings fails a step
        attach_ensemble(peft_model, args.num_members)
        self._completion_head = add_completion_lm_head(peft_model.get_base_model())
        self.shared_trunk_layer = enable_shared_trunk(peft_model) if args.shared_trunk else None
        if is_deepspeed_zero3_enabled():
            register_members_with_zero3(peft_model, self.member_names)

    @property
    def num_members(self) -> int:
        return self.args.num_members

    # ------------------------------------------------------------------ forward
    def member_forward(self, model, inputs: dict):
        """One member-batched forward of ``inputs`` (B rows) through the routed members (all K, or a chunk).

        ``inputs`` must hold ``labels`` (-100 where no log-prob is needed). Uses the completion-only chunked head of
        :mod:`trl_renyi.model.lm_head` when the model allows it (TRL's fused head otherwise) and returns a
        ``FusedCausalLMOutput`` for the K·B tiled rows: ``log_probs`` ``(K·B, T−1)``, rows ``k·B … (k+1)·B − 1``
        belonging to the k-th routed member. With a shared trunk the model receives the untiled batch and tiles at
        the first adapted layer; only the labels are tiled here.
        """
        inputs = model_inputs_only(inputs)
        peft_model = self.accelerator.unwrap_model(model)
        router = get_router(peft_model)
        if router.routing is None:  # called outside a training or prediction step
            if torch.is_grad_enabled() and is_activation_checkpointing(peft_model):
                raise RuntimeError(
                    "member_forward with gradients under gradient checkpointing must run inside "
                    "`trainer.member_routing(model)` together with its backward (the backward recomputes the forward); "
                    "training_step and prediction_step open it themselves."
                )
            with self.member_routing(model):
                return self.member_forward(model, inputs)
        copies = router.num_members
        router.routing.rows_per_member, router.routing.tokens_per_row = inputs["input_ids"].shape[:2]
        # the trunk state stays set until the step's backward is done (gradient checkpointing recomputes with it)
        router.trunk_active = router.trunk_layer is not None and "cu_seq_lens_q" not in inputs
        if router.trunk_active:
            tiled = dict(inputs)
            tiled["labels"] = tile_for_members({"input_ids": inputs["labels"]}, copies)["input_ids"]
        else:
            tiled = tile_for_members(inputs, copies)
        if getattr(self, "aux_loss_enabled", False):  # TRL's switch: MoE models return their router logits
            tiled["output_router_logits"] = True
        if getattr(self, "_completion_head", False):
            return model(**tiled, completion_head=True, num_members=copies)
        return model(**tiled, fused_lm_head=True)

    @contextlib.contextmanager
    def member_routing(self, model=None):
        """Route rows to members inside the block (see :func:`~trl_renyi.model.layer.member_routing`); the trainer's
        steps hold it around their forward and backward. On exit the shared trunk is switched off again."""
        peft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        router = get_router(peft_model)
        try:
            with member_routing(peft_model):
                yield
        finally:
            router.trunk_active = False

    def _member_loglik(self, model, inputs: dict) -> MemberLogLik:
        """The batch's log-likelihoods under the routed members (one member-batched forward). Implemented by each
        trainer; the result feeds :meth:`_normalised_loss` and :meth:`_log_forward_metrics`."""
        raise NotImplementedError

    def _normalised_loss(self, negative_bound_sum: torch.Tensor, step: MemberLogLik, num_items_in_batch) -> torch.Tensor:
        """Divide ``−Σ_i J_i`` by the trainer's own normaliser. Implemented by each trainer."""
        raise NotImplementedError

    def _router_aux_steps(self, num_items_in_batch) -> int:
        """How many micro-batches the router auxiliary loss is averaged over (TRL's DPO: 1; SFT overrides)."""
        return 1

    def _with_router_aux_loss(self, loss: torch.Tensor, step: MemberLogLik, num_items_in_batch, share: float = 1.0):
        r"""Add TRL's MoE load-balancing term, ``router_aux_loss_coef · aux / steps``, when TRL enables it.

        ``aux`` is the mean over the routed members of each member's own load-balancing loss (for K = 1 the model's
        ``aux_loss``, so K = 1 equals TRL); ``share`` is the routed members' fraction of all K, so that a step run in
        member chunks adds the same total as one pass.
        """
        aux = step.router_aux_loss
        if not getattr(self, "aux_loss_enabled", False) or aux is None:
            return loss
        return loss + self.router_aux_loss_coef * aux.to(loss.device) * share / self._router_aux_steps(num_items_in_batch)

    def _log_router_aux_loss(self, steps: list[MemberLogLik], mode: str) -> None:
        if getattr(self, "aux_loss_enabled", False) and steps[0].router_aux_loss is not None:
            value = torch.stack([s.router_aux_loss.detach().float() for s in steps]).mean()
            trainer_metrics(self, mode)["aux_loss"].append(self.accelerator.gather_for_metrics(value).mean().item())

    def _log_forward_metrics(self, steps: list[MemberLogLik], inputs: dict, mode: str) -> None:
        """Log the trainer's own per-forward metrics from one or several (chunked) forwards."""

    def _ensemble_loss(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """The α-Rényi loss of one batch in a single member-batched pass (logs all metrics)."""
        if self._chunk_pass is not None:  # a chunk of members inside a chunked training step
            return self._chunk_surrogate(model, inputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        step = self._member_loglik(model, inputs)
        if step.source_ids is not None:  # source_column: the bound over sources, Σ_s J_s (weights folded in)
            bound = self.source_objective(step, mode)
            bound_sum = bound.value.sum()
        else:
            bound = self.renyi_objective(step.loglik, mode, per_token=step.num_tokens)
            bound_sum = step.weighted_sum(bound.value)
        self._log_forward_metrics([step], inputs, mode)
        self._log_router_aux_loss([step], mode)
        loss = self._normalised_loss(-bound_sum, step, num_items_in_batch)
        return self._with_router_aux_loss(loss, step, num_items_in_batch)

    #: ``(member names, their r_ik, the value to report, the steps seen)`` while a chunked training step runs a chunk
    _chunk_pass = None

    def _member_chunks(self) -> list[list[str]] | None:
        size = getattr(self.args, "member_chunk_size", None)
        if not size or size >= self.num_members:
            return None
        return [self.member_names[i : i + size] for i in range(0, self.num_members, size)]

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.member_routing(model):
            chunks = self._member_chunks()
            if chunks is None:
                return super().training_step(model, inputs, num_items_in_batch)
            if self.args.parallel_mode.value == "distributed" and not self.args.ddp_find_unused_parameters:
                raise ValueError(
                    "member_chunk_size under DDP needs ddp_find_unused_parameters=True: each chunk's backward leaves "
                    "the other members' LoRA weights without gradients."
                )
            return self._chunked_training_step(model, inputs, num_items_in_batch, chunks)

    def _chunked_training_step(self, model, inputs: dict, num_items_in_batch, chunks: list[list[str]]):
        """Exact chunked training step: score all members without gradients (the loss, r_ik, the routing metrics), then
        run transformers' own ``training_step`` once per chunk of members. There ``compute_loss`` returns the chunk's
        surrogate ``−Σ_i Σ_{k∈chunk} r_ik ℓ_ik``, whose gradient equals that of ``−Σ_i J_i`` (∂J_i/∂ℓ_ik = r_ik), with
        its value set to the loss on the last chunk and 0 before, so the step returns the loss as transformers scales
        it. Activation memory is that of one chunk."""
        peft_model = self.accelerator.unwrap_model(model)
        model.train()
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            parts, aux_terms = [], 0.0
            for names in chunks:
                with routed_members(peft_model, names):
                    step = self._member_loglik(model, inputs)
                parts.append(step.loglik)
                zero = step.loglik.new_zeros(())
                aux_terms = aux_terms + self._with_router_aux_loss(
                    zero, step, num_items_in_batch, len(names) / self.num_members
                )
            bound = self.renyi_objective(torch.cat(parts, dim=-1), "train", per_token=step.num_tokens)
            loss = self._normalised_loss(-step.weighted_sum(bound.value), step, num_items_in_batch) + aux_terms
        steps, offset, total = [], 0, 0.0
        try:
            for index, names in enumerate(chunks):
                last = index == len(chunks) - 1
                weights = bound.responsibilities[:, offset : offset + len(names)]
                self._chunk_pass = (names, weights, loss if last else torch.zeros_like(loss), steps)
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync, routed_members(peft_model, names):
                    total = total + super().training_step(model, inputs, num_items_in_batch)
                offset += len(names)
        finally:
            self._chunk_pass = None
        self._log_forward_metrics(steps, inputs, "train")
        self._log_router_aux_loss(steps, "train")
        return total

    def _chunk_surrogate(self, model, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """``compute_loss`` inside a chunked step: the chunk's surrogate, valued as :meth:`_chunked_training_step` says."""
        names, weights, value, steps = self._chunk_pass
        step = self._member_loglik(model, inputs)
        weights = weights.to(step.loglik.dtype)
        surrogate = self._normalised_loss(-step.weighted_sum((weights * step.loglik).sum(-1)), step, num_items_in_batch)
        surrogate = self._with_router_aux_loss(surrogate, step, num_items_in_batch, len(names) / self.num_members)
        steps.append(step)
        return (surrogate - surrogate.detach()) + value.to(surrogate.device, surrogate.dtype)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self.member_routing(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def base_forward(self, model, inputs: dict):
        """One forward of the frozen base model alone over the untiled ``inputs`` (B rows), with the LM head that
        :meth:`member_forward` uses: every member's delta is skipped (:func:`~trl_renyi.model.layer.base_model_only`),
        with no ``requires_grad`` or active-adapter change. E.g. DPO's reference π_ref, one pass for all K members.
        Call it under ``torch.no_grad()``. Returns a ``FusedCausalLMOutput`` with ``log_probs`` ``(B, T−1)``.
        """
        inputs = model_inputs_only(inputs)
        with base_model_only(self.accelerator.unwrap_model(model)):
            if getattr(self, "_completion_head", False):
                return model(**inputs, completion_head=True, num_members=1)
            return model(**inputs, fused_lm_head=True)

    # ------------------------------------------------------------------ objective
    def current_alpha(self) -> float:
        """α in force at this optimizer step (1 during the α warm-up)."""
        state = getattr(self, "state", None)
        step = state.global_step if state is not None else 0
        max_steps = state.max_steps if state is not None else 0
        return alpha_at_step(self.args.alpha, self.args.alpha_warmup_ratio, step, max_steps)

    def _check_finite(self, loglik: torch.Tensor) -> None:
        """Raise ``FloatingPointError`` naming the step and the member(s) when any ℓ_ik is NaN or ±inf.

        It runs before the loss exists, so no backward pass and no optimizer step ever sees the bad values. Under
        distributed training the per-member count of bad entries is summed over the processes, so every process
        stops at the same step and none is left waiting in a collective.
        """
        local = ~torch.isfinite(loglik.detach())
        bad = local.sum(0).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bool(bad.any()):
            return
        members = ", ".join(self.member_names[k] for k in bad.nonzero().flatten().tolist())
        state = getattr(self, "state", None)
        step = state.global_step + 1 if state is not None else 1
        first = local.nonzero()
        where = f"first at example {int(first[0, 0])} of the batch" if first.numel() else "on another process"
        raise FloatingPointError(
            f"Non-finite log-likelihood at step {step} for member {members} ({where}); stopping before the "
            "optimizer applies it, so the weights keep their last finite values. Check the learning rate and the data."
        )

    def renyi_objective(self, loglik: torch.Tensor, mode: str, per_token: torch.Tensor | None = None) -> RenyiBound:
        """Evaluate the bound for ``loglik`` ``(B, K)`` and log the routing metrics.

        ``per_token`` ``(B,)`` gives the completion tokens of each example, so member NLLs are reported per token;
        without it they are per example.
        """
        self._check_finite(loglik)
        alpha = self.current_alpha()
        bound = floored_renyi_bound(
            loglik, alpha, self._renyi_log_weights.to(loglik.device), getattr(self.args, "responsibility_floor", 0.0)
        )
        self._log_routing(loglik.detach().float(), bound.responsibilities, alpha, mode, per_token)
        return bound

    def source_objective(self, step, mode: str):
        """The bound over sources (:func:`~trl_renyi.objective.source_renyi_bound`) for a batch whose examples name
        their source, with the rest of each source from the trainer's :class:`~trl_renyi.training.source_routing.
        SourceMemory`; a training batch then updates the memory. Logs the same routing metrics as
        :meth:`renyi_objective`, per example."""
        self._check_finite(step.loglik)
        alpha = self.current_alpha()
        memory = self.source_memory
        unique, local, others = memory.batch_view(step.source_ids, step.example_weights)
        bound = source_renyi_bound(
            step.loglik, local, others, alpha, self._renyi_log_weights.to(step.loglik.device),
            getattr(self.args, "responsibility_floor", 0.0), step.example_weights,
        )  # fmt: skip
        if mode == "train" and torch.is_grad_enabled():
            memory.update(unique, bound.source_loglik)
        self._log_routing(step.loglik.detach().float(), bound.responsibilities, alpha, mode, step.num_tokens)
        return bound

    def _log_routing(self, loglik, responsibilities, alpha, mode, per_token) -> None:
        num = loglik.shape[0]
        tokens = per_token.float().sum() if per_token is not None else torch.tensor(float(num), device=loglik.device)
        stats = torch.cat(
            [
                torch.tensor([float(num)], device=loglik.device),
                routing_entropy(responsibilities).sum().reshape(1),
                (loglik.std(dim=-1, unbiased=False).sum() if num else loglik.new_zeros(())).reshape(1),
                tokens.reshape(1).to(loglik.device),
                responsibilities.sum(0),
                -loglik.sum(0),
            ]
        )
        stats = self.accelerator.reduce(stats, reduction="sum")
        count, entropy_sum, std_sum, token_sum = (float(v) for v in stats[:4])
        k = self.num_members
        shares, nll = stats[4 : 4 + k], stats[4 + k : 4 + 2 * k]
        metrics = trainer_metrics(self, mode)
        metrics[ALPHA_METRIC] = [alpha]  # the α in force at the last step logged, not a mean over the window
        metrics["renyi/routing_entropy"].append(entropy_sum / max(count, 1.0))
        metrics["renyi/loglik_std"].append(std_sum / max(count, 1.0))
        for index, name in enumerate(self.member_names):
            metrics[SHARE_METRIC.format(name=name)].append(float(shares[index]) / max(count, 1.0))
            metrics[f"renyi/{name}/nll"].append(float(nll[index]) / max(token_sum, 1.0))

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, *args, **kwargs):
        """TRL's dataset preparation, reporting the examples it drops because truncation to ``max_length`` left them
        without a completion token.

        Such an example has no log-likelihood to train on (TRL removes it; were it kept, ℓ_ik would be an empty sum,
        never a NaN). Dropping some is a ``UserWarning`` that counts them; dropping all is a ``ValueError``.
        """
        prepared = super()._prepare_dataset(dataset, *args, **kwargs)
        name = kwargs.get("dataset_name", args[-1] if args and isinstance(args[-1], str) else "train")
        config = kwargs.get("args", next((a for a in args if isinstance(a, TrainingArguments)), None))
        report_dropped_examples(dataset, prepared, config, name)
        return prepared
