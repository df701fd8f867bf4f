"""Evaluation shared by the efficacy studies: specialisation, held-out NLL, routing and uncertainty per task family.

Given an ensemble and the held-out split of the conflicting-data generator (``trl_renyi.data``), every held-out
prompt is scored with its labelled completion and with its two reference answers (``choices``):

* **held-out NLL** per family: −log Σ_k π_k p_k(y | x), in nats per example;
* **routing** uses the posterior over members given the labelled answer, w_k ∝ π_k p_k(y | x) (α = 0), which is
  defined whatever α the ensemble was trained with; a *group* is a (family, convention) pair; its *top member* is
  the member with the largest mean posterior, and *purity* the share of the group's examples whose most likely
  member is that top member (a group served by two equally specialised members scores about ½ there);
  *specialist purity* is clustering purity on the contradictory families: each example goes to its most likely
  member, and the share of examples whose member serves mostly their own convention is reported (½ when one member
  serves both conventions, as a single LoRA does; 1 for clean specialists, however many members share a
  convention); *convention mass* is the posterior mass an example's convention's own members hold (½ without
  routing, 1 for hard specialists: purity counts argmaxes, this measures how decisive they are);
  ``routing_entropy`` is the entropy of the responsibilities at the training α;
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
from trl_renyi.inference.uncertainty import decompose
from trl_renyi.objective import renyi_bound


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AUROC of ``scores`` for detecting ``positive`` rows (torchmetrics; NaN when one class is absent)."""
    positive = positive.long()
    if positive.min() == positive.max():
        return math.nan
    return float(binary_auroc(scores.float(), positive))


def specialist_purity(test_rows: list[dict], top_members: list[int]) -> float:
    """Clustering purity of the contradictory families: Σ over (family, member) cells of the count of the cell's
    majority convention, divided by the number of contradictory examples (NaN without any)."""
    cells = defaultdict(lambda: defaultdict(int))
    total = 0
    for row, member in zip(test_rows, top_members, strict=True):
        if row["contradictory"]:
            cells[(row["family"], member)][row["convention"]] += 1
            total += 1
    if total == 0:
        return math.nan
    return sum(max(counts.values()) for counts in cells.values()) / total


def convention_mass(examples: dict, contradictory_families) -> float:
    """How strongly the contradictory families are routed: a member *serves* the convention on which its mean
    posterior is higher; the figure is the mean, over contradictory examples, of the posterior mass held by the members
    serving the example's own convention (½ without routing, 1 for hard specialists; NaN without such examples)."""
    posterior = torch.tensor(examples["posterior"])
    values = []
    for family in contradictory_families:
        rows = [i for i, f in enumerate(examples["family"]) if f == family]
        conventions = sorted({examples["convention"][i] for i in rows})
        means = {c: posterior[[i for i in rows if examples["convention"][i] == c]].mean(0) for c in conventions}
        serves = torch.stack([means[c] for c in conventions]).argmax(0)  # (K,) index of the convention served
        for i in rows:
            own = serves == conventions.index(examples["convention"][i])
            values.append(float(posterior[i][own].sum()))
    return _mean(values)


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

    group_share = {}
    for family in families:
        for convention in sorted({row["convention"] for row in test_rows if row["family"] == family}):
            rows = [i for i, row in enumerate(test_rows) if row["family"] == family and row["convention"] == convention]
            group_share[f"{family}/{convention}"] = posterior[rows].mean(0).tolist()
    consistent = [f for f in families if not per_family[f]["contradictory"]]
    contradictory_families = [f for f in families if per_family[f]["contradictory"]]
    split_conflicts = [
        family
        for family in contradictory_families
        if len({top for (fam, _), top in top_member.items() if fam == family}) > 1
    ]
    gaps = [max(per_family[f]["member_loglik"]) - min(per_family[f]["member_loglik"]) for f in consistent]
    worst = [min(per_family[f]["member_loglik"]) for f in consistent]
    examples = {
        "family": [row["family"] for row in test_rows],
        "convention": [row["convention"] for row in test_rows],
        "posterior": posterior.tolist(),
        "member_loglik": labelled.member_loglik.tolist(),
        "choice_mi": choice_parts.mutual_information.tolist(),
    }
    return {
        "num_members": num_members,
        "families": per_family,
        "purity": purity_by_group,
        "purity_contradictory": _mean(
            v for k, v in purity_by_group.items() if per_family[k.split("/")[0]]["contradictory"]
        ),
        "conflicts_split": split_conflicts,
        "specialist_purity": specialist_purity(test_rows, posterior.argmax(-1).tolist()),
        "group_share": group_share,
        "convention_mass": convention_mass(examples, contradictory_families),
        "examples": examples,
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
