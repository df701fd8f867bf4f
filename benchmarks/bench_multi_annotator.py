"""Step time of multi-annotator rows against their expansion into one row per vote.

A ChaosNLI item with five original votes split 3 / 2 between two labels is one multi-annotator row (prompt, the two
label words, weights 3 and 2); TRL's plain prompt/completion form of the same votes is five rows. All train the same
objective (tests/test_multi_annotator.py and tests/test_shared_prompt.py check loss and gradients). This measures,
in one process, the median ``RenyiSFTTrainer`` step time for the same items per step in three forms: the rows with
one prompt pass per item (``share_prompt``, the default), the same rows with ``share_prompt=False`` (one pass per
distinct label: about 2 / 5 of the expansion) and the expansion into one row per vote.

Items come from ``--data`` (default ``../shared/data/chaosnli-snli.jsonl``; only items whose 5 votes fall on exactly
two labels, so every item is two weighted rows); without the file, generated items of the same shape are used and
the output says so.

Usage:

    python benchmarks/bench_multi_annotator.py                     # SmolLM2-135M-Instruct, K = 4, 4 items per step
    python benchmarks/bench_multi_annotator.py --quick             # tiny model: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import StepTimer, machine_description, median_after_warmup, quiet_transformers, update_benchmarks_page, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chaosnli-snli.jsonl"
sys.path.insert(0, str(REPO / "experiments"))  # the ChaosNLI converter lives with the studies


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a ChaosNLI file (SNLI or MNLI part)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-members", type=int, default=4)
    parser.add_argument("--items-per-step", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny offline model, few steps")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "multi_annotator.json"))
    parser.add_argument("--docs", default=None, help="page to update (default docs/benchmarks.md; quick: none)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_members, args.items_per_step, args.warmup, args.repeats = 2, 2, 1, 2
    return args


def _relative(path: Path) -> str:
    """The path as the docs write it (relative to the repository when it lies beside it)."""
    try:
        return str(Path("..") / path.resolve().relative_to(REPO.parent))
    except ValueError:
        return str(path)


def two_label_items(path: Path, count: int) -> tuple[list[dict], str]:
    """``count`` ChaosNLI items whose 5 original votes fall on exactly two labels (from the file, or generated)."""
    from chaosnli import vote_counts

    if path.is_file():
        rows = [json.loads(line) for line in path.open() if line.strip()]
        picked = [r for r in rows if sorted(c for c in vote_counts(r) if c) == [2, 3]][:count]
        if len(picked) == count:
            return picked, _relative(path)
    generated = []
    for i in range(count):
        generated.append({
            "example": {"premise": f"A man in a red shirt is playing guitar on stage number {i} tonight.",
                        "hypothesis": "A musician performs for a crowd."},
            "label_count": [50, 40, 10], "old_labels": ["entailment"] * 3 + ["neutral"] * 2,
        })  # fmt: skip
    return generated, f"generated (no {path})"


def time_steps(base, tokenizer, dataset, rows_per_step: int, args, share_prompt: bool) -> list[float]:
    from peft import LoraConfig

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    config = RenyiSFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_multi_"), per_device_train_batch_size=rows_per_step,
        max_steps=args.warmup + args.repeats, learning_rate=1e-4, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0, max_length=256,
        activation_checkpointing=False, num_members=args.num_members, alpha=-1.0, alpha_warmup_ratio=0.0,
        share_prompt=share_prompt,
    )  # fmt: skip
    timer = StepTimer()
    trainer = RenyiSFTTrainer(
        model=copy.deepcopy(base), args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )  # fmt: skip
    trainer.train()
    del trainer
    gc.collect()
    return timer.times


def main(argv=None) -> int:
    args = parse_args(argv)
    from datasets import Dataset

    from chaosnli import chaosnli_to_multi_completion, chaosnli_to_prompt_completion

    steps = args.warmup + args.repeats
    items, source = two_label_items(Path(args.data), args.items_per_step * steps)
    weighted = Dataset.from_dict(chaosnli_to_multi_completion(items, "original"))
    expanded = Dataset.from_dict(chaosnli_to_prompt_completion(items, "original"))
    if args.quick:
        from trl_renyi.testing import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_llama(tokenizer)
    else:
        from trl_renyi.model.loading import load_causal_lm, load_tokenizer

        base, tokenizer = load_causal_lm(args.model, dtype="float32"), load_tokenizer(args.model)
    print(f"{len(items)} items from {source}; K = {args.num_members}, {args.items_per_step} items per step", flush=True)
    with quiet_transformers():
        print("  multi-annotator rows, one prompt pass per item ...", flush=True)
        shared_times = time_steps(base, tokenizer, weighted, args.items_per_step, args, share_prompt=True)
        print("  multi-annotator rows, share_prompt=False (2 weighted rows per item) ...", flush=True)
        weighted_times = time_steps(base, tokenizer, weighted, 2 * args.items_per_step, args, share_prompt=False)
        print("  expanded rows (5 rows per item, one per vote) ...", flush=True)
        expanded_times = time_steps(base, tokenizer, expanded, 5 * args.items_per_step, args, share_prompt=False)
    shared_s = median_after_warmup(shared_times, args.warmup)
    weighted_s = median_after_warmup(weighted_times, args.warmup)
    expanded_s = median_after_warmup(expanded_times, args.warmup)
    payload = {
        "machine": machine_description(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "model": "tiny (offline test model)" if args.quick else args.model,
        "data": source,
        "num_members": args.num_members,
        "items_per_step": args.items_per_step,
        "shared_prompt_step_s": shared_s,
        "multi_annotator_step_s": weighted_s,
        "expanded_step_s": expanded_s,
        "ratio": shared_s / expanded_s,
        "ratio_unshared": weighted_s / expanded_s,
        "step_times": {"shared_prompt": shared_times, "multi_annotator": weighted_times, "expanded": expanded_times},
    }
    write_json(args.output, payload)
    table = (
        "| form of the same items | prompt passes per item | median K-member step (s) | per item (s) |\n"
        "|---|---|---|---|\n"
        f"| multi-annotator rows, one prompt pass (`share_prompt`, default) | 1 | {shared_s:.2f} | "
        f"{shared_s / args.items_per_step:.2f} |\n"
        f"| multi-annotator rows, `share_prompt=False` | 2 | {weighted_s:.2f} | {weighted_s / args.items_per_step:.2f} |\n"
        f"| expanded, one row per vote | 5 | {expanded_s:.2f} | {expanded_s / args.items_per_step:.2f} |\n\n"
        f"Against the expansion: {payload['ratio']:.2f} with one prompt pass per item, {payload['ratio_unshared']:.2f} "
        f"without ({payload['model']}, K = {args.num_members}, {args.items_per_step} items per step, median of "
        f"{args.repeats} steps after {args.warmup} warm-up; data: {source})."
    )
    print(table)
    update_benchmarks_page("multi-annotator", table, args.docs, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
