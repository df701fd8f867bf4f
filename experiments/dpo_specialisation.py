"""Efficacy study 2: preference specialisation — do members take the sides of annotator groups that disagree?

Two annotator groups label the same kind of prompts in opposite ways on the contradictory families (greetings,
farewells) and agree on the consistent ones (opposites, capitals; ``--families`` to change). For a single LoRA (K = 1, which must average
the groups) and K-member α-Rényi DPO ensembles, it reports:

* **routed accuracy** per group: each group is routed to the member with the largest mean posterior
  w_k ∝ π_k σ(m_k) on the group's *training* pairs; the accuracy of that member's implicit reward model on the
  group's held-out pairs (the single LoRA's accuracy for comparison);
* **agreed accuracy**: on the consistent families, the mixture's accuracy and the worst member's accuracy;
* **uncertainty**: mutual information of the members' preference probabilities on disputed vs undisputed held-out
  pairs, and its AUROC for detecting disputed pairs.

Usage:

    python experiments/dpo_specialisation.py                 # SmolLM2-135M-Instruct (embedded)
    python experiments/dpo_specialisation.py --quick         # tiny offline model, seconds (smoke test)
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluation import auroc  # noqa: E402
from runs import (  # noqa: E402
    REPO,
    Stopwatch,
    apply_size_defaults,
    fmt,
    load_base,
    save_json,
    study_parser,
    train_ensemble,
    update_results_page,
)

RUNS = {
    "single": {"label": "single LoRA (K = 1)", "num_members": 1, "alpha": 1.0},
    "a1": {"label": "α = 1", "alpha": 1.0},
    "a0w": {"label": "α = 0, warm-up", "alpha": 0.0, "warmup": 0.5},
    "a-1w": {"label": "α = −1, warm-up", "alpha": -1.0, "warmup": 0.5},
    "a-1wf": {"label": "α = −1, warm-up, floor 0.1", "alpha": -1.0, "warmup": 0.5, "floor": 0.1},
}
QUICK_RUNS = "single,a-1w"


def parse_args(argv=None):
    parser = study_parser(__doc__, RUNS, learning_rate=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--routing-pairs", type=int, default=32, help="training pairs per group used for routing")
    return parser.parse_args(argv)


def preference_probs(ensemble, rows, beta):
    """``(N, K)`` each member's probability that the chosen answer is preferred (DPO implicit reward model)."""
    from trl_renyi.inference.baseline import SingleModel

    predictions = ensemble.predict_preferences(
        [r["prompt"] for r in rows],
        [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
        reference=SingleModel.base_of(ensemble),
        beta=beta,
        show_progress=False,
    )
    member = torch.stack([p.member_probs[:, 0] for p in predictions]).float()
    mi = torch.tensor([p.mutual_information for p in predictions], dtype=torch.float32)
    mixture = torch.stack([p.probs[0] for p in predictions]).float()
    return member, mixture, mi


def evaluate(ensemble, train_rows, test_rows, beta, routing_pairs):
    weights = ensemble.log_weights.exp().float()
    out = {"groups": {}}
    disputed_test = [r for r in test_rows if r["contradictory"]]
    agreed_test = [r for r in test_rows if not r["contradictory"]]
    for group in ("A", "B"):
        train_group = [r for r in train_rows if r["contradictory"] and r["annotator"] == group][:routing_pairs]
        member_train, _, _ = preference_probs(ensemble, train_group, beta)
        posterior = weights * member_train
        posterior = posterior / posterior.sum(-1, keepdim=True)
        top = int(posterior.mean(0).argmax())
        test_group = [r for r in disputed_test if r["annotator"] == group]
        member_test, mixture_test, _ = preference_probs(ensemble, test_group, beta)
        out["groups"][group] = {
            "top_member": top,
            "routing_share": float(posterior.mean(0)[top]),
            "routed_accuracy": float((member_test[:, top] > 0.5).float().mean()),
            "mixture_accuracy": float((mixture_test > 0.5).float().mean()),
        }
    member_agreed, mixture_agreed, mi_agreed = preference_probs(ensemble, agreed_test, beta)
    _, _, mi_disputed = preference_probs(ensemble, disputed_test, beta)
    out["agreed_mixture_accuracy"] = float((mixture_agreed > 0.5).float().mean())
    out["agreed_worst_member_accuracy"] = float((member_agreed > 0.5).float().mean(0).min())
    out["groups_on_different_members"] = out["groups"]["A"]["top_member"] != out["groups"]["B"]["top_member"]
    out["mi_disputed"] = float(mi_disputed.mean())
    out["mi_agreed"] = float(mi_agreed.mean())
    scores = torch.cat([mi_disputed, mi_agreed])
    labels = torch.cat([torch.ones(len(mi_disputed)), torch.zeros(len(mi_agreed))])
    out["auroc_mi"] = auroc(scores, labels)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from trl_renyi.data import conflict_preference_dataset
    from trl_renyi.training.config import RenyiDPOConfig
    from trl_renyi.training.dpo import RenyiDPOTrainer

    out_dir, docs = apply_size_defaults(args, "dpo_study_")
    clock = Stopwatch()
    base, tokenizer = load_base(args.quick, args.model)
    data = conflict_preference_dataset(
        num_train_per_family=args.train_per_family,
        num_test_per_family=args.test_per_family,
        families=args.families,
        seed=args.seed,
        conversational=not args.quick,
    )
    train_rows, test_rows = [dict(r) for r in data["train"]], [dict(r) for r in data["test"]]
    settings = {
        "model": "tiny (offline test model)" if args.quick else args.model,
        "num_members": args.num_members,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "lora_r": args.lora_r,
        "member_init_std": args.member_init_std,
        "seed": args.seed,
        "families": list(args.families),
        "max_length": 96,
        "train_pairs": len(train_rows),
        "test_pairs": len(test_rows),
        "extra_config": {"beta": args.beta},
    }
    names = [n for n in (args.runs or (QUICK_RUNS if args.quick else ",".join(RUNS))).split(",") if n]
    results = {}
    for index, name in enumerate(names, start=1):
        run = dict(RUNS[name])
        run.setdefault("num_members", args.num_members)
        watch = Stopwatch()
        print(f"[{index}/{len(names)}] {run['label']} ...", flush=True)
        ensemble = train_ensemble(RenyiDPOTrainer, RenyiDPOConfig, base, tokenizer, data["train"], settings, run)
        metrics = evaluate(ensemble, train_rows, test_rows, args.beta, args.routing_pairs)
        metrics["label"] = run["label"]
        results[name] = metrics
        save_json(out_dir / "dpo_specialisation.json", {"settings": settings, "results": results, "partial": True})
        print(
            f"    {watch}: routed acc A {fmt(metrics['groups']['A']['routed_accuracy'])} / B "
            f"{fmt(metrics['groups']['B']['routed_accuracy'])}, agreed worst member "
            f"{fmt(metrics['agreed_worst_member_accuracy'])}, AUROC(MI) {fmt(metrics['auroc_mi'])}",
            flush=True,
        )
    command = ("python experiments/dpo_specialisation.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    payload = {"settings": settings, "results": results, "command": command}
    save_json(out_dir / "dpo_specialisation.json", payload)

    fig, axis = plt.subplots(figsize=(7, 4))
    labels = [r["label"] for r in results.values()]
    for j, (key, name) in enumerate([("A", "group A routed acc."), ("B", "group B routed acc.")]):
        axis.bar([i + 0.27 * j for i in range(len(labels))], [r["groups"][key]["routed_accuracy"] for r in results.values()], width=0.27, label=name)
    axis.bar([i + 0.54 for i in range(len(labels))], [r["agreed_worst_member_accuracy"] for r in results.values()], width=0.27, label="agreed, worst member")
    axis.set_xticks([i + 0.27 for i in range(len(labels))])
    axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=8)
    axis.set_title("DPO on two disagreeing annotator groups", fontsize=10)
    fig.tight_layout()
    plot_path = out_dir / "dpo_specialisation.png"
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)

    s = settings
    lines = [
        f"Model {s['model']}, K = {s['num_members']}, {s['steps']} steps of batch {s['batch_size']}, lr "
        f"{s['learning_rate']}, β = {s['beta']}, LoRA r {s['lora_r']}; {s['train_pairs']} training / "
        f"{s['test_pairs']} held-out pairs.",
        f"Command: `{command}`",
        "",
        "| setting | routed acc. group A / B | groups on different members | agreed acc. mixture / worst member "
        "| MI disputed / agreed | AUROC MI |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['label']} | {fmt(r['groups']['A']['routed_accuracy'])} / {fmt(r['groups']['B']['routed_accuracy'])} | "
            f"{'yes' if r['groups_on_different_members'] else 'no'} | {fmt(r['agreed_mixture_accuracy'])} / "
            f"{fmt(r['agreed_worst_member_accuracy'])} | {fmt(r['mi_disputed'], 3)} / {fmt(r['mi_agreed'], 3)} | "
            f"{fmt(r['auroc_mi'])} |"
        )
    if docs is not None and plot_path.is_relative_to(REPO):
        lines += ["", f"![dpo_specialisation](../{plot_path.relative_to(REPO)})"]
    table = "\n".join(lines)
    update_results_page("dpo-specialisation", table, docs)
    print(table)
    print(f"done in {clock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
