r"""When does spreading pay? The local stability criterion of a collapsed ensemble, measured from the data.

At a one-model fit :math:`\theta^*` (a K = 1 run, or one member after the α = 1 warm-up, when every member has
fitted all the data), a spread ensemble beats the collapsed one locally iff :math:`(1-\varphi)(1-\alpha)\lambda_1 > 1`,
with :math:`\lambda_1` the top generalised eigenvalue of the units' gradient outer products
:math:`F = \sum_u g_u g_u^\top` against the model's own Fisher (for the negative Hessian) and φ the responsibility
floor: :math:`\alpha^* = 1 - 1/\lambda_1`. Data one model can serve gives λ ≈ 1 (information equality); units that
gather votes following a convention of their own raise :math:`\lambda_1` in the direction that separates them.
:func:`measure_stability` returns the spectrum, its calibrated null (labels redrawn from the fitted model), α*, the
recommended α and each unit's side of the split (:class:`StabilityReport`). The math is in
:mod:`trl_renyi.stability.criterion`.

Example::

    from trl_renyi.stability import choice_votes, measure_stability

    votes = choice_votes(rows, tokenizer, unit="source", source_key="annotator")
    report = measure_stability(peft_model, tokenizer, votes)
    print(report.summary()); report.plot("stability.png")
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from trl_renyi.stability.criterion import (
    GradientTable,
    Spectrum,
    critical_alpha,
    recommend_alpha,
    spread_is_favourable,
    spread_spectrum,
)
from trl_renyi.stability.gradients import gradient_table, sequence_count
from trl_renyi.stability.report import StabilityReport
from trl_renyi.stability.votes import (
    UNITS,
    ChoiceVotes,
    PairVotes,
    SequenceVotes,
    choice_votes,
    pair_votes,
    sequence_votes,
    subsample_units,
)

_KINDS = {ChoiceVotes: "choice", SequenceVotes: "sequence", PairVotes: "pair"}


def measure_stability(
    model,
    tokenizer,
    votes,
    *,
    adapter: str | None = None,
    floor: float = 0.0,
    damping: float = 1.0,
    sketch_dim: int | None = 4096,
    null_draws: int = 20,
    null_level: float = 0.95,
    num_directions: int = 10,
    max_units: int | None = None,
    fisher_samples: int = 2,
    null_samples: int = 2,
    seed: int = 0,
    show_progress: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    item_cache: dict | None = None,
) -> StabilityReport:
    r"""Measure the stability criterion of ``votes`` at ``model``'s fit.

    Args:
        model: a PEFT model whose adapter (``adapter``, default the active one; a member name for an ensemble) is the
            one-model fit θ*.
        tokenizer: its tokenizer (the pad token id is read).
        votes: :class:`ChoiceVotes`, :class:`SequenceVotes` or :class:`PairVotes` (see their builders).
        floor: the responsibility floor φ the α values account for.
        damping: the prior's curvature in votes' worth of the Fisher's mean curvature (δ = damping · tr G / Σ_v w_v).
        sketch_dim: D of the gradient sketch; ``None`` (or ≥ P) keeps exact gradients.
        null_draws: draws of labels from the fitted model for the null; ``null_level`` the quantile of the null's
            λ_1 that λ_1 must clear.
        max_units: measure on a random sample of at most this many units.
        fisher_samples, null_samples: sampled completions per free-text vote for the Fisher and for the null.
        gradient_checkpointing_kwargs: how to switch gradient checkpointing on again after the measurement (which
            runs without it), e.g. a trainer's ``args.gradient_checkpointing_kwargs``.
        item_cache: choice votes only: a dict keeping every item's gradients, so that the same items of the same model
            measured again with other units run no second forward (pass the same dict each time).
    """
    start = time.perf_counter()
    votes = subsample_units(votes, max_units, seed)
    kind = _KINDS[type(votes)]
    bar = tqdm(total=sequence_count(votes) + null_draws, desc="stability", unit="seq", disable=not show_progress)
    try:
        table = gradient_table(
            model, tokenizer, votes, adapter=adapter, sketch_dim=sketch_dim, seed=seed, fisher_samples=fisher_samples,
            null_samples=null_samples, progress=bar.update, checkpointing_kwargs=gradient_checkpointing_kwargs,
            item_cache=item_cache,
        )  # fmt: skip
        spectrum = spread_spectrum(
            table, damping=damping, num_directions=num_directions, null_draws=null_draws, seed=seed,
            progress=lambda: bar.update(1),
        )  # fmt: skip
    finally:
        bar.close()
    unit = _unit_kind(votes)
    return StabilityReport.from_spectrum(
        spectrum, table, kind=kind, unit=unit, floor=floor, damping=damping, null_level=null_level,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _unit_kind(votes) -> str:
    first = votes.unit_names[0] if votes.unit_names else ("row",)
    return {"source": "source", "vote": "completion"}.get(first[0], "row") if isinstance(first, tuple) else "row"


__all__ = [
    "UNITS",
    "ChoiceVotes",
    "GradientTable",
    "PairVotes",
    "SequenceVotes",
    "Spectrum",
    "StabilityReport",
    "choice_votes",
    "critical_alpha",
    "gradient_table",
    "measure_stability",
    "pair_votes",
    "recommend_alpha",
    "sequence_votes",
    "spread_is_favourable",
    "spread_spectrum",
]
