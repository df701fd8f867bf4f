"""Shared plumbing of the efficacy studies: model loading, training runs, plots and the results page."""

from __future__ import annotations

import copy
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_utils import replace_section  # noqa: E402

from trl_renyi import RenyiEnsemble  # noqa: E402
from trl_renyi.data.conflict import DEMO_FAMILIES  # noqa: E402
from trl_renyi.model.layer import member_names
from trl_renyi.model.members import build_ensemble  # noqa: E402

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
# The demo's families: greetings and farewells are contradictory; opposites and capitals are consistent and known to
# the base model, so disagreement on them can only come from a member abandoning them (not from ignorance, as on
# arithmetic, where a 135M model's members also disagree on unseen sums).
STUDY_FAMILIES = DEMO_FAMILIES


def load_base(quick: bool, model: str):
    """``(base model, tokenizer)``: the tiny offline Llama for ``quick`` runs, else ``model`` through the resolver."""
    if quick:
        from trl_renyi.testing import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer, init_std=0.5), tokenizer
    from trl_renyi.model.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(model, dtype="float32"), load_tokenizer(model)


def library_defaults() -> dict:
    """A run with the library's default ensemble settings (``RenyiEnsembleArguments``)."""
    from dataclasses import fields

    from trl_renyi.training.config import RenyiEnsembleArguments

    d = {f.name: f.default for f in fields(RenyiEnsembleArguments)}
    label = f"defaults (α = {d['alpha']:g}, warm-up {d['alpha_warmup_ratio']:g}, floor {d['responsibility_floor']:g})"
    return {
        "label": label,
        "alpha": d["alpha"],
        "warmup": d["alpha_warmup_ratio"],
        "floor": d["responsibility_floor"],
        "init_std": d["member_init_std"],
    }


#: the settings every real-data study compares (the library's defaults are added by each study)
STUDY_SETTINGS = {
    "base": {"label": "base model (zero-shot)"},
    "single": {"label": "single LoRA (K = 1)", "num_members": 1, "alpha": 1.0},
    "independent": {"label": "independent LoRAs (deep ensemble)", "num_members": 1, "alpha": 1.0},
    "alpha1": {"label": "ensemble α = 1", "alpha": 1.0},
    "alpha0": {"label": "ensemble α = 0", "alpha": 0.0},
}


def train_setting(trainer_cls, config_cls, base, tokenizer, dataset, budget: dict, run: dict, *, independent: bool,
                  num_members: int, seed: int, lora_r: int) -> RenyiEnsemble:
    """One study setting: ``run`` trained as one ensemble, or (``independent``) ``num_members`` single LoRAs with
    seeds ``seed, seed + 1, …`` mixed uniformly (a deep ensemble). Plain-text prompts, as the studies train them."""
    if independent:
        singles = [
            train_ensemble(trainer_cls, config_cls, base, tokenizer, dataset, budget, {**run, "seed": seed + k})
            for k in range(num_members)
        ]
        model = combine_independent(singles, base, tokenizer, lora_r)
        del singles
    else:
        model = train_ensemble(trainer_cls, config_cls, base, tokenizer, dataset, budget, run)
    model.use_chat_template = False
    return model


def metrics_table(settings: dict, columns) -> str:
    """A markdown table of ``settings`` (name → metrics) with the ``(key, title)`` columns any setting has."""
    columns = [(key, title) for key, title in columns if any(key in m for m in settings.values())]
    lines = ["| setting | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in settings.items():
        cells = [fmt(metrics.get(key), 0 if key == "seconds" else 3) for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def native_bf16() -> bool:
    """Whether this machine multiplies bfloat16 natively: a CUDA device that supports it, or a CPU with AVX512-BF16
    or AMX-BF16 (where oneDNN's bf16 matmuls beat float32 ones). oneDNN *accepts* bfloat16 on any AVX512 CPU
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is true there) but emulates it: on an AVX512F-only CPU a
    bfloat16 matmul measured five times slower than float32, so the instruction set is read, not that flag."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: float32 is then the safe choice)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def resolve_precision(precision: str) -> bool:
    """``--precision`` of a study as TRL's ``bf16`` flag: ``"auto"`` is bf16 mixed precision where it is native."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return native_bf16() if precision == "auto" else precision == "bf16"


def training_arguments(
    output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int, max_length: int | None, bf16: bool = False
):
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        disable_tqdm=steps < 20,
        bf16=bf16,  # mixed precision: float32 master weights, bfloat16 matmuls under autocast
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        max_length=max_length,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )


def train_ensemble(trainer_cls, config_cls, base, tokenizer, dataset, settings: dict, run: dict) -> RenyiEnsemble:
    """Train one ensemble on a copy of ``base`` and return it as a :class:`RenyiEnsemble`."""
    args = config_cls(
        **training_arguments(
            tempfile.mkdtemp(prefix="efficacy_"),
            settings["steps"],
            settings["batch_size"],
            settings["learning_rate"],
            run.get("seed", settings["seed"]),
            settings["max_length"],
            settings.get("bf16", False),
        ),
        num_members=run["num_members"],
        alpha=run["alpha"],
        alpha_warmup_ratio=run.get("warmup", 0.0),
        member_init_std=run.get("init_std", settings["member_init_std"]),
        responsibility_floor=run.get("floor", 0.0),
        **{**settings.get("extra_config", {}), **run.get("config", {})},
    )
    trainer = trainer_cls(
        model=copy.deepcopy(base),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings["lora_r"]),
    )
    trainer.train()
    ensemble = trainer.ensemble
    ensemble.model.eval()
    del trainer
    gc.collect()
    return ensemble


