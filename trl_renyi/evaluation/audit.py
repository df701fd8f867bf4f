"""The training-data audit of ``trl-renyi audit``, as library functions: every training example scored by the
ensemble (supervised rows: per-token and sequence uncertainty; preference pairs: the DPO reward as trained) and the
text table of the examples its members disagree on most. The command wires them to its arguments."""

from __future__ import annotations

import math

from trl_renyi.evaluation.report import text_table
from trl_renyi.inference.baseline import SingleModel
from trl_renyi.objective import routing_entropy

#: the scores an SFT example can be ranked by (the first is the default)
SFT_SCORES = ("mutual_information_max", "mutual_information", "loglik_std", "routing_entropy", "nll")
#: the scores a preference pair can be ranked by (the first is the default)
PREFERENCE_SCORES = ("mutual_information", "loglik_std", "routing_entropy", "nll")



def score_sft(ensemble, columns: dict, batch_size: int) -> list[dict]:
    """Every supervised example (``columns``: ``prompt`` and ``completion`` lists) scored by the ensemble: each
    score of :data:`SFT_SCORES`, the responsibilities and the member it is routed to most, in the data's order."""
    scores = ensemble.score(columns["prompt"], columns["completion"], batch_size=batch_size, show_progress=True)
    r_entropy = routing_entropy(scores.responsibilities)
    rows = []
    for i in range(len(scores.loglik)):
        rows.append(
            {
                "index": i,
                "mutual_information_max": float(scores.mutual_information_max[i]),
                "mutual_information": float(scores.mutual_information[i]),
                "loglik_std": float(scores.loglik_std[i]),
                "routing_entropy": float(r_entropy[i]),
                "nll": float(-scores.loglik[i]),
                "num_tokens": int(scores.num_tokens[i]),
                "member_loglik": scores.member_loglik[i].tolist(),
                "responsibilities": scores.responsibilities[i].tolist(),
                "top_member": int(scores.responsibilities[i].argmax()),
                "prompt": columns["prompt"][i],
                "completion": columns["completion"][i],
            }
        )
    return rows


def score_preferences(ensemble, columns: dict, beta: float | None, batch_size: int) -> list[dict]:
    """Each pair scored by the DPO reward with the preference likelihood the ensemble was trained with (``beta``
    replaces its β when given)."""
    predictions = ensemble.predict_preferences(
        columns["prompt"], columns["chosen"], columns["rejected"], reference=SingleModel.base_of(ensemble),
        beta=beta, batch_size=batch_size, show_progress=True,
    )
    rows = []
    for i, p in enumerate(predictions):
        loglik = p.member_loglik[0]  # ℓ_k, the DPO training log-likelihood of the pair (as trained: loss type, ε)
        responsibilities = p.responsibilities[0]
        rows.append(
            {
                "index": i,
                "mutual_information": p.mutual_information,
                "loglik_std": float(loglik.double().std(unbiased=False)),
                "routing_entropy": float(routing_entropy(responsibilities[None].double())[0]),
                "nll": float(-math.log(max(float(p.probs[0]), 1e-30))),
                "prob_chosen": float(p.probs[0]),
                "member_prob_chosen": p.member_probs[:, 0].tolist(),
                "member_loglik": loglik.tolist(),
                "responsibilities": responsibilities.tolist(),
                "top_member": int(responsibilities.argmax()),
                "prompt": columns["prompt"][i],
                "chosen": columns["chosen"][i],
                "rejected": columns["rejected"][i],
            }
        )
    return rows


def _preview(value, width: int) -> str:
    if isinstance(value, list):
        value = " | ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def audit_table(rows: list[dict], kind: str, sort_by: str, top: int) -> str:
    """The ``top`` rows as a text table, with its legend."""
    numeric = ["mutual_information_max", "mutual_information"] if kind == "sft" else ["mutual_information", "prob_chosen"]
    numeric += ["loglik_std", "routing_entropy", "nll"]
    short = {"mutual_information_max": "MI_max", "mutual_information": "MI", "loglik_std": "ll_std",
             "routing_entropy": "H(r)", "nll": "NLL", "prob_chosen": "p(chosen)"}
    texts = ("prompt", "completion") if kind == "sft" else ("prompt", "chosen", "rejected")
    head = ["rank", "index", *[short[k] + ("*" if k == sort_by else "") for k in numeric], "top", *texts]
    table = [head]
    for rank, row in enumerate(rows[:top], start=1):
        table.append(
            [str(rank), str(row["index"]), *[f"{row[k]:.3f}" for k in numeric], f"m{row['top_member']}",
             *[_preview(row[t], 40) for t in texts]]
        )
    return text_table(table) + "\n" + table_legend(kind, sort_by)


def table_legend(kind: str, sort_by: str) -> str:
    """What the audit table's columns mean (``*`` marks the ranking score)."""
    parts = {
        "MI_max": "largest per-token mutual information between members",
        "MI": "mean per-token mutual information" if kind == "sft" else "mutual information of the preference",
        "p(chosen)": "the ensemble's probability that the chosen response is preferred",
        "ll_std": "spread of the members' log-likelihoods",
        "H(r)": "entropy of the example's routing over members",
        "NLL": "mixture negative log-likelihood of the " + ("completion" if kind == "sft" else "preference"),
        "top": "the member the example is routed to most",
    }
    if kind == "sft":
        parts.pop("p(chosen)")
    else:
        parts.pop("MI_max")
    return " · ".join(f"{k}: {v}" for k, v in parts.items()) + f" · *: ranked by {sort_by}, highest first."
