r"""Uncertainty decomposition of an ensemble's predictive distribution.

For K member distributions :math:`p_k` over the same outcomes (next token, or answer choices) and weights
:math:`w_k` (the prior :math:`\pi_k`, or a posterior :math:`w_k \propto \pi_k p_k(\text{prefix})`):

.. math::

    \underbrace{H\Big[\sum_k w_k p_k\Big]}_{\text{total}}
    = \underbrace{\sum_k w_k H[p_k]}_{\text{aleatoric}}
    + \underbrace{\text{MI}}_{\text{epistemic}}

The mutual information between the outcome and the member is zero when all members agree and grows as they
disagree. Everything is computed in float32 (float64 for float64 input).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Decomposition(NamedTuple):
    """Total entropy, aleatoric part and mutual information (epistemic part), in nats."""

    total: torch.Tensor
    aleatoric: torch.Tensor
    mutual_information: torch.Tensor


def decompose(member_log_probs: torch.Tensor, log_weights: torch.Tensor, dim: int = -1) -> Decomposition:
    r"""Decompose the uncertainty of a weighted mixture of member distributions.

    Args:
        member_log_probs: ``(K, ..., C)`` log-probabilities of each member over C outcomes (normalised along ``dim``).
        log_weights: ``(K,)`` or ``(K, ...)`` log mixture weights broadcastable to ``member_log_probs`` without its
            outcome dimension (normalised over K).
        dim: the outcome dimension.

    Returns:
        :class:`Decomposition` of tensors shaped like ``member_log_probs`` without its member and outcome dims.
    """
    dtype = torch.float64 if member_log_probs.dtype == torch.float64 else torch.float32
    logp = member_log_probs.to(dtype)
    if dim < 0:
        dim = logp.dim() + dim
    lw = log_weights.to(device=logp.device, dtype=dtype)
    while lw.dim() < logp.dim():
        lw = lw.unsqueeze(-1)
    mixture = torch.logsumexp(lw + logp, dim=0)  # (..., C)
    total = -(mixture.exp() * mixture).sum(dim - 1)
    member_entropy = -(logp.exp() * logp).sum(dim)  # (K, ...)
    aleatoric = (lw.squeeze(dim).exp() * member_entropy).sum(0)
    mutual_information = (total - aleatoric).clamp(min=0.0)
    return Decomposition(total=total, aleatoric=aleatoric, mutual_information=mutual_information)


def mixture_log_prob(member_log_probs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """``log Σ_k w_k p_k`` over the member dimension 0 (any trailing shape)."""
    dtype = torch.float64 if member_log_probs.dtype == torch.float64 else torch.float32
    lw = log_weights.to(device=member_log_probs.device, dtype=dtype)
    while lw.dim() < member_log_probs.dim():
        lw = lw.unsqueeze(-1)
    return torch.logsumexp(lw + member_log_probs.to(dtype), dim=0)
