r"""Per-family evaluation of an ensemble on the held-out items of :mod:`trl_renyi.data` (what ``trl-renyi demo`` shows).

For every held-out item of a task family (two conventions on contradictory families; the correct answer and a
distractor on consistent ones):

* the routing table: the mean responsibility :math:`r_{ik} = \operatorname{softmax}_k(\log\pi_k + (1-\alpha)\ell_{ik})`
  of each member for the answers the training data gives (per convention on contradictory families);
* choice-level mutual information over the two reference answers :math:`c \in \{a, b\}`: with
  :math:`p_k(c) = \operatorname{softmax}_c \ell_k(c)`, :math:`\mathrm{MI} = H[\sum_k \pi_k p_k] - \sum_k \pi_k H[p_k]`
  (0 when members agree, up to log 2);
* the maximum over answer tokens of the per-token mutual information, and the spread (std over members) of
  :math:`\ell_k` of the reference answers;
* each member's greedy answer and the mixture's, each with its epistemic uncertainty (max per-token MI) and the spread
  of its log-likelihood over members.

The figures are drawn by :func:`trl_renyi.evaluation.plots.routing_heatmap` and
:func:`trl_renyi.evaluation.plots.signal_bars`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from trl_renyi.data import FAMILIES, Item, chat_answer, chat_prompt
from trl_renyi.evaluation import plots
from trl_renyi.inference.choices import prediction_from_member_log_probs

#: The epistemic signals reported per family: field of :class:`FamilyReport` -> label.
SIGNALS = {
    "choice_mi": "choice MI",
    "token_mi_max": "max token MI",
    "loglik_std": "ℓ spread (std)",
}


@dataclass
class FamilyReport:
    """Held-out figures of one task family (means over its prompts)."""

    family: str
    contradictory: bool
    choice_mi: float
    token_mi_max: float
    loglik_std: float
    mixture_accuracy: float | None  # consistent families: how often the mixture prefers the correct answer


def evaluate_families(ensemble, items: dict[str, list[Item]], system_prompt: str | None):
    """Choice-level and token-level uncertainty of every held-out item, and the routing of its reference answers.

    The two reference answers of each item are scored once by :meth:`RenyiEnsemble.score`; the choice-level figures
    (MI, mixture probabilities, responsibilities) come from :func:`trl_renyi.inference.choices.prediction_from_member_log_probs`,
    the max per-token MI and the ℓ spread from the answers the training data gives (both conventions, or the correct
    answer).

    Returns ``(routing, reports, per_item)``: the routing table (``"family/convention"`` → mean responsibilities over
    those answers), a :class:`FamilyReport` per family and per-item details.
    """
    index = [(family, item) for family, family_items in items.items() for item in family_items]
    prompts = [chat_prompt(item.prompt, system_prompt) for _, item in index]
    scores = ensemble.score(
        [p for p in prompts for _ in range(2)],
        [chat_answer(choice) for _, item in index for choice in item.choices],
        batch_size=16,
    )
    loglik = scores.member_loglik.view(len(index), 2, -1)  # (N, 2 choices, K)
    predictions = [
        prediction_from_member_log_probs(torch.log_softmax(block.T.double(), -1), ensemble.log_weights, block, ensemble.alpha)
        for block in loglik
    ]
    token_mi_max = scores.mutual_information_max.view(len(index), 2)

    routing: dict[str, list[torch.Tensor]] = {}
    per_item, grouped = [], {}
    for row, ((family, item), prediction) in enumerate(zip(index, predictions, strict=True)):
        spec = FAMILIES[family]
        refs = range(len(item.answers))  # the answers the training data gives for this prompt
        for ref in refs:
            routing.setdefault(f"{family}/{spec.conventions[ref]}", []).append(prediction.responsibilities[ref].float())
        spread = prediction.member_loglik.float().std(dim=-1, unbiased=False)  # (C,) std of ℓ_k over members
        details = {
            "family": family,
            "prompt": item.prompt,
            "choices": list(item.choices),
            "choice_mi": float(prediction.mutual_information),
            "mixture_probs": prediction.probs.tolist(),
            "member_choice": prediction.member_probs.argmax(-1).tolist(),  # preferred choice of each member
            "token_mi_max": float(sum(token_mi_max[row, r] for r in refs) / len(refs)),
            "loglik_std": float(sum(spread[r] for r in refs) / len(refs)),
        }
        per_item.append(details)
        grouped.setdefault(family, []).append(details)

    reports = []
    for family, rows in grouped.items():
        spec = FAMILIES[family]
        mean = lambda key: sum(r[key] for r in rows) / len(rows)
        accuracy = None if spec.contradictory else sum(r["mixture_probs"][0] > 0.5 for r in rows) / len(rows)
        reports.append(
            FamilyReport(family, spec.contradictory, mean("choice_mi"), mean("token_mi_max"), mean("loglik_std"), accuracy)
        )
    routing_table = {key: torch.stack(values).mean(0).tolist() for key, values in routing.items()}
    return routing_table, reports, per_item


def uncertainty_gap(reports: Sequence[FamilyReport]) -> dict[str, tuple[float, float]]:
    """``signal -> (mean over contradictory families, mean over consistent families)``."""
    gap = {}
    for key in SIGNALS:
        contra = [getattr(r, key) for r in reports if r.contradictory]
        consistent = [getattr(r, key) for r in reports if not r.contradictory]
        gap[key] = (
            sum(contra) / len(contra) if contra else math.nan,
            sum(consistent) / len(consistent) if consistent else math.nan,
        )
    return gap


def generate_answers(ensemble, conversations: list[list[dict]], max_new_tokens: int) -> dict[str, list]:
    """Greedy answers of every member (``strategy="member"``) and of the posterior-weighted mixture
    (``strategy="mixture"``), as :class:`~trl_renyi.inference.generation.GeneratedText` with per-token uncertainty."""
    answers = {
        name: ensemble.generate(conversations, strategy="member", member=name, max_new_tokens=max_new_tokens)
        for name in ensemble.member_names
    }
    answers["mixture"] = ensemble.generate(conversations, strategy="mixture", max_new_tokens=max_new_tokens)
    return answers


def member_answers(ensemble, conversations: list[list[dict]], items: list[dict], max_new_tokens: int) -> list[dict]:
    """:func:`generate_answers` for ``conversations`` (one per entry of ``items``, which give ``family`` and
    ``prompt``), each answer with its max per-token MI, the mixture's member posterior and the spread over members of
    the answer's log-likelihood (high when some members would never give it)."""
    if not conversations:
        return []
    generated = generate_answers(ensemble, conversations, max_new_tokens)
    pairs = [(source, i, output) for source, outputs in generated.items() for i, output in enumerate(outputs)]
    scores = ensemble.score(
        [conversations[i] for _, i, _ in pairs],
        [chat_answer(output.text.strip() or " ") for _, _, output in pairs],
        batch_size=16,
    )
    answers = []
    for j, (source, i, output) in enumerate(pairs):
        mi = output.mutual_information
        answers.append(
            {
                "family": items[i]["family"],
                "prompt": items[i]["prompt"],
                "source": source,
                "answer": output.text.strip(),
                "loglik_std": float(scores.loglik_std[j]),
                "token_mi_max": float(mi.max()) if mi.numel() else 0.0,
                "member_posterior": [round(float(w), 4) for w in output.member_posterior],
            }
        )
    return answers


