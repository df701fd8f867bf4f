"""Which TRL / transformers training options the ensemble trainers honour, and which they refuse by name.

Both trainers call :func:`check_options` before the model is loaded, so an option the ensemble cannot honour fails
at once with the field's name and what to do, never by silently training something else. Options not listed here
act outside the loss (optimizer, scheduler, logging, saving, precision, batching) and work as in TRL.

Refused, with the reason:

* SFT ``loss_type="dft"``: DFT rescales each token's loss by its detached probability, so a member's per-example
  term is no longer the log-likelihood ℓ_ik that the α-Rényi bound mixes through exp(ℓ_ik).
* ``label_smoothing_factor > 0`` (SFT): the smoothed token loss is not a log-likelihood either. (DPO's own
  ``label_smoothing`` is honoured: see :mod:`trl_renyi.training.dpo`.)
* ``compute_loss_func``: it replaces the loss of one model's logits; the ensemble's loss is the bound over K members.
* ``use_liger_kernel``: Liger's fused loss returns one loss per batch, not the per-example, per-member ℓ_ik.
* ``activation_offloading``: not yet verified against the member-batched backward (untested, so refused).

Honoured as TRL honours them (K = 1 equals the stock trainer): the MoE router auxiliary loss (``router_aux_loss_coef``,
TRL's default for MoE configs; the ensemble adds the mean over members of each member's own load-balancing loss),
``load_best_model_at_end`` (every member restored), ``torch_empty_cache_steps``, DPO's ``label_smoothing``.
"""

from __future__ import annotations


def _refuse(field: str, value, reason: str, remedy: str) -> ValueError:
    return ValueError(f"{field}={value!r} is not supported by the α-Rényi ensemble trainers: {reason} {remedy}")


def check_options(args, compute_loss_func=None) -> None:
    """Raise ``ValueError`` naming the first option in ``args`` (or the trainer's arguments) the ensemble refuses."""
    loss_type = getattr(args, "loss_type", None)
    if isinstance(loss_type, str) and loss_type == "dft":
        raise _refuse(
            "loss_type", loss_type,
            "DFT weights each token's loss by its detached probability, so a member's term is no log-likelihood.",
            "Use loss_type='nll'.",
        )
    if float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0:
        raise _refuse(
            "label_smoothing_factor", args.label_smoothing_factor,
            "a label-smoothed token loss is no log-likelihood of the completion.",
            "Set label_smoothing_factor=0.0.",
        )
    if compute_loss_func is not None:
        raise _refuse(
            "compute_loss_func", getattr(compute_loss_func, "__name__", compute_loss_func),
            "the ensemble's loss is the α-Rényi bound over the K members' log-likelihoods, not a function of one "
            "model's logits.",
            "Subclass the trainer and override renyi_objective instead.",
        )
    if getattr(args, "use_liger_kernel", False):
        raise _refuse(
            "use_liger_kernel", True,
            "Liger's fused loss returns one loss per batch, not the per-example, per-member log-likelihoods.",
            "Set use_liger_kernel=False (the completion-only head already bounds the LM head's memory).",
        )
    if getattr(args, "activation_offloading", False):
        raise _refuse(
            "activation_offloading", True,
            "it is not verified against the member-batched backward.",
            "Use gradient_checkpointing or member_chunk_size to bound activation memory.",
        )
