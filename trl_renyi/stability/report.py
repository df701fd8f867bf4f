"""The result of one stability measurement: the spectrum against its null, the critical α, the recommended α and the
units on each side of the split, as numbers (JSON), text and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from trl_renyi.stability.criterion import (
    NULL_QUANTILES,
    Spectrum,
    bulk_edge,
    critical_alpha,
    recommend_alpha,
)


@dataclass
class StabilityReport:
    """What :func:`~trl_renyi.stability.measure_stability` found (module docstring of
    :mod:`trl_renyi.stability.criterion` for the definitions).

    Attributes:
        kind: the likelihood measured: ``"choice"``, ``"sequence"`` or ``"pair"``.
        unit: what the bound is taken over: ``"row"``, ``"completion"`` or ``"source"``.
        num_units, num_votes: sizes; ``num_parameters``: P of the adapter; ``sketch_dim``: D, or ``None`` when exact.
        damping: the relative damping (votes' worth of curvature) and ``damping_absolute`` δ.
        eigenvalues: top generalised eigenvalues λ_1 ≥ λ_2 ≥ … of F v = λ (G + δI) v.
        null_top: the null's top eigenvalue in every draw; ``null_quantiles`` its quantiles;
            ``null_spectrum_mean`` its mean top eigenvalues (for the plot).
        null_level: the quantile λ_1 must clear; ``null_edge`` its value; ``bulk_edge`` λ_0 = max(null_edge, 1), the
            edge of the directions not to spread along (:func:`~trl_renyi.stability.criterion.bulk_edge`).
        floor: the responsibility floor φ the α values account for.
        alpha_critical: 1 − 1/λ_1 (no floor); ``alpha_critical_floor``: 1 − 1/((1−φ)λ_1);
            ``alpha_bulk``: 1 − 1/((1−φ)λ_0), below which the bulk spreads too.
        significant: λ_1 clears the null (λ_1 > null_edge); ``num_significant``: how many eigenvalues clear λ_0.
        recommended_alpha: the geometric middle of [α_bulk, α*_floor) when λ_1 > λ_0, else 1; ``reason`` says why.
        unit_names: the units; ``scores``: per top direction, every unit's split score g_uᵀv_j.
        stationarity: how far the fit is from stationary, ‖Σ_u ĝ_u‖² / (U Σ_u ‖ĝ_u‖²) in the whitened metric (0 at a
            fit, 1 when every unit pulls the same way); above 1e-3 the spread directions are taken orthogonal to the
            total gradient.
        seconds: wall time of the measurement.
    """

    kind: str
    unit: str
    num_units: int
    num_votes: int
    num_parameters: int
    sketch_dim: int | None
    damping: float
    damping_absolute: float
    eigenvalues: list[float]
    null_top: list[float]
    null_quantiles: dict[str, float]
    null_spectrum_mean: list[float]
    null_level: float
    null_edge: float
    bulk_edge: float
    floor: float
    alpha_critical: float
    alpha_critical_floor: float
    alpha_bulk: float
    significant: bool
    num_significant: int
    recommended_alpha: float
    reason: str
    unit_names: list = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    stationarity: float = 0.0
    seconds: float = 0.0

    @property
    def lambda1(self) -> float:
        """λ₁, the top generalized eigenvalue."""
        return self.eigenvalues[0] if self.eigenvalues else 0.0

    @classmethod
    def from_spectrum(cls, spectrum: Spectrum, table, *, kind, unit, floor, damping, null_level, seconds=0.0):
        """The report for a measured spectrum and the gradient table it came from."""
        edge = spectrum.null_quantile(null_level)
        return cls(
            kind=kind,
            unit=unit,
            num_units=table.num_units,
            num_votes=table.num_votes,
            num_parameters=table.num_parameters,
            sketch_dim=None if table.exact else table.dim,
            damping=float(damping),
            damping_absolute=spectrum.damping,
            eigenvalues=list(spectrum.eigenvalues),
            null_top=list(spectrum.null_top),
            null_quantiles={f"{q:g}": spectrum.null_quantile(q) for q in NULL_QUANTILES},
            null_spectrum_mean=spectrum.null_spectra.mean(0).tolist() if len(spectrum.null_spectra) else [],
            null_level=float(null_level),
            floor=float(floor),
            **decision(list(spectrum.eigenvalues), edge, float(floor), float(null_level)),
            unit_names=[_name(u) for u in table.unit_names],
            scores=spectrum.scores.tolist(),
            stationarity=spectrum.stationarity,
            seconds=float(seconds),
        )

    def rederived(self) -> StabilityReport:
        """The same measurement with its decision (edges, α values, recommendation) recomputed from the stored
        spectrum and null by the current rule: a report saved by an earlier version, read the way this one reads."""
        return replace(self, **decision(self.eigenvalues, self.null_edge, self.floor, self.null_level))

    def top_units(self, direction: int = 0, count: int = 5) -> tuple[list, list]:
        """``(positive side, negative side)``: the units with the largest and smallest split scores on a direction,
        as ``(name, score)`` pairs."""
        if not self.scores:
            return [], []
        ranked = sorted(zip(self.unit_names, self.scores[direction]), key=lambda pair: pair[1])
        positive = [p for p in reversed(ranked) if p[1] > 0][:count]
        negative = [p for p in ranked if p[1] < 0][:count]
        return positive, negative

    def summary(self, top: int = 5) -> str:
        """The report as a few lines of text."""
        quantiles = ", ".join(f"q{float(k) * 100:g} {v:.3g}" for k, v in self.null_quantiles.items())
        lines = [
            f"Stability criterion over {self.num_units} {self.unit} units ({self.num_votes} {self.kind} votes; "
            f"P = {self.num_parameters:,} adapter parameters, "
            + ("exact gradients" if self.sketch_dim is None else f"sketched to D = {self.sketch_dim}")
            + f"; damping {self.damping:g} votes of curvature; stationarity {self.stationarity:.3g}, 0 at a fit)",
            "  top eigenvalues: " + ", ".join(f"{v:.3g}" for v in self.eigenvalues[:8]),
            f"  null λ1 over {len(self.null_top)} draws of labels from the fitted model: {quantiles}",
            f"  critical α* = 1 − 1/λ1 = {self.alpha_critical:.3f}; with the floor φ = {self.floor:g}: "
            f"{self.alpha_critical_floor:.3f}; the null's bulk edge spreads below α = {self.alpha_bulk:.3f}",
            f"  recommended α = {self.recommended_alpha:.3f}: {self.reason}",
        ]
        positive, negative = self.top_units(0, top)
        if positive or negative:
            lines.append("  direction 1, one side: " + ", ".join(f"{n} ({s:+.3g})" for n, s in positive))
            lines.append("  direction 1, other side: " + ", ".join(f"{n} ({s:+.3g})" for n, s in negative))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as JSON-ready values."""
        return _finite(asdict(self))

    def save(self, path) -> Path:
        """Write the report as JSON to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, values: dict) -> StabilityReport:
        """The report of :meth:`to_dict`'s values (``None`` back to NaN where a float was not finite)."""
        values = {"bulk_edge": None, **values}  # reports written before the bulk edge was recorded lack it
        return cls(**{k: (math.nan if v is None and k in _FLOAT_FIELDS else v) for k, v in values.items()})

    @classmethod
    def load(cls, path) -> StabilityReport:
        """Read a report written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, path, max_named_units: int = 40) -> Path:
        """Two panels: the spectrum against the null (mean and the quantile λ_1 must clear), and the units' split
        scores on the top direction."""
        matplotlib.use("Agg")

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        ranks = range(1, len(self.eigenvalues) + 1)
        left.plot(ranks, self.eigenvalues, "o-", label="data")
        if self.null_spectrum_mean:
            left.plot(range(1, len(self.null_spectrum_mean) + 1), self.null_spectrum_mean, "s--", color="grey", label="null (mean)")
        if math.isfinite(self.null_edge):
            left.axhline(self.null_edge, color="grey", lw=0.8, ls=":", label=f"null λ1, q{self.null_level * 100:g}")
        left.axhline(1.0, color="k", lw=0.5)
        left.set(xlabel="direction j", ylabel="λ_j", title=f"spectrum ({self.unit} units); α* = {self.alpha_critical:.2f}")
        left.set_yscale("log" if self.eigenvalues and self.eigenvalues[0] > 20 * max(min(self.eigenvalues), 1e-12) else "linear")
        left.legend(fontsize=7)
        if self.scores:
            scores = sorted(zip(self.scores[0], self.unit_names))
            values = [s for s, _ in scores]
            if len(values) <= max_named_units:
                right.barh(range(len(values)), values, color=["tab:red" if v > 0 else "tab:blue" for v in values])
                right.set_yticks(range(len(values)))
                right.set_yticklabels([str(n) for _, n in scores], fontsize=6)
            else:
                right.hist(values, bins=40, color="tab:purple")
                right.set(ylabel="units")
            right.set(xlabel="split score g_uᵀv₁", title="which side each unit would take")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def decision(eigenvalues: list[float], null_edge: float, floor: float, null_level: float) -> dict:
    """The report's decision fields from the spectrum and the null's quantile λ_1 must clear: ``null_edge``,
    ``bulk_edge``, the α values, ``significant``, ``num_significant``, ``recommended_alpha`` and its ``reason``."""
    top = eigenvalues[0] if eigenvalues else 0.0
    finite = math.isfinite(null_edge)
    bulk = bulk_edge(null_edge) if finite else math.nan
    recommended = recommend_alpha(top, null_edge, floor) if finite else None
    above = sum(v > bulk for v in eigenvalues) if finite else 0
    if recommended is None and not top > null_edge:
        reason = (
            f"λ1 = {top:.3g} does not clear the null's {null_level:.0%} quantile {null_edge:.3g}: no direction in which "
            "a spread ensemble beats a collapsed one beyond what data drawn from the fitted model gives; keep α = 1"
        )
    elif recommended is None:
        reason = (
            f"λ1 = {top:.3g} clears the null's {null_level:.0%} quantile {null_edge:.3g} but not 1: a real but weak "
            "direction, no more than one vote's worth of information per unit (spreading along it makes label "
            "specialists); keep α = 1"
        )
    else:
        reason = (
            f"λ1 = {top:.3g} clears the bulk edge {bulk:.3g} (the null's {null_level:.0%} quantile {null_edge:.3g}, at "
            f"least 1): α = {recommended:.3f} spreads the members along the {above} direction(s) above it and not "
            "along the bulk"
        )
    return {
        "null_edge": null_edge,
        "bulk_edge": bulk,
        "alpha_critical": critical_alpha(top),
        "alpha_critical_floor": critical_alpha(top, floor),
        "alpha_bulk": critical_alpha(bulk, floor) if finite else math.nan,
        "significant": bool(top > null_edge),
        "num_significant": above,
        "recommended_alpha": 1.0 if recommended is None else recommended,
        "reason": reason,
    }


_FLOAT_FIELDS = {"null_edge", "bulk_edge", "alpha_critical", "alpha_critical_floor", "alpha_bulk"}


def _name(unit) -> str:
    if isinstance(unit, tuple):
        return str(unit[-1]) if unit[0] == "source" else ":".join(str(u) for u in unit)
    return str(unit)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
