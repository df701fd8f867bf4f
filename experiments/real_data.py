"""Efficacy study 3: real data — TruthfulQA mc1 (SFT) and the hh-rlhf harmless pairs (DPO).

**TruthfulQA mc1.** The 817 questions are shuffled (seeded) and split; one LoRA (K = 1, which equals TRL's
``SFTTrainer``), K-member ensembles at α = 1 and α = 0, and one with the library's default settings are trained on
the best answers of the training questions. On the held-out questions every model scores each mc1 choice by its
log-likelihood (members mixed with π); reported are accuracy, NLL of the true choice, ECE (10 bins, top-label),
Brier, the AUROC of entropy / mutual information for detecting wrong answers, and accuracy at 50% coverage (keeping
the half of the questions with the lowest uncertainty). The base model (adapters off) is the reference.

**hh-rlhf harmless.** Dialogues whose prompt fits in half of ``--dpo-max-length`` tokens become conversational
preference pairs. One LoRA (K = 1, which equals TRL's ``DPOTrainer``), an ensemble at α = 1 and one with the
library's defaults are trained on the first pairs; on held-out pairs each model's P(chosen ≻ rejected) is the
DPO implicit reward model σ(β·Δ) against the base model (mixed over members with π), and its accuracy, NLL, ECE and
Brier are reported, with a reliability diagram.

The data is read from ``--data-dir`` (default ``../shared/data``); a part whose file is absent is skipped with a
message. ``--quick`` runs both parts on the tiny offline model with generated stand-in data (a smoke test).

Usage:

    python experiments/real_data.py                      # SmolLM2-135M-Instruct (embedded), ~25 min on 2 CPU cores
    python experiments/real_data.py --parts truthfulqa --tqa-eval-questions 300
    python experiments/real_data.py --quick
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import (  # noqa: E402
    DEFAULT_DATA_DIR,
    REPO,
    Stopwatch,
    fmt,
    library_defaults,
    load_base,
    save_json,
    train_ensemble,
    update_results_page,
)

sys.path.insert(0, str(REPO / "benchmarks"))
from dpo_hh_rlhf import DATA_FILE as HH_FILE  # noqa: E402
from dpo_hh_rlhf import load_pairs  # noqa: E402
from truthfulqa_eval import SYSTEM_PROMPT as TQA_SYSTEM  # noqa: E402
from truthfulqa_eval import sft_dataset as truthfulqa_sft_dataset  # noqa: E402
from truthfulqa_eval import split_questions  # noqa: E402

TQA_FILE = "truthfulqa-en-validation.json"


SINGLE = {"label": "single LoRA (K = 1)", "num_members": 1, "alpha": 1.0}
TQA_RUNS = {
    "single": SINGLE,
    "a1": {"label": "α = 1", "alpha": 1.0},
    "a0": {"label": "α = 0", "alpha": 0.0},
}
# α = 0 is left out on preferences: a pair is one decision, where the α = 0 objective is flat between specialists and
# a hedging member (see docs/method.md); the defaults (α < 0 after a warm-up) are what this part checks.
HH_RUNS = {"single": SINGLE, "a1": {"label": "α = 1", "alpha": 1.0}}


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny offline model and generated data: a smoke test",
    )
    parser.add_argument(
        "--parts",
        default="truthfulqa,hh-rlhf",
        help="comma-separated: truthfulqa, hh-rlhf",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="embedded alias, local path or Hub id",
    )
    parser.add_argument("--num-members", type=int, default=4)
    parser.add_argument("--member-init-std", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tqa-train-questions", type=int, default=400)
    parser.add_argument("--tqa-eval-questions", type=int, default=100)
    parser.add_argument("--tqa-steps", type=int, default=30)
    parser.add_argument("--tqa-learning-rate", type=float, default=1e-3)
    parser.add_argument("--dpo-train-pairs", type=int, default=256)
    parser.add_argument("--dpo-eval-pairs", type=int, default=128)
    parser.add_argument("--dpo-steps", type=int, default=32)
    parser.add_argument("--dpo-batch-size", type=int, default=4)
    parser.add_argument("--dpo-learning-rate", type=float, default=5e-4)
    parser.add_argument("--dpo-max-length", type=int, default=80)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--output-dir",
        default=None,
        help="default experiments/results (quick: a temp dir)",
    )
    parser.add_argument(
        "--docs",
        default=None,
        help="results page to update (default docs/results.md; quick: none)",
    )
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - {"truthfulqa", "hh-rlhf"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; choose from truthfulqa, hh-rlhf")
    if args.quick:
        args.tqa_train_questions, args.tqa_eval_questions, args.tqa_steps = 12, 8, 3
        args.dpo_train_pairs, args.dpo_eval_pairs, args.dpo_steps = 12, 8, 3
    return args


# ---------------------------------------------------------------------------------------------------------- data


def stand_in_truthfulqa(count: int, seed: int) -> list[dict]:
    """TruthfulQA-format records built from the package's capitals family (``--quick`` only)."""
    from trl_renyi.data import conflict_sft_dataset

    rows = conflict_sft_dataset(1, count, families=["capitals"], seed=seed, conversational=False)["test"]
    return [
        {
            "question": row["prompt"],
            "best_answer": row["choices"][0].strip(),
            "mc1_targets": {
                "choices": [c.strip() for c in row["choices"]],
                "labels": [1, 0],
            },
        }
        for row in rows
    ]


