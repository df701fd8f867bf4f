"""RenyiDPOTrainer on real preference data: Anthropic HH-RLHF (harmless-base, test split), SmolLM2-135M-Instruct.

Trains a K-member α-Rényi LoRA ensemble with `RenyiDPOTrainer` and, on the same pairs with the same settings, a stock
TRL `DPOTrainer` with one LoRA. Reports, on held-out pairs:

* each member's reward accuracy (share of pairs whose implicit reward margin m_k = β·Δ is > 0), the ensemble's
  (π-weighted mean reward) and the single LoRA's;
* routing: the mean responsibility of every member and the mean routing entropy at the final α;
* the median optimizer-step time of both trainers (after warm-up steps) and their ratio.

The data file is read from ``--data-dir`` (default ``../shared/data`` next to the repository); without it the
script prints a message and exits 0. Dialogues become conversational pairs: the dialogue up to the last Assistant
turn is the prompt (after a short system message, which keeps SmolLM2's long default one out), the two last
Assistant turns are chosen / rejected. To stay CPU-feasible only pairs whose prompt fits in half of
``--max-length`` are kept (mostly single-turn questions), and TRL's collator truncates the completions.

Usage:

    python benchmarks/dpo_hh_rlhf.py                                  # ~10 min on 2 idle CPU cores
    python benchmarks/dpo_hh_rlhf.py --train-pairs 512 --steps 128 --max-length 128
    python benchmarks/dpo_hh_rlhf.py --data-dir /path/to/data --output results.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (
    REPO,
    StepTimer,
    machine_description,
    median_after_warmup,
    quiet_transformers,
    write_json,
)

DATA_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"
SYSTEM = "You are a helpful assistant."


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help=f"folder holding {DATA_FILE}")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias, local path or Hub id")
    parser.add_argument("--train-pairs", type=int, default=128)
    parser.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs")
    parser.add_argument("--max-length", type=int, default=80, help="tokens per prompt + completion")
    parser.add_argument("--num-members", type=int, default=4, help="K")
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--alpha-warmup-ratio", type=float, default=0.5)
    parser.add_argument("--member-init-std", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps of the ensemble")
    parser.add_argument("--baseline-steps", type=int, default=None, help="steps of the stock DPOTrainer (default --steps)")
    parser.add_argument("--timing-warmup", type=int, default=2, help="first steps left out of the median step time")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    return parser.parse_args(argv)


def parse_dialogue(text: str) -> tuple[list[dict], str]:
    """``(conversation before the last Assistant turn, last Assistant turn)`` of an HH-RLHF transcript."""
    head, _, answer = text.rpartition("\n\nAssistant:")
    messages = []
    for chunk in head.split("\n\nHuman:")[1:]:
        human, _, assistant = chunk.partition("\n\nAssistant:")
        messages.append({"role": "user", "content": human.strip()})
        if assistant:
            messages.append({"role": "assistant", "content": assistant.strip()})
    return messages, answer.strip()


def load_pairs(path: Path, tokenizer, max_prompt_tokens: int) -> list[dict]:
    """Conversational preference pairs (whole dialogue as the prompt) whose prompt fits, in file order."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            dialogue, chosen = parse_dialogue(record["chosen"])
            dialogue_r, rejected = parse_dialogue(record["rejected"])
            if dialogue != dialogue_r or not dialogue or not chosen or not rejected or chosen == rejected:
                continue
            prompt = [{"role": "system", "content": SYSTEM}] + dialogue
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if length > max_prompt_tokens:
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    return rows


