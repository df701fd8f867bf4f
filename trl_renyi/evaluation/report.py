"""The evaluation report of ``trl-renyi eval``, as library functions: every model's predictions on choice items,
their metrics (accuracy, NLL, ECE, Brier, AUROC of the uncertainty, selective accuracy; per member and routing for an
ensemble), the predictions file, the plots and the text table. The command wires them to its arguments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from trl_renyi.evaluation import plots
from trl_renyi.evaluation.metrics import DEFAULT_COVERAGES, choice_outcomes, summarize
from trl_renyi.inference.choices import ChoicePrediction
from trl_renyi.objective import routing_entropy


def text_table(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def json_safe(value):
    """``value`` with non-finite floats as ``None`` (JSON has no NaN), lists and dicts walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def member_predictions(predictions: list[ChoicePrediction], k: int) -> list[ChoicePrediction]:
    """Member k's own predictions, read from the ensemble's pass (one model: no epistemic part)."""
    out = []
    for p in predictions:
        probs = p.member_probs[k]
        entropy = float(-(torch.special.xlogy(probs.double(), probs.double())).sum())
        out.append(
            ChoicePrediction(
                probs=probs,
                member_probs=probs[None],
                entropy=entropy,
                aleatoric=entropy,
                mutual_information=0.0,
                member_loglik=p.member_loglik[:, k : k + 1],
                responsibilities=torch.ones(len(probs), 1),
            )
        )
    return out


def predict(
    scorer, prompts, choices, reference=None, likelihood=None, length_normalize: bool = False, batch_size: int = 8
) -> list[ChoicePrediction]:
    """Predictions of one model (ensemble or single) on every item: preference pairs by the DPO reward against
    ``reference`` under ``likelihood`` (the ensemble's own, for every model compared) when a reference is given,
    otherwise every question's choices by likelihood."""
    if reference is not None:
        return scorer.predict_preferences(
            prompts, [c[0] for c in choices], [c[1] for c in choices], reference=reference, likelihood=likelihood,
            batch_size=batch_size, show_progress=True,
        )
    return scorer.predict_choices(
        prompts, choices, length_normalize=length_normalize, batch_size=batch_size, show_progress=True
    )


def model_report(predictions: list[ChoicePrediction], labels, n_bins: int = 10, coverages=DEFAULT_COVERAGES, member_names=None) -> dict:
    """Metrics of one model; for an ensemble also each member's metrics and the routing statistics."""
    probs = [p.probs for p in predictions]
    uncertainties = {"entropy": [p.entropy for p in predictions]}
    ensemble = member_names is not None and len(member_names) > 1
    if ensemble:
        uncertainties["mutual_information"] = [p.mutual_information for p in predictions]
    report = summarize(probs, labels, uncertainties, n_bins=n_bins, coverages=coverages)
    report["mean_entropy"] = float(sum(p.entropy for p in predictions) / len(predictions))
    report["mean_aleatoric"] = float(sum(p.aleatoric for p in predictions) / len(predictions))
    report["mean_mutual_information"] = float(sum(p.mutual_information for p in predictions) / len(predictions))
    if ensemble:
        report["members"] = {
            name: summarize([p.member_probs[k] for p in predictions], labels, n_bins=n_bins, coverages=coverages)
            for k, name in enumerate(member_names)
        }
        routing = reference_responsibilities(predictions, labels)
        report["routing"] = {
            "mean_responsibility": dict(zip(member_names, routing.mean(0).tolist(), strict=True)),
            "mean_routing_entropy": float(routing_entropy(routing).mean()),
            "top_member_share": dict(
                zip(member_names, torch.bincount(routing.argmax(1), minlength=len(member_names)).div(len(routing)).tolist(), strict=True)
            ),
        }
    return report


def reference_responsibilities(predictions: list[ChoicePrediction], labels) -> torch.Tensor:
    """``(N, K)`` responsibilities of each item's correct (first true) choice: how training would route the item."""
    return torch.stack([p.responsibilities[list(y).index(1)] for p, y in zip(predictions, labels, strict=True)])


