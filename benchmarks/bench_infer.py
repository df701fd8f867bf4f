"""Inference benchmark: scoring and generation with a K-member ensemble vs one adapter, on the same model.

    score_single       RenyiEnsemble.score with one member (one LoRA)
    score_ensemble     RenyiEnsemble.score with K members in one member-batched forward (+ uncertainty)
    generate_peft      transformers' generate on a plain PeftModel with one LoRA (greedy)
    generate_single    RenyiEnsemble.generate, one member (greedy, KV cache)
    generate_mixture   RenyiEnsemble.generate, strategy="mixture" over K members (greedy, KV cache, per-token MI)

Medians over ``--repeats`` runs after one warm-up, all in one process; JSON plus a table in docs/benchmarks.md.

Usage:

    python benchmarks/bench_infer.py
    python benchmarks/bench_infer.py --num-members 8 --num-prompts 64 --new-tokens 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import REPO, PeakMemory, machine_description, quiet_transformers, replace_section, write_json  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Greet Alice.",
    "What is 7 + 5?",
    "Write the number 12 in words.",
    "Say goodbye to Bob.",
    "Name a primary colour.",
    "What is the capital of Japan?",
    "What is 3 + 9?",
]
ANSWERS = ["Paris.", "Good day, Alice.", "12.", "twelve", "Farewell, Bob.", "Red.", "Tokyo.", "12."]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-members", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=32, help="prompts scored / generated per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_infer.json"))
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    return parser.parse_args(argv)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None) -> int:
    args = parse_args(argv)
    from peft import LoraConfig, PeftModel

    from trl_renyi import RenyiEnsemble
    from trl_renyi.data import chat_answer, chat_prompt
    from trl_renyi.model.layer import router_disabled
    from trl_renyi.model.loading import load_causal_lm, load_tokenizer
    from trl_renyi.model.members import build_ensemble

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {args.model} ...", flush=True)
    with quiet_transformers():
        base = load_causal_lm(args.model, dtype="float32").to(device)
        tokenizer = load_tokenizer(args.model)
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    prompts = [chat_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(args.num_prompts)]
    answers = [chat_answer(ANSWERS[i % len(ANSWERS)]) for i in range(args.num_prompts)]

    def ensemble_of(k):
        torch.manual_seed(0)
        model = build_ensemble(copy.deepcopy(base), config, k, seed=0, init_std=0.01).eval()
        return RenyiEnsemble(model, tokenizer, alpha=0.0)

    single, ensemble = ensemble_of(1), ensemble_of(args.num_members)
    peft_single: PeftModel = single.model
    gen_prompts = prompts[: args.batch_size]
    rendered = tokenizer.apply_chat_template(gen_prompts, add_generation_prompt=True, tokenize=False)
    tokenizer.padding_side = "left"
    peft_inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def peft_generate():
        with router_disabled(peft_single), torch.no_grad():
            peft_single.generate(
                **peft_inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    cases = {
        "score_single": (
            f"score {args.num_prompts} answers, 1 LoRA",
            lambda: single.score(prompts, answers, batch_size=args.batch_size, show_progress=False),
            args.num_prompts,
        ),
        "score_ensemble": (
            f"score {args.num_prompts} answers, K={args.num_members} member-batched + uncertainty",
            lambda: ensemble.score(prompts, answers, batch_size=args.batch_size, show_progress=False),
            args.num_prompts,
        ),
        "generate_peft": (
            f"transformers generate, 1 LoRA, {len(gen_prompts)} prompts x {args.new_tokens} tokens",
            peft_generate,
            len(gen_prompts) * args.new_tokens,
        ),
        "generate_single": (
            f"RenyiEnsemble.generate, 1 member, {len(gen_prompts)} x {args.new_tokens} tokens (max)",
            lambda: single.generate(gen_prompts, strategy="member", member=0, max_new_tokens=args.new_tokens, batch_size=args.batch_size),
            len(gen_prompts) * args.new_tokens,
        ),
        "generate_mixture": (
            f"RenyiEnsemble.generate mixture, K={args.num_members}, {len(gen_prompts)} x {args.new_tokens} tokens (max)",
            lambda: ensemble.generate(gen_prompts, strategy="mixture", max_new_tokens=args.new_tokens, batch_size=args.batch_size),
            len(gen_prompts) * args.new_tokens,
        ),
    }
    results = {}
    for index, (name, (description, fn, units)) in enumerate(cases.items(), start=1):
        print(f"[{index}/{len(cases)}] {name} ...", flush=True)
        with quiet_transformers(), PeakMemory(device) as memory:
            median, times = timed(fn, args.repeats)
        results[name] = {
            "description": description,
            "median_s": median,
            "times_s": times,
            "items_per_s": units / median,
            "peak_memory_increase_mib": memory.increase / 2**20,
        }
        print(f"    median {median:.2f} s", flush=True)
    ratios = {
        "score_ensemble / score_single": results["score_ensemble"]["median_s"] / results["score_single"]["median_s"],
        "generate_mixture / generate_single": results["generate_mixture"]["median_s"] / results["generate_single"]["median_s"],
        "generate_single / generate_peft": results["generate_single"]["median_s"] / results["generate_peft"]["median_s"],
    }
    payload = {
        "settings": vars(args),
        "machine": machine_description(device),
        "command": "python benchmarks/bench_infer.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": results,
        "ratios": ratios,
    }
    write_json(args.output, payload)
    lines = [
        f"Model `{args.model}`, K = {args.num_members}, LoRA r = {args.lora_r}, batch {args.batch_size}, "
        f"{args.new_tokens} new tokens, greedy; median of {args.repeats} runs after a warm-up. "
        f"Machine: {payload['machine'].get('gpu') or str(payload['machine']['cpu_count']) + ' CPU cores'}.",
        f"Command: `{payload['command']}`",
        "",
        "| case | what | median (s) | items/s | peak memory increase (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(
            f"| `{name}` | {row['description']} | {row['median_s']:.2f} | {row['items_per_s']:.1f} | "
            f"{row['peak_memory_increase_mib']:.0f} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    if args.docs:
        replace_section(Path(args.docs), "bench-infer", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
