r"""``trl-renyi demo``: train a small α-Rényi ensemble on conflicting data and show where its members disagree.

:func:`run_demo` wires the pieces: it generates SFT data from :mod:`trl_renyi.data` (two task families answered under
two incompatible conventions, two consistent ones), trains a K-member LoRA ensemble with
:class:`~trl_renyi.RenyiSFTTrainer` (α held at 1 during a warm-up so every member first learns what the data agrees
on, then a small α so members specialise on the contradictions), evaluates it per family on held-out prompts with
:mod:`trl_renyi.evaluation.families` (routing table, choice-level and per-token mutual information, ℓ spread, each
member's answers), and writes the ensemble (members, ``renyi_ensemble.json``, model card), a routing heatmap and an
uncertainty plot (:mod:`trl_renyi.evaluation.plots`) and ``results.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from transformers.trainer_callback import ProgressCallback

from trl_renyi.cli.parsing import RenyiParser
from trl_renyi.data import (
    DEFAULT_SYSTEM_PROMPT,
    DEMO_FAMILIES,
    FAMILIES,
    chat_prompt,
    conflict_sft_dataset,
)
from trl_renyi.data import held_out_items as make_held_out_items
from trl_renyi.evaluation.families import (
    SIGNALS,
    FamilyReport,
    evaluate_families,
    format_family_report,
    member_answers,
    uncertainty_gap,
    write_family_plots,
)
from trl_renyi.model.loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from trl_renyi.model.saved_format import ALPHA_METRIC, CARD_FILE
from trl_renyi.training.config import RenyiSFTConfig
from trl_renyi.training.sft import RenyiSFTTrainer

DATASET_NAME = "trl_renyi:conflict_sft_chat"
# two contradictory families and two consistent ones the base model already knows: a family it cannot learn from
# the data (e.g. two-digit arithmetic for a 135M model) also shows member disagreement, from ignorance, not conflict


@dataclass
class DemoConfig:
    """Settings of ``trl-renyi demo`` (the defaults are the recipe for the embedded SmolLM2-135M-Instruct)."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL, metadata={"help": "Base model: the embedded alias, a local folder or a Hub id."}
    )
    output_dir: str = field(
        default="outputs/demo", metadata={"help": "Where the ensemble, the plots and the model card are written."}
    )
    num_members: int = field(default=4, metadata={"help": "Ensemble size K."})
    alpha: float = field(default=-1.0, metadata={"help": "Rényi order α after the warm-up (α < 1 lets members specialise)."})
    alpha_warmup_ratio: float = field(
        default=0.5, metadata={"help": "Fraction of the steps with α held at 1 (members first fit what the data agrees on)."}
    )
    responsibility_floor: float = field(
        default=0.1,
        metadata={"help": "λ of the α = 1 bound mixed into the objective, so no member abandons the agreed families."},
    )
    member_init_std: float = field(default=0.01, metadata={"help": "Std of each member's random initial LoRA B."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the LoRA weights."})
    max_steps: int = field(default=36, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step (every member sees all of them)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of every member (all linear layers)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    families: list[str] = field(
        default_factory=lambda: list(DEMO_FAMILIES),
        metadata={"help": f"Task families of the generated data, from {sorted(FAMILIES)}."},
    )
    num_test_per_family: int = field(default=8, metadata={"help": "Held-out prompts per family for the evaluation."})
    show_per_family: int = field(default=2, metadata={"help": "Held-out prompts per family whose answers are printed."})
    max_new_tokens: int = field(default=12, metadata={"help": "Length limit of the generated answers."})
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "Short system message (without one, SmolLM2's template inserts a long default prompt)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data, the members' initialisation and training."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})

    def __post_init__(self):
        for name in ("num_members", "max_steps", "batch_size", "lora_r", "num_test_per_family"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.show_per_family < 0:
            raise ValueError(f"show_per_family must be >= 0, got {self.show_per_family!r}.")
        if not self.families:
            raise ValueError("families must name at least one task family.")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families: unknown task families {unknown}; choose from {sorted(FAMILIES)}.")


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    routing: dict[str, list[float]]  # "family/convention" -> mean responsibility of each member
    families: list[FamilyReport]
    answers: list[dict]
    gap: dict[str, tuple[float, float]]  # signal -> (contradictory mean, consistent mean)
    ensemble_dir: Path
    plots: list[Path]
    model_card: Path
    train_seconds: float
    wall_seconds: float
    cpu_seconds: float  # CPU time of the process, all threads (on a busy machine a steadier figure than wall time)
    log_history: list[dict] = field(default_factory=list)


def _quiet_progress(trainer) -> None:
    """Keep the training progress bar but show the loss on it instead of printing every log dictionary."""
    class LossOnBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                alpha = logs.get(ALPHA_METRIC)
                postfix = {"loss": f"{logs['loss']:.3f}"}
                if alpha is not None:
                    postfix["α"] = f"{alpha:g}"
                self.training_bar.set_postfix(postfix)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossOnBar())


def run_demo(
    config: DemoConfig | None = None,
    model=None,
    tokenizer=None,
    print_fn: Callable[[str], None] = print,
    **overrides,
) -> DemoResult:
    """Train the demo ensemble and report its routing and uncertainty per task family.

    Args:
        config: the settings (``DemoConfig()`` by default); ``overrides`` replace single fields.
        model: a loaded base model (by default ``config.model_name_or_path`` is loaded).
        tokenizer: its tokenizer (required with ``model``; loaded with the model otherwise).
        print_fn: where the report goes.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    config = DemoConfig(**{**asdict(config or DemoConfig()), **overrides})
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        print_fn(f"Loading {config.model_name_or_path} ...")
        model = load_causal_lm(config.model_name_or_path)
        tokenizer = tokenizer or load_tokenizer(config.model_name_or_path)
    elif tokenizer is None:
        raise ValueError("Pass the tokenizer together with a loaded model.")

    per_family = math.ceil(config.max_steps * config.batch_size / len(config.families))
    data = conflict_sft_dataset(
        num_train_per_family=per_family,
        num_test_per_family=config.num_test_per_family,
        families=config.families,
        seed=config.seed,
        conversational=True,
        system_prompt=config.system_prompt,
    )
    contradictory = [f for f in config.families if FAMILIES[f].contradictory]
    consistent = [f for f in config.families if not FAMILIES[f].contradictory]
    print_fn(
        f"Data: {len(data['train'])} chat examples; contradictory families {contradictory} (two conventions, half each), "
        f"consistent families {consistent}."
    )
    args = RenyiSFTConfig(
        output_dir=str(out_dir / "trainer"),
        num_members=config.num_members,
        alpha=config.alpha,
        alpha_warmup_ratio=config.alpha_warmup_ratio,
        responsibility_floor=config.responsibility_floor,
        member_init_std=config.member_init_std,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=128,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = RenyiSFTTrainer(
        model=model, args=args, train_dataset=data["train"], processing_class=tokenizer, peft_config=peft_config
    )
    _quiet_progress(trainer)
    warmup_steps = math.ceil(config.alpha_warmup_ratio * config.max_steps)
    print_fn(
        f"Training K = {config.num_members} LoRA members (r = {config.lora_r}, all linear layers) for {config.max_steps} "
        f"steps of {config.batch_size}: α = 1 for {warmup_steps} warm-up steps, then α = {config.alpha:g} with a "
        f"responsibility floor λ = {config.responsibility_floor:g}."
    )
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start

    ensemble = trainer.ensemble
    items = make_held_out_items(config.num_test_per_family, config.families, config.seed)
    routing, reports, per_item = evaluate_families(ensemble, items, config.system_prompt)
    gap = uncertainty_gap(reports)

    shown = [d for family in config.families for d in [p for p in per_item if p["family"] == family][: config.show_per_family]]
    conversations = [chat_prompt(d["prompt"], config.system_prompt) for d in shown]
    answers = member_answers(ensemble, conversations, shown, config.max_new_tokens)

    ensemble_dir = out_dir / "ensemble"
    eval_results = {
        f"{r.family} ({'contradictory' if r.contradictory else 'consistent'})": {
            label: round(getattr(r, key), 4) for key, label in SIGNALS.items()
        }
        for r in reports
    }
    ensemble.save_pretrained(
        ensemble_dir, model_name="trl-renyi-demo", dataset_name=DATASET_NAME, eval_results=eval_results
    )
    card = ensemble_dir / CARD_FILE
    plots = write_family_plots(routing, reports, ensemble.member_names, out_dir)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = DemoResult(
        routing=routing,
        families=reports,
        answers=answers,
        gap=gap,
        ensemble_dir=ensemble_dir,
        plots=plots,
        model_card=card,
        train_seconds=train_seconds,
        wall_seconds=wall,
        cpu_seconds=cpu,
        log_history=list(trainer.state.log_history),
    )
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "routing": routing,
                "families": [asdict(r) for r in reports],
                "gap": gap,
                "answers": answers,
                "per_item": per_item,
                "train_seconds": train_seconds,
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
        + "\n"
    )
    print_fn(format_report(result, ensemble.member_names, config, out_dir))
    return result


def format_report(result: DemoResult, member_names: list[str], config: DemoConfig, out_dir) -> str:
    """What the demo prints at the end: the per-family report, then where everything was written and the time."""
    lines = ["", "=" * 100, ""]
    lines += format_family_report(result.routing, result.families, result.gap, result.answers, member_names, config.alpha)
    lines += [
        f"Ensemble:    {result.ensemble_dir}  (member_k/ PEFT adapters, renyi_ensemble.json)",
        f"Model card:  {result.model_card}",
        f"Plots:       {', '.join(str(p) for p in result.plots)}",
        f"Results:     {Path(out_dir) / 'results.json'}",
        f"Time: {result.wall_seconds:.0f} s in all ({result.train_seconds:.0f} s training), "
        f"{result.cpu_seconds:.0f} s of CPU time on {torch.get_num_threads()} threads.",
    ]
    return "\n".join(lines)


def make_parser():
    return RenyiParser((DemoConfig,), prog="trl-renyi demo")


def main(config: DemoConfig) -> int:
    run_demo(config)
    return 0


if __name__ == "__main__":
    (demo_config,) = make_parser().parse_args_and_config()
    main(demo_config)
