"""Configuration: the ensemble fields shared by :class:`RenyiSFTConfig` and :class:`RenyiDPOConfig`."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, SFTConfig

from trl_renyi.data.group_conflicts import GROUP_ROWS
from trl_renyi.model.saved_format import SETTINGS_FIELDS
from trl_renyi.objective import (
    AUTO_ALPHA,
    DEFAULT_ALPHA,
    check_alpha,
    check_floor,
    check_member_weights,
    check_num_members,
    check_warmup_ratio,
)


@dataclass
class RenyiEnsembleArguments:
    """Fields of the α-Rényi LoRA ensemble, mixed into TRL's SFT and DPO configs (one definition, not two)."""

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory (TRL's default: on). transformers 5 "
            "calls this option activation_checkpointing; either name works."
        },
    )
    num_members: int = field(
        default=4,
        metadata={"help": "Number K of LoRA members in the ensemble (>= 1). K = 1 reproduces plain TRL training."},
    )
    alpha: float | str = field(
        default=DEFAULT_ALPHA,
        metadata={
            "help": "Rényi order α of the objective J = 1/(1-α)·log Σ_k π_k exp((1-α)ℓ_k), applied after the warm-up. "
            "α → 1: independent deep ensemble (every member fits everything); α = 0: predictive mixture "
            "(complementary specialists); α < 0: sharper, winner-take-all routing, where specialists strictly beat "
            "hedging on two-way conflicts; α > 1: soft minimum. 'auto': chosen at the end of the warm-up by the local "
            "stability criterion, measured on auto_alpha_units training units: members spread along the directions "
            "that clear a calibrated null and not along the bulk, and α stays 1 when nothing clears it (see "
            "docs/method.md). Default -1 (see docs/results.md)."
        },
    )
    member_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Prior mixture weights π_k, K positive numbers (normalised to sum to 1). Uniform if unset."},
    )
    loglik_reduction: str = field(
        default="sum",
        metadata={
            "help": "Per-example log-likelihood ℓ_ik of SFT: 'sum' of the completion tokens' log-probs (the "
            "sequence likelihood; K = 1 equals TRL's loss) or their 'mean' per token.",
            "choices": ["sum", "mean"],
        },
    )
    alpha_warmup_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of the training steps during which α is held at 1 (every member fits all data) before "
            "`alpha` applies. Lets every member learn what the data agrees on before members specialise. 0 disables it."
        },
    )
    member_init_std: float = field(
        default=1e-3,
        metadata={
            "help": "Standard deviation of each member's random initial LoRA B (own seed per member), so that members "
            "start functionally different; 0 keeps PEFT's B = 0, where identical members sit on a saddle. Ignored "
            "with one member (K = 1 keeps PEFT's init and equals TRL)."
        },
    )

    responsibility_floor: float = field(
        default=0.1,
        metadata={
            "help": "λ in [0, 1): mix λ of the α = 1 bound into the objective, J = (1-λ)·J_α + λ·Σ_k π_k ℓ_k, so every "
            "member receives at least λ·π_k of every example's gradient and keeps what all data agrees on while "
            "specialising on what it contradicts. 0 disables it."
        },
    )
    auto_alpha_units: int = field(
        default=256,
        metadata={
            "help": "alpha='auto': how many training units (rows, completions, pairs or sources, as the bound takes "
            "them) the stability criterion is measured on at the end of the warm-up, drawn at random."
        },
    )
    auto_alpha_damping: float = field(
        default=1.0,
        metadata={
            "help": "alpha='auto': the prior's curvature added to the model's Fisher, in votes' worth of its mean "
            "curvature (δ = damping · tr G / Σ w); LoRA has flat directions that only a prior makes finite."
        },
    )
    auto_alpha_null_draws: int = field(
        default=20,
        metadata={"help": "alpha='auto': draws of labels from the fitted model for the null that λ1 must clear (q95)."},
    )
    auto_alpha_sketch_dim: int = field(
        default=4096,
        metadata={"help": "alpha='auto': dimension of the count sketch of the members' per-example gradients."},
    )
    member_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Process the members in chunks of this size per forward/backward so that activation memory scales "
            "with the chunk instead of K. A no-grad pass first scores all members (the responsibilities need every "
            "ℓ_ik), then each chunk is trained with its detached responsibilities: the same loss and gradients "
            "(exactly, without LoRA dropout) for about one extra forward pass. Unset: all K members in one pass."
        },
    )
    shared_trunk: bool = field(
        default=True,
        metadata={
            "help": "When every LoRA module sits in the upper decoder layers (see LoraConfig.layers_to_transform), run "
            "the layers below once on the untiled batch and tile the hidden states at the first adapted layer."
        },
    )

    share_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "Run a prompt once for all the sequences that start with it (DPO's chosen and rejected answers; "
            "the completions of a multi-annotator SFT row; in other SFT batches, a prefix such as a system prompt "
            "common to every row, when that saves at least a quarter of the batch's tokens): packed rows in which "
            "every completion attends to the shared prompt and to itself, so loss and gradients equal the unshared "
            "computation. Unset: on wherever the model allows it (sdpa or eager attention, no sliding window, "
            "position ids, no mixture of experts); True: refuse by name where it cannot be honoured; False: every "
            "sequence runs on its own."
        },
    )

    group_rows: str | None = field(
        default=None,
        metadata={
            "help": "For a group-annotated dataset (columns prompt, options, groups; docs/data.md), the training rows "
            "to build from it, group names dropped: "
            + "; ".join(f"'{name}': {text}" for name, text in GROUP_ROWS.items())
            + ". Unset: 'vote' for SFT, 'pairs' for DPO. The settings a kind of rows needs (source_column='annotator' "
            "for 'annotator') are set with it.",
            "choices": list(GROUP_ROWS),
        },
    )

    def _validate_renyi_fields(self) -> None:
        if self.group_rows is not None and self.group_rows not in GROUP_ROWS:
            raise ValueError(f"group_rows must be one of {list(GROUP_ROWS)} or None, got {self.group_rows!r}.")
        self.num_members = check_num_members(self.num_members)
        self.alpha = check_alpha(self.alpha, allow_auto=True)
        self.member_weights = check_member_weights(self.member_weights, self.num_members)
        if self.loglik_reduction not in ("sum", "mean"):
            raise ValueError(f"loglik_reduction must be 'sum' or 'mean', got {self.loglik_reduction!r}.")
        self.alpha_warmup_ratio = check_warmup_ratio(self.alpha_warmup_ratio)
        self.responsibility_floor = check_floor(self.responsibility_floor)
        check_auto_alpha(self)
        if self.member_chunk_size is not None and (
            isinstance(self.member_chunk_size, bool)
            or not isinstance(self.member_chunk_size, int)
            or self.member_chunk_size < 1
        ):
            raise ValueError(f"member_chunk_size must be an integer >= 1 or None, got {self.member_chunk_size!r}.")
        if self.share_prompt is not None and not isinstance(self.share_prompt, bool):
            raise ValueError(f"share_prompt must be True, False or None (automatic), got {self.share_prompt!r}.")
        if not (math.isfinite(float(self.member_init_std)) and float(self.member_init_std) >= 0.0):
            raise ValueError(f"member_init_std must be a finite number >= 0, got {self.member_init_std!r}.")

    def __post_init__(self):
        self._validate_renyi_fields()
        no_accelerator = not torch.accelerator.is_available()
        if self.bf16 is None and not self.fp16 and no_accelerator:
            # TRL defaults to bf16, which transformers refuses on a machine with no accelerator: train in float32
            self.bf16 = False
        if no_accelerator:
            self.dataloader_pin_memory = False  # nothing to pin memory for (torch warns at every epoch otherwise)
        if getattr(self, "activation_checkpointing", False) is None:
            # TRL's default (checkpointing on) or the user's gradient_checkpointing, set through the current name:
            # transformers warns on the deprecated one, which this config documents as an equal alternative
            self.activation_checkpointing = True if self.gradient_checkpointing is None else self.gradient_checkpointing
        elif self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.activation_checkpointing
        super().__post_init__()

    def renyi_metadata(self) -> dict:
        """The ensemble settings, as written to ``renyi_ensemble.json`` (``saved_format.SETTINGS_FIELDS``)."""
        return {field: getattr(self, field) for field in SETTINGS_FIELDS}


