"""What RenyiSFTTrainer and RenyiDPOTrainer share after their construction: the step and the parts of the loss.

Each trainer owns its ``compute_loss`` (as TRL's trainers do), which reads top to bottom and calls downward: the
member-batched forward (:func:`~trl_renyi.training.forward.member_forward`, a function), then the parts defined here,
:meth:`~RenyiEnsembleTrainerMixin.ensemble_loss` (the α-Rényi bound at the α in force, TRL's normaliser carried by the
step, TRL's MoE term) or, inside a step run in member chunks, :meth:`~RenyiEnsembleTrainerMixin.chunk_loss`, and the
routing metrics. Nothing here calls a trainer's method but ``compute_loss``, the Trainer's own entry point, which the
chunked step drives as transformers' ``training_step`` does; the one value a trainer hands down is its normaliser,
carried by the step record. Each step owns a :class:`~trl_renyi.training.step.StepScope` for the values it computes
once. Saving, loading and publishing are inherited from
:class:`~trl_renyi.training.persistence.EnsemblePersistenceMixin`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from trl_renyi.compat import trainer_metrics
from trl_renyi.model.layer import (
    get_router,
    member_names,
    member_routing,
    routed_members,
)
from trl_renyi.model.lm_head import add_completion_lm_head
from trl_renyi.model.loading import check_vocabulary
from trl_renyi.model.members import (
    register_members_with_zero3,
    set_members_trainable,
)
from trl_renyi.model.saved_format import ALPHA_METRIC
from trl_renyi.model.trunk import enable_shared_trunk
from trl_renyi.objective import AUTO_ALPHA, RenyiBound
from trl_renyi.run_log import set_run_log_level
from trl_renyi.training.auto_alpha import AutoAlpha
from trl_renyi.training.config import construction_settings
from trl_renyi.training.ensemble_objective import EnsembleObjective
from trl_renyi.training.persistence import EnsemblePersistenceMixin
from trl_renyi.training.run_summary import StepTimer
from trl_renyi.training.step import ChunkPass, MemberLogLik, StepScope

logger = logging.getLogger(__name__)


class RenyiEnsembleTrainerMixin(EnsemblePersistenceMixin):
    """Mixed into TRL trainers, before the TRL class in the bases. Saves and checkpoints are published atomically."""

    # ------------------------------------------------------------------ after TRL's constructor
    def _finish_ensemble_setup(self) -> None:
        """What needs TRL's model in place: every member trainable again (TRL may have activated one adapter, which
        freezes the others; the members were built and checked before), the completion head, the shared trunk, the
        α resolver; and the construction settings, checked again when training starts."""
        set_run_log_level(self.args)
        self.member_names = member_names(self.args.num_members)
        self.built_with = construction_settings(self.args)
        self.auto_alpha = AutoAlpha(self)  # resolves alpha="auto" at the end of the warm-up (a no-op otherwise)
        self.add_callback(self.auto_alpha)
        self.add_callback(StepTimer(self))  # step_seconds in every training log
        peft_model = self.accelerator.unwrap_model(self.model)
        check_vocabulary(peft_model, self.processing_class)  # before a token id past the embeddings fails a step
        set_members_trainable(peft_model, self.member_names)
        add_completion_lm_head(peft_model.get_base_model())
        self.shared_trunk_layer = enable_shared_trunk(peft_model) if self.args.shared_trunk else None
        if is_deepspeed_zero3_enabled():
            register_members_with_zero3(peft_model, self.member_names)

    @property
    def num_members(self) -> int:
        """K, the number of ensemble members."""
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

    # ------------------------------------------------------------------ the step
    #: the open step's :class:`StepScope` (``None`` between steps)
    _scope: StepScope | None = None

    @contextlib.contextmanager
    def member_routing(self, model=None):
        """One step: rows are routed to members inside the block (see :func:`~trl_renyi.model.layer.member_routing`)
        and a fresh :class:`StepScope` holds what the step computes once. The trainer's steps hold it around their
        forward and backward; on exit the scope is dropped and the shared trunk switched off again."""
        peft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        outer, self._scope = self._scope, self._scope or StepScope()
        try:
            with member_routing(peft_model):
                yield
        finally:
            get_router(peft_model).trunk_active = False  # set by the member forward for the step's backward
            self._scope = outer

    def _once(self, name: str, batch, compute):
        """``compute()`` once per step and batch (:meth:`StepScope.once`); outside a step, every time."""
        return compute() if self._scope is None else self._scope.once(name, batch, compute)

    @property
    def current_chunk(self) -> ChunkPass | None:
        """The chunk of members this ``compute_loss`` serves inside a step run in member chunks, else ``None``."""
        return self._scope.chunk if self._scope is not None else None

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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self.member_routing(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _member_chunks(self) -> list[list[str]] | None:
        size = getattr(self.args, "member_chunk_size", None)
        if not size or size >= self.num_members:
            return None
        return [self.member_names[i : i + size] for i in range(0, self.num_members, size)]

    def _chunked_training_step(self, model, inputs: dict, num_items_in_batch, chunks: list[list[str]]):
        """Exact chunked training step. First ``compute_loss`` scores every chunk without gradients (each records its
        :class:`MemberLogLik`), which gives the loss and the responsibilities r_ik; then transformers' own
        ``training_step`` runs once per chunk, its ``compute_loss`` returning the chunk's surrogate
        ``−Σ_i Σ_{k∈chunk} r_ik ℓ_ik`` (:meth:`chunk_loss`), whose gradient equals that of ``−Σ_i J_i``
        (∂J_i/∂ℓ_ik = r_ik), valued at the loss on the last chunk and 0 before, so the step returns the loss as
        transformers scales it. Activation memory is that of one chunk."""
        peft_model = self.accelerator.unwrap_model(model)
        model.train()
        inputs = self._prepare_inputs(inputs)
        scored: list[MemberLogLik] = []
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                for names in chunks:
                    self._scope.chunk = ChunkPass(names, scored, scoring=True)
                    with routed_members(peft_model, names):
                        self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                step = scored[-1]
                bound = self.renyi_objective(torch.cat([s.loglik for s in scored], dim=-1), "train", per_token=step.num_tokens)
                loss = step.normalise(-step.weighted_sum(bound.value))
                for names, part in zip(chunks, scored):
                    loss = self.with_router_aux_loss(loss, part, len(names) / self.num_members)
            trained: list[MemberLogLik] = []
            total, offset = 0.0, 0
            for index, names in enumerate(chunks):
                last = index == len(chunks) - 1
                weights = bound.responsibilities[:, offset : offset + len(names)]
                value = loss if last else torch.zeros_like(loss)
                self._scope.chunk = ChunkPass(names, trained, responsibilities=weights, value=value, last=last)
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync, routed_members(peft_model, names):
                    total = total + super().training_step(model, inputs, num_items_in_batch)
                offset += len(names)
        finally:
            self._scope.chunk = None
        return total

    # ------------------------------------------------------------------ the shared parts of compute_loss
    def ensemble_loss(self, step: MemberLogLik, mode: str) -> tuple[torch.Tensor, list[MemberLogLik]]:
        r"""The batch's loss from its ℓ_ik, and the forwards whose metrics are now due.

        The loss is :math:`-\sum_i w_i J_i` at the α in force (:meth:`renyi_objective`; over sources,
        :math:`-\sum_s J_s`, with ``source_column``), normalised as the trainer's step says (``step.normalise``:
        TRL's own, so K = 1 is TRL's loss for every α), plus TRL's MoE load-balancing term; the metrics are due for
        this forward. Inside a step run in member chunks it is the chunk's share (:meth:`chunk_loss`), and the metrics
        are due for every chunk's forward once the last is done (none before)."""
        chunk = self.current_chunk
        if chunk is not None:
            return self.chunk_loss(step), (chunk.steps if chunk.complete else [])
        if step.source_ids is not None:
            bound_sum = self.source_objective(step, mode).value.sum()
        else:
            bound_sum = step.weighted_sum(self.renyi_objective(step.loglik, mode, per_token=step.num_tokens).value)
        return self.with_router_aux_loss(step.normalise(-bound_sum), step), [step]

    def chunk_loss(self, step: MemberLogLik) -> torch.Tensor:
        """``compute_loss`` inside a step run in member chunks (:meth:`_chunked_training_step`): while scoring, the
        step's ℓ is recorded and nothing returned but 0; while training a chunk, its surrogate, valued as the chunked
        step says. Every chunk's :class:`MemberLogLik` is kept in ``current_chunk.steps`` for the metrics."""
        chunk = self.current_chunk
        chunk.steps.append(step)
        if chunk.scoring:
            return step.loglik.new_zeros(())
        weights = chunk.responsibilities.to(step.loglik.dtype)
        surrogate = step.normalise(-step.weighted_sum((weights * step.loglik).sum(-1)))
        surrogate = self.with_router_aux_loss(surrogate, step, len(chunk.names) / self.num_members)
        return (surrogate - surrogate.detach()) + chunk.value.to(surrogate.device, surrogate.dtype)

    def with_router_aux_loss(self, loss: torch.Tensor, step: MemberLogLik, share: float = 1.0) -> torch.Tensor:
        r"""Add TRL's MoE load-balancing term, ``router_aux_loss_coef · aux · step.aux_scale``, when TRL enables it.

        ``aux`` is the mean over the routed members of each member's own load-balancing loss (for K = 1 the model's
        ``aux_loss``, so K = 1 equals TRL); ``share`` is the routed members' fraction of all K, so that a step run in
        member chunks adds the same total as one pass.
        """
        aux = step.router_aux_loss
        if not getattr(self, "aux_loss_enabled", False) or aux is None:
            return loss
        return loss + self.router_aux_loss_coef * aux.to(loss.device) * share * step.aux_scale

    def log_router_aux_loss(self, steps: list[MemberLogLik], mode: str) -> None:
        """TRL's ``aux_loss`` metric (MoE models), from one or several (chunked) forwards."""
        if getattr(self, "aux_loss_enabled", False) and steps[0].router_aux_loss is not None:
            value = torch.stack([s.router_aux_loss.detach().float() for s in steps]).mean()
            trainer_metrics(self, mode)["aux_loss"].append(self.accelerator.gather_for_metrics(value).mean().item())

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
