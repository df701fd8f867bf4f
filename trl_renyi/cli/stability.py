"""``trl-renyi stability``: when does spreading pay on this data? The local stability criterion, measured.

At a one-model fit θ* (fitted here with one LoRA, or loaded with ``--adapter``), spreading an ensemble's members is
locally favourable iff (1 − φ)(1 − α)·λ₁ > 1, with λ₁ the top generalised eigenvalue of the units' gradient outer
products against the model's Fisher and φ the responsibility floor (``trl_renyi.stability``). The command prints λ₁
against its calibrated null (labels redrawn from the fitted model), the critical α* = 1 − 1/λ₁, the recommended α
and the units on each side of the top direction, and writes ``stability.json`` and ``stability.png`` into
``--output_dir``.

Data (``--dataset_name``, any source the training commands read):

* a group-annotated file (``prompt``, ``options``, ``groups``, optional ``annotations``): choice votes with the exact
  Fisher; ``--unit row`` takes each group's votes on an item together, ``completion`` every vote on its own,
  ``source`` every annotator's votes together; the fit sees every vote pooled (each group's distribution weighing 1);
* choice rows (``prompt``, ``options`` and ``label`` or ``label_counts``): the same, the fit sees the votes;
* SFT rows (TRL's formats, multi-annotator rows): free-text votes (Fisher from completions sampled along each prefix),
  per ``completion``, per multi-annotator ``row``, or per ``source`` with ``--source_column``;
* preference pairs (``--trainer dpo``): ℓ = log σ(margin) against the base model, the exact Bernoulli Fisher.

The fit uses the training flags (``--learning_rate``, ``--max_steps``, ``--lora_r`` …) with one member; with
``--adapter`` (a PEFT adapter folder, or an ensemble folder and ``--member``) nothing is trained.

Example (embedded model, HS-Brexit's annotators)::

    trl-renyi stability --dataset_name ../shared/data/group-conflicts/hs-brexit.jsonl --unit source \\
        --max_steps 80 --learning_rate 1e-3 --per_device_train_batch_size 8 --output_dir outputs/stability
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

from trl_renyi.cli import training
from trl_renyi.cli.parsing import RenyiParser
from trl_renyi.model.loading import DEFAULT_MODEL
from trl_renyi.stability import measure_stability
from trl_renyi.stability.votes import UNITS
from trl_renyi.training.config import RenyiSFTConfig

RESULT_FILE = "stability.json"
PLOT_FILE = "stability.png"


@dataclass
class StabilityArguments:
    """Arguments of ``trl-renyi stability`` (besides TRL's model, data and training flags)."""

    unit: str = field(
        default="row",
        metadata={
            "help": "What the bound is taken over: each row (a group's votes on an item together; a multi-annotator "
            "row), each completion/vote on its own, or each source (a group file's annotators; the column named by "
            "--source_column for SFT or DPO rows).",
            "choices": list(UNITS),
        },
    )
    trainer: str = field(
        default="sft", metadata={"help": "The likelihood: SFT rows or DPO pairs.", "choices": ["sft", "dpo"]}
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "The one-model fit θ*: a PEFT LoRA adapter folder or a saved ensemble (with --member). Unset: fit "
            "one LoRA with the training flags first."
        },
    )
    member: int = field(default=0, metadata={"help": "With an ensemble --adapter: the member to measure."})
    max_units: int | None = field(default=2000, metadata={"help": "Measure on at most this many units, drawn at random."})
    floor: float | None = field(
        default=None, metadata={"help": "The responsibility floor φ α* accounts for (default: --responsibility_floor)."}
    )
    damping: float = field(
        default=1.0, metadata={"help": "The prior's curvature, in votes' worth of the Fisher's mean curvature."}
    )
    sketch_dim: int = field(default=4096, metadata={"help": "Dimension of the count sketch of the gradients."})
    null_draws: int = field(default=20, metadata={"help": "Draws of labels from the fitted model for the null."})
    null_level: float = field(default=0.95, metadata={"help": "The quantile of the null's λ1 that λ1 must clear."})
    fisher_samples: int = field(default=2, metadata={"help": "Free text: sampled completions per vote for the Fisher."})
    null_samples: int = field(default=2, metadata={"help": "Free text: sampled completions per vote for the null."})
    plots: bool = field(default=True, metadata={"help": "Write stability.png (spectrum against the null; split scores)."})

    def __post_init__(self):
        for name in ("max_units", "sketch_dim", "null_draws", "fisher_samples", "null_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}.")
        if not 0 < self.null_level < 1:
            raise ValueError(f"--null_level must lie in (0, 1), got {self.null_level}.")
        if not self.damping > 0:
            raise ValueError(f"--damping must be positive, got {self.damping}.")


def main(script_args, stability_args, training_args, model_args, dataset_args):
    # The data: choice items where the file has options (exact Fisher), else the trainer's own rows
    records, choice_rows = training.stability_data(script_args, training_args, dataset_args, stability_args)
    # One member, α = 1: a plain LoRA fit (or the given adapter loaded into it)
    trainer = training.single_fit_trainer(records, stability_args, training_args, model_args)
    if stability_args.adapter is None:
        trainer.train()
        trainer.save_model(trainer.args.output_dir)  # the fit, for --adapter OUTPUT_DIR/fit next time
    votes = training.stability_votes(trainer, choice_rows, stability_args, training_args.source_column)
    floor = training_args.responsibility_floor if stability_args.floor is None else stability_args.floor
    report = measure_stability(
        trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, votes, adapter=trainer.member_names[0],
        floor=floor, damping=stability_args.damping, sketch_dim=stability_args.sketch_dim,
        null_draws=stability_args.null_draws, null_level=stability_args.null_level, max_units=stability_args.max_units,
        fisher_samples=stability_args.fisher_samples, null_samples=stability_args.null_samples, seed=training_args.seed,
    )  # fmt: skip
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**report.to_dict(), "data": script_args.dataset_name, "fit": stability_args.adapter or "one LoRA fitted here"}
    (out / RESULT_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    print(report.summary())
    written = [str(out / RESULT_FILE)]
    if stability_args.plots:
        written.append(str(report.plot(out / PLOT_FILE)))
    print("Wrote " + " and ".join(written) + f" ({report.seconds:.0f} s for the measurement).")
    return 0


def make_parser(subparsers=None):
    dataclass_types = (ScriptArguments, StabilityArguments, RenyiSFTConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("stability", help="Run trl-renyi stability", dataclass_types=dataclass_types)
    else:
        parser = RenyiParser(dataclass_types, prog="trl-renyi stability")
    parser.set_defaults(model_name_or_path=DEFAULT_MODEL, use_peft=True, output_dir="renyi-stability")
    return parser