def format_answers(answers: list[dict]) -> list[str]:
    """The lines of the answers table: per prompt its max token MI, per answer its ℓ spread (and the mixture's member
    posterior)."""
    lines, seen = [], []
    for row in answers:
        key = (row["family"], row["prompt"])
        if key not in seen:
            seen.append(key)
    for family, prompt in seen:
        rows = [row for row in answers if (row["family"], row["prompt"]) == (family, prompt)]
        kind = "contradictory" if FAMILIES[family].contradictory else "consistent"
        first_token_mi = max(row["token_mi_max"] for row in rows)
        lines.append(f"  [{family}, {kind}] {prompt!r}   max token MI {first_token_mi:.3f}")
        for row in rows:
            line = f"      {row['source']:<10} {row['answer'][:40]!r:<44} ℓ spread {row['loglik_std']:6.2f}"
            if row["source"] == "mixture":
                line += "   member posterior " + " ".join(f"{w:.2f}" for w in row["member_posterior"])
            lines.append(line)
    return lines


def format_routing_table(routing: dict[str, list[float]], member_names: list[str], alpha: float) -> str:
    """The routing table as text: a row per ``family/convention``, a column per member."""
    width = max(len(r) for r in routing) + 2
    lines = [f"Routing table: mean responsibility r_ik (α = {alpha:g}) of the held-out reference answers"]
    lines.append("family/convention".ljust(width) + "".join(n.rjust(10) for n in member_names))
    for row, shares in routing.items():
        lines.append(row.ljust(width) + "".join(f"{s:10.2f}" for s in shares))
    return "\n".join(lines)