def write_predictions(path: Path, items, results: dict[str, list[ChoicePrediction]]) -> None:
    """One JSON line per item: its labels and every model's prediction (probabilities, entropy, MI; members' too)."""
    with open(path, "w") as handle:
        for i, item in enumerate(items):
            row = {"id": item.id, "labels": item.labels, **({"info": item.info} if item.info else {})}
            for name, predictions in results.items():
                p = predictions[i]
                entry = {
                    "probs": p.probs.tolist(),
                    "prediction": p.prediction,
                    "correct": bool(item.labels[p.prediction] == 1),
                    "entropy": p.entropy,
                    "mutual_information": p.mutual_information,
                }
                if p.member_probs.shape[0] > 1:
                    entry["member_probs"] = p.member_probs.tolist()
                    entry["aleatoric"] = p.aleatoric
                row[name] = entry
            handle.write(json.dumps(json_safe(row)) + "\n")


def write_plots(out: Path, results, labels, report, ensemble) -> list[str]:
    """The report's plots in ``out``: reliability diagram, uncertainty histograms, routing heatmap of the correct
    answers, selective accuracy; ``results`` maps a model's label to its predictions, ``"ensemble"`` first."""
    outcomes = {name: choice_outcomes([p.probs for p in preds], labels) for name, preds in results.items()}
    pairs = {name: (o["confidence"], o["correct"]) for name, o in outcomes.items()}
    eces = {name: report["models"][name]["ece"] for name in results}
    files = [plots.reliability_diagram(pairs, report["settings"]["n_bins"], out / "reliability.png", eces)]
    ens = results["ensemble"]
    correct = outcomes["ensemble"]["correct"]
    panels = [("ensemble: total entropy", [p.entropy for p in ens], correct)]
    if ensemble.num_members > 1:
        panels.append(("ensemble: mutual information", [p.mutual_information for p in ens], correct))
    for name, preds in results.items():
        if name != "ensemble":
            panels.append((f"{name}: entropy", [p.entropy for p in preds], outcomes[name]["correct"]))
    files.append(plots.uncertainty_histograms(panels, out / "uncertainty_hist.png"))
    files.append(
        plots.routing_heatmap(
            reference_responsibilities(ens, labels), ensemble.member_names, out / "routing_heatmap.png",
            title=f"responsibility of each member for the correct answer (α = {ensemble.alpha:g})",
        )
    )
    curves = {f"{name} (max prob)": (1 - o["confidence"], o["correct"]) for name, o in outcomes.items()}
    if ensemble.num_members > 1:
        curves["ensemble (mutual information)"] = ([p.mutual_information for p in ens], correct)
    files.append(plots.selective_accuracy_curves(curves, out / "selective_accuracy.png"))
    return files


def report_table(report: dict) -> str:
    """The headline metrics of every model as a text table, with its legend."""
    coverages = report["settings"]["coverages"]
    head = ["model", "acc", "NLL", "ECE", "Brier", "AUROC(H)", "AUROC(MI)"] + [f"acc@{c:g}" for c in coverages]
    rows = [head]
    for name, m in report["models"].items():
        auroc = m["auroc"]
        fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
        rows.append(
            [name, fmt(m["accuracy"]), fmt(m["nll"]), fmt(m["ece"]), fmt(m["brier"]), fmt(auroc.get("entropy")),
             fmt(auroc.get("mutual_information"))]
            + [fmt(m["selective_accuracy"]["entropy"][f"{c:g}"]) for c in coverages]
        )
    return text_table(rows) + "\n" + TABLE_LEGEND


TABLE_LEGEND = (
    "acc: accuracy of the most probable choice · NLL: mean −log p(correct choice) · ECE: expected calibration error "
    "(confidence bins) · Brier: mean squared error of the choice probabilities · AUROC(H) / AUROC(MI): how well the "
    "predictive entropy / the mutual information between members separates wrong answers from right ones (0.5 = "
    "chance; '-' for a single model, whose MI is 0) · acc@c: accuracy on the fraction c of items with the lowest "
    "entropy."
)
