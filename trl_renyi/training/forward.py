"""The two forwards a trainer's ``compute_loss`` makes: every routed member at once, or the frozen base alone.

Both return a ``FusedCausalLMOutput`` with per-token log-probs of the labels: from the completion-only chunked head of
:mod:`trl_renyi.model.lm_head` where the model has it (a plain linear head), else from TRL's fused head.
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel

from trl_renyi.model.layer import base_model_only, get_router, member_routing
from trl_renyi.model.lm_head import has_completion_head
from trl_renyi.model.members import tile_for_members
from trl_renyi.model.modes import is_activation_checkpointing
from trl_renyi.model.shared_prompt import model_inputs_only


def member_forward(model, inputs: dict, router_logits: bool = False):
    """One member-batched forward of ``inputs`` (B rows) through the routed members (all K, or a chunk).

    ``model`` is the model as the trainer holds it (wrapped or not); ``inputs`` must hold ``labels`` (-100 where no
    log-prob is needed). Returns a ``FusedCausalLMOutput`` for the K·B tiled rows: ``log_probs`` ``(K·B, T−1)``, rows
    ``k·B … (k+1)·B − 1`` belonging to the k-th routed member. With a shared trunk the model receives the untiled batch
    and tiles at the first adapted layer; only the labels are tiled here. ``router_logits`` asks an MoE model for its
    router logits (TRL's ``aux_loss_enabled``), from which each member's load-balancing loss is taken.

    Inside a step (``trainer.member_routing``) the step's routing is used and the shared trunk stays switched on until
    the step's backward is done (gradient checkpointing recomputes with it); outside one, the forward opens its own
    routing, which gradient checkpointing refuses (its backward would recompute outside it).
    """
    inputs = model_inputs_only(inputs)
    peft_model = extract_model_from_parallel(model)
    router = get_router(peft_model)
    if router.routing is None:  # called outside a training or prediction step
        if torch.is_grad_enabled() and is_activation_checkpointing(peft_model):
            raise RuntimeError(
                "member_forward with gradients under gradient checkpointing must run inside "
                "`trainer.member_routing(model)` together with its backward (the backward recomputes the forward); "
                "training_step and prediction_step open it themselves."
            )
        with member_routing(peft_model):
            try:
                return member_forward(model, inputs, router_logits)
            finally:
                router.trunk_active = False
    copies = router.num_members
    router.routing.rows_per_member, router.routing.tokens_per_row = inputs["input_ids"].shape[:2]
    router.trunk_active = router.trunk_layer is not None and "cu_seq_lens_q" not in inputs
    if router.trunk_active:
        tiled = {**inputs, "labels": tile_for_members({"labels": inputs["labels"]}, copies)["labels"]}
    else:
        tiled = tile_for_members(inputs, copies)
    tiled["use_cache"] = False
    if router_logits:
        tiled["output_router_logits"] = True
    if has_completion_head(peft_model.get_base_model()):
        return model(**tiled, completion_head=True, num_members=copies)
    return model(**tiled, fused_lm_head=True)


def base_forward(model, inputs: dict):
    """One forward of the frozen base model alone over the untiled ``inputs`` (B rows), with the head
    :func:`member_forward` uses: every member's delta is skipped (:func:`~trl_renyi.model.layer.base_model_only`), with
    no ``requires_grad`` or active-adapter change. E.g. DPO's reference π_ref, one pass for all K members. Call it
    under ``torch.no_grad()``. Returns a ``FusedCausalLMOutput`` with ``log_probs`` ``(B, T−1)``."""
    inputs = {**model_inputs_only(inputs), "use_cache": False}
    peft_model = extract_model_from_parallel(model)
    with base_model_only(peft_model):
        if has_completion_head(peft_model.get_base_model()):
            return model(**inputs, completion_head=True, num_members=1)
        return model(**inputs, fused_lm_head=True)
