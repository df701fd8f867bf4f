"""Efficacy study 5: groups of people who follow different conventions — does the ensemble find the groups, and is
its epistemic uncertainty high exactly where the groups disagree? (any group-annotated file: HS-Brexit, OpinionQA, …)

Data: one item per line with ``prompt``, ``options`` and ``groups`` (vote counts per group), optionally per-annotator
``annotations`` (:mod:`trl_renyi.data.group_conflicts`). **Group names never reach training**; they are the targets.
Without ``--eval_data`` a stratified ``--held_out_share`` of the items (contested and agreed alike) is held out; with
it, every item of ``--data`` trains and ``--eval_data`` is evaluated.

Training rows (SFT, ``--trainer sft``), every setting the same number of epochs over the training items:

* ``single``, ``alpha1``, ``alpha0``, ``default``, ``independent``: one multi-annotator row per item with every group's
  votes pooled (each group's distribution weighs 1, so large and small groups count alike); with the default
  completion routing every vote is its own example of the bound;
* ``default_row``: one row per (item, group), the group's whole distribution as one example of the bound
  (``multi_annotator_routing="row"``): rows, not votes, are routed to members;
* ``default_source`` (files with annotator ids only): one row per annotator vote with the annotator id, the bound
  taken over annotators (``source_column="annotator"``): a mixture of annotators.

DPO (``--trainer dpo``): one preference pair per (item, group) — on contested items one group's chosen answer is the
other group's rejected one — for ``single``, ``alpha1``, ``alpha0``, ``default``, ``independent``.

Settings: ``base`` (zero-shot), ``single`` (one LoRA, K = 1), ``independent`` (K separately trained LoRAs mixed
uniformly), ``alpha1`` (the ensemble at α = 1), ``alpha0`` (α = 0), ``default`` (the library's defaults: α = −1
after a warm-up of half the steps, floor 0.1), ``default_row`` and ``default_source`` as above; ``auto`` and
``auto_source`` (the defaults with ``alpha="auto"``: α chosen by the stability criterion at the end of the warm-up,
pooled rows or routed by annotator); ``cluster`` (files with annotator ids: the two-stage baseline with the same ids —
the annotators clustered by their agreement on the training items, Cohen's κ, into as many clusters as the file has
groups, without their names, then one LoRA per cluster on its annotators' votes, scored as an ensemble).

Metrics per setting (held-out items unless named ``train_*``; definitions in
:mod:`trl_renyi.evaluation.group_conflicts`): ``auroc_mi_contested``, ``auroc_entropy_contested``,
``auroc_mi_contested_vs_split``, ``auroc_entropy_contested_vs_split``, ``spearman_mi_group_jsd``,
``group_alignment`` (with the best member per group chosen on contested training items), ``best_member_group_nll``,
``group_nll``, ``train_auroc_mi_contested`` (training items scored as ``trl-renyi audit`` scores SFT data, pooled
majority as the completion, ranked by its default score), ``mixture_nll`` and ``pooled_jsd`` (mixture vs all votes
pooled), ``accuracy`` (vs the pooled majority), ``ece``, ``member_agreed_accuracy`` (each member's accuracy on the
agreed items: a member that has become a label specialist loses it), and ``seconds`` with its split; the field's own
scores — LeWiDi 2023's soft-label cross-entropy ``lewidi_ce`` (targets the pooled vote shares, predictions clipped as
its scorer clips them) and micro-F1 ``lewidi_f1`` against the pooled majority, and where annotators are named the
per-annotator macro-F1 ``annotator_macro_f1`` (each annotator's labels predicted by the member that explains that
annotator best on the training items); within the items where anyone disagrees (the pooled vote is not unanimous),
the AUROC for contested items of MI, of the aleatoric and of the total entropy (``auroc_*_disputed``; the ``single``
row's total entropy is one LoRA's); Spearman ρ of MI, total and aleatoric entropy with the between-group JSD.
Anchors per file (``anchors`` in the JSON): the training-prior baseline and the human shares themselves (the
oracle floor) under the same scores, and the share of contested items observed against the share when each item's
votes are dealt to the groups at random. Plots: MI against the between-group JSD per setting; member × group alignment
on held-out contested items.

With ``--seeds 0,1,2`` every setting is trained and scored once per seed (``DIR/seed{s}/group_conflicts.json``) and
``DIR/group_conflicts.json`` holds the mean and standard deviation over the seeds each setting has (``sd``).

Usage:

    python experiments/group_conflicts.py --data ../shared/data/group-conflicts/hs-brexit.jsonl --output_dir DIR
    python experiments/group_conflicts.py --data FILE --output_dir DIR --settings single,alpha1,default
    python experiments/group_conflicts.py --data FILE --output_dir DIR --trainer dpo
    python experiments/group_conflicts.py --data FILE --output_dir DIR --seeds 0,1,2 --settings single,default_source
    python experiments/group_conflicts.py --data FILE --output_dir DIR --quick      # tiny random model: a smoke test

Results accumulate: settings already in ``DIR/group_conflicts.json`` from an earlier run with the same data and
sizes are kept unless run again.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs  # noqa: E402  (the studies' shared plumbing)

SETTINGS = {
    **runs.STUDY_SETTINGS,
    "default": None,  # the library's defaults, filled at run time
    "default_row": None,
    "default_source": None,
    "auto": None,
    "auto_source": None,
    "cluster": {"label": "two-stage: annotators clustered by agreement, one LoRA per cluster"},
}
SFT_ONLY = ("default_row", "default_source", "auto_source", "cluster")
#: settings that need annotator ids
ANNOTATED_ONLY = ("default_source", "auto_source", "cluster")
RESULT_FILE = "group_conflicts.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a group-annotated JSON-lines file (training items)")
    parser.add_argument("--eval_data", default=None, help="a second file to evaluate on (default: hold out part of --data)")
    parser.add_argument("--output_dir", required=True, help=f"folder for {RESULT_FILE} and the plots")
    parser.add_argument("--trainer", default="sft", choices=("sft", "dpo"))
    parser.add_argument("--settings", default=None, help="comma-separated, from: " + ",".join(SETTINGS) + " (default: all that apply)")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke test of the pipeline, not a measurement: a tiny random offline model (not the embedded one), 8 "
        "training items, 2 members, a few steps; its numbers mean nothing",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: every setting once per seed, mean ± sd")
    parser.add_argument("--held_out_share", type=float, default=0.3, help="share of the items held out (without --eval_data)")
    parser.add_argument(
        "--held_out_split", default=None,
        help="hold out the items of this split of --data (e.g. HS-Brexit's dev) instead of a stratified share",
    )  # fmt: skip
    parser.add_argument("--max_train_items", type=int, default=None, help="at most this many training items (stratified); default all")
    parser.add_argument("--epochs", type=float, default=None, help="passes over the training items (default 2; quick 2)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias, local path or Hub id")
    parser.add_argument("--num_members", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="training rows per step")
    parser.add_argument("--learning_rate", type=float, default=None, help="default 1e-3 (SFT), 5e-4 (DPO)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO β")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "bf16", "fp32"),
        help="training precision (auto: bf16 mixed precision where the machine multiplies bfloat16 natively); "
        "scoring is always float32",
    )  # fmt: skip
    parser.add_argument("--docs", default=None, help="results page to update (e.g. docs/results.md)")
    parser.add_argument(
        "--render", action="store_true",
        help="train nothing: print (and with --docs, write) the tables of the seed folders already in --output_dir",
    )  # fmt: skip
    args = parser.parse_args(argv)
    names = list(SETTINGS) if args.settings is None else [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if args.trainer == "dpo":
        if args.settings is not None and any(s in SFT_ONLY for s in names):
            parser.error(f"{[s for s in names if s in SFT_ONLY]} are SFT settings (--trainer sft)")
        names = [s for s in names if s not in SFT_ONLY]
    args.settings = names
    args.seeds = [int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds else None
    args.epochs = args.epochs or 2.0
    args.learning_rate = args.learning_rate or (1e-3 if args.trainer == "sft" else 5e-4)
    if args.quick:
        args.batch_size = min(args.batch_size, 4)
        args.num_members = min(args.num_members, 2)
        args.max_train_items = args.max_train_items or 8
    return args


# -------------------------------------------------------------------------------------------------------------- data
def load_items(args):
    """``(train items, held-out items)``."""
    from trl_renyi.data.group_conflicts import read_group_items, stratified_split

    items = read_group_items(args.data)
    if args.eval_data:
        train, held_out = items, read_group_items(args.eval_data)
        if set(held_out[0].groups) != set(train[0].groups):
            raise ValueError(f"--eval_data groups {sorted(held_out[0].groups)} differ from --data's {sorted(train[0].groups)}")
    elif args.held_out_split:
        held_out = [i for i in items if i.split == args.held_out_split]
        train = [i for i in items if i.split != args.held_out_split]
        if not held_out or not train:
            raise ValueError(f"--held_out_split {args.held_out_split!r} leaves {len(train)} training and {len(held_out)} held-out items")
    else:
        train, held_out = stratified_split(items, args.held_out_share, args.seed)
    if args.quick:
        held_out = held_out[:8]
    if args.max_train_items and len(train) > args.max_train_items:
        train, _ = stratified_split(train, 1.0 - args.max_train_items / len(train), args.seed + 1) if len(train) > 2 else (train, [])
        train = train[: args.max_train_items]
    return train, held_out


def training_rows(setting: str, trainer: str, train: list, seed: int) -> dict:
    from trl_renyi.data.group_conflicts import annotator_vote_rows, group_vote_rows, pooled_vote_rows, preference_pairs

    if trainer == "dpo":
        return preference_pairs(train, seed)
    if setting == "default_row":
        return group_vote_rows(train, seed=seed)
    if setting in ("default_source", "auto_source"):
        return annotator_vote_rows(train)
    return pooled_vote_rows(train)


def setting_run(name: str, args) -> dict:
    run = dict(SETTINGS[name] or {})
    if name.startswith(("default", "auto")):
        run = runs.library_defaults()
        if name.startswith("auto"):
            run["alpha"] = "auto"
            run["label"] = run["label"].replace(f"α = {runs.library_defaults()['alpha']:g}", "α chosen by the stability criterion")
        if name == "default_row":
            run["config"] = {"multi_annotator_routing": "row"}
            run["label"] += ", one row per (item, group), row routing"
        if name.endswith("_source"):
            run["config"] = {"source_column": "annotator"}
            run["label"] += ", one row per annotator vote, routed by annotator"
    run.setdefault("num_members", args.num_members)
    return run


def train_setting(name: str, args, base, tokenizer, train: list, budget: dict):
    """Train (or, for ``base``, wrap) one setting and return its scorer (plain-text prompts, as trained)."""
    from datasets import Dataset

    from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer, RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.inference.baseline import SingleModel

    if name == "base":
        return SingleModel(base, tokenizer, name="base", use_chat_template=False)
    if name == "cluster":
        return train_clusters(args, base, tokenizer, train, budget)
    rows = training_rows(name, args.trainer, train, args.seed)
    dataset = Dataset.from_dict(rows)
    first = "chosen" if args.trainer == "dpo" else "completions"
    budget = dict(budget, steps=max(1, math.ceil(args.epochs * len(rows[first]) / args.batch_size)))
    trainer_cls, config_cls = (RenyiDPOTrainer, RenyiDPOConfig) if args.trainer == "dpo" else (RenyiSFTTrainer, RenyiSFTConfig)
    run = setting_run(name, args)
    if args.trainer == "dpo":
        run["config"] = {**run.get("config", {}), "beta": args.beta}
    print(f"    {len(dataset)} training rows, {budget['steps']} steps of {args.batch_size}", flush=True)
    model = runs.train_setting(
        trainer_cls, config_cls, base, tokenizer, dataset, budget, run,
        independent=name == "independent", num_members=args.num_members, seed=args.seed, lora_r=args.lora_r,
    )  # fmt: skip
    return model, budget["steps"]


def train_clusters(args, base, tokenizer, train: list, budget: dict):
    """``cluster``: the annotators clustered by agreement on the training items (as many clusters as groups, names
    unseen), one LoRA per cluster on its annotators' votes (the same passes over them as every setting), mixed
    uniformly. Returns ``(ensemble, steps)``; the clusters are recorded on the ensemble for the report."""
    from datasets import Dataset

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.data.group_conflicts import annotator_vote_rows
    from trl_renyi.evaluation.group_conflicts import cluster_annotators

    clusters = cluster_annotators(train, len(train[0].groups))
    rows = annotator_vote_rows(train)
    singles, total = [], 0
    for cluster in range(len(set(clusters.values()))):
        keep = [[j for j, a in enumerate(annotators) if clusters[a] == cluster] for annotators in rows["annotator"]]
        part = {
            "prompt": [p for p, k in zip(rows["prompt"], keep) if k],
            "completions": [[c[j] for j in k] for c, k in zip(rows["completions"], keep) if k],
            "completion_weights": [[w[j] for j in k] for w, k in zip(rows["completion_weights"], keep) if k],
        }
        steps = max(1, math.ceil(args.epochs * len(part["prompt"]) / args.batch_size))
        total += steps
        print(f"    cluster {cluster}: {sum(v == cluster for v in clusters.values())} annotators, {steps} steps", flush=True)
        singles.append(runs.train_ensemble(
            RenyiSFTTrainer, RenyiSFTConfig, base, tokenizer, Dataset.from_dict(part), dict(budget, steps=steps),
            {"num_members": 1, "alpha": 1.0, "seed": args.seed + cluster},
        ))  # fmt: skip
    model = runs.combine_independent(singles, base, tokenizer, args.lora_r)
    model.use_chat_template = False
    model.clusters = clusters
    return model, total


# ------------------------------------------------------------------------------------------------------------ scoring
def predict(model, items: list) -> list:
    from trl_renyi.data.group_conflicts import answer_completions, answer_prompt

    if not items:
        return []
    return model.predict_choices(
        [answer_prompt(i) for i in items], [answer_completions(i) for i in items], batch_size=16, show_progress=False
    )


def evaluate(model, held_out: list, train: list) -> dict:
    """The metrics of the module docstring (without ``train_auroc_mi_contested``, see :func:`audit_auroc`)."""
    from trl_renyi.data.group_conflicts import group_targets, has_annotators
    from trl_renyi.evaluation.distributions import jensen_shannon_distances, spearman
    from trl_renyi.evaluation.group_conflicts import (
        alignment_matrix,
        best_members,
        contested_auroc,
        contested_vs_split_auroc,
        cross_entropy,
        group_alignment,
        group_cross_entropy,
        lewidi_cross_entropy,
        majority_label,
        micro_f1,
        per_annotator_macro_f1,
    )
    from trl_renyi.evaluation.metrics import expected_calibration_error

    targets = [group_targets(i) for i in held_out]
    groups = list(held_out[0].groups)
    predictions = predict(model, held_out)
    mi = [p.mutual_information for p in predictions]
    entropy = [p.entropy for p in predictions]
    contested = [t["contested"] for t in targets]
    within = [t["within_group_entropy"] for t in targets]
    jsd = [t["between_group_jsd"] for t in targets]
    member_probs = [p.member_probs.double() for p in predictions]

    # each group's best member, chosen on the contested training items (every training item is scored where
    # annotators are named: the per-annotator F1 picks each annotator's member on all of them)
    annotated = has_annotators(train) and has_annotators(held_out)
    scored_train = train if annotated else [i for i in train if i.contested]
    scored_predictions = predict(model, scored_train)
    train_contested = [i for i in scored_train if i.contested]
    train_predictions = [p for i, p in zip(scored_train, scored_predictions) if i.contested]
    train_targets = [group_targets(i) for i in train_contested]
    best = best_members(
        [p.member_probs.double() for p in train_predictions],
        {g: [t["distributions"][g] for t in train_targets] for g in groups},
    ) if train_predictions else {g: 0 for g in groups}  # fmt: skip
    held_contested = [i for i, c in enumerate(contested) if c]
    majorities = {g: [targets[i]["majorities"][g] for i in held_contested] for g in groups}
    distributions = {g: [t["distributions"][g] for t in targets] for g in groups}
    pooled = [t["pooled"] for t in targets]
    probs = [p.probs.double().tolist() for p in predictions]
    pooled_majority = [majority_label(q) for q in pooled]
    correct = [p.prediction == m for p, m in zip(predictions, pooled_majority)]
    aleatoric = [h - m for h, m in zip(entropy, mi)]
    disputed = [i for i, q in enumerate(pooled) if max(q) < 1.0]  # anyone disagrees
    field_scores = {
        "lewidi_ce": lewidi_cross_entropy(pooled, probs),
        "lewidi_f1": micro_f1(pooled_majority, [p.prediction for p in predictions]),
        "auroc_mi_disputed": contested_auroc([mi[i] for i in disputed], [contested[i] for i in disputed]),
        "auroc_aleatoric_disputed": contested_auroc([aleatoric[i] for i in disputed], [contested[i] for i in disputed]),
        "auroc_entropy_disputed": contested_auroc([entropy[i] for i in disputed], [contested[i] for i in disputed]),
        "spearman_entropy_group_jsd": spearman(entropy, jsd),
        "spearman_aleatoric_group_jsd": spearman(aleatoric, jsd),
        "disputed_items": len(disputed),
    }
    if annotated:
        f1 = per_annotator_macro_f1(
            [p.member_probs.double() for p in scored_predictions], [[(a, o) for a, _, o in i.annotations] for i in train],
            member_probs, [[(a, o) for a, _, o in i.annotations] for i in held_out],
        )  # fmt: skip
        field_scores["annotator_macro_f1"] = f1["mean"]
        field_scores["annotator_members"] = f1["members"]
    return {
        **field_scores,
        "auroc_mi_contested": contested_auroc(mi, contested),
        "auroc_entropy_contested": contested_auroc(entropy, contested),
        "auroc_mi_contested_vs_split": contested_vs_split_auroc(mi, contested, within),
        "auroc_entropy_contested_vs_split": contested_vs_split_auroc(entropy, contested, within),
        "spearman_mi_group_jsd": spearman(mi, jsd),
        "group_alignment": group_alignment([member_probs[i] for i in held_contested], majorities, best),
        "best_members": best,
        "best_member_group_nll": group_cross_entropy(
            {g: [mp[best[g]].tolist() for mp in member_probs] for g in groups}, distributions
        ),
        "group_nll": group_cross_entropy({g: probs for g in groups}, distributions),
        "mixture_nll": sum(cross_entropy(q, p) for q, p in zip(pooled, probs)) / len(pooled),
        "pooled_jsd": float(jensen_shannon_distances(pooled, probs).mean()) if _same_width(pooled) else _mean_jsd(pooled, probs),
        "accuracy": sum(correct) / len(correct),
        "ece": expected_calibration_error([max(p) for p in probs], correct),
        "mean_mi": sum(mi) / len(mi),
        "mi_contested": _mean([mi[i] for i in held_contested]),
        "mi_agreed": _mean([m for m, c in zip(mi, contested) if not c]),
        "entropy_contested": _mean([entropy[i] for i in held_contested]),
        "entropy_agreed": _mean([h for h, c in zip(entropy, contested) if not c]),
        "alignment_matrix": alignment_matrix([member_probs[i] for i in held_contested], majorities),
        # diagnostic: does each member still answer what both groups answer where they agree? (a label specialist
        # that always gives one group's contested answer does not)
        "member_agreed_accuracy": [
            _mean([float(int(member_probs[i][k].argmax()) == pooled_majority[i]) for i in range(len(held_out)) if not contested[i]])
            for k in range(member_probs[0].shape[0])
        ] if member_probs else [],  # fmt: skip
        "_mi": mi,
        "_jsd": jsd,
    }


def _mean(values):
    return sum(values) / len(values) if values else None


def _same_width(rows) -> bool:
    return len({len(r) for r in rows}) == 1


def _mean_jsd(targets, predicted) -> float:
    from trl_renyi.evaluation.distributions import jensen_shannon_distances

    return sum(float(jensen_shannon_distances([q], [p])[0]) for q, p in zip(targets, predicted)) / len(targets)


def audit_auroc(model, train: list) -> float:
    """``train_auroc_mi_contested``: the training items scored as ``trl-renyi audit`` scores SFT data (the pooled
    majority as the completion, its default ranking score), as a detector of the contested items."""
    from trl_renyi.evaluation.audit import SFT_SCORES, score_sft
    from trl_renyi.data.group_conflicts import answer_completions, answer_prompt
    from trl_renyi.evaluation.group_conflicts import contested_auroc

    columns = {"prompt": [], "completion": []}
    for item in train:
        pooled = item.pooled_distribution()
        columns["prompt"].append(answer_prompt(item))
        columns["completion"].append(answer_completions(item)[max(range(len(pooled)), key=pooled.__getitem__)])
    rows = score_sft(model, columns, batch_size=16)
    return contested_auroc([r[SFT_SCORES[0]] for r in rows], [train[r["index"]].contested for r in rows])


# -------------------------------------------------------------------------------------------------------------- plots
def plot_mi_against_group_jsd(results: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.1), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        ax.scatter(r["_jsd"], r["_mi"], s=8, alpha=0.5)
        ax.set(
            title=f"{name} (ρ = {runs.fmt(r.get('spearman_mi_group_jsd'))})",
            xlabel="between-group JSD (nats)",
            ylabel="ensemble MI (nats)",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_alignment(results: dict, groups: list[str], path: Path) -> str:
    """Member × group: the share of held-out contested items where the member answers the group's majority."""
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if r.get("alignment_matrix")]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(2.6 * max(len(names), 1) + 1, 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        matrix = results[name]["alignment_matrix"]
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for k, row in enumerate(matrix):
            for g, value in enumerate(row):
                ax.text(g, k, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
        ax.set(title=name, xticks=range(len(groups)), yticks=range(len(matrix)), xlabel="group", ylabel="member")
        ax.set_xticklabels(groups, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------------------- report
#: the field's scores (LeWiDi 2023, perspectivist) and calibration
FIELD_COLUMNS = (
    ("lewidi_ce", "soft CE ↓"), ("lewidi_f1", "micro-F1 ↑"), ("annotator_macro_f1", "per-annotator macro-F1 ↑"),
    ("mixture_nll", "NLL ↓"), ("pooled_jsd", "JSD ↓"), ("ece", "ECE ↓"), ("seconds", "s"),
)  # fmt: skip
#: does the epistemic signal find the groups' conflict, and does a member speak for each group?
SIGNAL_COLUMNS = (
    ("auroc_mi_contested", "AUROC MI ↑"), ("auroc_entropy_contested", "AUROC H ↑"),
    ("auroc_mi_disputed", "AUROC MI, disputed ↑"), ("auroc_aleatoric_disputed", "AUROC aleatoric, disputed"),
    ("auroc_entropy_disputed", "AUROC H, disputed ↑"), ("spearman_mi_group_jsd", "ρ(MI, JSD) ↑"),
    ("spearman_entropy_group_jsd", "ρ(H, JSD)"), ("group_alignment", "alignment ↑"),
    ("best_member_group_nll", "best-member group NLL ↓"), ("group_nll", "group NLL ↓"),
    ("train_auroc_mi_contested", "train AUROC ↑"), ("mi_contested", "MI contested"), ("mi_agreed", "MI agreed"),
)  # fmt: skip


def docs_marker(data: str, trainer: str, model: str, seeds: bool = False) -> str:
    """The results-page section a run replaces: one per data file and trainer, per base model other than the
    embedded default (so a run on another model never overwrites the default model's table), and apart for runs over
    several seeds (whose tables carry mean ± sd and the field's scores)."""
    from trl_renyi.model.loading import DEFAULT_MODEL, canonical_name

    marker = f"group-conflicts-{Path(data).stem}-{trainer}"
    name = canonical_name(model)
    if name != DEFAULT_MODEL:
        marker += "-" + "".join(c if c.isalnum() or c in "-." else "-" for c in name.lower()).strip("-")
    return marker + ("-seeds" if seeds else "")


def _cell(payload: dict, name: str, key: str) -> str:
    value = payload["settings"][name].get(key)
    digits = 0 if key == "seconds" else 3
    sd = (payload.get("sd") or {}).get(name, {}).get(key)
    return runs.fmt(value, digits) + (f" ± {sd:.{digits}f}" if sd is not None else "")


def table(payload: dict) -> str:
    """Two tables (the field's scores with the anchors as rows; the uncertainty and group figures), mean ± sd over the
    seeds where the payload is a summary of several."""
    seeds = payload.get("seeds")
    parts = []
    for columns, anchor_rows in ((FIELD_COLUMNS, True), (SIGNAL_COLUMNS, False)):
        shown = [(k, t) for k, t in columns if any(k in m for m in payload["settings"].values())]
        lines = ["| setting |" + (" seeds |" if seeds else "") + " " + " | ".join(t for _, t in shown) + " |"]
        lines.append("|---" * (len(shown) + 1 + bool(seeds)) + "|")
        for name in payload["settings"]:
            cells = [_cell(payload, name, k) for k, _ in shown]
            lines.append(f"| {name} |" + (f" {len(seeds.get(name, []))} |" if seeds else "") + " " + " | ".join(cells) + " |")
        anchors_ = payload.get("anchors") or {}
        if anchor_rows and anchors_:
            for label, ce, f1 in (("training prior", "prior_lewidi_ce", "prior_lewidi_f1"), ("human shares (floor)", "oracle_lewidi_ce", None)):
                cells = [runs.fmt(anchors_.get(ce), 3) if k == "lewidi_ce" else runs.fmt(anchors_.get(f1), 3) if k == "lewidi_f1" and f1 else "–" for k, _ in shown]
                lines.append(f"| *{label}* |" + (" – |" if seeds else "") + " " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    anchors_ = payload.get("anchors") or {}
    if anchors_:
        parts.append(
            f"Contested items: {anchors_['contested_share']:.3f} of the evaluated ones ({anchors_['contested_share_by_chance']:.3f} "
            f"if each item's votes were dealt to the groups at random), {anchors_['train_contested_share']:.3f} of the training "
            f"ones ({anchors_['train_contested_share_by_chance']:.3f} by chance); {anchors_['tied_majorities']:g} evaluated items "
            "have a tied pooled majority (the first option counts)."
        )
    return "\n\n".join(parts)


# options that say what to run or where to write it, not what a result means
NOT_RESULT_OPTIONS = ("settings", "output_dir", "docs", "render")


def earlier_results(path: Path, config: dict) -> dict:
    """Settings of an earlier run with the same data and sizes (kept unless run again).

    The two configurations are compared on the options both record, less :data:`NOT_RESULT_OPTIONS`, so an option
    added to the study later does not discard the results written before it existed."""
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    earlier = payload.get("config", {})
    differing = sorted(k for k in config.keys() & earlier.keys() if k not in NOT_RESULT_OPTIONS and config[k] != earlier[k])
    if differing:
        print(f"{path} was written with other data or sizes ({', '.join(differing)} differ): starting afresh.", flush=True)
        return {}
    return payload.get("settings", {})


def anchors(train: list, held_out: list, seed: int) -> dict:
    """Where a model sits between the field's anchors on the evaluated items: the training-prior baseline and the
    human shares themselves (oracle floor) under LeWiDi's scores, and the share of contested items observed against
    the share when each item's votes are dealt to its groups at random."""
    from trl_renyi.evaluation.group_conflicts import (
        chance_contested_share,
        lewidi_cross_entropy,
        majority_label,
        micro_f1,
        training_prior,
    )

    pooled = [i.pooled_distribution() for i in held_out]
    gold = [majority_label(q) for q in pooled]
    prior = training_prior([i.pooled_distribution() for i in train], [len(q) for q in pooled])
    return {
        "prior_lewidi_ce": lewidi_cross_entropy(pooled, prior),
        "prior_lewidi_f1": micro_f1(gold, [majority_label(p) for p in prior]),
        "oracle_lewidi_ce": lewidi_cross_entropy(pooled, pooled),
        "tied_majorities": sum(1 for q in pooled if list(q).count(max(q)) > 1),
        "contested_share": sum(i.contested for i in held_out) / len(held_out),
        "contested_share_by_chance": chance_contested_share(held_out, draws=200, seed=seed),
        "train_contested_share": sum(i.contested for i in train) / len(train),
        "train_contested_share_by_chance": chance_contested_share(train, draws=200, seed=seed),
    }


def cluster_report(model, train: list) -> dict:
    """The ``cluster`` setting's clusters and how pure they are in the (hidden) groups: per cluster, the share of its
    annotators from its most common group."""
    group_of = {a: g for item in train for a, g, _ in item.annotations}
    clusters = model.clusters
    purity = []
    for cluster in sorted(set(clusters.values())):
        members = [group_of[a] for a, c in clusters.items() if c == cluster]
        purity.append(max(members.count(g) for g in set(members)) / len(members))
    return {"clusters": clusters, "cluster_purity": sum(purity) / len(purity)}


def run_seed(args, seed: int, out_dir: Path) -> dict:
    """Every setting of ``args`` trained and scored with ``seed``; the results accumulate in ``out_dir``."""
    from trl_renyi.data.group_conflicts import has_annotators

    clock = runs.Stopwatch()
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    train, held_out = load_items(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = list(args.settings)
    for name in ANNOTATED_ONLY:
        if name in settings and not has_annotators(train):
            print(f"{name}: the training items name no annotators; setting skipped.", flush=True)
            settings.remove(name)
    groups = list(train[0].groups)
    if args.quick:  # the smoke test: one member per group, the fewest that can hold them
        args.num_members = len(groups)
    ensembles = [n for n in settings if n not in ("base", "single", "cluster") and (setting_run(n, args).get("num_members") or 0) > 1]
    if ensembles and args.num_members < len(groups):
        raise ValueError(f"--num_members {args.num_members} is below the {len(groups)} groups: K ≥ groups is needed for a member per group")
    print(
        f"{args.data}: {len(train)} training items ({sum(i.contested for i in train)} contested), {len(held_out)} "
        f"evaluated ({sum(i.contested for i in held_out)} contested); groups {groups} (evaluation only); "
        f"trainer {args.trainer}; seed {seed}."
        + (" Quick smoke test: a tiny random model, numbers meaningless." if args.quick else ""),
        flush=True,
    )
    base, tokenizer = runs.load_base(args.quick, args.model)
    budget = {
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "lora_r": args.lora_r,
        "member_init_std": 1e-3, "seed": seed, "max_length": None,
        "bf16": False if args.quick else runs.resolve_precision(args.precision),
        "extra_config": {"padding_free": True} if args.trainer == "sft" else {},
    }  # fmt: skip
    # the precision as resolved on this machine, so that results of another precision are not mixed in
    config = {**{k: v for k, v in vars(args).items() if k != "seeds"}, "precision": "bf16" if budget["bf16"] else "fp32"}
    results = earlier_results(out_dir / RESULT_FILE, config)
    anchor_values = anchors(train, held_out, seed)
    for index, name in enumerate(settings, start=1):
        run_clock = runs.Stopwatch()
        label = setting_run(name, args).get("label", name) if name != "base" else SETTINGS["base"]["label"]
        print(f"[{index}/{len(settings)}] {name}: {label} ...", flush=True)
        trained = train_setting(name, args, base, tokenizer, train, budget)
        model, steps = trained if isinstance(trained, tuple) else (trained, 0)
        phases = {"train_seconds": run_clock.seconds()}
        metrics = evaluate(model, held_out, train)
        phases["eval_seconds"] = run_clock.seconds() - phases["train_seconds"]
        metrics["train_auroc_mi_contested"] = audit_auroc(model, train)
        phases["audit_seconds"] = run_clock.seconds() - phases["train_seconds"] - phases["eval_seconds"]
        metrics.update(phases, label=label, steps=steps, seconds=run_clock.seconds())
        if name == "cluster":
            metrics.update(cluster_report(model, train))
        resolution = getattr(getattr(model, "metadata", None) or {}, "get", lambda key: None)("alpha_auto")
        if resolution:
            metrics["alpha_auto"] = resolution
        results[name] = metrics
        print(
            f"    {run_clock}: AUROC MI {runs.fmt(metrics['auroc_mi_contested'], 3)}, AUROC H "
            f"{runs.fmt(metrics['auroc_entropy_contested'], 3)}, LeWiDi CE {runs.fmt(metrics['lewidi_ce'], 3)} (prior "
            f"{runs.fmt(anchor_values['prior_lewidi_ce'], 3)}, oracle {runs.fmt(anchor_values['oracle_lewidi_ce'], 3)}), "
            f"alignment {runs.fmt(metrics['group_alignment'], 3)}, train AUROC {runs.fmt(metrics['train_auroc_mi_contested'], 3)} ("
            + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s" for k, v in phases.items()) + ")",
            flush=True,
        )
        del model
        gc.collect()
        payload = {
            "data": str(args.data),
            "eval_data": args.eval_data,
            "config": config,
            "seed": seed,
            "items": {
                "train": len(train), "train_contested": sum(i.contested for i in train),
                "held_out": len(held_out), "held_out_contested": sum(i.contested for i in held_out),
            },  # fmt: skip
            "groups": groups,
            "anchors": anchor_values,
            "settings": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()},
            "plots": {
                "mi_vs_group_jsd": plot_mi_against_group_jsd(
                    {n: r for n, r in results.items() if "_mi" in r}, out_dir / "mi_vs_group_jsd.png"
                ),
                "alignment": plot_alignment(results, groups, out_dir / "alignment.png"),
            },
            "seconds": clock.seconds(),
        }
        # the per-item values of earlier settings are kept for the plots of a later run
        for n, r in results.items():
            payload["settings"][n]["_mi"], payload["settings"][n]["_jsd"] = r.get("_mi"), r.get("_jsd")
        runs.save_json(out_dir / RESULT_FILE, payload)
    return json.loads((out_dir / RESULT_FILE).read_text()) if (out_dir / RESULT_FILE).is_file() else {}


def summarise(out_dir: Path) -> dict:
    """Mean and standard deviation over the seed folders of ``out_dir`` (each setting over the seeds it has)."""
    import statistics

    per_seed = {}
    for path in sorted(out_dir.glob("seed*/" + RESULT_FILE)):
        payload = json.loads(path.read_text())
        per_seed[payload.get("seed", path.parent.name)] = payload
    if not per_seed:
        raise SystemExit(f"no seed*/{RESULT_FILE} in {out_dir}")
    first = next(iter(per_seed.values()))
    names = list(dict.fromkeys(n for p in per_seed.values() for n in p["settings"]))
    means, spread, seeds = {}, {}, {}
    for name in names:
        runs_of = {seed: p["settings"][name] for seed, p in per_seed.items() if name in p["settings"]}
        seeds[name] = sorted(runs_of)
        keys = [k for k, v in next(iter(runs_of.values())).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        means[name], spread[name] = {"label": next(iter(runs_of.values())).get("label")}, {}
        for key in keys:
            values = [r[key] for r in runs_of.values() if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            if values:
                means[name][key] = statistics.fmean(values)
                spread[name][key] = statistics.stdev(values) if len(values) > 1 else None
    anchor_keys = first.get("anchors", {})
    summary = {
        "data": first["data"], "config": first["config"], "items": first["items"], "groups": first["groups"],
        "anchors": {k: statistics.fmean(p["anchors"][k] for p in per_seed.values() if "anchors" in p) for k in anchor_keys},
        "settings": means, "sd": spread, "seeds": seeds,
        "per_seed": {str(seed): str(out_dir / f"seed{seed}" / RESULT_FILE) for seed in per_seed},
        "plots": {str(seed): p.get("plots") for seed, p in per_seed.items()},
    }  # fmt: skip
    runs.save_json(out_dir / RESULT_FILE, summary)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = runs.Stopwatch()
    out_dir = Path(args.output_dir)
    over_seeds = bool(args.seeds or args.render)
    if not args.render:  # --render trains nothing: it re-summarises the stored seed folders
        for seed in args.seeds or []:
            run_seed(args, seed, out_dir / f"seed{seed}")
    payload = summarise(out_dir) if over_seeds else run_seed(args, args.seed, out_dir)
    print(table(payload))
    made = f"from {len(payload['per_seed'])} seed folder(s)" if args.render else f"and the plots in {clock}"
    print(f"Wrote {out_dir / RESULT_FILE} {made}.")
    if args.docs:
        marker = docs_marker(args.data, args.trainer, args.model, seeds=over_seeds)
        runs.update_results_page(marker, table(payload), Path(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
