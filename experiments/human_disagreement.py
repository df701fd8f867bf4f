"""Efficacy study 4: does the ensemble's uncertainty track real human disagreement? (ChaosNLI)

ChaosNLI gives 100 human labels for each NLI item (SNLI and MNLI: entailment / neutral / contradiction; αNLI: which
of two hypotheses explains the ending). Items are shuffled (seeded) and split into held-out items (the first
``--eval_items``, the same whatever the training size) and training items. Each training item becomes one
multi-annotator row: the prompt, every label word as a completion, and the votes as ``completion_weights`` — the 5
original votes (``--train_labels original``, the default) or K votes sampled from the 100 (``sampled:K``). Each setting is trained with the same budget and scored on the held-out items' label words
(``predict_choices``: members mixed with π) against their 100-vote distribution.

Budget (every trained setting): ``--steps`` optimizer steps of ``--batch_size`` items, over ``--steps × --batch_size``
training items by default (one epoch: every item is trained on once, and the audit ranks only items trained on);
padding-free batches (exact, see the shared-prompt layout); bf16 mixed precision where the machine multiplies bfloat16
natively (``--precision``; TRL's ``bf16=True``, float32 master weights), scoring always in float32.

Settings (``--settings``, comma-separated):

* ``base`` — the base model, zero-shot (adapters off);
* ``single`` — one LoRA (K = 1, which equals TRL's ``SFTTrainer``);
* ``independent`` — K LoRAs trained separately (seeds s, s+1, …), mixed uniformly: a deep ensemble;
* ``alpha1`` — the in-library K-member ensemble at α = 1 (every member fits every vote);
* ``alpha0`` — α = 0 (the predictive mixture is fitted);
* ``default`` — the library's defaults (α = −1 after a warm-up of half the steps, responsibility floor 0.1);
* ``default_nofloor`` — the defaults without the floor;
* ``default_row`` — the defaults with ``multi_annotator_routing="row"``: each item, with all its votes, is one example
  of the bound (ℓ_ik = Σ_j w_ij ℓ_ijk), so members are routed items rather than votes.

Metrics per setting, over held-out items: ``jsd`` and ``kl`` (ChaosNLI's definitions, mixture vs the 100 votes),
``accuracy`` (vs the 100-vote majority), ``spearman_mi_human_entropy`` and ``spearman_entropy_human_entropy``
(Spearman's ρ of the mixture's mutual information, and of its total entropy, with the entropy of the votes),
``auroc_mi_contested`` (MI separating contested items, majority share < 0.6, from agreed ones, ≥ 0.8),
``selective_accuracy_50`` (accuracy on the half of the items with the lowest MI; ties in item order), and
``audit_precision_at_100``: the training items are scored as ``trl-renyi audit`` scores SFT data (its ``score_sft``
and default ranking, ``mutual_information_max``; one row per item, the majority training vote as completion), and of
the 100 ranked most contested the share whose 100-vote majority share is < 0.6, with a random ranking's expected
share beside it (``audit_random_share``).

Usage:

    python experiments/human_disagreement.py --data ../shared/data/chaosnli-snli.jsonl --output_dir DIR
    python experiments/human_disagreement.py --data FILE --output_dir DIR --settings single,alpha1,default
    python experiments/human_disagreement.py --data FILE --output_dir DIR --quick      # tiny model, seconds

The command reads any ChaosNLI part (the row tells SNLI/MNLI from αNLI). ``--quick`` trains the tiny offline test
model on a few items: a smoke test of the whole pipeline, not a result.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
from pathlib import Path

import torch

import matplotlib

matplotlib.use("Agg")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs  # noqa: E402  (the studies' shared plumbing)

SETTINGS = {
    **runs.STUDY_SETTINGS,
    "default": None,  # filled from the library's defaults at run time
    "default_nofloor": None,
    "default_row": None,
}
CONTESTED_BELOW, AGREED_FROM = 0.6, 0.8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a ChaosNLI file (JSON lines: SNLI, MNLI or αNLI part)")
    parser.add_argument("--output_dir", required=True, help="folder for human_disagreement.json and the plots")
    parser.add_argument("--quick", action="store_true", help="tiny offline model and few items: a smoke test")
    parser.add_argument("--settings", default="base,single,alpha1,default,independent", help="comma-separated: " + ",".join(SETTINGS))
    parser.add_argument(
        "--train_items", type=int, default=None,
        help="training items (default: --steps × --batch_size, one epoch, so that the audit ranks only items trained on)",
    )  # fmt: skip
    parser.add_argument("--eval_items", type=int, default=None, help="held-out items (default 300; quick 8)")
    parser.add_argument(
        "--train_labels", default="original",
        help="training votes: 'original' (the 5 votes of the source dataset) or 'sampled:K' (K of the 100 votes)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias, local path or Hub id")
    parser.add_argument("--num_members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per trained run (default 48; quick 3)")
    parser.add_argument("--batch_size", type=int, default=8, help="items (multi-annotator rows, all their votes) per step")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "bf16", "fp32"),
        help="training precision: bf16 mixed precision (TRL's bf16=True: float32 weights, bfloat16 matmuls) or fp32; "
        "auto: bf16 where the machine multiplies bfloat16 natively. Scoring is always float32.",
    )  # fmt: skip
    parser.add_argument("--skip_audit", action="store_true", help="leave out audit_precision_at_100 (saves K passes over the training items)")
    parser.add_argument("--docs", default=None, help="results page to update (default: none; e.g. docs/results.md)")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if not (args.train_labels == "original" or args.train_labels.startswith("sampled:")):
        parser.error(f"--train_labels must be 'original' or 'sampled:K', got {args.train_labels!r}")
    args.eval_items = args.eval_items or (8 if args.quick else 300)
    args.steps = args.steps or (3 if args.quick else 48)
    if args.quick:
        args.batch_size = min(args.batch_size, 4)
        args.num_members = min(args.num_members, 2)
    args.train_items = args.train_items or args.steps * args.batch_size
    return args


# -------------------------------------------------------------------------------------------------------------- data
def read_items(path: Path) -> list[dict]:
    """The file's ChaosNLI rows; every row is checked (``label_count``, and the part's text fields) with its line."""
    from chaosnli import chaosnli_part, label_words

    if not path.is_file():
        raise FileNotFoundError(f"ChaosNLI file {path} does not exist")
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                chaosnli_part(row)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: {error}") from None
            if len(row.get("label_count") or []) != len(label_words(row)):
                raise ValueError(f"{path}, line {number}: 'label_count' must hold {len(label_words(row))} vote counts")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no ChaosNLI rows")
    return rows


def split_items(rows: list[dict], train: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    if train + held_out > len(rows):
        raise ValueError(f"--train_items {train} + --eval_items {held_out} exceed the file's {len(rows)} items")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    # the held-out items first: they stay the same whatever --train_items is
    return [rows[i] for i in order[held_out : held_out + train]], [rows[i] for i in order[:held_out]]


def majority_share(row: dict) -> float:
    from chaosnli import human_distribution

    return max(human_distribution(row))


# ------------------------------------------------------------------------------------------------------------ scoring
def evaluate(model, held_out: list[dict]) -> dict:
    """Score the held-out items' label words and compare with their 100 votes (metrics of the module docstring)."""
    from chaosnli import chaosnli_prompt, human_distribution, label_words
    from trl_renyi.evaluation.distributions import entropies, jensen_shannon_distances, kl_divergences, spearman
    from trl_renyi.evaluation.metrics import accuracy_at_coverage, error_detection_auroc

    prompts = [chaosnli_prompt(r) for r in held_out]
    choices = [[" " + w for w in label_words(r)] for r in held_out]
    predictions = model.predict_choices(prompts, choices, batch_size=16, show_progress=False)
    human = [human_distribution(r) for r in held_out]
    predicted = [p.probs.tolist() for p in predictions]
    mi = [p.mutual_information for p in predictions]
    entropy = [p.entropy for p in predictions]
    human_entropy = entropies(human).tolist()
    correct = [p.prediction == max(range(len(h)), key=h.__getitem__) for p, h in zip(predictions, human)]
    share = [max(h) for h in human]
    judged = [i for i, s in enumerate(share) if s < CONTESTED_BELOW or s >= AGREED_FROM]
    contested = [i for i, s in enumerate(share) if s < CONTESTED_BELOW]
    agreed = [i for i, s in enumerate(share) if s >= AGREED_FROM]

    def mean_over(values, items):
        return sum(values[i] for i in items) / len(items) if items else None

    # diagnostics: does each member answer one label everywhere (label specialists), and where is the MI?
    member_votes = torch.stack([p.member_probs.argmax(-1) for p in predictions])  # (N, K)
    num_labels = len(choices[0])
    label_shares = [
        [float((member_votes[:, k] == c).double().mean()) for c in range(num_labels)] for k in range(member_votes.shape[1])
    ]
    return {
        "jsd": float(jensen_shannon_distances(human, predicted).mean()),
        "kl": float(kl_divergences(human, predicted).mean()),
        "accuracy": sum(correct) / len(correct),
        "spearman_mi_human_entropy": spearman(mi, human_entropy),
        "spearman_entropy_human_entropy": spearman(entropy, human_entropy),
        # error_detection_auroc(u, ok) is the AUROC of u for "not ok": here "not agreed" among judged items = contested
        "auroc_mi_contested": error_detection_auroc([mi[i] for i in judged], [share[i] >= AGREED_FROM for i in judged]),
        "selective_accuracy_50": accuracy_at_coverage(mi, correct, 0.5),
        "mean_mi": sum(mi) / len(mi),
        "mean_entropy": sum(entropy) / len(entropy),
        "mi_contested": mean_over(mi, contested),
        "mi_agreed": mean_over(mi, agreed),
        "entropy_contested": mean_over(entropy, contested),
        "entropy_agreed": mean_over(entropy, agreed),
        "member_label_shares": label_shares,
        "_mi": mi,
        "_human_entropy": human_entropy,
        "_confidence": [max(p) for p in predicted],
        "_correct": correct,
    }


