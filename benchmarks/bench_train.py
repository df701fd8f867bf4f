"""Training-step benchmark: one LoRA vs K LoRAs in a loop vs the member-batched α-Rényi ensemble.

Measures, in ONE process and run, the median optimizer-step time after warm-up, tokens/s and peak memory of

    sft_single             TRL SFTTrainer with one LoRA (plain text: every token in the loss; TRL's default
                           checkpointing on)
    sft_single_nogc        the same without gradient checkpointing
    sft_sequential         K LoRA adapters, one forward + backward each per step (plain PEFT, no checkpointing)
    sft_sequential_gc      the same with gradient checkpointing
    renyi_sft              RenyiSFTTrainer, K members in one member-batched pass (TRL's default checkpointing on)
    renyi_sft_nogc         the same without gradient checkpointing (like the sequential baseline)
    sft_sequential_pc(_gc) the sequential loop on prompt-completion rows (first half of each row unscored)
    renyi_sft_pc(_nogc)    RenyiSFTTrainer on the same prompt-completion rows
    renyi_sft_top          RenyiSFTTrainer with adapters on the top half of the layers, shared trunk off
    renyi_sft_trunk        the same with the shared trunk (bottom half run once on the untiled batch)
    renyi_sft_chunk1       RenyiSFTTrainer with member_chunk_size=1 (activation memory of one member)
    dpo_single             TRL DPOTrainer with one LoRA
    renyi_dpo              RenyiDPOTrainer, K members, one shared reference pass
    renyi_dpo_hh           RenyiDPOTrainer on hh-rlhf pairs (long multi-turn prompts), one prompt pass per pair
    renyi_dpo_hh_unshared  the same with share_prompt=False (chosen and rejected each run their prompt)
    renyi_sft_1c           RenyiSFTTrainer, rows of one prompt with one completion
    renyi_sft_5c           the same prompts with five completions each (multi-annotator rows, one prompt pass)
    renyi_sft_5c_unshared  the five-completion rows with share_prompt=False

and writes a JSON file plus the table in docs/benchmarks.md. Timings share one process; the peak memory of the
configurations named by ``--memory-configs`` is measured in a fresh child process each (its peak RSS on CPU), since
a process's RSS never shrinks back after earlier configurations.

Usage:

    python benchmarks/bench_train.py                        # SmolLM2-135M-Instruct (embedded), K=4, 4 x 128
    python benchmarks/bench_train.py --num-members 8 --batch-size 2 --seq-len 256 --repeats 5
    python benchmarks/bench_train.py --model Qwen/Qwen2.5-0.5B --configs sft_single,renyi_sft
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    REPO,
    PeakMemory,
    StepTimer,
    machine_description,
    median_after_warmup,
    quiet_transformers,
    replace_section,
    write_json,
)

ALL_CONFIGS = [
    "sft_single",
    "sft_single_nogc",
    "sft_sequential",
    "sft_sequential_gc",
    "renyi_sft",
    "renyi_sft_nogc",
    "sft_sequential_pc",
    "sft_sequential_pc_gc",
    "renyi_sft_pc",
    "renyi_sft_pc_nogc",
    "renyi_sft_top",
    "renyi_sft_trunk",
    "renyi_sft_chunk1",
    "dpo_single",
    "renyi_dpo",
    "renyi_dpo_hh",
    "renyi_dpo_hh_unshared",
    "renyi_sft_1c",
    "renyi_sft_5c",
    "renyi_sft_5c_unshared",
]
HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias, local path or Hub id")
    parser.add_argument("--num-members", type=int, default=4, help="K")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (per device)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-targets", default="all-linear", help="'all-linear' or comma-separated module names")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS), help="comma-separated subset of " + ",".join(ALL_CONFIGS))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_train.json"))
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file whose table is updated ('' to skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-configs",
        default="sft_single,renyi_sft,renyi_sft_chunk1",
        help="configurations whose peak memory is measured in a fresh process each ('' to skip)",
    )
    parser.add_argument("--hh-data", default=str(HH_DATA), help="hh-rlhf pairs for renyi_dpo_hh* (skipped without)")
    parser.add_argument("--hh-max-length", type=int, default=256, help="tokens per hh-rlhf prompt + completion")
    parser.add_argument("--hh-min-prompt", type=int, default=96, help="shortest hh-rlhf prompt used (tokens)")
    parser.add_argument("--hh-batch-size", type=int, default=2, help="hh-rlhf pairs per step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def lora_config(args, top_half_of: int | None = None):
    from peft import LoraConfig

    targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    kwargs = dict(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM")
    if top_half_of is not None:
        kwargs["target_modules"] = LINEAR_TARGETS if targets == "all-linear" else targets
        kwargs["layers_to_transform"] = list(range(top_half_of // 2, top_half_of))
    else:
        kwargs["target_modules"] = targets
    return LoraConfig(**kwargs)


def sft_dataset(tokenizer, args, count, prompt_fraction: float = 0.0):
    """Pre-tokenised rows of ``seq_len`` random tokens; the first ``prompt_fraction`` of each is unscored (label -100)."""
    from datasets import Dataset

    rng = random.Random(args.seed)
    low = max(tokenizer.all_special_ids or [0]) + 1
    rows = [[rng.randrange(low, len(tokenizer)) for _ in range(args.seq_len)] for _ in range(count)]
    if not prompt_fraction:
        return Dataset.from_dict({"input_ids": rows})
    cut = int(args.seq_len * prompt_fraction)
    return Dataset.from_dict({"input_ids": rows, "labels": [[-100] * cut + row[cut:] for row in rows]})


def multi_completion_dataset(args, count, completions: int):
    """Multi-annotator rows: a prompt of about ``seq_len`` words and ``completions`` different 8-word answers."""
    from datasets import Dataset

    rng = random.Random(args.seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    prompts = [text(max(4, args.seq_len - 10)) for _ in range(count)]
    answers = [[" " + text(8) for _ in range(5)] for _ in range(count)]
    return Dataset.from_dict({"prompt": prompts, "completions": [a[:completions] for a in answers]})


def hh_dataset(args, tokenizer, count):
    """``count`` hh-rlhf pairs whose prompt has between ``--hh-min-prompt`` and ``--hh-max-length`` − 32 tokens,
    or ``None`` when the file is absent."""
    from datasets import Dataset
    from dpo_hh_rlhf import load_pairs

    path = Path(args.hh_data)
    if not path.is_file():
        return None
    pairs = load_pairs(path, tokenizer, args.hh_max_length - 32)
    long_enough = []
    for pair in pairs:
        text = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= args.hh_min_prompt:
            long_enough.append(pair)
        if len(long_enough) == count:
            break
    return Dataset.from_list(long_enough)


WORDS = (
    "the a of and to in is that it for on with as was at by be this from or have an they which one you were her all "
    "she there would their we him been has when who will more no if out so said what up its about into than them can "
    "only other new some could time these two may then do first any my now such like our over man me even most made"
).split()


def dpo_dataset(args, count):
    from datasets import Dataset

    rng = random.Random(args.seed)
    half = max(2, args.seq_len // 2)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return Dataset.from_dict(
        {
            "prompt": [text(half) for _ in range(count)],
            "chosen": [" " + text(half) for _ in range(count)],
            "rejected": [" " + text(half) for _ in range(count)],
        }
    )


def common_training_args(args, output_dir, device):
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.repeats,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        bf16=False,
        use_cpu=device.type == "cpu",
        seed=args.seed,
        max_length=args.seq_len,
        dataloader_num_workers=0,
    )


def run_trainer(name, build, device, args):
    timer = StepTimer()
    trainer = build()
    trainer.add_callback(timer)
    with PeakMemory(device) as memory:
        trainer.train()
    del trainer
    gc.collect()
    return timer.times, memory


def run_sequential(base, tokenizer, dataset, args, device, checkpointing=False):
    """K LoRA adapters trained the usual way: one forward and backward per adapter per optimizer step."""
    from peft import get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    names = [f"member_{k}" for k in range(args.num_members)]
    model = get_peft_model(copy.deepcopy(base), lora_config(args), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora_config(args))
    model.set_requires_grad(names, requires_grad=True)
    if checkpointing:  # as TRL's default turns it on (non-reentrant, so the frozen inputs need no grad)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    rows = list(dataset)
    times = []
    with PeakMemory(device) as memory:
        for step in range(args.warmup + args.repeats):
            batch = collator(rows[step * args.batch_size : (step + 1) * args.batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for name in names:
                model.set_adapter(name)
                model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    del model, optimizer
    gc.collect()
    return times, memory


def main(argv=None):
    args = parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {ALL_CONFIGS}")
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.model.loading import load_causal_lm, load_tokenizer
    from trl_renyi.training.config import RenyiDPOConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    print(f"loading {args.model} ...", flush=True)
    with quiet_transformers():
        base = load_causal_lm(args.model, dtype="float32").to(device)
        tokenizer = load_tokenizer(args.model)
    num_layers = base.config.get_text_config().num_hidden_layers
    steps = args.warmup + args.repeats
    sft_data = sft_dataset(tokenizer, args, steps * args.batch_size)
    pc_data = sft_dataset(tokenizer, args, steps * args.batch_size, prompt_fraction=0.5)
    dpo_data = dpo_dataset(args, steps * args.batch_size)
    hh_data = hh_dataset(args, tokenizer, steps * args.hh_batch_size) if any("hh" in c for c in configs) else None
    workdir = tempfile.mkdtemp(prefix="bench_train_")
    k = args.num_members

    def sft_single(**extra):
        def build():
            return SFTTrainer(
                model=copy.deepcopy(base),
                args=SFTConfig(**common_training_args(args, workdir, device), **extra),
                train_dataset=sft_data,
                processing_class=tokenizer,
                peft_config=lora_config(args),
            )

        return build

    def renyi_sft(top_half=False, data=None, **extra):
        def build():
            settings = {**common_training_args(args, workdir, device), **extra}
            return RenyiSFTTrainer(
                model=copy.deepcopy(base),
                args=RenyiSFTConfig(**settings, num_members=k, member_init_std=1e-3),
                train_dataset=sft_data if data is None else data(),
                processing_class=tokenizer,
                peft_config=lora_config(args, num_layers if top_half else None),
            )

        return build

    def dpo_single():
        return DPOTrainer(
            model=copy.deepcopy(base),
            args=DPOConfig(**common_training_args(args, workdir, device)),
            train_dataset=dpo_data,
            processing_class=tokenizer,
            peft_config=lora_config(args),
        )

    def renyi_dpo(data=None, **extra):
        def build():
            from trl_renyi.training.dpo import RenyiDPOTrainer

            settings = common_training_args(args, workdir, device)
            if data is not None:
                if hh_data is None:
                    raise FileNotFoundError(f"no hh-rlhf pairs ({args.hh_data})")
                settings.update(max_length=args.hh_max_length, per_device_train_batch_size=args.hh_batch_size)
            return RenyiDPOTrainer(
                model=copy.deepcopy(base),
                args=RenyiDPOConfig(**settings, num_members=k, member_init_std=1e-3, **extra),
                train_dataset=dpo_data if data is None else data,
                processing_class=tokenizer,
                peft_config=lora_config(args),
            )

        return build

    def rows(completions):
        return lambda: multi_completion_dataset(args, steps * args.batch_size, completions)

    builders = {
        "sft_single": ("TRL SFTTrainer, one LoRA", sft_single()),
        "sft_single_nogc": ("TRL SFTTrainer, one LoRA, no checkpointing", sft_single(gradient_checkpointing=False)),
        "renyi_sft": (f"RenyiSFTTrainer, K={k}, member-batched", renyi_sft()),
        "renyi_sft_nogc": (f"RenyiSFTTrainer, K={k}, member-batched, no checkpointing", renyi_sft(gradient_checkpointing=False)),
        "renyi_sft_top": (f"RenyiSFTTrainer, K={k}, LoRA on the top half, trunk off", renyi_sft(True, shared_trunk=False)),
        "renyi_sft_trunk": (f"RenyiSFTTrainer, K={k}, LoRA on the top half, shared trunk", renyi_sft(True)),
        "renyi_sft_chunk1": (f"RenyiSFTTrainer, K={k}, member_chunk_size=1", renyi_sft(member_chunk_size=1)),
        "renyi_sft_pc": (f"RenyiSFTTrainer, K={k}, prompt-completion rows", renyi_sft(data=lambda: pc_data)),
        "renyi_sft_pc_nogc": (
            f"RenyiSFTTrainer, K={k}, prompt-completion rows, no checkpointing",
            renyi_sft(data=lambda: pc_data, gradient_checkpointing=False),
        ),
        "dpo_single": ("TRL DPOTrainer, one LoRA", dpo_single),
        "renyi_dpo": (f"RenyiDPOTrainer, K={k}, one reference pass", renyi_dpo()),
        "renyi_dpo_hh": (f"RenyiDPOTrainer, K={k}, hh-rlhf pairs, one prompt pass per pair", renyi_dpo(hh_data)),
        "renyi_dpo_hh_unshared": (
            f"RenyiDPOTrainer, K={k}, hh-rlhf pairs, share_prompt=False", renyi_dpo(hh_data, share_prompt=False)
        ),
        "renyi_sft_1c": (f"RenyiSFTTrainer, K={k}, one completion per prompt", renyi_sft(data=rows(1))),
        "renyi_sft_5c": (f"RenyiSFTTrainer, K={k}, five completions per prompt (shared)", renyi_sft(data=rows(5))),
        "renyi_sft_5c_unshared": (
            f"RenyiSFTTrainer, K={k}, five completions per prompt, share_prompt=False",
            # unshared, a batch counts completions: five per prompt, so that a step holds the same prompts
            renyi_sft(data=rows(5), share_prompt=False, per_device_train_batch_size=5 * args.batch_size),
        ),
    }
    sequential = {
        "sft_sequential": (sft_data, False, "plain text"),
        "sft_sequential_gc": (sft_data, True, "plain text, checkpointing"),
        "sft_sequential_pc": (pc_data, False, "prompt-completion rows"),
        "sft_sequential_pc_gc": (pc_data, True, "prompt-completion rows, checkpointing"),
    }
    results = {}
    for index, name in enumerate(configs, start=1):
        print(f"[{index}/{len(configs)}] {name}: {steps} steps ({args.warmup} warm-up) ...", flush=True)
        try:
            with quiet_transformers():
                if name in sequential:
                    data, checkpointing, what = sequential[name]
                    description = f"{k} LoRAs in a loop, one fwd+bwd each (PEFT), {what}"
                    times, memory = run_sequential(base, tokenizer, data, args, device, checkpointing)
                else:
                    description, build = builders[name]
                    times, memory = run_trainer(name, build, device, args)
        except (ImportError, FileNotFoundError) as err:
            print(f"    skipped: {err}", flush=True)
            continue
        step = median_after_warmup(times, args.warmup)
        tokens = args.batch_size * args.seq_len * (2 if "dpo" in name else 1)
        if "hh" in name:
            tokens = args.hh_batch_size * args.hh_max_length * 2  # an upper bound: pairs are up to max_length long
        results[name] = {
            "description": description,
            "step_times_s": times,
            "median_step_s": step,
            "tokens_per_s": tokens / step,
            "peak_memory_mib": memory.peak / 2**20,
            "peak_memory_increase_mib": memory.increase / 2**20,
        }
        print(
            f"    median step {step:.2f} s, {tokens / step:.0f} tokens/s, peak +{memory.increase / 2**20:.0f} MiB",
            flush=True,
        )

    if args.child:
        write_json(args.output, {"results": results})
        return 0
    memory_configs = [c for c in args.memory_configs.split(",") if c.strip() in results]
    if memory_configs and device.type == "cpu":
        for index, name in enumerate(memory_configs, start=1):
            print(f"[memory {index}/{len(memory_configs)}] {name} in a fresh process ...", flush=True)
            results[name]["fresh_process"] = fresh_process_memory(args, name)
            print(f"    {results[name]['fresh_process']}", flush=True)
    ratios = compute_ratios(results, k)
    payload = {
        "settings": vars(args),
        "machine": machine_description(device),
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": results,
        "ratios": ratios,
    }
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio['value']:.3f} (target {ratio['target']}) {'met' if ratio['met'] else 'MISSED'}")
    if args.docs:
        replace_section(Path(args.docs), "bench-train", render_table(payload))
        print(f"updated {args.docs}")
    return 0


def fresh_process_memory(args, name: str) -> dict:
    """Memory of ``name`` run alone in a child process: its peak RSS over the whole process (model loading
    included) and the peak increase during training over the RSS it had once the model was loaded."""
    import json
    import os
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        output = handle.name
    command = [
        sys.executable, __file__, "--child", "--configs", name, "--docs", "", "--memory-configs", "",
        "--output", output, "--model", args.model, "--num-members", str(args.num_members),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lora-r", str(args.lora_r),
        "--lora-targets", args.lora_targets, "--repeats", "1", "--warmup", "1", "--seed", str(args.seed),
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"memory run of {name} failed (status {status}): {' '.join(command)}")
    row = json.loads(Path(output).read_text())["results"][name]
    os.unlink(output)
    return {
        "process_peak_rss_mib": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "training_peak_increase_mib": row["peak_memory_increase_mib"],
    }


def compute_ratios(results, k):
    def get(name, key="median_step_s"):
        row = results.get(name, {})
        return row.get("fresh_process", {}).get(key) if key in ("training_peak_increase_mib",) else row.get(key)

    ratios = {}

    def add(label, numerator, denominator, target, comparison):
        if numerator is None or denominator is None:
            return
        value = numerator / denominator
        ratios[label] = {"value": value, "target": target, "met": comparison(value)}

    at_most = {1.0: lambda v: v <= 1.0, 1.5: lambda v: v <= 1.5, 0.7: lambda v: v <= 0.7}
    add(f"renyi_sft / ({k} x sft_single)", get("renyi_sft"), None if get("sft_single") is None else k * get("sft_single"), "<= 1.0", at_most[1.0])
    add(f"renyi_sft_nogc / ({k} x sft_single_nogc) (both without checkpointing)", get("renyi_sft_nogc"), None if get("sft_single_nogc") is None else k * get("sft_single_nogc"), "<= 1.0", at_most[1.0])
    add("renyi_sft / sft_sequential_gc (both checkpointing)", get("renyi_sft"), get("sft_sequential_gc"), "<= 1.0", at_most[1.0])
    add("renyi_sft_nogc / sft_sequential (both without checkpointing)", get("renyi_sft_nogc"), get("sft_sequential"), "<= 1.0", at_most[1.0])
    add("renyi_sft_pc / sft_sequential_pc_gc (prompt-completion, checkpointing)", get("renyi_sft_pc"), get("sft_sequential_pc_gc"), "<= 1.0", at_most[1.0])
    add("renyi_sft_pc_nogc / sft_sequential_pc (prompt-completion, no checkpointing)", get("renyi_sft_pc_nogc"), get("sft_sequential_pc"), "<= 1.0", at_most[1.0])
    add("renyi_dpo_hh / renyi_dpo_hh_unshared (one prompt pass per pair)", get("renyi_dpo_hh"), get("renyi_dpo_hh_unshared"), "<= 0.7", at_most[0.7])
    add("renyi_sft_5c / renyi_sft_1c (five completions, shared prompt)", get("renyi_sft_5c"), get("renyi_sft_1c"), "<= 1.5", at_most[1.5])
    add("renyi_sft_5c_unshared / renyi_sft_1c (five completions, unshared)", get("renyi_sft_5c_unshared"), get("renyi_sft_1c"), "(reference)", lambda v: True)
    add("renyi_dpo / dpo_single", get("renyi_dpo"), get("dpo_single"), "<= 3.4", lambda v: v <= 3.4)
    add("renyi_sft_trunk / renyi_sft", get("renyi_sft_trunk"), get("renyi_sft"), "<= 0.65", lambda v: v <= 0.65)
    add("renyi_sft_trunk / renyi_sft_top", get("renyi_sft_trunk"), get("renyi_sft_top"), "(trunk effect alone)", lambda v: v < 1)
    add(
        "renyi_sft_chunk1 / sft_single, training peak memory (fresh processes)",
        get("renyi_sft_chunk1", "training_peak_increase_mib"),
        get("sft_single", "training_peak_increase_mib"),
        "<= 1.5",
        lambda v: v <= 1.5,
    )
    add(
        "renyi_sft / sft_single, training peak memory (fresh processes)",
        get("renyi_sft", "training_peak_increase_mib"),
        get("sft_single", "training_peak_increase_mib"),
        "(reference: all K members in one pass)",
        lambda v: True,
    )
    return ratios


def render_table(payload) -> str:
    machine = payload["machine"]
    settings = payload["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    where = machine.get("gpu") or f"CPU, {machine['cpu_count']} cores, {machine['torch_threads']} torch threads"
    lines = [
        f"Model `{settings['model']}`, K = {settings['num_members']}, batch {settings['batch_size']} x "
        f"{settings['seq_len']} tokens, LoRA r = {settings['lora_r']} on `{settings['lora_targets']}`, float32; "
        f"median of {settings['repeats']} steps after {settings['warmup']} warm-up.",
        f"Machine: {where} ({machine['platform']}); {versions}.",
        f"Command: `{payload['command']}`",
        "",
        "| configuration | what | median step (s) | tokens/s | training peak memory, fresh process (MiB) "
        "| process peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in payload["results"].items():
        fresh = row.get("fresh_process", {})
        train_peak, process_peak = fresh.get("training_peak_increase_mib"), fresh.get("process_peak_rss_mib")
        lines.append(
            f"| `{name}` | {row['description']} | {row['median_step_s']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{'–' if train_peak is None else f'{train_peak:.0f}'} | {'–' if process_peak is None else f'{process_peak:.0f}'} |"
        )
    lines += ["", "| ratio | value | target | |", "|---|---|---|---|"]
    for label, ratio in payload["ratios"].items():
        lines.append(f"| {label} | {ratio['value']:.3f} | {ratio['target']} | {'met' if ratio['met'] else 'missed'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