def stand_in_pairs(count: int, seed: int) -> list[dict]:
    """Preference pairs from the package's generator in hh-rlhf's conversational form (``--quick`` only)."""
    from trl_renyi.data import conflict_preference_dataset

    rows = conflict_preference_dataset(count, 1, families=["capitals"], seed=seed, conversational=False)["train"]
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def format_prompt(question: str, system: str, chat: bool):
    """A chat prompt (system + user message), or the plain question for models without a chat template."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}] if chat else question


def format_answer(answer: str, chat: bool):
    return [{"role": "assistant", "content": answer}] if chat else " " + answer


# ---------------------------------------------------------------------------------------------------------- evaluation


def summarize_predictions(predictions, labels) -> dict:
    """Accuracy, NLL, ECE, Brier, error-detection AUROC and selective accuracy from choice predictions."""
    from trl_renyi.evaluation.metrics import choice_outcomes, summarize

    probs = [p.probs for p in predictions]
    uncertainties = {"entropy": [p.entropy for p in predictions]}
    if predictions and predictions[0].member_probs.shape[0] > 1:  # (K, choices)
        uncertainties["mutual_information"] = [p.mutual_information for p in predictions]
    summary = summarize(probs, labels, uncertainties, coverages=(0.5,))
    outcomes = choice_outcomes(probs, labels)
    summary["_outcomes"] = (
        outcomes["confidence"].tolist(),
        outcomes["correct"].tolist(),
    )
    return summary


def trained_runs(
    part: str,
    runs: dict,
    trainer_cls,
    config_cls,
    base,
    tokenizer,
    dataset,
    settings: dict,
):
    """Train the part's runs (plus one with the library defaults) one after the other; yields
    ``(name, run, ensemble, stopwatch)`` and drops each ensemble once the caller has evaluated it."""
    runs = {**runs, "defaults": library_defaults()}
    for index, (name, run) in enumerate(runs.items(), start=1):
        run = {"num_members": settings["num_members"], **run}
        clock = Stopwatch()
        print(f"[{part} {index}/{len(runs)}] {run['label']} ...", flush=True)
        ensemble = train_ensemble(trainer_cls, config_cls, base, tokenizer, dataset, settings, run)
        yield name, run, ensemble, clock
        del ensemble


def part_payload(settings: dict, results: dict, plot_path: Path) -> dict:
    """Draw the part's reliability diagram and return its JSON payload (without the per-item outcomes)."""
    from trl_renyi.evaluation.plots import reliability_diagram

    plot = reliability_diagram(
        {r["label"]: r["_outcomes"] for r in results.values()},
        10,
        plot_path,
        {r["label"]: r["ece"] for r in results.values()},
    )
    public = {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()}
    return {"settings": settings, "results": public, "plot": plot}


# ---------------------------------------------------------------------------------------------------------- parts