def check_auto_alpha(args) -> None:
    """The fields of ``alpha='auto'``: a warm-up to measure at the end of, and sizes of the measurement."""
    for name in ("auto_alpha_units", "auto_alpha_null_draws", "auto_alpha_sketch_dim"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    damping = args.auto_alpha_damping
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"auto_alpha_damping must be a positive number, got {damping!r}.")
    if args.alpha == AUTO_ALPHA and getattr(args, "packing", False):
        raise ValueError(
            "alpha='auto' measures every training unit on its own, which packed rows (several examples in one row) "
            "do not allow: set packing=False or alpha to a number."
        )
    if args.alpha == AUTO_ALPHA and args.alpha_warmup_ratio == 0 and args.num_members > 1:
        raise ValueError(
            "alpha='auto' measures the stability criterion at the end of the α = 1 warm-up, when every member has "
            "fitted all the data; with alpha_warmup_ratio=0 there is no warm-up. Set alpha_warmup_ratio > 0."
        )


#: Fields that shape what the trainer builds (the members, their layers, the data layout): read once, at construction.
#: The objective's own settings (α, the floor, the warm-up, the mixture weights, the reduction) are read at use.
FIXED_AT_CONSTRUCTION = (
    "num_members", "member_init_std", "shared_trunk", "share_prompt", "source_column", "multi_annotator_routing",
    "group_rows",
)  # fmt: skip


