"""Training-step benchmark: one LoRA vs K LoRAs in a loop vs the member-batched α-Rényi ensemble.

Measures, in ONE process and run, the median optimizer-step time after warm-up, tokens/s and peak memory of

    sft_single             TRL SFTTrainer with one LoRA (plain text: every token in the loss; TRL's default
                           checkpointing on)
    sft_single_nogc        the same without gradient checkpointing
    sft_sequential         K LoRA adapters in TRL's SFTTrainer, one forward + backward each per step (set_adapter),
                           one optimizer step over all K; no checkpointing
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

and writes a JSON file plus the table in docs/benchmarks.md.

Every configuration is measured the same way: its own fresh child process (the model loaded there, no earlier
configuration's heap, threads or caches), the same training arguments (``common_training_args``), the same rows for
the same configuration family, the same ``--warmup`` untimed optimizer steps and the median of ``--repeats`` timed
ones, each timed by the same Trainer callback around the whole optimizer step. The references are trainers too: one
TRL ``SFTTrainer`` step, and the sequential loop as an ``SFTTrainer`` that runs one forward + backward per adapter
(TRL's own loss and LM head, its optimizer, clipping and scheduler), so that a ratio compares the ensemble and
nothing else. The child's peak RSS (on CPU) is its memory.

Usage:

    python benchmarks/bench_train.py                        # SmolLM2-135M-Instruct (embedded), K=4, 4 x 128
    python benchmarks/bench_train.py --num-members 8 --batch-size 2 --seq-len 256 --repeats 5
    python benchmarks/bench_train.py --model Qwen/Qwen2.5-0.5B --configs sft_single,renyi_sft
    python benchmarks/bench_train.py --quick                # tiny offline model, three configurations: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import sys
import tempfile
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
    parser.add_argument("--quick", action="store_true", help="tiny offline model, sft_single / sft_sequential / renyi_sft")
    parser.add_argument("--hh-data", default=str(HH_DATA), help="hh-rlhf pairs for renyi_dpo_hh* (skipped without)")
    parser.add_argument("--hh-max-length", type=int, default=256, help="tokens per hh-rlhf prompt + completion")
    parser.add_argument("--hh-min-prompt", type=int, default=96, help="shortest hh-rlhf prompt used (tokens)")
    parser.add_argument("--hh-batch-size", type=int, default=2, help="hh-rlhf pairs per step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_members, args.batch_size, args.seq_len, args.repeats, args.warmup = 2, 2, 16, 1, 1
        if args.configs == ",".join(ALL_CONFIGS):
            args.configs = "sft_single,sft_sequential,renyi_sft"
        if args.docs == str(REPO / "docs" / "benchmarks.md"):
            args.docs = ""
    return args


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


def sequential_trainer_class():
    """TRL's ``SFTTrainer`` training ``num_adapters`` LoRA adapters the usual way: per optimizer step, one forward and
    backward per adapter (``set_adapter``, TRL's own loss and fused LM head), then one optimizer step over all of them
    (the optimizer, clipping and scheduler are the Trainer's, as for every other configuration)."""
    from trl import SFTTrainer

    class SequentialLoRATrainer(SFTTrainer):
        def __init__(self, *args, num_adapters: int, peft_config, **kwargs):
            super().__init__(*args, peft_config=peft_config, **kwargs)
            self.adapter_names = ["default"] + [f"adapter_{k}" for k in range(1, num_adapters)]
            for name in self.adapter_names[1:]:
                self.model.add_adapter(name, copy.deepcopy(peft_config))
            self.model.set_requires_grad(self.adapter_names, requires_grad=True)  # before train() builds the optimizer

        def training_step(self, model, inputs, num_items_in_batch=None):
            peft_model = self.accelerator.unwrap_model(model)
            total = 0.0
            for name in self.adapter_names:
                peft_model.set_adapter(name)  # freezes the others: the backward reaches this adapter only
                total = total + super().training_step(model, inputs, num_items_in_batch)
            peft_model.set_requires_grad(self.adapter_names, requires_grad=True)
            return total / len(self.adapter_names)

    return SequentialLoRATrainer


def main(argv=None):
    args = parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {ALL_CONFIGS}")
    if not args.child:
        return measure_in_fresh_processes(args, configs, argv)
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

    def sft_sequential(data, **extra):
        def build():
            return sequential_trainer_class()(
                model=copy.deepcopy(base),
                args=SFTConfig(**common_training_args(args, workdir, device), **extra),
                train_dataset=data,
                processing_class=tokenizer,
                peft_config=lora_config(args),
                num_adapters=k,
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
    loop = f"{k} LoRAs in a loop in SFTTrainer, one fwd+bwd each"
    builders.update({
        "sft_sequential": (f"{loop}, plain text", sft_sequential(sft_data, gradient_checkpointing=False)),
        "sft_sequential_gc": (f"{loop}, plain text, checkpointing", sft_sequential(sft_data)),
        "sft_sequential_pc": (f"{loop}, prompt-completion rows", sft_sequential(pc_data, gradient_checkpointing=False)),
        "sft_sequential_pc_gc": (f"{loop}, prompt-completion rows, checkpointing", sft_sequential(pc_data)),
    })  # fmt: skip
    results = {}
    for index, name in enumerate(configs, start=1):
        print(f"[{index}/{len(configs)}] {name}: {steps} steps ({args.warmup} warm-up) ...", flush=True)
        try:
            with quiet_transformers():
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

    write_json(args.output, {"results": results, "machine": machine_description(device)})
    return 0


def measure_in_fresh_processes(args, configs, argv) -> int:
    """Run every configuration in its own child process (``--child``), then write the JSON, the ratios and the table.

    The child's peak RSS over its whole life (model loading included) is recorded beside the peak increase during
    training over the RSS it had once the model was loaded (CPU)."""
    import json
    import os
    import subprocess

    if args.quick:
        from trl_renyi.testing import tiny_llama, tiny_tokenizer

        folder = tempfile.mkdtemp(prefix="bench_train_tiny_")
        tokenizer = tiny_tokenizer()
        tiny_llama(tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = folder
    else:
        model = args.model
    results, machine = {}, None
    for index, name in enumerate(configs, start=1):
        print(f"[{index}/{len(configs)}] {name} in a fresh process ...", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            output = handle.name
        command = [
            sys.executable, __file__, "--child", "--configs", name, "--docs", "", "--output", output, "--model", model,
            "--num-members", str(args.num_members), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--lora-r", str(args.lora_r), "--lora-targets", args.lora_targets, "--repeats", str(args.repeats),
            "--warmup", str(args.warmup), "--seed", str(args.seed), "--hh-data", args.hh_data,
            "--hh-max-length", str(args.hh_max_length), "--hh-min-prompt", str(args.hh_min_prompt),
            "--hh-batch-size", str(args.hh_batch_size),
        ]  # fmt: skip
        child = subprocess.Popen(command)
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            raise RuntimeError(f"{name} failed (status {status}): {' '.join(command)}")
        payload = json.loads(Path(output).read_text())
        os.unlink(output)
        machine = payload["machine"]
        if name not in payload["results"]:  # skipped in the child (missing data)
            continue
        row = payload["results"][name]
        row["fresh_process"] = {
            "process_peak_rss_mib": usage.ru_maxrss / 1024,  # kilobytes on Linux
            "training_peak_increase_mib": row["peak_memory_increase_mib"],
        }
        results[name] = row
    ratios = compute_ratios(results, args.num_members)
    settings = dict(vars(args), model="tiny (offline test model)" if args.quick else args.model)
    payload = {
        "settings": settings,
        "machine": machine,
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
    at_most_k = lambda v: v <= k  # noqa: E731 - the FLOP limit: K members cost at most K single steps
    add(f"renyi_sft / sft_single (K = {k} over one SFTTrainer step, checkpointing)", get("renyi_sft"), get("sft_single"), f"<= {k}.0", at_most_k)
    add(f"renyi_sft_nogc / sft_single_nogc (K = {k} over one SFTTrainer step, no checkpointing)", get("renyi_sft_nogc"), get("sft_single_nogc"), f"<= {k}.0", at_most_k)
    add(f"sft_sequential / sft_single_nogc (the loop's own overhead over {k} steps)", get("sft_sequential"), get("sft_single_nogc"), f"(reference, {k}.0 = no overhead)", lambda v: True)
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
