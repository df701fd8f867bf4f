r"""The α-Rényi variational objective over an ensemble of K members (pure torch, no TRL).

For example :math:`i` and member :math:`k` let :math:`\ell_{ik} = \log p(y_i \mid x_i, \theta_k)` and let
:math:`\pi_k` be the mixture weights. The per-example bound (maximised; the training loss is its negative) is

.. math::

    J_i(\alpha) = \frac{1}{1-\alpha} \log \sum_k \pi_k \exp\big((1-\alpha)\,\ell_{ik}\big)

* :math:`\alpha \to 1`: :math:`J_i = \sum_k \pi_k \ell_{ik}` (classical VB, an independent deep ensemble);
* :math:`\alpha = 0`: :math:`J_i = \log \sum_k \pi_k p_{ik}` (the predictive mixture likelihood);
* :math:`\alpha \to -\infty`: :math:`J_i \to \max_k \ell_{ik}` (winner takes all);
* :math:`\alpha > 1`: a soft minimum, favouring members that are good everywhere.

Its gradient is soft routing without a gating network:

.. math::

    \frac{\partial J_i}{\partial \ell_{ik}} = r_{ik}, \qquad
    r_{ik} = \operatorname{softmax}_k\big(\log \pi_k + (1-\alpha)\,\ell_{ik}\big).

All reductions run in float32 (or float64 when the input is float64) whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Below this |1 - α| the bound is evaluated by a centred expansion that is exact in the limit and free of the
# division by 1 - α ≈ 0 (see `_bound_near_one`).
_NEAR_ONE = 1e-3


class RenyiBound(NamedTuple):
    """Result of :func:`renyi_bound`.

    Attributes:
        value: ``(B,)`` the per-example bound :math:`J_i` (differentiable w.r.t. the log-likelihoods).
        responsibilities: ``(B, K)`` the detached routing weights :math:`r_{ik}`, rows summing to one.
    """

    value: torch.Tensor
    responsibilities: torch.Tensor


#: The Rényi order the trainers apply after the warm-up unless told otherwise (see docs/results.md).
DEFAULT_ALPHA = -1.0
#: ``alpha="auto"``: α chosen by the local stability criterion at the end of the warm-up (:mod:`trl_renyi.stability`)
AUTO_ALPHA = "auto"


def check_alpha(value, allow_auto: bool = False) -> float | str:
    """α as a float (any finite value), or :data:`AUTO_ALPHA` where ``allow_auto``; otherwise ``ValueError`` naming it."""
    if allow_auto and isinstance(value, str) and value.strip().lower() == AUTO_ALPHA:
        return AUTO_ALPHA
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = math.nan
    if isinstance(value, bool) or not math.isfinite(alpha):
        expected = f"a finite float or {AUTO_ALPHA!r}" if allow_auto else "a finite float"
        raise ValueError(f"alpha must be {expected}, got {value!r}.")
    return alpha


# ------------------------------------------------------------------------------------------ the settings, checked once
# Each setting of the objective is checked here and nowhere else: the configs, the saved metadata, the member builder
# and the bound itself call these, so a value has one valid range wherever it enters.


def check_num_members(value) -> int:
    """K, an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_members must be an integer >= 1, got {value!r}.")
    return value


def check_member_weights(weights, num_members: int) -> list[float] | None:
    """The prior mixture weights π: ``None`` (uniform) or ``num_members`` finite positive numbers, returned normalised."""
    if weights is None:
        return None
    raw = list(weights.tolist() if isinstance(weights, torch.Tensor) else weights)
    if len(raw) != num_members:
        raise ValueError(f"member_weights must have num_members={num_members} entries, got {len(raw)}.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in raw):
        raise ValueError(f"member_weights must be finite and positive, got {raw}.")
    total = float(sum(raw))
    return [float(w) / total for w in raw]


def check_floor(value) -> float:
    """The responsibility floor λ ∈ [0, 1) (λ = 1 would leave only the α = 1 bound, whatever α)."""
    floor = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"responsibility_floor must lie in [0, 1), got {value!r}.")
    return floor


def check_warmup_ratio(value) -> float:
    """The share of the steps α is held at 1, in [0, 1]."""
    ratio = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"alpha_warmup_ratio must lie in [0, 1], got {value!r}.")
    return ratio