def run_truthfulqa(args, base, tokenizer, out_dir: Path) -> dict:
    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.inference.baseline import SingleModel

    if args.quick:
        records = stand_in_truthfulqa(args.tqa_train_questions + args.tqa_eval_questions, args.seed)
        system = "Answer briefly."
    else:
        path = args.data_dir / TQA_FILE
        records = json.loads(path.read_text())
        system = TQA_SYSTEM
    train, held_out = split_questions(records, args.tqa_train_questions, args.tqa_eval_questions, args.seed)
    chat = not args.quick
    if chat:
        dataset = truthfulqa_sft_dataset(train)
    else:
        from datasets import Dataset

        dataset = Dataset.from_dict(
            {
                "prompt": [r["question"] for r in train],
                "completion": [format_answer(r["best_answer"], False) for r in train],
            }
        )
    prompts = [format_prompt(r["question"], system, chat) for r in held_out]
    choices = [[format_answer(c, chat) for c in r["mc1_targets"]["choices"]] for r in held_out]
    labels = [r["mc1_targets"]["labels"] for r in held_out]
    settings = {
        "model": "tiny (offline test model)" if args.quick else args.model,
        "num_members": args.num_members,
        "steps": args.tqa_steps,
        "batch_size": 8,
        "learning_rate": args.tqa_learning_rate,
        "lora_r": args.lora_r,
        "member_init_std": args.member_init_std,
        "seed": args.seed,
        "max_length": 128,
        "train_questions": len(train),
        "eval_questions": len(held_out),
    }
    results = {}
    trained = trained_runs(
        "TruthfulQA",
        TQA_RUNS,
        RenyiSFTTrainer,
        RenyiSFTConfig,
        base,
        tokenizer,
        dataset,
        settings,
    )
    for name, run, ensemble, clock in trained:
        if name == "single":
            base_model = SingleModel.base_of(ensemble)
            results["base"] = summarize_predictions(
                base_model.predict_choices(prompts, choices, batch_size=16, show_progress=False),
                labels,
            )
            results["base"]["label"] = "base model"
        results[name] = summarize_predictions(
            ensemble.predict_choices(prompts, choices, batch_size=16, show_progress=False),
            labels,
        )
        results[name]["label"] = run["label"]
        results[name]["seconds"] = float(str(clock).split()[0])
        print(
            f"    {clock}: accuracy {results[name]['accuracy']:.3f}, NLL {results[name]['nll']:.3f}",
            flush=True,
        )
    return part_payload(settings, results, out_dir / "truthfulqa_reliability.png")


