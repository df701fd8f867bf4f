r"""The ensemble objective of one batch: α schedule, finiteness check, bound and routing metrics, with no trainer state.

A trainer hands it the ``(N, K)`` matrix :math:`\ell_{ik}` of one member-batched forward and gets back the bound

.. math::

    J_i = \frac{1}{1-\alpha_t} \log \sum_k \pi_k \exp\big((1-\alpha_t)\,\ell_{ik}\big)
    \quad\text{(per example, or per source: } \ell_{ik} \to L_{sk} = \textstyle\sum_{i\in s} w_i \ell_{ik}\text{)}

with the responsibility floor λ mixed in (:func:`~trl_renyi.objective.floored_renyi_bound`), where
:math:`\alpha_t` is 1 during the warm-up and α after it (:func:`~trl_renyi.objective.alpha_at_step`); and the routing
metrics of the batch as plain numbers. What it needs from a run — the step, a sum over processes — is passed in, so
the same object serves training, evaluation and :meth:`~trl_renyi.RenyiDPOTrainer.score_pairs`, and can be tested
without a trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trl_renyi.model.saved_format import ALPHA_METRIC, SHARE_METRIC
from trl_renyi.objective import (
    RenyiBound,
    SourceBound,
    alpha_at_step,
    check_alpha,
    check_floor,
    check_warmup_ratio,
    floored_renyi_bound,
    normalized_log_weights,
    routing_entropy,
    source_renyi_bound,
)

#: a sum over the processes of a run (identity in one process)
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class EnsembleObjective:
    """The α-Rényi objective of a K-member ensemble with its schedule (α after ``warmup_ratio`` of the steps, 1 before),
    mixture weights :math:`\\pi_k` and responsibility floor λ."""

    member_names: tuple[str, ...]
    log_weights: torch.Tensor  # (K,) log π_k
    alpha: float
    warmup_ratio: float = 0.0
    floor: float = 0.0

    @classmethod
    def from_args(cls, args, member_names, alpha: float | None = None) -> EnsembleObjective:
        """From a :class:`~trl_renyi.training.config.RenyiEnsembleArguments` as it is now (``alpha``,
        ``alpha_warmup_ratio``, ``member_weights``, ``responsibility_floor``), each checked by its one definition in
        :mod:`trl_renyi.objective`; ``alpha`` given here replaces ``args.alpha`` (the resolution of ``"auto"``)."""
        return cls(
            member_names=tuple(member_names),
            log_weights=normalized_log_weights(len(member_names), args.member_weights),
            alpha=check_alpha(args.alpha if alpha is None else alpha),
            warmup_ratio=check_warmup_ratio(args.alpha_warmup_ratio),
            floor=check_floor(getattr(args, "responsibility_floor", 0.0)),
        )

    @property
    def num_members(self) -> int:
        return len(self.member_names)

    def alpha_at(self, step: int, max_steps: int) -> float:
        """α in force at optimizer ``step`` of ``max_steps``."""
        return alpha_at_step(self.alpha, self.warmup_ratio, step, max_steps)

    def check_finite(self, loglik: torch.Tensor, step_number: int, reduce: ReduceSum = _no_reduce) -> None:
        """Raise ``FloatingPointError`` naming the step and the member(s) when any ℓ_ik is NaN or ±inf.

        It runs before the loss exists, so no backward pass and no optimizer step ever sees the bad values. ``reduce``
        sums the per-member count of bad entries over the processes, so every process stops at the same step and none
        is left waiting in a collective.
        """
        local = ~torch.isfinite(loglik.detach())
        bad = reduce(local.sum(0).float())
        if not bool(bad.any()):
            return
        members = ", ".join(self.member_names[k] for k in bad.nonzero().flatten().tolist())
        first = local.nonzero()
        where = f"first at example {int(first[0, 0])} of the batch" if first.numel() else "on another process"
        raise FloatingPointError(
            f"Non-finite log-likelihood at step {step_number} for member {members} ({where}); stopping before the "
            "optimizer applies it, so the weights keep their last finite values. Check the learning rate and the data."
        )

    def __call__(
        self, loglik: torch.Tensor, step: int, max_steps: int, per_token=None, reduce: ReduceSum = _no_reduce
    ) -> tuple[RenyiBound, dict[str, float]]:
        """One batch at optimizer ``step`` of ``max_steps``: ℓ checked for finiteness, the bound at the α in force,
        and the routing metrics (:meth:`routing_metrics`)."""
        alpha = self.alpha_at(step, max_steps)
        self.check_finite(loglik, step + 1, reduce)
        bound = self.bound(loglik, alpha)
        return bound, self.routing_metrics(loglik, bound.responsibilities, alpha, per_token, reduce)

    def over_sources(
        self, loglik, source_index, others, step: int, max_steps: int, example_weights=None, per_token=None,
        reduce: ReduceSum = _no_reduce,
    ) -> tuple[SourceBound, dict[str, float]]:  # fmt: skip
        """As :meth:`__call__` with the bound over sources (:meth:`source_bound`); metrics per example."""
        alpha = self.alpha_at(step, max_steps)
        self.check_finite(loglik, step + 1, reduce)
        bound = self.source_bound(loglik, source_index, others, alpha, example_weights)
        return bound, self.routing_metrics(loglik, bound.responsibilities, alpha, per_token, reduce)

    def bound(self, loglik: torch.Tensor, alpha: float) -> RenyiBound:
        """The per-example bound ``(N,)`` and responsibilities ``(N, K)`` of ``loglik`` ``(N, K)`` at ``alpha``."""
        return floored_renyi_bound(loglik, alpha, self.log_weights.to(loglik.device), self.floor)

    def source_bound(self, loglik, source_index, others, alpha: float, example_weights=None) -> SourceBound:
        """The bound over sources (:func:`~trl_renyi.objective.source_renyi_bound`); ``others`` ``(S, K)`` holds the
        log-likelihood of each source's examples outside the batch."""
        return source_renyi_bound(
            loglik, source_index, others, alpha, self.log_weights.to(loglik.device), self.floor, example_weights
        )

    def routing_metrics(
        self, loglik, responsibilities, alpha: float, per_token=None, reduce: ReduceSum = _no_reduce
    ) -> dict[str, float]:
        """The batch's routing metrics, summed over processes by ``reduce``: α, the mean routing entropy
        :math:`-\\sum_k r_{ik}\\log r_{ik}`, the mean spread of :math:`\\ell_{ik}` over members, and per member its
        share :math:`\\frac1N\\sum_i r_{ik}` and NLL (per completion token when ``per_token`` ``(N,)`` gives the
        examples' token counts, else per example)."""
        loglik = loglik.detach().float()
        num = loglik.shape[0]
        tokens = per_token.float().sum() if per_token is not None else torch.tensor(float(num), device=loglik.device)
        stats = torch.cat(
            [
                torch.tensor([float(num)], device=loglik.device),
                routing_entropy(responsibilities).sum().reshape(1).to(loglik.device),
                (loglik.std(dim=-1, unbiased=False).sum() if num else loglik.new_zeros(())).reshape(1),
                tokens.reshape(1).to(loglik.device),
                responsibilities.sum(0).to(loglik.device),
                -loglik.sum(0),
            ]
        )
        stats = reduce(stats)
        count, entropy_sum, std_sum, token_sum = (float(v) for v in stats[:4])
        k = self.num_members
        shares, nll = stats[4 : 4 + k], stats[4 + k : 4 + 2 * k]
        metrics = {
            ALPHA_METRIC: alpha,
            "renyi/routing_entropy": entropy_sum / max(count, 1.0),
            "renyi/loglik_std": std_sum / max(count, 1.0),
        }
        for index, name in enumerate(self.member_names):
            metrics[SHARE_METRIC.format(name=name)] = float(shares[index]) / max(count, 1.0)
            metrics[f"renyi/{name}/nll"] = float(nll[index]) / max(token_sum, 1.0)
        return metrics