def normalized_log_weights(
    num_members: int, weights=None, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Return :math:`\\log \\pi_k` for ``weights`` (positive, any scale; uniform when ``None``)."""
    check_num_members(num_members)
    normalised = check_member_weights(weights, num_members)
    if normalised is None:
        return torch.full((num_members,), -math.log(num_members), device=device, dtype=dtype)
    return torch.tensor(normalised, dtype=torch.float64).log().to(device=device, dtype=dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bound_near_one(loglik: torch.Tensor, log_weights: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Evaluate :math:`J` for small :math:`\varepsilon = 1-\alpha` without dividing a rounding error by :math:`\varepsilon`.

    With :math:`m = \sum_k \pi_k \ell_k` and :math:`c_k = \ell_k - m` (so :math:`\sum_k \pi_k c_k = 0`):

    .. math::

        J = m + \frac{1}{\varepsilon}\log\Big(1 + \sum_k \pi_k\big(\operatorname{expm1}(\varepsilon c_k) - \varepsilon c_k\big)\Big)

    which equals :math:`m` exactly at :math:`\varepsilon = 0` and is continuous across it. Its gradient w.r.t.
    :math:`\ell_k` is exactly :math:`r_k`.
    """
    weights = log_weights.exp()
    mean = (weights * loglik).sum(-1)
    if eps == 0.0:
        return mean
    centred = loglik - mean.unsqueeze(-1)
    excess = (weights * (torch.expm1(eps * centred) - eps * centred)).sum(-1)
    return mean + torch.log1p(excess) / eps


def renyi_bound(loglik: torch.Tensor, alpha: float, log_weights: torch.Tensor | None = None) -> RenyiBound:
    r"""The α-Rényi bound :math:`J_i(\alpha)` of each example and its routing responsibilities.

    Args:
        loglik: ``(B, K)`` per-example, per-member log-likelihoods :math:`\ell_{ik}` (any float dtype).
        alpha: the Rényi order α, any finite float. α = 1 is the exact limit :math:`\sum_k \pi_k \ell_{ik}`.
        log_weights: ``(K,)`` log mixture weights :math:`\log \pi_k` (normalised); uniform when ``None``.

    Returns:
        :class:`RenyiBound` with ``value`` ``(B,)`` and detached ``responsibilities`` ``(B, K)``, both in float32
        (float64 for float64 input).
    """
    if loglik.dim() != 2:
        raise ValueError(f"loglik must have shape (batch, num_members), got {tuple(loglik.shape)}.")
    alpha = check_alpha(alpha)
    dtype = _accumulation_dtype(loglik.dtype)
    ll = loglik.to(dtype)
    num_members = ll.shape[-1]
    if log_weights is None:
        lw = normalized_log_weights(num_members, device=ll.device, dtype=dtype)
    else:
        lw = log_weights.to(device=ll.device, dtype=dtype)
        if lw.shape != (num_members,):
            raise ValueError(f"log_weights must have shape ({num_members},), got {tuple(lw.shape)}.")

    eps = 1.0 - alpha
    logits = lw + eps * ll
    responsibilities = torch.softmax(logits.detach(), dim=-1)
    if abs(eps) < _NEAR_ONE:
        value = _bound_near_one(ll, lw, eps)
    else:
        value = torch.logsumexp(logits, dim=-1) / eps
    return RenyiBound(value=value, responsibilities=responsibilities)


def floored_renyi_bound(
    loglik: torch.Tensor, alpha: float, log_weights: torch.Tensor | None = None, floor: float = 0.0
) -> RenyiBound:
    r"""The α-Rényi bound mixed with a share ``floor`` = λ of the α = 1 bound (the remedy against forgetting).

    .. math::

        J^\lambda_i = (1-\lambda)\, J_i(\alpha) + \lambda \sum_k \pi_k \ell_{ik}, \qquad
        \frac{\partial J^\lambda_i}{\partial \ell_{ik}} = (1-\lambda)\, r_{ik} + \lambda\, \pi_k \;\ge\; \lambda\,\pi_k

    At small α a member whose responsibility for an example fell to ~0 receives no gradient from it, so it can
    forget what every member should know (the data's agreed part). The floor guarantees each member a share
    λ·π_k of every example's gradient: shared knowledge is kept, while the (1−λ) part still routes the
    contradictory examples to specialists. λ = 0 is :func:`renyi_bound`; as λ → 1 it tends to the α = 1 bound.

    Returns :class:`RenyiBound` whose ``responsibilities`` are the gradient weights
    :math:`(1-\lambda) r_{ik} + \lambda \pi_k` (how much example i trains member k).
    """
    floor = check_floor(floor)
    bound = renyi_bound(loglik, alpha, log_weights)
    if floor == 0.0:
        return bound
    dtype = bound.value.dtype
    num_members = loglik.shape[-1]
    lw = (
        normalized_log_weights(num_members, device=loglik.device, dtype=dtype)
        if log_weights is None
        else log_weights.to(device=loglik.device, dtype=dtype)
    )
    weights = lw.exp()
    value = (1.0 - floor) * bound.value + floor * (weights * loglik.to(dtype)).sum(-1)
    responsibilities = (1.0 - floor) * bound.responsibilities + floor * weights
    return RenyiBound(value=value, responsibilities=responsibilities)


class SourceBound(NamedTuple):
    """Result of :func:`source_renyi_bound`.

    Attributes:
        value: ``(S,)`` each source's share of its bound contributed by this batch (differentiable).
        responsibilities: ``(N, K)`` the detached routing weights of each example: its source's :math:`r_{sk}`.
        source_loglik: ``(S, K)`` the detached full source log-likelihoods :math:`L_{sk}` (the memory's next value).
    """

    value: torch.Tensor
    responsibilities: torch.Tensor
    source_loglik: torch.Tensor


def source_renyi_bound(
    loglik: torch.Tensor,
    source_index: torch.Tensor,
    others: torch.Tensor,
    alpha: float,
    log_weights: torch.Tensor | None = None,
    floor: float = 0.0,
    example_weights: torch.Tensor | None = None,
) -> SourceBound:
    r"""The α-Rényi bound taken over *sources* (e.g. annotators) rather than examples: a mixture of annotators.

    Every example i comes from a source s(i); the source's log-likelihood under member k is the (weighted) sum over
    its examples, :math:`L_{sk} = \sum_{i \in s} w_i \ell_{ik}`, and the bound is

    .. math::

        J_s = \frac{1}{1-\alpha} \log \sum_k \pi_k \exp\big((1-\alpha) L_{sk}\big),
        \qquad \frac{\partial J_s}{\partial \ell_{ik}} = w_i\, r_{sk},\quad
        r_{sk} = \operatorname{softmax}_k\big(\log\pi_k + (1-\alpha) L_{sk}\big),

    so all of a source's examples are routed together and each source follows one member's convention. A batch holds
    only some of a source's examples: ``others`` ``(S, K)`` holds the (detached) log-likelihood of the rest of each
    source (a stochastic-EM memory kept by the caller), :math:`L_{sk} = O_{sk} + \sum_{i \in s \cap
    \text{batch}} w_i \ell_{ik}`, and the value is the batch's share of the bound,
    :math:`J_s(L) - J_s(O)` — over an epoch these shares add up to the sources' bounds, and the gradient is exactly
    that of :math:`J_s`. With the floor λ both terms use :func:`floored_renyi_bound`.

    Exact cases (tested): K = 1 and α = 1 give :math:`\sum_i w_i \sum_k \pi_k \ell_{ik}` (the per-example bound,
    which is linear there); a source with one unit-weight example and ``others = 0`` gives the per-example
    :math:`J_i`.

    Args:
        loglik: ``(N, K)`` per-example, per-member log-likelihoods.
        source_index: ``(N,)`` the batch-local source of each example, in ``[0, S)``.
        others: ``(S, K)`` log-likelihood of each source's examples outside the batch (no gradient).
        alpha, log_weights, floor: as in :func:`floored_renyi_bound`.
        example_weights: ``(N,)`` non-negative weights :math:`w_i` (ones when ``None``).
    """
    if loglik.dim() != 2 or source_index.shape != loglik.shape[:1]:
        raise ValueError(
            f"source_index must hold one source per example: loglik {tuple(loglik.shape)}, "
            f"source_index {tuple(source_index.shape)}"
        )
    dtype = _accumulation_dtype(loglik.dtype)
    ll = loglik.to(dtype)
    if example_weights is not None:
        ll = ll * example_weights.to(device=ll.device, dtype=dtype).unsqueeze(-1)
    index = source_index.to(device=ll.device, dtype=torch.long)
    others = others.detach().to(device=ll.device, dtype=dtype)
    if others.dim() != 2 or others.shape[1] != ll.shape[1] or (index.numel() and int(index.max()) >= others.shape[0]):
        raise ValueError(f"others must have shape (num_sources, {ll.shape[1]}), got {tuple(others.shape)}")
    full = others.index_add(0, index, ll)
    bound = floored_renyi_bound(full, alpha, log_weights, floor)
    with torch.no_grad():
        baseline = floored_renyi_bound(others, alpha, log_weights, floor).value
    return SourceBound(
        value=bound.value - baseline,
        responsibilities=bound.responsibilities[index],
        source_loglik=full.detach(),
    )


def routing_entropy(responsibilities: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of the responsibilities, ``(B, K) -> (B,)``; ``0 · log 0`` counts as 0."""
    r = responsibilities.to(_accumulation_dtype(responsibilities.dtype))
    return -(torch.special.xlogy(r, r)).sum(-1)


def alpha_at_step(alpha: float, warmup_ratio: float, step: int, max_steps: int) -> float:
    """The α in force at optimizer ``step``: held at 1 for the first ``warmup_ratio · max_steps`` steps, then ``alpha``."""
    if warmup_ratio > 0 and max_steps > 0 and step < warmup_ratio * max_steps:
        return 1.0
    return float(alpha)