def audit_precision(model, train: list[dict], top: int = 100) -> dict:
    """Rank the training items as ``trl-renyi audit`` ranks SFT data and measure how many of the top ones humans
    really contest (majority share < 0.6), against the share among all training items (a random ranking)."""
    from trl_renyi.evaluation.audit import SFT_SCORES, score_sft
    from chaosnli import chaosnli_prompt, label_words, vote_counts

    columns = {"prompt": [], "completion": []}
    for row in train:
        votes = vote_counts(row, "original")
        columns["prompt"].append(chaosnli_prompt(row))
        columns["completion"].append(" " + label_words(row)[max(range(len(votes)), key=votes.__getitem__)])
    rows = score_sft(model, columns, batch_size=16)
    rows.sort(key=lambda r: -r[SFT_SCORES[0]])
    top = min(top, len(rows))
    contested = [majority_share(row) < CONTESTED_BELOW for row in train]
    return {
        "audit_precision_at_100": sum(contested[r["index"]] for r in rows[:top]) / top,
        "audit_random_share": sum(contested) / len(contested),
        "audit_top": top,
    }


# ----------------------------------------------------------------------------------------------------------- training
def training_dataset(train: list[dict], labels: str, seed: int):
    from datasets import Dataset

    from chaosnli import chaosnli_to_multi_completion

    return Dataset.from_dict(chaosnli_to_multi_completion(train, labels, random.Random(seed)))


