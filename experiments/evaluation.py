"""Evaluation shared by the efficacy studies: specialisation, held-out NLL, routing and uncertainty per task family.

Given an ensemble and the held-out split of the conflicting-data generator (``trl_renyi.data``), every held-out
prompt is scored with its labelled completion and with its two reference answers (``choices``):

* **held-out NLL** per family: −log Σ_k π_k p_k(y | x), in nats per example;
* **routing** uses the posterior over members given the labelled answer, w_k ∝ π_k p_k(y | x) (α = 0), which is
  defined whatever α the ensemble was trained with; a *group* is a (family, convention) pair; its *top member* is
  the member with the largest mean posterior, and *purity* the share of the group's examples whose most likely
  member is that top member; ``routing_entropy`` is the entropy of the responsibilities at the training α;
* **uncertainty**: choice-level mutual information over the two reference answers (each member's normalised
  probabilities of the two answers), the maximum per-token MI over the labelled answer, and the spread (std) of
  ℓ_ik across members; ``auroc_*`` is the AUROC of each for telling contradictory from consistent prompts;
* **forgetting**: on consistent families, each member's mean ℓ on the correct answer; ``worst_member_gap`` is the
  best member's minus the worst member's (nats): small means every member kept the agreed knowledge.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torchmetrics.functional.classification import binary_auroc

from trl_renyi import RenyiEnsemble
from trl_renyi.objective import renyi_bound
from trl_renyi.uncertainty import decompose


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AUROC of ``scores`` for detecting ``positive`` rows (torchmetrics; NaN when one class is absent)."""
    positive = positive.long()
    if positive.min() == positive.max():
        return math.nan
    return float(binary_auroc(scores.float(), positive))


def evaluate_ensemble(ensemble: RenyiEnsemble, test_rows: list[dict], batch_size: int = 16) -> dict:
    """All per-family figures of one ensemble on the held-out rows (see the module docstring)."""
    prompts = [row["prompt"] for row in test_rows]
    labelled = ensemble.score(prompts, [row["completion"] for row in test_rows], batch_size=batch_size)
    first = ensemble.score(prompts, [row["choices"][0] for row in test_rows], batch_size=batch_size)
    second = ensemble.score(prompts, [row["choices"][1] for row in test_rows], batch_size=batch_size)

    log_weights = ensemble.log_weights
    member_choice = torch.stack([first.member_loglik, second.member_loglik], dim=-1)  # (N, K, 2)
    member_choice_logp = member_choice - torch.logsumexp(member_choice, dim=-1, keepdim=True)
    choice_parts = decompose(member_choice_logp.transpose(0, 1), log_weights)  # over (K, N, 2)
    posterior = renyi_bound(labelled.member_loglik, 0.0, log_weights).responsibilities  # (N, K)
    training_routing = labelled.responsibilities
    num_members = labelled.member_loglik.shape[1]

    families = sorted({row["family"] for row in test_rows})
    contradictory = torch.tensor([bool(row["contradictory"]) for row in test_rows])
    per_family = {}
    purity_by_group = {}
    top_member = {}
    for family in families:
        rows = [i for i, row in enumerate(test_rows) if row["family"] == family]
        member_ll = labelled.member_loglik[rows]
        per_family[family] = {
            "contradictory": bool(test_rows[rows[0]]["contradictory"]),
            "nll": -_mean(labelled.loglik[rows].tolist()),
            "choice_mi": _mean(choice_parts.mutual_information[rows].tolist()),
            "token_mi_max": _mean(labelled.mutual_information_max[rows].tolist()),
            "token_mi_mean": _mean(labelled.mutual_information[rows].tolist()),
            "loglik_std": _mean(labelled.loglik_std[rows].tolist()),
            "member_loglik": member_ll.mean(0).tolist(),
            "posterior_share": posterior[rows].mean(0).tolist(),
        }
        groups = defaultdict(list)
        for i in rows:
            groups[test_rows[i]["convention"]].append(i)
        for convention, members in groups.items():
            share = posterior[members].mean(0)
            top = int(share.argmax())
            top_member[(family, convention)] = top
            purity_by_group[f"{family}/{convention}"] = float((posterior[members].argmax(-1) == top).float().mean())

    consistent = [f for f in families if not per_family[f]["contradictory"]]
    contradictory_families = [f for f in families if per_family[f]["contradictory"]]
    split_conflicts = [
        family
        for family in contradictory_families
        if len({top for (fam, _), top in top_member.items() if fam == family}) > 1
    ]
    gaps = [max(per_family[f]["member_loglik"]) - min(per_family[f]["member_loglik"]) for f in consistent]
    worst = [min(per_family[f]["member_loglik"]) for f in consistent]
    return {
        "num_members": num_members,
        "families": per_family,
        "purity": purity_by_group,
        "purity_contradictory": _mean(
            v for k, v in purity_by_group.items() if per_family[k.split("/")[0]]["contradictory"]
        ),
        "conflicts_split": split_conflicts,
        "routing_entropy": _mean((-(training_routing * training_routing.clamp_min(1e-30).log()).sum(-1)).tolist()),
        "posterior_entropy": _mean((-(posterior * posterior.clamp_min(1e-30).log()).sum(-1)).tolist()),
        "nll_all": -_mean(labelled.loglik.tolist()),
        "auroc_choice_mi": auroc(choice_parts.mutual_information, contradictory),
        "auroc_token_mi_max": auroc(labelled.mutual_information_max, contradictory),
        "auroc_loglik_std": auroc(labelled.loglik_std, contradictory),
        "mi_contradictory": _mean(per_family[f]["choice_mi"] for f in contradictory_families),
        "mi_consistent": _mean(per_family[f]["choice_mi"] for f in consistent),
        "worst_member_gap": max(gaps) if gaps else math.nan,
        "worst_member_loglik_consistent": min(worst) if worst else math.nan,
    }