def combine_independent(ensembles: list[RenyiEnsemble], base, tokenizer, rank: int) -> RenyiEnsemble:
    """Put K separately trained single-LoRA runs into one K-member ensemble (uniform weights, scored at α = 1)."""
    model = build_ensemble(copy.deepcopy(base), lora_config(rank), len(ensembles))
    for name, single in zip(member_names(len(ensembles)), ensembles, strict=True):
        state = get_peft_model_state_dict(single.model, adapter_name="member_0")
        set_peft_model_state_dict(model, state, adapter_name=name)
    model.eval()
    return RenyiEnsemble(model, tokenizer, alpha=1.0)


def study_parser(doc: str, runs: dict, learning_rate: float):
    """The command-line arguments every study shares (sizes, model, output)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny offline model and data: a smoke test in seconds")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias, local path or Hub id")
    parser.add_argument("--runs", default=None, help="comma-separated subset of: " + ",".join(runs))
    parser.add_argument("--num-members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; quick 6)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--member-init-std", type=float, default=1e-3)
    parser.add_argument("--train-per-family", type=int, default=None, help="default 160 (quick 8)")
    parser.add_argument("--test-per-family", type=int, default=None, help="default 12 (quick 4)")
    parser.add_argument(
        "--families",
        default=",".join(STUDY_FAMILIES),
        help="comma-separated task families of the generated data (default: two contradictory families and two "
        "consistent ones the base model already knows, as in the demo)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default experiments/results (quick: a temp dir)")
    parser.add_argument("--docs", default=None, help="results page to update (default docs/results.md; quick: none)")
    return parser


def apply_size_defaults(args, prefix: str) -> tuple[Path, Path | None]:
    """Fill the size arguments left unset (``--quick``: a smoke test in seconds) and return
    ``(output folder, results page or None)``; quick runs write to a temporary folder and no page by default."""
    import tempfile

    args.steps = args.steps or (6 if args.quick else 60)
    if args.quick:
        args.batch_size = min(args.batch_size, 4)
    args.train_per_family = args.train_per_family or (8 if args.quick else 160)
    args.test_per_family = args.test_per_family or (4 if args.quick else 12)
    args.families = [name.strip() for name in args.families.split(",") if name.strip()]
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix=prefix) if args.quick else str(REPO / "experiments" / "results")
    docs = None if (args.quick and args.docs is None) else Path(args.docs or REPO / "docs" / "results.md")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, docs


#: arguments that say where results go, not what is measured: left out of the command a results page shows
OUTPUT_ARGUMENTS = ("--output_dir", "--docs")


def display_command(script: str, argv: list[str]) -> str:
    """``python experiments/SCRIPT ARGS`` as a results page shows it: without :data:`OUTPUT_ARGUMENTS` (and their
    values), so the line reads the same wherever the results were written."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in OUTPUT_ARGUMENTS:
            skip = "=" not in arg
            continue
        shown.append(arg)
    return " ".join([f"python experiments/{script}", *shown])


def save_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def update_results_page(marker: str, content: str, docs: Path | None) -> None:
    if docs is not None:
        replace_section(docs, marker, content)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self) -> str:
        return f"{self.seconds():.0f} s"
