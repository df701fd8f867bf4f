"""TruthfulQA mc1: an α-Rényi ensemble on SmolLM2-135M-Instruct next to the base model and a single LoRA.

1. Splits TruthfulQA's 817 questions (a seeded shuffle) into training and held-out questions.
2. Trains a K-member ensemble with RenyiSFTTrainer on the best answers of the training questions, and one LoRA with
   TRL's SFTTrainer on the same data and settings (the single-adapter baseline).
3. Runs ``trl-renyi eval`` on the held-out questions' mc1 choices with the baselines ``base`` (adapters off), ``single``
   (the TRL LoRA) and ``member_0`` (one member of the ensemble alone).

Outputs: the evaluation report, predictions and plots under ``--output-dir`` (default ``outputs/truthfulqa_eval``) and a
summary in ``benchmarks/results/truthfulqa_eval.json``. The data is read from ``../shared/data/`` next to the
repository (``--data`` overrides); without it the script says so and exits cleanly.

Usage:

    python benchmarks/truthfulqa_eval.py                              # K=4, 160 train / 100 held-out questions
    python benchmarks/truthfulqa_eval.py --steps 60 --eval-questions 300 --alpha 0 --alpha-warmup-ratio 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "truthfulqa-en-validation.json"
SYSTEM_PROMPT = "Answer the question briefly and truthfully."


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TruthfulQA JSON (question, mc1_targets, best_answer)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (embedded alias, folder or Hub id)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "truthfulqa_eval")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "truthfulqa_eval.json")
    parser.add_argument("--train-questions", type=int, default=160, help="questions whose best answers are trained on")
    parser.add_argument("--eval-questions", type=int, default=100, help="held-out questions evaluated (mc1)")
    parser.add_argument("--num-members", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--alpha-warmup-ratio", type=float, default=0.0)
    parser.add_argument("--member-init-std", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each training run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16, help="choices per member-batched forward")
    parser.add_argument("--length-normalize", action="store_true", help="score choices by mean per-token log-likelihood")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def split_questions(records: list[dict], n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    if n_train + n_eval > len(records):
        raise ValueError(f"{n_train} training + {n_eval} held-out questions exceed the {len(records)} available.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:n_train]], [records[i] for i in order[n_train : n_train + n_eval]]


def sft_dataset(records: list[dict]):
    """Conversational prompt/completion pairs: the question (after a short system message) and its best answer."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [
                [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": r["question"]}] for r in records
            ],
            "completion": [[{"role": "assistant", "content": r["best_answer"]}] for r in records],
        }
    )


def training_kwargs(args, output_dir: Path) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_length=128,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        seed=args.seed,
    )


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def train_ensemble(args, dataset, output_dir: Path) -> float:
    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    config = RenyiSFTConfig(
        num_members=args.num_members,
        alpha=args.alpha,
        alpha_warmup_ratio=args.alpha_warmup_ratio,
        member_init_std=args.member_init_std,
        **training_kwargs(args, output_dir),
    )
    start = time.perf_counter()
    trainer = RenyiSFTTrainer(model=args.model, args=config, train_dataset=dataset, peft_config=lora_config(args))
    trainer.train()
    trainer.save_model(str(output_dir))
    return time.perf_counter() - start


def train_single(args, dataset, output_dir: Path) -> float:
    from trl import SFTConfig, SFTTrainer

    from trl_renyi.model.loading import load_causal_lm, load_tokenizer

    start = time.perf_counter()
    trainer = SFTTrainer(
        model=load_causal_lm(args.model),
        args=SFTConfig(**training_kwargs(args, output_dir)),
        train_dataset=dataset,
        processing_class=load_tokenizer(args.model),
        peft_config=lora_config(args),
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    return time.perf_counter() - start


def _relative(path: Path) -> str:
    """``path`` relative to the repository (results carry no machine-specific paths)."""
    return os.path.relpath(path.resolve(), REPO)


def main(argv=None) -> int:
    from trl_renyi.cli import main as trl_renyi_command  # the `trl-renyi eval` command itself

    args = parse_args(argv)
    if not args.data.is_file():
        print(f"Skipping the TruthfulQA benchmark: {args.data} not found (pass --data).")
        return 0
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = split_questions(json.loads(args.data.read_text()), args.train_questions, args.eval_questions, args.seed)
    held_out_file = out / "held_out_mc1.json"
    held_out_file.write_text(json.dumps(held_out))
    dataset = sft_dataset(train)
    timings = {"train_ensemble_s": train_ensemble(args, dataset, out / "ensemble")}
    timings["train_single_s"] = train_single(args, dataset, out / "single")
    start = time.perf_counter()
    status = trl_renyi_command([
        "eval",
        "--ensemble", str(out / "ensemble"),
        "--data", str(held_out_file),
        "--data_format", "mc1",
        "--baselines", "base", f"single=adapter:{out / 'single'}", "member:0",
        "--chat", "yes",
        "--system_prompt", SYSTEM_PROMPT,
        "--batch_size", str(args.eval_batch_size),
        "--output_dir", str(out / "eval"),
        *(["--length_normalize", "true"] if args.length_normalize else []),
    ])  # fmt: skip
    if status:
        raise SystemExit(f"trl-renyi eval failed with status {status}")
    timings["eval_s"] = time.perf_counter() - start
    report = json.loads((out / "eval" / "report.json").read_text())
    keys = ("accuracy", "nll", "ece", "brier", "auroc", "selective_accuracy", "mean_mutual_information")
    summary = {
        "settings": {k: _relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {"train_questions": len(train), "eval_questions": len(held_out), "format": "mc1"},
        "timings": timings,
        "models": {name: {k: m[k] for k in keys} for name, m in report["models"].items()},
        "ensemble_members": {name: m["accuracy"] for name, m in report["models"]["ensemble"].get("members", {}).items()},
        "plots": [_relative(Path(p)) for p in report.get("plots", [])],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nTimings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    print(f"Summary written to {args.results}; report and plots in {out / 'eval'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