def format_family_table(reports: Sequence[FamilyReport]) -> str:
    """The signals of :data:`SIGNALS` and the mixture's accuracy per family, as text."""
    lines = ["Epistemic uncertainty per family (held-out prompts, means)"]
    lines.append(f"{'family':<12}{'data':<15}" + "".join(f"{label:>16}" for label in SIGNALS.values()) + f"{'mixture acc.':>14}")
    for r in reports:
        kind = "contradictory" if r.contradictory else "consistent"
        acc = "-" if r.mixture_accuracy is None else f"{r.mixture_accuracy:.2f}"
        lines.append(
            f"{r.family:<12}{kind:<15}" + "".join(f"{getattr(r, key):16.3f}" for key in SIGNALS) + f"{acc:>14}"
        )
    return "\n".join(lines)


def format_gap(gap: dict[str, tuple[float, float]]) -> str:
    """The :func:`uncertainty_gap` as text: each signal on contradictory vs consistent families, and their ratio."""
    lines = ["Uncertainty gap, contradictory vs consistent families:"]
    for key, (contra, consistent) in gap.items():
        ratio = contra / consistent if consistent > 0 else math.inf
        lines.append(f"  {SIGNALS[key]:<16} {contra:7.3f} vs {consistent:7.3f}   (x{ratio:.1f})")
    return "\n".join(lines)


def format_family_report(routing, reports, gap, answers, member_names: list[str], alpha: float) -> list[str]:
    """The lines of the whole per-family report: routing table, signals per family, the gap, the answers."""
    lines = [format_routing_table(routing, member_names, alpha), "", format_family_table(reports), ""]
    lines += [format_gap(gap), ""]
    if answers:
        lines.append(
            "Held-out answers of each member and of the posterior-weighted mixture (greedy). Per prompt: the max "
            "per-token mutual information while answering; per answer: ℓ spread = std over members of log p_k(answer)."
        )
        lines += [*format_answers(answers), ""]
    return lines


def write_family_plots(routing, reports: Sequence[FamilyReport], member_names: list[str], out_dir) -> list[Path]:
    """``routing.png`` (the routing table as a heatmap) and ``uncertainty.png`` (the signals per family, contradictory
    families in red) in ``out_dir``."""
    heatmap = plots.routing_heatmap(
        list(routing.values()), member_names, Path(out_dir) / "routing.png",
        title="Routing of held-out reference answers", xlabel="family/convention", item_labels=list(routing),
    )  # fmt: skip
    bars = plots.signal_bars(
        [r.family for r in reports],
        {label: [getattr(r, key) for r in reports] for key, label in SIGNALS.items()},
        [r.contradictory for r in reports],
        Path(out_dir) / "uncertainty.png",
        title="Epistemic uncertainty on held-out prompts (red: contradictory training data)",
    )
    return [Path(heatmap), Path(bars)]
