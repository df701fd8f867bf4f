"""Does the local stability criterion predict what training does? (``trl_renyi.stability``)

Two parts, each one command, each writing a JSON file, plots and its section of ``docs/results.md``:

* ``synthetic``: the conflict families of the other studies (greetings and farewells answered under two conventions;
  opposites and capitals consistent) on the embedded model. A K = 4 ensemble is trained at α = 1 for the warm-up (half
  the steps) and checkpointed; the criterion is measured there at member 0 over the training completions (free text:
  the Fisher from completions sampled along each prefix); then training continues from that same checkpoint at
  α* − 0.4, α* − 0.15, α* + 0.15, α* + 0.4 (α* with the responsibility floor φ, 1 − 1/((1−φ)λ₁)), at the recommended α
  and at α = 1, and each run reports how far its members split: the choice mutual information on contradicted and on
  consistent held-out prompts, and the spread of ℓ across members on contradicted ones. The prediction: members
  split iff α < α*.
* ``group FILE``: a group-annotated file (HS-Brexit, OpinionQA). One LoRA is fitted on the training items with every
  vote pooled (the group study's ``single``), then the criterion is measured on the same items with three groupings
  of the same votes: per vote, per (item, group) row (a group's votes together, its name unseen) and per annotator
  (where annotators are named); each item's gradients are computed once. For the top direction: the AUROC of the
  units' split scores against their group (evaluation only), and for rows whether the two groups' rows of an item
  fall on opposite sides where the groups disagree (groups) or on the same side where they agree (answers).

Usage:

    python experiments/stability.py synthetic                       # ~25 min on 2 CPU cores
    python experiments/stability.py group --data ../shared/data/group-conflicts/hs-brexit.jsonl --held_out_split dev
    python experiments/stability.py group --data ../shared/data/group-conflicts/opinionqa-ideology.jsonl
    python experiments/stability.py synthetic --quick               # tiny offline model: a smoke test, numbers meaningless
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs  # noqa: E402
from evaluation import evaluate_ensemble  # noqa: E402

RESULTS = runs.REPO / "experiments" / "results" / "stability"
OFFSETS = (-0.4, -0.15, 0.15, 0.4)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "part", choices=("synthetic", "group", "render"),
        help="render: rewrite a results section from its stored JSON (``--data`` names the group file; without it the "
        "synthetic part), the decision recomputed from the stored spectrum and null by the current rule",
    )  # fmt: skip
    parser.add_argument("--data", default=None, help="group: a group-annotated JSON-lines file")
    parser.add_argument("--held_out_split", default=None, help="group: the file's split held out (e.g. dev); default: 30 %% stratified")
    parser.add_argument("--max_train_items", type=int, default=None, help="group: at most this many training items")
    parser.add_argument("--epochs", type=float, default=2.0, help="group: passes of the one-LoRA fit over the training items")
    parser.add_argument("--quick", action="store_true", help="tiny offline model and few rows: a smoke test in seconds")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num_members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="synthetic: optimizer steps in all (default 60; quick 6)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=None, help="default 2e-3 (synthetic), 1e-3 (group)")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--floor", type=float, default=0.1, help="responsibility floor φ of the runs and of α*")
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--null_draws", type=int, default=20)
    parser.add_argument("--max_units", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help=f"default {RESULTS.relative_to(runs.REPO)} (quick: a temp dir)")
    parser.add_argument("--docs", default=None, help="results page to update (default docs/results.md; quick: none)")
    args = parser.parse_args(argv)
    if args.part == "group" and not args.data:
        parser.error("group needs --data FILE")
    args.steps = args.steps or (6 if args.quick else 60)
    args.learning_rate = args.learning_rate or (2e-3 if args.part == "synthetic" else 1e-3)
    if args.quick:
        args.batch_size = min(args.batch_size, 4)
        args.num_members = min(args.num_members, 2)
        args.null_draws = min(args.null_draws, 5)
        args.max_train_items = args.max_train_items or 8
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix="stability_") if args.quick else str(RESULTS)
    docs = None if (args.quick and args.docs is None) else Path(args.docs or runs.REPO / "docs" / "results.md")
    return args, Path(args.output_dir), docs


def measure(model, tokenizer, votes, args, **kwargs):
    from trl_renyi.stability import measure_stability

    return measure_stability(
        model, tokenizer, votes, floor=args.floor, damping=args.damping, null_draws=args.null_draws,
        max_units=args.max_units, seed=args.seed, **kwargs,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------- synthetic
class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def synthetic_trainer(args, base, tokenizer, train, out_dir: Path, alpha: float, **extra):
    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    settings = runs.training_arguments(str(out_dir), args.steps, args.batch_size, args.learning_rate, args.seed, 96)
    config = RenyiSFTConfig(
        **{**settings, **extra}, num_members=args.num_members, alpha=alpha, alpha_warmup_ratio=0.5,
        responsibility_floor=args.floor, member_init_std=1e-3,
    )  # fmt: skip
    return RenyiSFTTrainer(
        model=copy.deepcopy(base), args=config, train_dataset=train, processing_class=tokenizer,
        peft_config=runs.lora_config(args.lora_r),
    )  # fmt: skip


def run_synthetic(args, out_dir: Path) -> dict:
    from trl_renyi.data import conflict_sft_dataset

    base, tokenizer = runs.load_base(args.quick, args.model)
    data = conflict_sft_dataset(
        num_train_per_family=8 if args.quick else 160, num_test_per_family=4 if args.quick else 12,
        families=list(runs.STUDY_FAMILIES), seed=args.seed, conversational=not args.quick,
    )  # fmt: skip
    train, test = data["train"], [dict(row) for row in data["test"]]
    warm = args.steps // 2
    run_dir = Path(tempfile.mkdtemp(prefix="stability_warmup_"))
    clock = runs.Stopwatch()
    print(f"warm-up: K = {args.num_members}, α = 1 for {warm} of {args.steps} steps ...", flush=True)
    trainer = synthetic_trainer(args, base, tokenizer, train, run_dir, 1.0, save_strategy="steps", save_steps=warm)
    trainer.add_callback(StopAt(warm))
    trainer.train()
    checkpoint = run_dir / f"checkpoint-{warm}"
    warmup_seconds = clock.seconds()
    print(f"    {clock}; measuring the criterion at member 0 over {len(train)} training completions ...", flush=True)
    votes = trainer.stability_votes(len(train), args.seed)
    report = measure(trainer.accelerator.unwrap_model(trainer.model), tokenizer, votes, args, adapter="member_0")
    print(report.summary(), flush=True)
    report.plot(out_dir / "synthetic_spectrum.png")
    del trainer
    gc.collect()
    star = report.alpha_critical_floor
    alphas = sorted({round(star + offset, 4) for offset in OFFSETS} | {1.0} | ({report.recommended_alpha} if report.significant else set()))
    runs_out = {}
    for alpha in alphas:
        clock = runs.Stopwatch()
        print(f"α = {alpha:.3f} from the same warm-up ...", flush=True)
        trainer = synthetic_trainer(args, base, tokenizer, train, run_dir, alpha)
        trainer.train(resume_from_checkpoint=str(checkpoint))
        after = [e["renyi/alpha"] for e in trainer.state.log_history if e.get("step", 0) > warm and "renyi/alpha" in e]
        if not after or any(abs(a - alpha) > 1e-9 for a in after):
            raise RuntimeError(f"α = {alpha}: the continuation logged α {after} after step {warm}")
        ensemble = trainer.ensemble
        ensemble.model.eval()
        metrics = evaluate_ensemble(ensemble, test)
        contradicted = [i for i, row in enumerate(test) if row["contradictory"]]
        spread = torch.tensor(metrics["examples"]["member_loglik"])[contradicted].std(dim=1, unbiased=False)
        runs_out[f"{alpha:.4f}"] = {
            "alpha": alpha,
            "below_alpha_star": alpha < star,
            "mi_contradicted": metrics["mi_contradictory"],
            "mi_consistent": metrics["mi_consistent"],
            "loglik_spread_contradicted": float(spread.mean()),
            "conflicts_split": len(metrics["conflicts_split"]),
            "routing_entropy": metrics["routing_entropy"],
            "nll": metrics["nll_all"],
            "worst_member_gap": metrics["worst_member_gap"],
            "seconds": clock.seconds(),
        }
        print(f"    {clock}: MI contradicted {metrics['mi_contradictory']:.3f} / consistent {metrics['mi_consistent']:.3f}, "
              f"ℓ spread {float(spread.mean()):.2f}", flush=True)  # fmt: skip
        del trainer, ensemble
        gc.collect()
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("output_dir", "docs")},
        "train_examples": len(train),
        "test_examples": len(test),
        "warmup_steps": warm,
        "warmup_seconds": warmup_seconds,
        "report": report.to_dict(),
        "alpha_star": star,
        "runs": runs_out,
    }


def plot_synthetic(payload: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = sorted(payload["runs"].values(), key=lambda r: r["alpha"])
    alphas = [r["alpha"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(alphas, [r["mi_contradicted"] for r in rows], "o-", label="contradicted prompts")
    left.plot(alphas, [r["mi_consistent"] for r in rows], "s--", label="consistent prompts")
    left.set(xlabel="α after the warm-up", ylabel="choice MI (nats)", title="members' disagreement")
    right.plot(alphas, [r["loglik_spread_contradicted"] for r in rows], "o-", color="tab:purple")
    right.set(xlabel="α after the warm-up", ylabel="std of ℓ across members", title="member spread (contradicted)")
    for ax in (left, right):
        ax.axvline(payload["alpha_star"], color="k", ls=":", label=f"α* = {payload['alpha_star']:.2f}")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def synthetic_section(payload: dict, command: str) -> str:
    report = payload["report"]
    lines = [
        f"Command: `{command}` (K = {payload['config']['num_members']}, {payload['config']['steps']} steps of "
        f"{payload['config']['batch_size']}, warm-up {payload['warmup_steps']} steps at α = 1, floor φ = "
        f"{payload['config']['floor']}; {payload['train_examples']} training completions measured, "
        f"{payload['test_examples']} held-out prompts).",
        "",
        f"Criterion at the end of the warm-up (member 0): λ₁ = {report['eigenvalues'][0]:.3g}, null λ₁ q50 / q95 / q99 = "
        f"{report['null_quantiles']['0.5']:.3g} / {report['null_quantiles']['0.95']:.3g} / "
        f"{report['null_quantiles']['0.99']:.3g}; α* = {report['alpha_critical']:.3f} (with φ: "
        f"{report['alpha_critical_floor']:.3f}); significant: {'yes' if report['significant'] else 'no'}; recommended "
        f"α = {report['recommended_alpha']:.3f}; stationarity {report['stationarity']:.3g}; {report['seconds']:.0f} s.",
        "",
        "| α after the warm-up | below α*? | choice MI contradicted | choice MI consistent | ℓ spread contradicted | conflicts split | held-out NLL | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(payload["runs"].values(), key=lambda r: r["alpha"]):
        lines.append(
            f"| {row['alpha']:.3f} | {'yes' if row['below_alpha_star'] else 'no'} | {row['mi_contradicted']:.3f} | "
            f"{row['mi_consistent']:.3f} | {row['loglik_spread_contradicted']:.2f} | {row['conflicts_split']}/2 | "
            f"{row['nll']:.2f} | {row['seconds']:.0f} |"
        )
    lines += ["", "![stability_synthetic](../experiments/results/stability/synthetic.png)",
              "![stability_synthetic_spectrum](../experiments/results/stability/synthetic_spectrum.png)"]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ group
def group_items(args):
    from trl_renyi.data.group_conflicts import read_group_items, stratified_split

    items = read_group_items(args.data)
    if args.held_out_split:
        train = [i for i in items if i.split != args.held_out_split]
        if len(train) == len(items):
            raise SystemExit(f"--held_out_split {args.held_out_split!r}: no item of {args.data} has that split")
    else:
        train, _ = stratified_split(items, 0.3, args.seed)
    if args.max_train_items and len(train) > args.max_train_items:
        train, _ = stratified_split(train, 1.0 - args.max_train_items / len(train), args.seed + 1)
        train = train[: args.max_train_items]
    return train


def group_side(report, unit_group: dict, unit_item: dict | None, contested: dict) -> dict:
    """The top direction's split scores against the units' groups (evaluation only): the AUROC of the scores for each
    group against the rest, folded to ≥ 0.5 (0.5: no separation), the largest over groups; and for (item, group) rows
    how often the rows of one item fall on opposite sides where the groups disagree, and on the same side where they
    agree (a split by group gives many opposite sides on contested items; a split by answer, same sides on agreed)."""
    from trl_renyi.evaluation.metrics import error_detection_auroc

    scores = dict(zip(report.unit_names, report.scores[0])) if report.scores else {}
    names = [n for n in scores if n in unit_group]
    out = {}
    groups = sorted({unit_group[n] for n in names})
    if len(groups) >= 2:
        folded = []
        for group in groups:
            value = error_detection_auroc([scores[n] for n in names], [unit_group[n] != group for n in names])
            folded.append(max(value, 1 - value))
        out["auroc_group"] = max(folded)
    if unit_item is not None:
        by_item: dict = {}
        for n in names:
            by_item.setdefault(unit_item[n], []).append(math.copysign(1.0, scores[n]))
        opposite = [len(set(signs)) > 1 for item, signs in by_item.items() if len(signs) > 1 and contested[item]]
        same = [len(set(signs)) == 1 for item, signs in by_item.items() if len(signs) > 1 and not contested[item]]
        out["opposite_sides_contested"] = sum(opposite) / len(opposite) if opposite else math.nan
        out["same_side_agreed"] = sum(same) / len(same) if same else math.nan
    return out


def run_group(args, out_dir: Path) -> dict:
    from datasets import Dataset

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.data.group_conflicts import (
        ANNOTATOR_COLUMN,
        annotator_choice_rows,
        group_choice_rows,
        has_annotators,
        pooled_vote_rows,
    )
    from trl_renyi.stability import choice_votes

    train = group_items(args)
    base, tokenizer = runs.load_base(args.quick, args.model)
    rows = pooled_vote_rows(train)
    steps = max(1, math.ceil(args.epochs * len(rows["prompt"]) / args.batch_size))
    budget = {
        "steps": steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate, "lora_r": args.lora_r,
        "member_init_std": 1e-3, "seed": args.seed, "max_length": None, "bf16": False,
        "extra_config": {"padding_free": True},
    }  # fmt: skip
    clock = runs.Stopwatch()
    print(f"{args.data}: one LoRA on {len(train)} training items ({sum(i.contested for i in train)} contested), "
          f"{steps} steps ...", flush=True)  # fmt: skip
    single = runs.train_setting(
        RenyiSFTTrainer, RenyiSFTConfig, base, tokenizer, Dataset.from_dict(rows), budget,
        {"num_members": 1, "alpha": 1.0}, independent=False, num_members=1, seed=args.seed, lora_r=args.lora_r,
    )  # fmt: skip
    fit_seconds = clock.seconds()
    few_votes = all(float(c).is_integer() and c <= 50 for item in train for v in item.groups.values() for c in v)
    weighting = "counts" if few_votes else "distribution"  # many respondents: each group's distribution weighs 1
    group_rows = group_choice_rows(train, weighting)
    row_owner = [(k, g) for k, item in enumerate(train) for g in item.groups]  # group_choice_rows' order
    contested = {k: item.contested for k, item in enumerate(train)}
    groupings = {}
    if few_votes:  # every vote its own unit (OpinionQA's hundreds of respondents per group are not enumerated)
        votes = choice_votes(group_rows, tokenizer, unit="completion")
        groupings["vote"] = (votes, {n: row_owner[u[1]][1] for n, u in _names(votes)}, None)
    votes = choice_votes(group_rows, tokenizer, unit="row")
    names = _names(votes)
    groupings["item_group"] = (votes, {n: row_owner[u[1]][1] for n, u in names}, {n: row_owner[u[1]][0] for n, u in names})
    if has_annotators(train):
        group_of = {a: g for item in train for a, g, _ in item.annotations}
        votes = choice_votes(annotator_choice_rows(train), tokenizer, unit="source", source_key=ANNOTATOR_COLUMN)
        groupings["annotator"] = (votes, {n: group_of[u[1]] for n, u in _names(votes)}, None)
    cache, results = {}, {}
    for name, (votes, unit_group, unit_item) in groupings.items():
        print(f"  {name}: {len(votes.unit_names)} units ...", flush=True)
        report = measure(single.model, tokenizer, votes, args, adapter="member_0", item_cache=cache)
        print(report.summary(), flush=True)
        report.plot(out_dir / f"{Path(args.data).stem}_{name}.png")
        results[name] = {"report": report.to_dict(), **group_side(report, unit_group, unit_item, contested)}
    return {
        "data": str(args.data),
        "config": {k: v for k, v in vars(args).items() if k not in ("output_dir", "docs")},
        "train_items": len(train),
        "train_contested": sum(i.contested for i in train),
        "fit_steps": steps,
        "fit_seconds": fit_seconds,
        "weighting": weighting,
        "groupings": results,
    }


def _names(votes) -> list[tuple[str, tuple]]:
    """``(report name, unit key)`` of every unit (the report names units as :mod:`trl_renyi.stability.report` does)."""
    from trl_renyi.stability.report import _name

    return [(_name(key), key) for key in votes.unit_names]


GROUPING_LABELS = {"vote": "per vote", "item_group": "per (item, group) row", "annotator": "per annotator"}


def group_section(payload: dict, command: str) -> str:
    lines = [
        f"Command: `{command}` ({payload['train_items']} training items, {payload['train_contested']} contested; one "
        f"LoRA fitted in {payload['fit_steps']} steps, {payload['fit_seconds']:.0f} s; votes weighted by "
        f"{payload['weighting']}).",
        "",
        "| units | U | λ₁ | null λ₁ q50 / q95 / q99 | significant | bulk edge λ₀ | α* (φ = 0.1) | recommended α | "
        "stationarity | AUROC scores vs group | opposite sides, contested | same side, agreed | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in payload["groupings"].items():
        r = entry["report"]
        q = r["null_quantiles"]
        lines.append(
            f"| {GROUPING_LABELS.get(name, name)} | {r['num_units']} | {r['eigenvalues'][0]:.3g} | "
            f"{q['0.5']:.3g} / {q['0.95']:.3g} / {q['0.99']:.3g} | {'yes' if r['significant'] else 'no'} | "
            f"{runs.fmt(r.get('bulk_edge'), 2)} | {r['alpha_critical_floor']:.3f} | {r['recommended_alpha']:.3f} | {r['stationarity']:.2g} | "
            f"{runs.fmt(entry.get('auroc_group'), 3)} | {runs.fmt(entry.get('opposite_sides_contested'), 2)} | "
            f"{runs.fmt(entry.get('same_side_agreed'), 2)} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def stored_command(payload: dict, part: str) -> str:
    """The command of a run stored without one: its non-default settings from the payload's ``config``."""
    base = [part] + (["--data", payload["data"]] if part == "group" else [])
    defaults = vars(parse_args(base)[0])
    flags = [
        f"--{key} {value}" if value is not True else f"--{key}"
        for key, value in payload["config"].items()
        if key not in ("part", "data") and value != defaults.get(key) and value not in (None, False)
    ]
    return runs.display_command("stability.py", [*base, *" ".join(flags).split()])


