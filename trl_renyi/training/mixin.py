"""The ensemble logic shared by RenyiSFTTrainer and RenyiDPOTrainer (one mixin, not two copies).

It finishes the ensemble's set-up after TRL's constructor (the trainers build it before, through
:mod:`trl_renyi.training.construction`) and holds the one ``compute_loss`` of both trainers, which reads in order: route the batch to the members and get ℓ_ik (the trainer's ``_member_loglik``),
apply the bound (:class:`~trl_renyi.training.ensemble_objective.EnsembleObjective`, pure), normalise the trainer's
way, add TRL's extras, log. Each step owns a :class:`~trl_renyi.training.step.StepScope` for the values it computes
once. Saving, loading and publishing are inherited from
:class:`~trl_renyi.training.persistence.EnsemblePersistenceMixin`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from trl_renyi.compat import trainer_metrics
from trl_renyi.model.layer import base_model_only, get_router, member_names, member_routing, routed_members
from trl_renyi.model.lm_head import add_completion_lm_head
from trl_renyi.model.loading import check_vocabulary
from trl_renyi.model.modes import is_activation_checkpointing
from trl_renyi.model.members import attach_ensemble, register_members_with_zero3, tile_for_members
from trl_renyi.model.saved_format import ALPHA_METRIC
from trl_renyi.model.shared_prompt import model_inputs_only
from trl_renyi.model.trunk import enable_shared_trunk
from trl_renyi.objective import AUTO_ALPHA, RenyiBound
from trl_renyi.training.auto_alpha import AutoAlpha
from trl_renyi.training.config import RenyiEnsembleArguments
from trl_renyi.training.datasets import report_dropped_examples
from trl_renyi.training.ensemble_objective import EnsembleObjective
from trl_renyi.training.persistence import EnsemblePersistenceMixin
from trl_renyi.training.step import ChunkPass, MemberLogLik, StepScope

logger = logging.getLogger(__name__)


class RenyiEnsembleTrainerMixin(EnsemblePersistenceMixin):
    """Mixed into TRL trainers, before the TRL class in the bases. Saves and checkpoints are published atomically."""

    # ------------------------------------------------------------------ construction
    def _finish_ensemble_setup(self) -> None:
        args: RenyiEnsembleArguments = self.args
        self.member_names = member_names(args.num_members)
        self.auto_alpha = AutoAlpha(self)  # resolves alpha="auto" at the end of the warm-up (a no-op otherwise)
        self.add_callback(self.auto_alpha)
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

    @property
    def objective(self) -> EnsembleObjective:
        """The objective as ``self.args`` says at this moment (read at use, as TRL reads its own settings, so that a
        value set on ``trainer.args`` after construction — e.g. by ``hyperparameter_search`` — is the one trained
        with), with ``alpha="auto"`` replaced by its resolution (1 until the end of the warm-up)."""
        return EnsembleObjective.from_args(self.args, self.member_names, alpha=self.alpha_after_warmup())

    def alpha_after_warmup(self) -> float:
        """The α that applies after the warm-up: ``args.alpha``, or the resolution of ``"auto"``."""
        return self.auto_alpha.alpha if self.args.alpha == AUTO_ALPHA else float(self.args.alpha)

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
        tiled["use_cache"] = False
        if getattr(self, "aux_loss_enabled", False):  # TRL's switch: MoE models return their router logits
            tiled["output_router_logits"] = True
        if getattr(self, "_completion_head", False):
            return model(**tiled, completion_head=True, num_members=copies)
        return model(**tiled, fused_lm_head=True)

    #: the open step's :class:`StepScope` (``None`` between steps)
    _scope: StepScope | None = None

    @contextlib.contextmanager
    def member_routing(self, model=None):
        """One step: rows are routed to members inside the block (see :func:`~trl_renyi.model.layer.member_routing`)
        and a fresh :class:`StepScope` holds what the step computes once. The trainer's steps hold it around their
        forward and backward; on exit the scope is dropped and the shared trunk switched off again."""
        peft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        router = get_router(peft_model)
        outer, self._scope = self._scope, self._scope or StepScope()
        try:
            with member_routing(peft_model):
                yield
        finally:
            router.trunk_active = False
            self._scope = outer

    def _once(self, name: str, batch, compute):
        """``compute()`` once per step and batch (:meth:`StepScope.once`); outside a step, every time."""
        return compute() if self._scope is None else self._scope.once(name, batch, compute)

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

    #: what ``compute_loss`` says when asked for outputs (each trainer names its scoring API)
    _no_outputs_hint = "use RenyiEnsemble.score for per-member scores"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        r"""The α-Rényi loss of one batch, :math:`\mathcal{L} = -\frac{1}{N}\sum_i J_i` (+ TRL's MoE term), in order:
        the routed members' ℓ_ik (the trainer's ``_member_loglik``, one member-batched forward), the bound J_i at the
        α in force (:meth:`renyi_objective`; over sources with ``source_column``), TRL's normaliser N (the trainer's
        ``_normalised_loss``), TRL's ``router_aux_loss_coef · aux`` for MoE models, and the metrics through TRL's
        ``_metrics``. With K = 1 it is TRL's own loss, for every α."""
        if return_outputs:
            raise ValueError(f"{type(self).__name__} does not return logits from compute_loss; {self._no_outputs_hint}.")
        mode = "train" if self.model.training else "eval"
        # 1. route the batch to the members: ℓ_ik of every example under every routed member, one member-batched pass
        step = self._member_loglik(model, inputs)
        chunk = self._scope.chunk if self._scope is not None else None
        if chunk is not None:  # one chunk of a chunked step: its surrogate, whose gradient is the bound's
            return self._chunk_surrogate(step, chunk, num_items_in_batch)
        # 2. apply the bound: Σ_i w_i J_i, or Σ_s J_s when the examples name their source (routing metrics logged)
        if step.source_ids is not None:
            bound_sum = self.source_objective(step, mode).value.sum()
        else:
            bound_sum = step.weighted_sum(self.renyi_objective(step.loglik, mode, per_token=step.num_tokens).value)
        # 3. normalise the trainer's way (TRL's normaliser), 4. add TRL's extras (MoE load balancing)
        loss = self._normalised_loss(-bound_sum, step, num_items_in_batch)
        loss = self._with_router_aux_loss(loss, step, num_items_in_batch)
        # 5. log TRL's own metrics of the forward
        self._log_forward_metrics([step], inputs, mode)
        self._log_router_aux_loss([step], mode)
        return loss

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
                self._scope.chunk = ChunkPass(names, weights, loss if last else torch.zeros_like(loss), steps)
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync, routed_members(peft_model, names):
                    total = total + super().training_step(model, inputs, num_items_in_batch)
                offset += len(names)
        finally:
            self._scope.chunk = None
        self._log_forward_metrics(steps, inputs, "train")
        self._log_router_aux_loss(steps, "train")
        return total

    def _chunk_surrogate(self, step: MemberLogLik, chunk: ChunkPass, num_items_in_batch) -> torch.Tensor:
        """``compute_loss`` inside a chunked step: the chunk's surrogate, valued as :meth:`_chunked_training_step` says."""
        weights = chunk.responsibilities.to(step.loglik.dtype)
        surrogate = self._normalised_loss(-step.weighted_sum((weights * step.loglik).sum(-1)), step, num_items_in_batch)
        surrogate = self._with_router_aux_loss(surrogate, step, num_items_in_batch, len(chunk.names) / self.num_members)
        chunk.steps.append(step)
        return (surrogate - surrogate.detach()) + chunk.value.to(surrogate.device, surrogate.dtype)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self.member_routing(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def base_forward(self, model, inputs: dict):
        """One forward of the frozen base model alone over the untiled ``inputs`` (B rows), with the LM head that
        :meth:`member_forward` uses: every member's delta is skipped (:func:`~trl_renyi.model.layer.base_model_only`),
        with no ``requires_grad`` or active-adapter change. E.g. DPO's reference π_ref, one pass for all K members.
        Call it under ``torch.no_grad()``. Returns a ``FusedCausalLMOutput`` with ``log_probs`` ``(B, T−1)``.
        """
        inputs = {**model_inputs_only(inputs), "use_cache": False}
        with base_model_only(self.accelerator.unwrap_model(model)):
            if getattr(self, "_completion_head", False):
                return model(**inputs, completion_head=True, num_members=1)
            return model(**inputs, fused_lm_head=True)

    # ------------------------------------------------------------------ objective
    def _progress(self) -> tuple[int, int]:
        """``(optimizer steps done, planned steps)``; ``(0, 0)`` before training."""
        state = getattr(self, "state", None)
        return (state.global_step, state.max_steps) if state is not None else (0, 0)

    def current_alpha(self) -> float:
        """α in force at this optimizer step (1 during the α warm-up)."""
        return self.objective.alpha_at(*self._progress())

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.accelerator.num_processes > 1 else tensor

    def renyi_objective(self, loglik: torch.Tensor, mode: str, per_token: torch.Tensor | None = None) -> RenyiBound:
        """The bound of ``loglik`` ``(B, K)`` at the α in force (:class:`EnsembleObjective`), its routing metrics
        logged (``per_token`` ``(B,)``: the examples' completion tokens, so member NLLs are per token, else per
        example). A non-finite ℓ raises ``FloatingPointError`` naming the step and member, before any backward."""
        bound, metrics = self.objective(loglik, *self._progress(), per_token=per_token, reduce=self._reduce_sum)
        self._log_routing(metrics, mode)
        return bound

    def source_objective(self, step: MemberLogLik, mode: str):
        """The bound over sources (:func:`~trl_renyi.objective.source_renyi_bound`) for a batch whose examples name
        their source, with the rest of each source from the trainer's :class:`~trl_renyi.training.source_routing.
        SourceMemory`; a training batch then updates the memory. Logs the same routing metrics as
        :meth:`renyi_objective`, per example."""
        unique, local, others = self.source_memory.batch_view(step.source_ids, step.example_weights)
        bound, metrics = self.objective.over_sources(
            step.loglik, local, others, *self._progress(), example_weights=step.example_weights,
            per_token=step.num_tokens, reduce=self._reduce_sum,
        )  # fmt: skip
        if mode == "train" and torch.is_grad_enabled():
            self.source_memory.update(unique, bound.source_loglik)
        self._log_routing(metrics, mode)
        return bound

    def _log_routing(self, routing_metrics: dict[str, float], mode: str) -> None:
        metrics = trainer_metrics(self, mode)
        for key, value in routing_metrics.items():
            if key == ALPHA_METRIC:
                metrics[key] = [value]  # the α in force at the last step logged, not a mean over the window
            else:
                metrics[key].append(value)
        for key, value in self.auto_alpha.metrics().items():  # alpha="auto": what α was chosen from
            metrics[key] = [value]

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