def run_setting(name: str, args, base, tokenizer, dataset, budget: dict):
    """Train (or, for ``base``, wrap) one setting and return its scorer (plain-text prompts, as trained)."""
    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.inference.baseline import SingleModel

    if name == "base":
        return SingleModel(base, tokenizer, name="base", use_chat_template=False)
    run = dict(SETTINGS[name] or {})
    if name.startswith("default"):
        run = runs.library_defaults()
        run["label"] = setting_label(name)
        if name == "default_nofloor":
            run["floor"] = 0.0
        if name == "default_row":
            run["config"] = {"multi_annotator_routing": "row"}
    run.setdefault("num_members", args.num_members)
    return runs.train_setting(
        RenyiSFTTrainer, RenyiSFTConfig, base, tokenizer, dataset, budget, run,
        independent=name == "independent", num_members=args.num_members, seed=args.seed, lora_r=args.lora_r,
    )  # fmt: skip


def setting_label(name: str) -> str:
    if name.startswith("default"):
        label = runs.library_defaults()["label"]
        if name == "default_nofloor":
            return label.replace("floor 0.1", "floor 0")
        return label + ", row routing" if name == "default_row" else label
    return SETTINGS[name]["label"]


# -------------------------------------------------------------------------------------------------------------- plots
def plot_mi_against_human_entropy(results: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False, sharey=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        ax.scatter(r["_human_entropy"], r["_mi"], s=8, alpha=0.5)
        rho = r["spearman_mi_human_entropy"]
        ax.set(title=f"{name} (ρ = {runs.fmt(rho)})", xlabel="entropy of the 100 votes (nats)", ylabel="ensemble MI (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_reliability(results: dict, path: Path) -> str:
    from trl_renyi.evaluation.plots import reliability_diagram

    return reliability_diagram({name: (r["_confidence"], r["_correct"]) for name, r in results.items()}, 10, path)


# ------------------------------------------------------------------------------------------------------------- report
COLUMNS = (
    ("jsd", "JSD ↓"), ("kl", "KL ↓"), ("accuracy", "acc. ↑"), ("spearman_mi_human_entropy", "ρ(MI, H_human) ↑"),
    ("spearman_entropy_human_entropy", "ρ(H, H_human) ↑"), ("auroc_mi_contested", "AUROC MI contested ↑"),
    ("selective_accuracy_50", "acc. @50% ↑"), ("mean_mi", "mean MI"), ("mi_contested", "MI contested"), ("mi_agreed", "MI agreed"),
    ("audit_precision_at_100", "audit P@100 ↑"),
    ("seconds", "s"),
)  # fmt: skip


def table(payload: dict) -> str:
    lines = [runs.metrics_table(payload["settings"], COLUMNS)]
    random_share = next((m["audit_random_share"] for m in payload["settings"].values() if "audit_random_share" in m), None)
    if random_share is not None:
        lines.append(f"\nAudit: a random ranking's expected P@100 is the contested share of the training items, {random_share:.3f}.")
    return "\n".join(lines)


def study_payload(args, part: str, budget: dict, held_out: list[dict], results: dict, out_dir: Path, clock) -> dict:
    return {
        "data": str(args.data),
        "part": part,
        "config": {k: v for k, v in vars(args).items() if k not in ("docs",)},
        "budget": budget,
        "human": {
            "contested_share_held_out": sum(majority_share(r) < CONTESTED_BELOW for r in held_out) / len(held_out),
            "agreed_share_held_out": sum(majority_share(r) >= AGREED_FROM for r in held_out) / len(held_out),
        },
        "settings": {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()},
        "plots": {
            "mi_vs_human_entropy": plot_mi_against_human_entropy(results, out_dir / "mi_vs_human_entropy.png"),
            "reliability": plot_reliability(results, out_dir / "reliability.png"),
        },
        "seconds": clock.seconds(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = runs.Stopwatch()
    rows = read_items(Path(args.data))
    train, held_out = split_items(rows, args.train_items, args.eval_items, args.seed)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from chaosnli import chaosnli_part

    part = chaosnli_part(rows[0])
    dataset = training_dataset(train, args.train_labels, args.seed)
    print(
        f"{args.data}: {len(rows)} {'NLI (3 labels)' if part == 'nli' else 'αNLI (2 labels)'} items; "
        f"{len(train)} for training (one multi-annotator row each, weighted by the {args.train_labels} votes), "
        f"{len(held_out)} held out.",
        flush=True,
    )
    base, tokenizer = runs.load_base(args.quick, args.model)
    # padding-free batches (exact: each row's prompt and completions are kept apart by the shared layout's mask) and
    # no truncation, which could cut a label word off a long premise
    budget = {
        "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate, "lora_r": args.lora_r,
        "member_init_std": 1e-3, "seed": args.seed, "max_length": None, "bf16": runs.resolve_precision(args.precision),
        "extra_config": {"padding_free": True},
    }  # fmt: skip
    results = {}
    for index, name in enumerate(args.settings, start=1):
        run_clock = runs.Stopwatch()
        print(f"[{index}/{len(args.settings)}] {name}: {setting_label(name)} ...", flush=True)
        model = run_setting(name, args, base, tokenizer, dataset, budget)
        phases = {"train_seconds": run_clock.seconds()}
        metrics = evaluate(model, held_out)
        phases["eval_seconds"] = run_clock.seconds() - phases["train_seconds"]
        if getattr(model, "num_members", 1) > 1 and not args.skip_audit:
            metrics.update(audit_precision(model, train))
            phases["audit_seconds"] = run_clock.seconds() - phases["train_seconds"] - phases["eval_seconds"]
        metrics["label"] = setting_label(name)
        metrics.update(phases)
        metrics["seconds"] = run_clock.seconds()
        results[name] = metrics
        print(
            f"    {run_clock}: JSD {metrics['jsd']:.3f}, KL {metrics['kl']:.3f}, accuracy {metrics['accuracy']:.3f}, "
            f"ρ(MI, H_human) {runs.fmt(metrics['spearman_mi_human_entropy'], 3)}, mean MI {metrics['mean_mi']:.3f} "
            f"(s: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f}" for k, v in phases.items()) + ")",
            flush=True,
        )
        del model
        gc.collect()
        # written after every setting, so that an interrupted study keeps what it measured
        payload = study_payload(args, part, budget, held_out, results, out_dir, clock)
        runs.save_json(out_dir / "human_disagreement.json", payload)
    print(table(payload))
    print(f"Wrote {out_dir / 'human_disagreement.json'} and the plots in {clock}.")
    if args.docs:
        runs.update_results_page("human-disagreement", table(payload), Path(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
