r"""The local stability criterion of a collapsed ensemble (pure torch: gradients in, eigenvalues and α out).

**The criterion.** Let :math:`\theta^*` be one model's fit of the data, :math:`\ell_u(\theta)` the log-likelihood of
*unit* u (the thing the bound is taken over: a row, a completion, a preference pair, or all rows of one source),
:math:`g_u = \nabla\ell_u(\theta^*)`, :math:`H = \sum_u \nabla^2\ell_u(\theta^*)` and :math:`F = \sum_u g_u g_u^\top`.
Perturb a collapsed ensemble, :math:`\theta_k = \theta^* + \bar\delta + e_k` with :math:`\sum_k \pi_k e_k = 0`.
With :math:`\tfrac{1}{1-\alpha}\log\sum_k\pi_k e^{(1-\alpha)x_k} = \bar x + \tfrac{1-\alpha}{2}\operatorname{Var}_\pi(x)
+ O(x^3)` and :math:`\operatorname{Var}_\pi(g_u^\top e_k) = \sum_k\pi_k (g_u^\top e_k)^2`, the bound
:math:`J = \sum_u J_u(\alpha)` changes to second order by

.. math::

    \Delta J = \tfrac12\,\bar\delta^\top H \bar\delta + \tfrac12 \sum_k \pi_k\, e_k^\top \big[H + (1-\alpha)\,F\big] e_k
    \;(+\,\bar\delta^\top \textstyle\sum_u g_u,\ \text{zero at a fit}),

so the collapsed ensemble is a local maximum along spread directions iff :math:`H + (1-\alpha)F \prec 0` there.
With :math:`\lambda_1` the largest generalised eigenvalue of :math:`F v = \lambda\,(-H) v`, **spreading is locally
favourable iff** :math:`(1-\alpha)\lambda_1 > 1`, i.e. :math:`\alpha < \alpha^* = 1 - 1/\lambda_1`, for every K and
π. A responsibility floor φ mixes φ of the α = 1 bound (whose spread curvature is H) into the objective, so the
condition becomes :math:`(1-\varphi)(1-\alpha)\lambda_1 > 1`.

**What is computed.** :math:`-H` is replaced by the model's own Fisher :math:`G = \sum_u \mathbb{E}_{y\sim
p_\theta}[\nabla\ell_u \nabla\ell_u^\top]` (the Gauss–Newton matrix of a softmax output; equal to :math:`-H` in
expectation under the model) plus a damping :math:`\delta I` for LoRA's flat directions, the prior's curvature. The
inputs are gradient vectors, sketched to D entries or exact (:mod:`trl_renyi.model.per_example`):

* *outcome vectors* :math:`f_m` with Fisher weights :math:`\omega_m`, :math:`G = \sum_m \omega_m f_m f_m^\top`
  (for a choice item every option's score vector weighted by its probability — the exact Fisher; for free text,
  sampled completions);
* *votes*: each unit is a weighted sum of votes, :math:`g_u = \sum_{v\in u} w_v\, f_{o(v)}` with o(v) the outcome
  vector the vote observed; and for each vote the outcomes the model could have produced with their probabilities
  (the null).

With the Cholesky factor :math:`LL^\top = G + \delta I` and :math:`\hat A = L^{-1}[g_1 \dots g_U]`, the non-zero
generalised eigenvalues are those of the U × U Gram matrix :math:`\hat A^\top \hat A` (or the D × D
:math:`\hat A\hat A^\top`, whichever is smaller): no P × P matrix is formed. For an eigenpair :math:`(\lambda_j,
z_j)` of the Gram matrix (unit :math:`z_j`) the direction in parameter space, normalised to :math:`v^\top (G+\delta I)
v = 1`, is :math:`v_j = L^{-\top}\hat A z_j/\sqrt{\lambda_j}` and **unit u's split score** is
:math:`g_u^\top v_j = \sqrt{\lambda_j}\, z_{ju}`: its sign says on which side of the split the unit would go, its
square its share :math:`\lambda_j z_{ju}^2` of :math:`v_j^\top F v_j = \lambda_j`.

**Away from a fit.** The spread term does not depend on :math:`\sum_u g_u` (it enters only the mean shift
:math:`\bar\delta`), but where the fit is unfinished the units share an ascent direction, and "one member up it,
another down it" then scores as spread although moving both up is better. The spread directions are therefore taken
orthogonal to the total gradient (:math:`v^\top \sum_u g_u = 0`; in whitened coordinates, the units' columns
projected off their sum) whenever ``stationarity``, :math:`\lVert\sum_u \hat g_u\rVert^2 / (U\sum_u
\lVert\hat g_u\rVert^2)` (0 at a fit, 1 when every unit pulls the same way), exceeds :data:`STATIONARY`; closer to
a fit the sum is treated as zero, its direction being mostly rounding.

**The calibrated null.** Information equality makes every λ ≈ 1 *on average* for data drawn from the model, but the
top eigenvalue of a finite sample sits above 1 by an amount that depends on N, P and the sketch. The null redraws
every vote's outcome from the fitted model (exactly, for choices; from held-out samples, for free text), recomputes
:math:`\lambda_1`, and gives its quantiles: :math:`\lambda_1` is called a conflict only when it clears them.

**The recommended α.** Directions whose eigenvalue clears the null's top-eigenvalue quantile :math:`\lambda_0`
(the bulk edge) should spread, the bulk should not: :math:`1 - \frac{1}{(1-\varphi)\lambda_0} \le \alpha <
1 - \frac{1}{(1-\varphi)\lambda_1}`. The recommendation is the geometric middle of that window,
:math:`(1-\varphi)(1-\alpha) = 1/\sqrt{\lambda_1\lambda_0}`, so the top direction is favoured and the bulk edge
disfavoured by the same factor :math:`\sqrt{\lambda_1/\lambda_0}`. When nothing clears the null, α = 1. The edge is
never taken below 1 (:func:`bulk_edge`): where each unit averages many votes the null shrinks like 1/n, yet a direction
with λ ≤ 1 carries no more than one vote's worth of information per unit and spreading along it only makes label
specialists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: quantiles of the null's top eigenvalue that are reported
NULL_QUANTILES = (0.5, 0.9, 0.95, 0.99)


@dataclass
class GradientTable:
    r"""The gradient vectors of one measurement (module docstring).

    A *vote group* v is n_v votes of one unit on one question (one vote for a row or a pair; a group's vote counts on
    an item), each vote weighing :math:`w_v`; unit u's gradient is :math:`g_u = \sum_{v\in u} w_v \sum_a
    n_{va} f_{o_{va}}` with the observed outcomes :math:`o_{va}` and their counts :math:`n_{va}`. In the null the
    counts are redrawn, :math:`\tilde n_v \sim \operatorname{Multinomial}(n_v, p_v)` over the vote group's null
    outcomes.

    Attributes:
        vectors: ``(M, D)`` outcome gradient vectors :math:`f_m` (sketched or exact).
        fisher_weights: ``(M,)`` :math:`\omega_m` (0 for a vector that is not part of the Fisher: free text's observed
            and held-out completions).
        group_unit: ``(V,)`` the unit of every vote group, in ``[0, U)``.
        group_weight: ``(V,)`` :math:`w_v`, the weight of each of its votes.
        observed_index: ``(V, A)`` indices into ``vectors`` of what the group observed (−1: padding) …
        observed_count: ``(V, A)`` … and how many of its votes observed each (0 for padding).
        null_index: ``(V, C)`` the outcomes of the null (−1: padding) …
        null_probs: ``(V, C)`` … and their probabilities under the fitted model (rows sum to 1).
        unit_names: the U units' names.
        num_parameters: P, the adapter's parameter count (``vectors`` has D ≤ P columns).
        exact: whether ``vectors`` hold exact gradients (D = P) rather than a sketch.
        details: what the gradient pass knows besides (the fitted model's option probabilities, DPO margins).
    """

    vectors: torch.Tensor
    fisher_weights: torch.Tensor
    group_unit: torch.Tensor
    group_weight: torch.Tensor
    observed_index: torch.Tensor
    observed_count: torch.Tensor
    null_index: torch.Tensor
    null_probs: torch.Tensor
    unit_names: list = field(default_factory=list)
    num_parameters: int = 0
    exact: bool = True
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        m, v = self.vectors.shape[0], self.group_unit.shape[0]
        if self.fisher_weights.shape != (m,):
            raise ValueError(f"fisher_weights must have shape ({m},), got {tuple(self.fisher_weights.shape)}")
        if self.group_weight.shape != (v,):
            raise ValueError(f"group_weight must have shape ({v},), got {tuple(self.group_weight.shape)}")
        if self.observed_index.shape != self.observed_count.shape or self.observed_index.shape[:1] != (v,):
            raise ValueError("observed_index and observed_count must both have shape (vote groups, A)")
        if self.null_index.shape != self.null_probs.shape or self.null_index.shape[:1] != (v,):
            raise ValueError("null_index and null_probs must both have shape (vote groups, C)")
        if v and int(self.group_unit.max()) >= self.num_units:
            raise ValueError(f"group_unit names unit {int(self.group_unit.max())}, but there are {self.num_units} units")
        if not bool(torch.isfinite(self.vectors).all()):
            raise FloatingPointError("non-finite gradient vectors: check the model's log-likelihoods")

    @property
    def num_units(self) -> int:
        """U, the number of units (columns of the gradient table)."""
        return len(self.unit_names) if self.unit_names else (int(self.group_unit.max()) + 1 if self.group_unit.numel() else 0)

    @property
    def num_votes(self) -> int:
        """The number of votes (scored rows) the units gather."""
        return int(self.observed_count.sum())

    @property
    def dim(self) -> int:
        """The dimension of the (sketched) LoRA gradient."""
        return int(self.vectors.shape[1])

    def fisher(self, dtype=torch.float64) -> torch.Tensor:
        r"""``(D, D)`` :math:`G = \sum_m \omega_m f_m f_m^\top`."""
        keep = self.fisher_weights > 0
        f = self.vectors[keep].to(dtype)
        return (f.T * self.fisher_weights[keep].to(dtype)) @ f

    def total_vote_weight(self) -> float:
        r""":math:`\sum_v w_v n_v`, the data's total weight (the scale of the Fisher)."""
        return float((self.group_weight * self.observed_count.sum(1).to(self.group_weight.dtype)).sum())

    def unit_matrix(self, columns: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        r"""``(D', U)``: :math:`\sum_{v\in u} w_v \sum_a n_{va}\, c_{i_{va}}` for per-outcome columns ``columns``
        ``(D', M)``, outcome indices ``index`` ``(V, A)`` (−1: none) and counts ``counts`` ``(V, A)``: one product with
        the ``(M, U)`` matrix of each outcome's total weight in each unit."""
        scale = (counts.to(columns.dtype) * self.group_weight.to(columns.dtype)[:, None]).masked_fill(index < 0, 0.0)
        units = self.group_unit[:, None].expand_as(index)
        weights = columns.new_zeros(columns.shape[1], self.num_units)
        weights.index_put_((index.clamp(min=0).reshape(-1), units.reshape(-1)), scale.reshape(-1), accumulate=True)
        return columns @ weights

    def observed_matrix(self, columns: torch.Tensor) -> torch.Tensor:
        """The units' data gradients in the space of ``columns`` (:meth:`unit_matrix` of the observed counts)."""
        return self.unit_matrix(columns, self.observed_index, self.observed_count)

    def sample_null_counts(self, generator: torch.Generator) -> torch.Tensor:
        """``(V, C)`` counts over the null outcomes: each group's n_v votes redrawn from its null distribution
        (a multinomial, drawn as a chain of binomials)."""
        probs = self.null_probs.double().masked_fill(self.null_index < 0, 0.0)
        remaining = self.observed_count.sum(1).double()
        left = probs.sum(1)
        counts = torch.zeros_like(probs)
        for c in range(probs.shape[1]):
            share = (probs[:, c] / left.clamp(min=1e-300)).clamp(0.0, 1.0)
            if c == probs.shape[1] - 1:
                share = torch.where(probs[:, c] > 0, torch.ones_like(share), share)
            drawn = torch.binomial(remaining, share, generator=generator)
            counts[:, c] = drawn
            remaining = remaining - drawn
            left = left - probs[:, c]
        if bool((remaining > 0).any()):  # a padded last column: the rest goes to the last real outcome
            last = (self.null_index >= 0).long().sum(1) - 1
            counts[torch.arange(len(counts)), last] += remaining
        return counts


@dataclass
class Spectrum:
    """The generalised eigenproblem :math:`F v = \\lambda (G + \\delta I) v` solved for the data and its null.

    Attributes:
        eigenvalues: the top eigenvalues λ_1 ≥ λ_2 ≥ … (at most ``num_directions``).
        scores: ``(num_directions, U)`` each unit's split score :math:`g_u^\\top v_j`, signed so that the unit with the
            largest ``|score|`` is positive.
        null_top: the top eigenvalue of every null draw.
        null_spectra: ``(draws, num_directions)`` the null's top eigenvalues, for the spectrum plot.
        damping: δ as used (absolute).
        directions: ``(num_directions, D)`` :math:`v_j` in the gradient space (parameter space when exact).
        stationarity: how far the fit is from stationary (module docstring; 0 at a fit).
    """

    eigenvalues: list[float]
    scores: torch.Tensor
    null_top: list[float]
    null_spectra: torch.Tensor
    damping: float
    directions: torch.Tensor
    stationarity: float = 0.0

    def null_quantile(self, level: float) -> float:
        """The ``level`` quantile of λ₁ over the null draws (labels permuted within items)."""
        if not self.null_top:
            return math.nan
        return float(torch.quantile(torch.tensor(self.null_top, dtype=torch.float64), level))


#: above this size (the smaller side of the ``(D, U)`` columns) the top eigenpairs come from a randomised SVD
EXACT_EIGEN_LIMIT = 1024


def _top_eigen(columns: torch.Tensor, count: int, vectors: bool):
    """Top eigenvalues (and unit-space eigenvectors) of ``columnsᵀ columns`` for ``columns`` ``(D, U)``: exact up to
    :data:`EXACT_EIGEN_LIMIT`, beyond it a randomised SVD (``torch.svd_lowrank`` with 8 power iterations, seeded)."""
    d, u = columns.shape
    if min(d, u) > EXACT_EIGEN_LIMIT:
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            _, singular, right = torch.svd_lowrank(columns, q=min(count + 10, min(d, u)), niter=8)
        finally:
            torch.random.set_rng_state(state)
        return singular[:count] ** 2, (right[:, :count] if vectors else None)
    if u <= d:
        values, vecs = torch.linalg.eigh(columns.T @ columns) if vectors else (torch.linalg.eigvalsh(columns.T @ columns), None)
        values = values.flip(0)[:count].clamp(min=0)
        if vecs is not None:
            vecs = vecs.flip(1)[:, :count]
        return values, vecs
    values, vecs = torch.linalg.eigh(columns @ columns.T) if vectors else (torch.linalg.eigvalsh(columns @ columns.T), None)
    values = values.flip(0)[:count].clamp(min=0)
    if vecs is None:
        return values, None
    left = vecs.flip(1)[:, :count]  # (D, count)
    unit_vecs = columns.T @ left / values.clamp(min=1e-300).sqrt()
    return values, unit_vecs


#: below this stationarity the units' sum is treated as zero (a fit): its direction is then rounding noise
STATIONARY = 1e-3


def stationarity(columns: torch.Tensor) -> float:
    r""":math:`\lVert\sum_u c_u\rVert^2 / (U \sum_u \lVert c_u\rVert^2)` for columns ``(D, U)``: 0 when they sum
    to zero, 1 when they are all equal."""
    total = columns.sum(1)
    return float(total @ total) / max(columns.shape[1] * float((columns * columns).sum()), 1e-300)


def off_total(columns: torch.Tensor) -> torch.Tensor:
    """``columns`` ``(D, U)`` projected off their sum (see "Away from a fit" in the module docstring), unless their
    :func:`stationarity` is below :data:`STATIONARY`."""
    if stationarity(columns) < STATIONARY:
        return columns
    total = columns.sum(1, keepdim=True)
    return columns - total @ (total.T @ columns) / float((total * total).sum())


def relative_damping(table: GradientTable, fisher: torch.Tensor, damping: float) -> float:
    r"""δ = ``damping`` × the Fisher's trace per unit of vote weight, :math:`\operatorname{tr}G / \sum_v w_v n_v`: a prior
    as strong as ``damping`` votes' worth of curvature in every direction (scale-free, so the same number serves any
    model and sketch)."""
    return float(damping) * float(torch.trace(fisher)) / max(table.total_vote_weight(), 1e-300)


def spread_spectrum(
    table: GradientTable,
    damping: float = 1.0,
    num_directions: int = 10,
    null_draws: int = 20,
    seed: int = 0,
    progress=None,
) -> Spectrum:
    """Solve the criterion's eigenproblem for ``table`` and ``null_draws`` draws of its null (module docstring).

    ``damping`` is relative (:func:`relative_damping`); ``progress`` is called once per null draw."""
    dtype = torch.float64
    fisher = table.fisher(dtype)
    delta = relative_damping(table, fisher, damping)
    if not delta > 0:
        raise ValueError("the damping must be positive (a zero Fisher trace means the model's gradients are all zero)")
    fisher.diagonal().add_(delta)
    chol = torch.linalg.cholesky(fisher)
    del fisher
    whitened = torch.linalg.solve_triangular(chol, table.vectors.to(dtype).T, upper=False)  # (D, M)
    count = max(1, min(num_directions, table.num_units))
    raw = table.observed_matrix(whitened)
    data = off_total(raw)
    values, unit_vecs = _top_eigen(data, count, vectors=True)
    scores = unit_vecs.T * values.sqrt()[:, None]  # (count, U)
    lead = scores.abs().argmax(dim=1)
    signs = torch.sign(scores.gather(1, lead[:, None])).clamp(min=0) * 2 - 1
    scores = scores * signs
    unit_vecs = unit_vecs * signs.T
    directions = torch.linalg.solve_triangular(chol.T, data @ unit_vecs, upper=True) / values.clamp(min=1e-300).sqrt()
    generator = torch.Generator().manual_seed(seed)
    null_top, null_spectra = [], []
    for _ in range(null_draws):
        null = off_total(table.unit_matrix(whitened, table.null_index, table.sample_null_counts(generator)))
        null_values, _ = _top_eigen(null, count, vectors=False)
        null_top.append(float(null_values[0]))
        null_spectra.append(torch.nn.functional.pad(null_values, (0, count - len(null_values))))
        if progress is not None:
            progress()
    return Spectrum(
        eigenvalues=[float(v) for v in values],
        scores=scores.float(),
        null_top=null_top,
        null_spectra=torch.stack(null_spectra) if null_spectra else torch.zeros(0, count, dtype=dtype),
        damping=delta,
        directions=directions.T.contiguous(),
        stationarity=stationarity(raw),
    )


def critical_alpha(eigenvalue: float, floor: float = 0.0) -> float:
    r""":math:`\alpha^* = 1 - \frac{1}{(1-\varphi)\lambda}`: spreading along a direction of eigenvalue λ is locally
    favourable iff α < α* (``-inf`` when λ = 0: never)."""
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"the responsibility floor must lie in [0, 1), got {floor}")
    scale = (1.0 - floor) * eigenvalue
    return 1.0 - 1.0 / scale if scale > 0 else -math.inf


def spread_is_favourable(alpha: float, eigenvalue: float, floor: float = 0.0) -> bool:
    """:math:`(1-\\varphi)(1-\\alpha)\\lambda > 1`."""
    return (1.0 - floor) * (1.0 - alpha) * eigenvalue > 1.0


#: the bulk edge is never taken below this: λ ≈ 1 is what a unit of one vote drawn from the fitted model gives
#: (information equality), a direction a single model serves
INFORMATION_EDGE = 1.0


def bulk_edge(null_edge: float) -> float:
    r""":math:`\lambda_0 = \max(\text{null quantile}, 1)`. The null's quantile measures sampling noise; where units
    average many votes (a group's distribution weighing one vote) that noise shrinks like 1/n and the quantile falls
    far below 1, but a direction with λ ≤ 1 still carries no more than one vote's worth of information per unit (the
    aleatoric case: spreading along it makes label specialists), so it is never favoured."""
    return max(float(null_edge), INFORMATION_EDGE)


def recommend_alpha(top: float, null_edge: float, floor: float = 0.0) -> float | None:
    r"""The α at the geometric middle of the window where the top direction spreads and the bulk edge
    :math:`\lambda_0` (:func:`bulk_edge` of the null's quantile) does not,
    :math:`(1-\varphi)(1-\alpha) = 1/\sqrt{\lambda_1\lambda_0}`; ``None`` when :math:`\lambda_1 \le \lambda_0`
    (nothing clears the bulk: keep α = 1)."""
    edge = bulk_edge(null_edge)
    if not top > edge:
        return None
    return 1.0 - 1.0 / ((1.0 - floor) * math.sqrt(top * edge))
