"""What a training run does, in one line each, logged when ``train()`` starts: the ensemble and its objective, a
quantised base, routing by source and the checkpoint a resume starts from; and while it runs, the seconds each
optimizer step takes (``step_seconds`` in every training log, so a slow machine shows itself)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from trl_renyi.compat import trainer_metrics
from trl_renyi.objective import AUTO_ALPHA


def resolved_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=...)`` starts from: a path, the last ``checkpoint-*`` of
    ``output_dir`` for ``True`` (as transformers resolves it), or ``None``."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    return str(resume_from_checkpoint)


def ensemble_line(trainer) -> str:
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.peft_config[trainer.member_names[0]]
    base = model.get_base_model()
    alpha = "chosen from the data at the end of the warm-up (alpha='auto')" if args.alpha == AUTO_ALPHA else f"α = {args.alpha:g}"
    warmup = f" after a warm-up at α = 1 for {args.alpha_warmup_ratio:.0%} of the steps" if args.alpha_warmup_ratio else ""
    return (
        f"Training {args.num_members} LoRA members (r = {config.r}) on {base.config.name_or_path or type(base).__name__} "
        f"({next(base.parameters()).dtype}): {alpha}{warmup}, responsibility floor {args.responsibility_floor:g}."
    )


def quantization_line(trainer) -> str | None:
    base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
    bits = 4 if getattr(base, "is_loaded_in_4bit", False) else 8 if getattr(base, "is_loaded_in_8bit", False) else None
    if bits is None:
        return None
    quantization = getattr(base.config, "quantization_config", None)
    settings = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization or {})
    detail = (
        f"{settings.get('bnb_4bit_quant_type', 'nf4')}, compute dtype {settings.get('bnb_4bit_compute_dtype', 'float32')}"
        if bits == 4
        else "LLM.int8()"
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    member_dtype = next((p.dtype for p in model.parameters() if p.requires_grad), None)
    return f"The base model is loaded in {bits} bit ({detail}, bitsandbytes); the members train on it in {member_dtype} (QLoRA)."


def source_line(trainer) -> str | None:
    memory = getattr(trainer, "source_memory", None)
    if getattr(trainer.args, "source_column", None) is None or memory is None:
        return None
    weights = [float(w) for w in memory.total_weight if w > 0]
    if not weights:
        return None
    return (
        f"Routing by source: column {trainer.args.source_column!r}, {len(weights)} sources in the training data, "
        f"their rows' weight min / median / max {min(weights):g} / {statistics.median(weights):g} / {max(weights):g}; "
        "each source's rows go to the members together."
    )


def resume_line(checkpoint: str | None) -> str | None:
    if checkpoint is None:
        return None
    state = Path(checkpoint) / "trainer_state.json"
    step = json.loads(state.read_text()).get("global_step") if state.is_file() else None
    return f"Resuming from {checkpoint}" + (f" (step {step})." if step is not None else ".")


def run_summary(trainer, resume_from_checkpoint=None) -> list[str]:
    """The lines logged at the start of ``train()``."""
    checkpoint = resolved_checkpoint(resume_from_checkpoint, trainer.args.output_dir)
    lines = [ensemble_line(trainer), quantization_line(trainer), source_line(trainer), resume_line(checkpoint)]
    return [line for line in lines if line]


#: the logged key of the wall-clock seconds per optimizer step (averaged over the logging window, as TRL's metrics)
STEP_SECONDS = "step_seconds"


class StepTimer(TrainerCallback):
    """Adds the wall-clock seconds of every optimizer step (forward, backward and update, all its micro-batches) to
    the trainer's metrics, which TRL averages over each logging window: ``step_seconds`` in the printed logs."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.started is None:
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is not None:
            trainer_metrics(self.trainer, "train")[STEP_SECONDS].append(time.perf_counter() - self.started)
            self.started = None
