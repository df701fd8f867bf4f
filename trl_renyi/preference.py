r"""A member's likelihood of a preference label, one definition for training and for scoring (pure torch, no TRL).

For pair i (prompt x, chosen :math:`y_w`, rejected :math:`y_l`) and member k, with sequence log-probabilities
:math:`s` (LD-DPO: tokens past the shorter answer weighted :math:`\alpha_{LD}`) and the frozen base model as
reference,

.. math::

    m_{ik} = \beta\big[f'\big(s_k(y_w) - s_\text{ref}(y_w)\big) - f'\big(s_k(y_l) - s_\text{ref}(y_l)\big)\big]

(:math:`f'` the score of TRL's f-divergence: the identity for the reverse KL) and the member's log-likelihood of the
label is minus TRL's per-pair loss at that margin:

* ``"sigmoid"``: :math:`\ell = \log\sigma(m)`; with label smoothing ε the expected log-likelihood under ε label
  noise, :math:`(1-\varepsilon)\log\sigma(m) + \varepsilon\log\sigma(-m)` (cDPO);
* ``"robust"``: TRL's unbiased estimate :math:`\big((1-\varepsilon)\log\sigma(m) - \varepsilon\log\sigma(-m)\big)/(1-2\varepsilon)`.

:class:`PreferenceLikelihood` holds every setting this needs; ``RenyiDPOTrainer`` computes ℓ with it, records it in
``renyi_ensemble.json`` (``preference_likelihood``), and scoring a saved ensemble by reward rebuilds it from there, so
an ensemble is scored with the β, loss type, smoothing and divergence it was trained with. What scoring cannot
reproduce is refused by name (:meth:`PreferenceLikelihood.check_scorable`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

#: TRL loss types whose per-pair loss is minus a log-likelihood of the preference label
LIKELIHOOD_LOSS_TYPES = ("sigmoid", "robust")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, coef: float) -> torch.Tensor:
    """TRL's f-DPO scores f'(π/π_ref) of the log-ratios (``reverse_kl``: the log-ratios themselves)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(coef - 1.0) < 1e-6:
            return logratios
        t = (coef - 1.0) * logratios
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (coef - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")


def pair_log_likelihood(margins: torch.Tensor, loss_type: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """ℓ = minus TRL's per-pair DPO loss at the margins (any shape), written as TRL writes its loss so that K = 1
    matches it to rounding."""
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        if eps == 0.0:
            return F.logsigmoid(margins)
        return (1 - eps) * F.logsigmoid(margins) + eps * F.logsigmoid(-margins)
    if loss_type == "robust":
        clean_loss_term = -(1 - eps) * F.logsigmoid(margins)
        flipped_loss_term = -eps * F.logsigmoid(-margins)
        return -(clean_loss_term - flipped_loss_term) / (1 - 2 * eps)
    raise ValueError(f"loss_type {loss_type!r} is not a pairwise log-likelihood; use one of {LIKELIHOOD_LOSS_TYPES}.")


@dataclass(frozen=True)
class PreferenceLikelihood:
    """Everything a member's preference likelihood depends on (module docstring).

    Attributes:
        beta: DPO's β (> 0).
        loss_type: ``"sigmoid"`` or ``"robust"``.
        label_smoothing: ε ∈ [0, 0.5).
        f_divergence_type, f_alpha_divergence_coef: TRL's f-DPO divergence and its α.
        ld_alpha: LD-DPO's weight of the tokens past the shorter answer (``None``: every token weighs 1).
        reference: where π_ref comes from: ``"base"`` (the base model, every member off) or ``"ref_model"`` (a
            separate reference model given to the trainer, which a saved ensemble does not carry).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    ld_alpha: float | None = None
    reference: str = "base"

    def __post_init__(self):
        if isinstance(self.beta, bool) or not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive number, got {self.beta!r}.")
        if self.loss_type not in LIKELIHOOD_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LIKELIHOOD_LOSS_TYPES)}, got {self.loss_type!r}.")
        if not 0.0 <= float(self.label_smoothing) < 0.5:
            raise ValueError(
                f"label_smoothing is the probability ε of a flipped preference label and must lie in [0, 0.5), got "
                f"{self.label_smoothing!r}."
            )
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, got {self.f_divergence_type!r}.")
        if self.reference not in ("base", "ref_model"):
            raise ValueError(f"reference must be 'base' or 'ref_model', got {self.reference!r}.")

    @classmethod
    def from_config(cls, args, ref_model=None) -> PreferenceLikelihood:
        """From a DPO config (``loss_type`` may be TRL's one-element list) and the trainer's reference model."""
        loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        if len(loss_types) != 1:
            raise ValueError(f"loss_type must be exactly one of {list(LIKELIHOOD_LOSS_TYPES)}, got {loss_types}.")
        return cls(
            beta=float(args.beta),
            loss_type=loss_types[0],
            label_smoothing=float(args.label_smoothing),
            f_divergence_type=str(args.f_divergence_type),
            f_alpha_divergence_coef=float(args.f_alpha_divergence_coef),
            ld_alpha=None if args.ld_alpha is None else float(args.ld_alpha),
            reference="base" if ref_model is None else "ref_model",
        )

    @classmethod
    def from_metadata(cls, values: dict) -> PreferenceLikelihood:
        """From the ``preference_likelihood`` record of ``renyi_ensemble.json``."""
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})

    def to_metadata(self) -> dict:
        """The fields recorded in ``renyi_ensemble.json`` under ``preference_likelihood``."""
        return asdict(self)

    def with_beta(self, beta: float) -> PreferenceLikelihood:
        """The same likelihood with β replaced (``trl-renyi eval --beta``)."""
        return replace(self, beta=float(beta))

    def check_scorable(self) -> None:
        """Refuse, by name, what scoring pairs after training cannot reproduce: LD-DPO's token weighting (scoring
        compares whole-sequence log-probabilities) and a separate reference model (a saved ensemble holds none)."""
        if self.ld_alpha is not None:
            raise ValueError(
                f"this ensemble was trained with ld_alpha={self.ld_alpha} (LD-DPO weights the tokens past the shorter "
                "answer), which scoring by whole-sequence log-probabilities cannot reproduce; score by likelihood instead"
            )
        if self.reference != "base":
            raise ValueError(
                "this ensemble was trained against a separate ref_model, which a saved ensemble does not carry; its "
                "reward cannot be reproduced against the base model — score by likelihood instead"
            )

    def sequence_logps(self, per_token: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """Sum of the completion tokens' log-probs (``(…, 2B, T−1)`` → ``(…, 2B)``, rows ``[chosen; rejected]``),
        LD-DPO weighted like TRL (which writes the weighting inline in its loss and exposes no helper for it)."""
        shift_mask = completion_mask[..., 1:]
        per_token = per_token[..., -shift_mask.size(1) :]
        if self.ld_alpha is None:
            return per_token.sum(dim=-1)
        comp_pos = shift_mask.cumsum(dim=1)
        chosen_lens, rejected_lens = shift_mask.sum(dim=1).long().chunk(2, dim=0)
        shared_lens = torch.minimum(chosen_lens, rejected_lens).repeat(2).unsqueeze(1)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens)
        tail_mask = comp_pos > shared_lens
        return (per_token * shared_mask).sum(dim=-1) + self.ld_alpha * (per_token * tail_mask).sum(dim=-1)

    def margins(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
        """:math:`m = \\beta[f'(\\text{chosen log-ratio}) - f'(\\text{rejected log-ratio})]`."""
        chosen = f_divergence_scores(chosen_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)
        rejected = f_divergence_scores(rejected_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)
        return self.beta * (chosen - rejected)

    def loglik(self, margins: torch.Tensor) -> torch.Tensor:
        """The member log-likelihood of the preference label at these margins (minus TRL's per-pair loss)."""
        return pair_log_likelihood(margins, self.loss_type, self.label_smoothing)