def run_hh_rlhf(args, base, tokenizer, out_dir: Path) -> dict:
    from datasets import Dataset

    from trl_renyi.inference.baseline import SingleModel
    from trl_renyi.training.config import RenyiDPOConfig
    from trl_renyi.training.dpo import RenyiDPOTrainer

    needed = args.dpo_train_pairs + args.dpo_eval_pairs
    if args.quick:
        pairs = stand_in_pairs(needed, args.seed)
    else:
        path = args.data_dir / HH_FILE
        pairs = load_pairs(path, tokenizer, args.dpo_max_length // 2)
    if len(pairs) < needed:
        raise SystemExit(f"real_data: only {len(pairs)} hh-rlhf pairs fit --dpo-max-length; need {needed}.")
    train, held_out = (
        Dataset.from_list(pairs[: args.dpo_train_pairs]),
        pairs[args.dpo_train_pairs : needed],
    )
    settings = {
        "model": "tiny (offline test model)" if args.quick else args.model,
        "num_members": args.num_members,
        "steps": args.dpo_steps,
        "batch_size": args.dpo_batch_size,
        "learning_rate": args.dpo_learning_rate,
        "beta": args.beta,
        "lora_r": args.lora_r,
        "member_init_std": args.member_init_std,
        "seed": args.seed,
        "max_length": args.dpo_max_length,
        "train_pairs": len(train),
        "eval_pairs": len(held_out),
        "extra_config": {"beta": args.beta},
    }
    labels = [[1, 0]] * len(held_out)
    results = {}
    trained = trained_runs(
        "hh-rlhf",
        HH_RUNS,
        RenyiDPOTrainer,
        RenyiDPOConfig,
        base,
        tokenizer,
        train,
        settings,
    )
    for name, run, ensemble, clock in trained:
        predictions = ensemble.predict_preferences(
            [r["prompt"] for r in held_out],
            [r["chosen"] for r in held_out],
            [r["rejected"] for r in held_out],
            reference=SingleModel.base_of(ensemble),
            beta=args.beta,
            show_progress=False,
        )
        results[name] = summarize_predictions(predictions, labels)
        results[name]["label"] = run["label"]
        results[name]["member_accuracy"] = [
            float(sum(float(p.member_probs[k, 0]) > 0.5 for p in predictions) / len(predictions))
            for k in range(predictions[0].member_probs.shape[0])
        ]
        results[name]["mean_p_chosen"] = float(sum(float(p.probs[0]) for p in predictions) / len(predictions))
        results[name]["seconds"] = float(str(clock).split()[0])
        print(
            f"    {clock}: accuracy {results[name]['accuracy']:.3f}, ECE {results[name]['ece']:.3f}",
            flush=True,
        )
    return part_payload(settings, results, out_dir / "hh_rlhf_reliability.png")


# ---------------------------------------------------------------------------------------------------------- page


def render(payload: dict, command: str, docs: Path | None) -> str:
    lines = [f"Command: `{command}`", ""]
    tqa = payload.get("truthfulqa")
    if tqa:
        s = tqa["settings"]
        lines += [
            f"**TruthfulQA mc1.** Model {s['model']}, K = {s['num_members']}, {s['steps']} steps of batch "
            f"{s['batch_size']}, lr {s['learning_rate']}, LoRA r {s['lora_r']}; trained on the best answers of "
            f"{s['train_questions']} questions, evaluated on {s['eval_questions']} held-out questions.",
            "",
            "| model | accuracy | NLL | ECE | Brier | AUROC entropy | AUROC MI | acc. @ 50% (entropy) | acc. @ 50% (MI) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tqa["results"].values():
            mi = "mutual_information" in r["auroc"]
            lines.append(
                f"| {r['label']} | {fmt(r['accuracy'], 3)} | {fmt(r['nll'], 3)} | {fmt(r['ece'], 3)} | "
                f"{fmt(r['brier'], 3)} | {fmt(r['auroc']['entropy'])} | "
                f"{fmt(r['auroc']['mutual_information']) if mi else '–'} | "
                f"{fmt(r['selective_accuracy']['entropy']['0.5'])} | "
                f"{fmt(r['selective_accuracy']['mutual_information']['0.5']) if mi else '–'} |"
            )
        lines += ["", _image(tqa["plot"], "truthfulqa_reliability", docs), ""]
    hh = payload.get("hh_rlhf")
    if hh:
        s = hh["settings"]
        lines += [
            f"**hh-rlhf harmless.** Model {s['model']}, K = {s['num_members']}, {s['steps']} steps of "
            f"{s['batch_size']} pairs, lr {s['learning_rate']}, β = {s['beta']}, max length {s['max_length']}; "
            f"{s['train_pairs']} training / {s['eval_pairs']} held-out pairs. P(chosen ≻ rejected) is the DPO "
            "implicit reward model against the base model.",
            "",
            "| model | accuracy | members' accuracy | NLL | ECE | Brier | mean P(chosen) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in hh["results"].values():
            members = " / ".join(fmt(a) for a in r["member_accuracy"])
            lines.append(
                f"| {r['label']} | {fmt(r['accuracy'], 3)} | {members} | {fmt(r['nll'], 3)} | {fmt(r['ece'], 3)} | "
                f"{fmt(r['brier'], 3)} | {fmt(r['mean_p_chosen'], 3)} |"
            )
        lines += ["", _image(hh["plot"], "hh_rlhf_reliability", docs)]
    return "\n".join(lines).rstrip() + "\n"


def _image(plot: str, name: str, docs: Path | None) -> str:
    path = Path(plot).resolve()
    if docs is None or not path.is_relative_to(REPO):
        return f"Plot: `{plot}`"
    return f"![{name}](../{path.relative_to(REPO)})"


def main(argv=None) -> int:
    import tempfile

    args = parse_args(argv)
    out_dir = Path(
        args.output_dir or (tempfile.mkdtemp(prefix="real_data_") if args.quick else REPO / "experiments" / "results")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = None if (args.quick and args.docs is None) else Path(args.docs or REPO / "docs" / "results.md")
    clock = Stopwatch()
    files = {"truthfulqa": args.data_dir / TQA_FILE, "hh-rlhf": args.data_dir / HH_FILE}
    if not args.quick:
        for part in [p for p in args.parts if not files[p].is_file()]:
            print(f"real_data: {files[part]} not found; skipping {part} (pass --data-dir).")
            args.parts.remove(part)
        if not args.parts:
            return 0
    base, tokenizer = load_base(args.quick, args.model)
    payload = {}
    if "truthfulqa" in args.parts:
        payload["truthfulqa"] = run_truthfulqa(args, base, tokenizer, out_dir)
    if "hh-rlhf" in args.parts:
        payload["hh_rlhf"] = run_hh_rlhf(args, base, tokenizer, out_dir)
    command = "python experiments/real_data.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload["command"] = command.strip()
    save_json(out_dir / "real_data.json", payload)
    if len(payload) > 1:
        page = render(payload, payload["command"], docs)
        update_results_page("real-data", page, docs)
        print(page)
    print(f"wrote {out_dir / 'real_data.json'} in {clock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
