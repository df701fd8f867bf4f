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
from trl_renyi.members import build_ensemble, member_names  # noqa: E402

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"


def load_base(quick: bool, model: str):
    """``(base model, tokenizer)``: the tiny offline Llama for ``quick`` runs, else ``model`` through the resolver."""
    if quick:
        from trl_renyi.testing import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer, init_std=0.5), tokenizer
    from trl_renyi.models import load_causal_lm, load_tokenizer

    return load_causal_lm(model, dtype="float32"), load_tokenizer(model)


def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def training_arguments(output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int, max_length: int):
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
        bf16=False,
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
        ),
        num_members=run["num_members"],
        alpha=run["alpha"],
        alpha_warmup_ratio=run.get("warmup", 0.0),
        member_init_std=settings["member_init_std"],
        responsibility_floor=run.get("floor", 0.0),
        **settings.get("extra_config", {}),
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


def run_label(run: dict) -> str:
    return run["label"]


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

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.start:.0f} s"
