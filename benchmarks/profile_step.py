"""Where a K-member step's time goes: one ``SFTTrainer`` step against one K-member ``RenyiSFTTrainer`` step.

Both train on the same plain-text batch (every token in the loss; ``bench_train.py``'s data), LoRA on all linear
layers, float32, no checkpointing, in one process. One optimizer step of each (after warm-up steps) runs under
``torch.profiler``; the self CPU time of every operator is summed into categories:

    matmul            aten::mm / addmm / bmm / baddbmm (base weights, LoRA factors, LM head)
    attention         scaled-dot-product attention kernels
    softmax & loss    (log-)softmax, cross-entropy / NLL and their backward
    copies & tiling   copy_, cat, stack, repeat, index, gather/scatter, clone, contiguous
    optimizer         fused / foreach AdamW kernels
    other             every other operator (element-wise, norms, activations, reductions)

and the table gives each category in seconds for both steps and the ratio; a category whose ratio is far above K is
overhead, one at K is FLOPs. The theoretical ratio for equal work is K (the base matmuls dominate and run K times).

Usage:

    python benchmarks/profile_step.py                       # SmolLM2-135M-Instruct, K = 4, 4 x 128 tokens
    python benchmarks/profile_step.py --quick               # tiny model: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import sft_dataset  # noqa: E402
from bench_utils import quiet_transformers, update_benchmarks_page, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("matmul", "attention", "softmax & loss", "copies & tiling", "optimizer", "other")


def category(name: str) -> str:
    op = name.removeprefix("aten::")
    if op in ("mm", "addmm", "bmm", "baddbmm", "matmul", "_mm"):
        return "matmul"
    if "scaled_dot_product" in op or "flash_attention" in op or "efficient_attention" in op:
        return "attention"
    if "softmax" in op or "nll_loss" in op or "cross_entropy" in op or "logsumexp" in op:
        return "softmax & loss"
    if op.startswith(("_fused_adam", "_foreach_")):
        return "optimizer"
    if op in ("copy_", "cat", "stack", "repeat", "index", "index_select", "gather", "scatter", "scatter_add_",
              "clone", "contiguous", "index_put_", "_index_put_impl_", "repeat_interleave", "narrow_copy", "fill_"):  # fmt: skip
        return "copies & tiling"
    return "other"


class ProfileOneStep(TrainerCallback):
    """Profile the optimizer step numbered ``step`` (1-based) of a Trainer run."""

    def __init__(self, step: int):
        self.step, self.profiler, self.wall = step, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.step:
            self.wall = time.perf_counter() - self._start
            self.profiler.__exit__(None, None, None)


def breakdown(profiler) -> dict[str, float]:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in profiler.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("_"):
            totals[category(event.key)] += event.self_cpu_time_total / 1e6
    return totals


def run(trainer_cls, config_cls, base, tokenizer, dataset, args, **extra) -> tuple[dict, float]:
    from peft import LoraConfig

    callback = ProfileOneStep(args.warmup + 1)
    config = config_cls(
        output_dir=tempfile.mkdtemp(prefix="profile_"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + 1, learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, bf16=False, use_cpu=True, seed=0, max_length=args.seq_len, activation_checkpointing=False,
        dataloader_num_workers=0, **extra,
    )  # fmt: skip
    trainer = trainer_cls(
        model=copy.deepcopy(base), args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    totals = breakdown(callback.profiler)
    totals["wall clock of the step"] = callback.wall
    del trainer
    gc.collect()
    return totals, sum(totals[name] for name in CATEGORIES)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-members", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "profile_step.json"))
    parser.add_argument("--docs", default=None, help="page to update (default docs/benchmarks.md; quick: none)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trl import SFTConfig, SFTTrainer

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    if args.quick:
        from trl_renyi.testing import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_llama(tokenizer)
        args.num_members, args.seq_len = 2, 32
    else:
        from trl_renyi.model.loading import load_causal_lm, load_tokenizer

        base, tokenizer = load_causal_lm(args.model, dtype="float32"), load_tokenizer(args.model)
    dataset = sft_dataset(tokenizer, args, args.batch_size * (args.warmup + 1))
    with quiet_transformers():
        print("profiling one SFTTrainer step ...", flush=True)
        single, single_total = run(SFTTrainer, SFTConfig, base, tokenizer, dataset, args)
        print(f"profiling one K = {args.num_members} RenyiSFTTrainer step ...", flush=True)
        ensemble, ensemble_total = run(
            RenyiSFTTrainer, RenyiSFTConfig, base, tokenizer, dataset, args, num_members=args.num_members
        )
    rows = ["| category | SFTTrainer (s) | K-member step (s) | ratio |", "|---|---|---|---|"]
    for name in CATEGORIES:
        ratio = ensemble[name] / single[name] if single[name] > 0 else float("nan")
        rows.append(f"| {name} | {single[name]:.2f} | {ensemble[name]:.2f} | {ratio:.2f} |")
    rows.append(f"| **total (operator self time)** | {single_total:.2f} | {ensemble_total:.2f} | {ensemble_total / single_total:.2f} |")
    wall = "wall clock of the step"
    rows.append(f"| {wall} (profiled) | {single[wall]:.2f} | {ensemble[wall]:.2f} | {ensemble[wall] / single[wall]:.2f} |")
    model_name = "tiny (offline test model)" if args.quick else args.model
    table = "\n".join(rows) + (
        f"\n\n{model_name}, K = {args.num_members}, {args.batch_size} × {args.seq_len} tokens of plain text (every "
        "token in the loss), LoRA r = 8 all-linear, float32, no checkpointing, one profiled step each after "
        f"{args.warmup} warm-up, CPU self time summed over operators (`benchmarks/profile_step.py`)."
    )
    print(table)
    write_json(args.output, {"model": model_name, "num_members": args.num_members, "single": single, "ensemble": ensemble})
    update_benchmarks_page("profile-step", table, args.docs, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