def common_settings(args, output_dir: str, steps: int) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=args.beta,
        max_length=args.max_length,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=not __import__("torch").cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        disable_tqdm=False,
        seed=args.seed,
        dataloader_num_workers=0,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.data_dir) / DATA_FILE
    if not path.is_file():
        print(f"dpo_hh_rlhf: {path} not found; skipping (pass --data-dir to point at the folder holding {DATA_FILE}).")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer
    from trl_renyi.model.loading import load_causal_lm, load_tokenizer
    from trl_renyi.objective import routing_entropy

    disable_progress_bars()
    started = time.perf_counter()
    load_at_start = list(os.getloadavg())

    def say(message):
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError as error:
        print(f"dpo_hh_rlhf: model {args.model!r} is not available ({error}); skipping.")
        return 0
    pairs = load_pairs(path, tokenizer, args.max_length // 2)
    needed = args.train_pairs + args.eval_pairs
    if len(pairs) < needed:
        print(f"dpo_hh_rlhf: only {len(pairs)} pairs fit max_length={args.max_length}, need {needed}; lower the sizes.")
        return 1
    train = Dataset.from_list(pairs[: args.train_pairs])
    held_out = Dataset.from_list(pairs[args.train_pairs : needed])
    say(f"{path.name}: {len(pairs)} pairs fit; training on {len(train)}, holding out {len(held_out)}")

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    baseline_steps = args.baseline_steps or args.steps

    with quiet_transformers():
        say(f"stock DPOTrainer, one LoRA, {baseline_steps} steps")
        stock_timer = StepTimer()
        stock = DPOTrainer(
            model=load_causal_lm(args.model),
            args=DPOConfig(**common_settings(args, "outputs/dpo_hh_rlhf/stock", baseline_steps)),
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[stock_timer],
        )
        stock.train()
        stock_eval = stock.evaluate()
        del stock

        say(f"RenyiDPOTrainer, K={args.num_members}, α={args.alpha} after warm-up {args.alpha_warmup_ratio}, {args.steps} steps")
        renyi_timer = StepTimer()
        trainer = RenyiDPOTrainer(
            model=load_causal_lm(args.model),
            args=RenyiDPOConfig(
                num_members=args.num_members,
                alpha=args.alpha,
                alpha_warmup_ratio=args.alpha_warmup_ratio,
                member_init_std=args.member_init_std,
                **common_settings(args, "outputs/dpo_hh_rlhf/renyi", args.steps),
            ),
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[renyi_timer],
        )
        trainer.train()
        say("scoring held-out pairs")
        scores = trainer.score_pairs(held_out)

    weights = trainer.objective.log_weights.exp()
    member_accuracy = (scores.margins > 0).float().mean(0)
    ensemble_accuracy = float(((scores.margins @ weights) > 0).float().mean())
    shares = scores.responsibilities.mean(0)
    entropy = float(routing_entropy(scores.responsibilities).mean())
    stock_median = median_after_warmup(stock_timer.times, args.timing_warmup)
    renyi_median = median_after_warmup(renyi_timer.times, args.timing_warmup)
    results = {
        "data": {"file": str(path), "train_pairs": len(train), "held_out_pairs": len(held_out), "max_length": args.max_length},
        "settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "output")},
        "held_out": {
            "member_reward_accuracy": member_accuracy.tolist(),
            "ensemble_reward_accuracy": ensemble_accuracy,
            "single_lora_reward_accuracy": stock_eval.get("eval_rewards/accuracies"),
            "member_share": shares.tolist(),
            "routing_entropy": entropy,
            "routing_entropy_uniform": math.log(args.num_members),
            "member_margin_mean": scores.margins.mean(0).tolist(),
        },
        "median_step_seconds": {"stock_dpo_one_lora": stock_median, "renyi_dpo": renyi_median,
                                "ratio": renyi_median / stock_median},
        "machine": machine_description(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "load_average_start_end": [load_at_start, list(os.getloadavg())],
        "wall_seconds": time.perf_counter() - started,
    }

    print(f"\nHeld-out pairs: {len(held_out)}  (β = {args.beta}, α = {args.alpha}, K = {args.num_members})")
    print(f"{'member':<10}{'reward acc.':>12}{'share':>9}{'mean margin':>13}")
    for k in range(args.num_members):
        print(f"{'member_' + str(k):<10}{member_accuracy[k]:>12.3f}{shares[k]:>9.3f}{scores.margins[:, k].mean():>13.3f}")
    print(f"{'ensemble':<10}{ensemble_accuracy:>12.3f}")
    print(f"{'1 LoRA':<10}{results['held_out']['single_lora_reward_accuracy']:>12.3f}  (stock DPOTrainer)")
    print(f"routing entropy {entropy:.3f} nats (uniform: {math.log(args.num_members):.3f})")
    print(
        f"median step: stock DPOTrainer (1 LoRA) {stock_median:.2f} s, RenyiDPOTrainer (K={args.num_members}) "
        f"{renyi_median:.2f} s, ratio {renyi_median / stock_median:.2f}x"
    )
    print(f"1-min load average at start / end: {load_at_start[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    say("done")
    if args.output:
        write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