def construction_settings(args) -> dict:
    return {name: getattr(args, name, None) for name in FIXED_AT_CONSTRUCTION}


def check_construction_unchanged(args, built: dict) -> None:
    """Refuse, by name, a field of :data:`FIXED_AT_CONSTRUCTION` changed on ``trainer.args`` after construction (the
    ensemble it shapes exists already, so the new value would be silently ignored)."""
    for name, value in built.items():
        now = getattr(args, name, None)
        if now != value:
            raise ValueError(
                f"{name} was {value!r} when the trainer was built and is {now!r} now: it shapes the members and the data "
                "layout built with the trainer, so it cannot change afterwards. Build a new trainer with it."
            )


#: TrainingArguments fields redefined here (same meaning, a default that does not trip a deprecation warning)
TRAINING_ARGUMENT_OVERRIDES = ("gradient_checkpointing",)


@dataclass
class RenyiSFTArguments:
    """Ensemble fields that only the SFT trainer has (multi-annotator rows)."""

    multi_annotator_routing: str = field(
        default="completion",
        metadata={
            "help": "How the bound treats a multi-annotator row (prompt + weighted completions): 'completion' makes "
            "each completion its own example, routed on its own (the loss of the expanded one-completion rows); "
            "'row' makes the row one example whose log-likelihood under member k is that of all its annotations, "
            "ℓ_ik = Σ_j w_ij ℓ_ijk, so a member is responsible for an item's whole vote distribution, not for one "
            "label across items. Equal at α = 1 or K = 1. 'row' needs share_prompt and loglik_reduction='sum'.",
            "choices": ["completion", "row"],
        },
    )

    source_column: str | None = field(
        default=None,
        metadata={
            "help": "A dataset column naming the source of every row (e.g. an annotator id; in a multi-annotator row "
            "one id, or a list parallel to completions). The bound is then taken over sources rather than rows, "
            "J_s = 1/(1−α) log Σ_k π_k exp((1−α) Σ_{i∈s} ℓ_ik): all of a source's rows are routed to members together, "
            "with each source's log-likelihood tracked across steps (stochastic EM), so members become a mixture of "
            "the sources' conventions. Equal to the per-row loss at K = 1 or α = 1. Unset: every row is routed on its "
            "own.",
        },
    )

    def __post_init__(self):
        self._validate_sft_fields()
        super().__post_init__()

    def _validate_sft_fields(self) -> None:
        if self.source_column is not None and self.multi_annotator_routing == "row":
            raise ValueError(
                "source_column routes whole sources and multi_annotator_routing='row' whole rows: choose one "
                "(leave multi_annotator_routing='completion' with source_column)."
            )
        if self.source_column is not None and self.loglik_reduction != "sum":
            raise ValueError(
                f"source_column sums each source's log-likelihoods and needs loglik_reduction='sum', got "
                f"{self.loglik_reduction!r}."
            )
        if self.multi_annotator_routing not in ("completion", "row"):
            raise ValueError(
                f"multi_annotator_routing must be 'completion' or 'row', got {self.multi_annotator_routing!r}."
            )
        if self.multi_annotator_routing == "row" and self.loglik_reduction != "sum":
            raise ValueError(
                "multi_annotator_routing='row' sums the log-likelihoods of a row's annotations and needs "
                f"loglik_reduction='sum', got {self.loglik_reduction!r}."
            )


def ensemble_fields_doc(trl_config, *extra_fields) -> str:
    """The docstring of a Rényi config: its ensemble fields listed as TRL's configs list theirs (from the fields'
    ``help``, so the two never disagree), then the TRL config's own parameters."""
    lines = [
        f"Configuration of the α-Rényi LoRA ensemble trainer: every field of [`~trl.{trl_config.__name__}`] plus the "
        "ensemble's fields.",
        "",
        "Parameters:",
        "",
        "    > Parameters of the ensemble",
        "",
    ]
    fields = [*RenyiEnsembleArguments.__dataclass_fields__.values()]
    for arguments in extra_fields:
        fields += [arguments.__dataclass_fields__[name] for name in arguments.__annotations__]
    for f in fields:
        if f.name in TRAINING_ARGUMENT_OVERRIDES:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"    {f.name} (`{kind}`, defaults to `{default!r}`):")
        lines.extend("        " + line for line in textwrap.wrap(f.metadata.get("help", ""), 108))
    lines += ["", f"    > Parameters of [`~trl.{trl_config.__name__}`]", ""]
    lines += [textwrap.indent(textwrap.dedent(trl_config.__doc__ or ""), "    ")]
    return "\n".join(lines)


@dataclass
class RenyiSFTConfig(RenyiSFTArguments, RenyiEnsembleArguments, SFTConfig):
    __doc__ = ensemble_fields_doc(SFTConfig, RenyiSFTArguments)


@dataclass
class RenyiDPOConfig(RenyiEnsembleArguments, DPOConfig):
    __doc__ = ensemble_fields_doc(DPOConfig)