def render(args, out_dir: Path) -> tuple[str, str]:
    """The results section of a stored run (its JSON in ``out_dir``), every report's decision re-derived."""
    from trl_renyi.stability import StabilityReport

    stem = Path(args.data).stem if args.data else "synthetic"
    payload = json.loads((out_dir / f"{stem}.json").read_text())
    command = payload.get("command") or stored_command(payload, "group" if args.data else "synthetic")
    if args.data:
        for entry in payload["groupings"].values():
            entry["report"] = StabilityReport.from_dict(entry["report"]).rederived().to_dict()
        return group_section(payload, command), f"stability-{stem}"
    payload["report"] = StabilityReport.from_dict(payload["report"]).rederived().to_dict()
    return synthetic_section(payload, command), "stability-synthetic"


def main(argv=None) -> int:
    args, out_dir, docs = parse_args(argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = runs.display_command("stability.py", list(argv if argv is not None else sys.argv[1:]))
    clock = runs.Stopwatch()
    if args.part == "render":
        section, marker = render(args, out_dir)
    elif args.part == "synthetic":
        payload = run_synthetic(args, out_dir)
        payload["command"] = command
        payload["plots"] = [str(plot_synthetic(payload, out_dir / "synthetic.png")), str(out_dir / "synthetic_spectrum.png")]
        payload["seconds"] = clock.seconds()
        runs.save_json(out_dir / "synthetic.json", payload)
        section, marker = synthetic_section(payload, command), "stability-synthetic"
    else:
        payload = run_group(args, out_dir)
        payload["command"] = command
        payload["seconds"] = clock.seconds()
        stem = Path(args.data).stem
        runs.save_json(out_dir / f"{stem}.json", payload)
        section, marker = group_section(payload, command), f"stability-{stem}"
    print(section)
    print(f"Done in {clock}.")
    runs.update_results_page(marker, section, docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
