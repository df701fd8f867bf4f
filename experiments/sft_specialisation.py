"""Efficacy study 1 (+ the forgetting remedy): do α-Rényi SFT ensembles specialise on contradictory data and flag it?

Trains, on the package's conflicting-data generator (greetings and farewells answered under two conventions;
opposites and capitals consistent; ``--families`` to change), a single LoRA, K independently trained LoRAs, and K-member ensembles for
α ∈ {1, 0.5, 0, −1, −3} with constant α and with an α warm-up, plus the ``responsibility_floor`` remedy; then
reports per setting the held-out NLL per family, routing purity, routing entropy, the AUROC of the uncertainty
signals for contradictory vs consistent prompts, and how far the worst member fell behind on consistent families.

Usage:

    python experiments/sft_specialisation.py                  # SmolLM2-135M-Instruct (embedded), ~1 h on 2 CPU cores
    python experiments/sft_specialisation.py --runs single,a1,a-1w,a-1wf --steps 60
    python experiments/sft_specialisation.py --quick          # tiny offline model, seconds (smoke test)

Writes ``<output-dir>/sft_specialisation.json``, two plots, and the section of ``docs/results.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluation import convention_mass, evaluate_ensemble  # noqa: E402
from runs import (  # noqa: E402
    REPO,
    Stopwatch,
    apply_size_defaults,
    combine_independent,
    fmt,
    load_base,
    save_json,
    study_parser,
    train_ensemble,
    update_results_page,
)

RUNS = {
    "single": {"label": "single LoRA (K = 1)", "num_members": 1, "alpha": 1.0},
    "independent": {"label": "K independent LoRAs", "independent": True},
    "a1": {"label": "α = 1", "alpha": 1.0},
    "a0.5": {"label": "α = 0.5", "alpha": 0.5},
    "a0.5w": {"label": "α = 0.5, warm-up", "alpha": 0.5, "warmup": 0.5},
    "a0": {"label": "α = 0", "alpha": 0.0},
    "a0w": {"label": "α = 0, warm-up", "alpha": 0.0, "warmup": 0.5},
    "a-1": {"label": "α = −1", "alpha": -1.0},
    "a-1w": {"label": "α = −1, warm-up", "alpha": -1.0, "warmup": 0.5},
    "a-3": {"label": "α = −3", "alpha": -3.0},
    "a-3w": {"label": "α = −3, warm-up", "alpha": -3.0, "warmup": 0.5},
    "a0wf": {"label": "α = 0, warm-up, floor 0.1", "alpha": 0.0, "warmup": 0.5, "floor": 0.1},
    "a-1wf": {"label": "α = −1, warm-up, floor 0.1", "alpha": -1.0, "warmup": 0.5, "floor": 0.1},
    "a-1wf.3": {"label": "α = −1, warm-up, floor 0.3", "alpha": -1.0, "warmup": 0.5, "floor": 0.3},
    "a-1wf-b0": {"label": "α = −1, warm-up, floor 0.1, B = 0", "alpha": -1.0, "warmup": 0.5, "floor": 0.1, "init_std": 0.0},
}
QUICK_RUNS = "single,a-1wf"


def parse_args(argv=None):
    parser = study_parser(__doc__, RUNS, learning_rate=2e-3)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output JSON, train the rest")
    parser.add_argument(
        "--render-only", action="store_true", help="redraw the plots and the results section from the output JSON"
    )
    return parser.parse_args(argv)


def build_data(args, tokenizer):
    from trl_renyi.data import conflict_sft_dataset

    data = conflict_sft_dataset(
        num_train_per_family=args.train_per_family,
        num_test_per_family=args.test_per_family,
        families=args.families,
        seed=args.seed,
        conversational=not args.quick,
    )
    return data["train"], [dict(row) for row in data["test"]]


def run_all(args, out_path: Path) -> dict:
    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    base, tokenizer = load_base(args.quick, args.model)
    train, test = build_data(args, tokenizer)
    settings = {
        "model": "tiny (offline test model)" if args.quick else args.model,
        "num_members": args.num_members,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "lora_r": args.lora_r,
        "member_init_std": args.member_init_std,
        "seed": args.seed,
        "families": list(args.families),
        "max_length": 96,
        "train_examples": len(train),
        "test_examples": len(test),
    }
    names = [n.strip() for n in (args.runs or (QUICK_RUNS if args.quick else ",".join(RUNS))).split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown --runs {unknown}; choose from {list(RUNS)}")
    results = {}
    if args.resume and out_path.exists():
        previous = json.loads(out_path.read_text())
        if previous.get("settings") == settings:
            results = {k: v for k, v in previous["results"].items() if k in names}
            print(f"resuming: {sorted(results)} already done", flush=True)
    for index, name in enumerate(names, start=1):
        if name in results:
            continue
        run = dict(RUNS[name])
        clock = Stopwatch()
        print(f"[{index}/{len(names)}] {run['label']} ...", flush=True)
        if run.get("independent"):
            singles = [
                train_ensemble(
                    RenyiSFTTrainer,
                    RenyiSFTConfig,
                    base,
                    tokenizer,
                    train,
                    settings,
                    {"num_members": 1, "alpha": 1.0, "seed": args.seed + k},
                )
                for k in range(args.num_members)
            ]
            ensemble = combine_independent(singles, base, tokenizer, args.lora_r)
        else:
            run.setdefault("num_members", args.num_members)
            ensemble = train_ensemble(RenyiSFTTrainer, RenyiSFTConfig, base, tokenizer, train, settings, run)
        metrics = evaluate_ensemble(ensemble, test)
        metrics["label"] = run["label"]
        metrics["run"] = {k: v for k, v in run.items() if k != "label"}
        metrics["seconds"] = float(str(clock).split()[0])
        results[name] = metrics
        save_json(out_path, {"settings": settings, "results": results, "partial": True})
        print(
            f"    {clock}: NLL {metrics['nll_all']:.2f}, purity {fmt(metrics['purity_contradictory'])} / "
            f"{fmt(metrics['specialist_purity'])}, "
            f"AUROC(choice MI) {fmt(metrics['auroc_choice_mi'])}, worst-member gap {fmt(metrics['worst_member_gap'])}",
            flush=True,
        )
        del ensemble
    return {"settings": settings, "results": {name: results[name] for name in names}}


def plot(payload: dict, out_dir: Path) -> list[Path]:
    results = payload["results"]
    labels = [r["label"] for r in results.values()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series = [
        ("AUROC, contradictory vs consistent", [("choice MI", "auroc_choice_mi"), ("max token MI", "auroc_token_mi_max"), ("ℓ spread", "auroc_loglik_std")]),
        (
            "routing on the contradictory families",
            [
                ("top member", "purity_contradictory"),
                ("specialist", "specialist_purity"),
                ("convention mass", "convention_mass"),
            ],
        ),
        ("worst-member gap on consistent families (nats)", [("gap", "worst_member_gap")]),
    ]
    for axis, (title, keys) in zip(axes, series):
        width = 0.8 / len(keys)
        for j, (name, key) in enumerate(keys):
            values = [results[r].get(key) for r in results]
            values = [float("nan") if v is None else v for v in values]
            axis.bar([i + j * width for i in range(len(labels))], values, width=width, label=name)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        if len(keys) > 1:
            axis.legend(fontsize=8)
    fig.tight_layout()
    summary = out_dir / "sft_specialisation_summary.png"
    fig.savefig(summary, dpi=110)
    plt.close(fig)

    ensembles = [name for name, r in results.items() if r["num_members"] > 1]
    columns = min(5, max(1, len(ensembles)))
    grid_rows = max(1, -(-len(ensembles) // columns))
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3.4 * columns, 3.2 * grid_rows), squeeze=False)
    for axis in axes.flat[len(ensembles) :]:
        axis.axis("off")
    for axis, name in zip(axes.flat, ensembles):
        families = results[name]["families"]
        groups = results[name].get("group_share") or {f: families[f]["posterior_share"] for f in families}
        rows = list(groups)
        matrix = [groups[g] for g in rows]
        axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, shares in enumerate(matrix):
            for j, share in enumerate(shares):
                axis.text(j, i, f"{share:.2f}", ha="center", va="center", fontsize=6, color="w" if share < 0.6 else "k")
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels([g + (" *" if families[g.split("/")[0]]["contradictory"] else "") for g in rows], fontsize=7)
        axis.set_xticks(range(len(matrix[0])))
        axis.set_xlabel("member", fontsize=8)
        axis.set_title(results[name]["label"], fontsize=8)
    fig.suptitle("posterior share of each member per family / convention (* contradictory)", fontsize=9)
    fig.tight_layout()
    routing = out_dir / "sft_specialisation_routing.png"
    fig.savefig(routing, dpi=110)
    plt.close(fig)
    return [summary, routing]


def contradictory_families(payload: dict) -> list[str]:
    first = next(iter(payload["results"].values()), {"families": {}})
    return [family for family, values in first["families"].items() if values["contradictory"]]


def render(payload: dict, plots: list[Path], command: str, docs: Path | None) -> str:
    s = payload["settings"]
    lines = [
        f"Model {s['model']}, K = {s['num_members']}, {s['steps']} steps of batch {s['batch_size']}, lr "
        f"{s['learning_rate']}, LoRA r {s['lora_r']} all-linear, member_init_std {s['member_init_std']}, seed "
        f"{s['seed']}; {s['train_examples']} training / {s['test_examples']} held-out examples "
        f"(families {', '.join(s['families'])}; contradictory: {', '.join(contradictory_families(payload)) or 'none'}).",
        f"Command: `{command}`",
        "",
        "| setting | NLL held-out | NLL contra. / consist. | purity: top member / specialist | convention mass "
        "| conflicts split "
        "| routing entropy "
        "| choice MI contra. / consist. | AUROC choice MI | AUROC max token MI | AUROC ℓ std | worst-member gap "
        "(consist.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in payload["results"].values():
        fam = result["families"]
        contra = [f for f in fam if fam[f]["contradictory"]]
        cons = [f for f in fam if not fam[f]["contradictory"]]
        nll_c = sum(fam[f]["nll"] for f in contra) / max(1, len(contra))
        nll_k = sum(fam[f]["nll"] for f in cons) / max(1, len(cons))
        lines.append(
            f"| {result['label']} | {fmt(result['nll_all'])} | {fmt(nll_c)} / {fmt(nll_k)} | "
            f"{fmt(result['purity_contradictory'])} / {fmt(result.get('specialist_purity'))} | "
            f"{fmt(result.get('convention_mass'))} | "
            f"{len(result['conflicts_split'])}/{len(contra)} | "
            f"{fmt(result['routing_entropy'])} | {fmt(result['mi_contradictory'], 3)} / {fmt(result['mi_consistent'], 3)} | "
            f"{fmt(result['auroc_choice_mi'])} | {fmt(result['auroc_token_mi_max'])} | {fmt(result['auroc_loglik_std'])} | "
            f"{fmt(result['worst_member_gap'])} |"
        )
    if docs is not None:
        lines.append("")
        for path in plots:
            lines.append(f"![{path.stem}]({Path('..') / path.relative_to(REPO) if path.is_relative_to(REPO) else path})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir, docs = apply_size_defaults(args, "sft_study_")
    clock = Stopwatch()
    out_path = out_dir / "sft_specialisation.json"
    if args.render_only:
        payload = json.loads(out_path.read_text())
        command = payload["command"]
    else:
        payload = run_all(args, out_path)
        command = "python experiments/sft_specialisation.py " + " ".join(sys.argv[1:] if argv is None else argv)
        payload["command"] = command
    for result in payload["results"].values():  # figures derived from the per-example data
        if "convention_mass" not in result and "examples" in result:
            contradictory = [f for f, v in result["families"].items() if v["contradictory"]]
            result["convention_mass"] = convention_mass(result["examples"], contradictory)
    save_json(out_path, payload)
    plots = plot(payload, out_dir)
    table = render(payload, plots, command, docs)
    update_results_page("sft-specialisation", table, docs)
    print(table)
    print(f"wrote {out_path} and {', '.join(str(p) for p in plots)} in {clock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
