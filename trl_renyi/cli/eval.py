"""``trl-renyi eval``: evaluate an ensemble next to its baselines on multiple-choice or preference data.

Data: TruthfulQA-style JSON (``question`` + ``mc1_targets`` / ``mc2_targets`` with ``choices`` and ``labels``), or
preference pairs (JSON lines with ``prompt``/``chosen``/``rejected``, or full ``chosen``/``rejected`` dialogues whose
shared beginning is the prompt; ``.gz`` is read too). Every model gives each item a distribution over its choices;
the report holds accuracy, NLL, ECE, Brier score, the error-detection AUROC of each uncertainty score and the accuracy
at fixed coverage, for the ensemble, each of its members and every baseline.

Baselines (``--baselines``, several allowed, each optionally ``label=spec``):

* ``base``: the ensemble's base model with every adapter off;
* ``member:K``: member K of the ensemble alone (from the ensemble's own pass, no extra forward);
* ``adapter:PATH``: a plain PEFT LoRA adapter folder on its base model (e.g. a single LoRA trained with TRL);
* ``ensemble:PATH``: another saved ensemble;
* ``model:NAME``: any causal LM (folder, Hub id or embedded alias);
* ``none``: no baseline.

Outputs in ``--output_dir``: ``report.json``, ``predictions.jsonl`` (per item and model) and the plots
``reliability.png``, ``uncertainty_hist.png``, ``routing_heatmap.png`` and ``selective_accuracy.png``.

Example::

    trl-renyi eval --ensemble outputs/renyi-sft --data ../shared/data/truthfulqa-en-validation.json \\
        --baselines base single=adapter:outputs/single-lora --max_items 200 --output_dir outputs/eval
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trl_renyi.cli.parsing import CHAT_MODES, RenyiParser, chat_field
from trl_renyi.evaluation.data import FORMATS, load_choice_items, model_inputs
from trl_renyi.evaluation.metrics import DEFAULT_COVERAGES
from trl_renyi.evaluation.report import (
    json_safe,
    member_predictions,
    model_report,
    predict,
    report_table,
    write_plots,
    write_predictions,
)
from trl_renyi.inference.baseline import SingleModel
from trl_renyi.inference.ensemble import RenyiEnsemble

BASELINE_KINDS = ("base", "member", "adapter", "ensemble", "model", "none")


@dataclass
class EvalArguments:
    """Arguments of ``trl-renyi eval``."""

    ensemble: str = field(metadata={"help": "Ensemble folder (written by save_model / save_pretrained) or Hub repo id."})
    data: str = field(
        metadata={
            "help": "Evaluation file: TruthfulQA-style JSON (question + mc1_targets/mc2_targets) or preference pairs "
            "(JSON lines with prompt/chosen/rejected or chosen/rejected dialogues; .gz allowed)."
        }
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "Format of --data: auto-detected, or mc1, mc2, preference.", "choices": ["auto", *FORMATS]},
    )
    output_dir: str = field(default="renyi-eval", metadata={"help": "Folder for report.json, predictions and plots."})
    baselines: list[str] = field(
        default_factory=lambda: ["base"],
        metadata={
            "help": "Models to evaluate next to the ensemble, each [label=]spec with spec one of: base, member:K, "
            "adapter:PATH, ensemble:PATH, model:NAME, none."
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model to load the ensemble on (default: the one it records)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the ensemble (branch, tag or commit)."})
    dtype: str = field(default="float32", metadata={"help": "Dtype to load models in (float32, bfloat16, float16)."})
    first_item: int = field(default=0, metadata={"help": "Index of the first item to evaluate (skip training items)."})
    max_items: int | None = field(default=None, metadata={"help": "Evaluate at most this many items."})
    chat: str = chat_field()
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message put before each chat-rendered question."}
    )
    length_normalize: bool = field(
        default=False, metadata={"help": "Score choices by their mean per-token log-likelihood instead of the sum."}
    )
    preference_scoring: str = field(
        default="likelihood",
        metadata={
            "help": "Preference pairs: compare the responses by likelihood, or by the DPO implicit reward "
            "β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)] with the base model as π_ref.",
            "choices": ["likelihood", "reward"],
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "β of the reward scoring, in place of the one the ensemble was trained with (its renyi_ensemble.json "
            "records β, loss type, label smoothing and divergence); required for an ensemble not trained on preferences."
        },
    )
    n_bins: int = field(default=10, metadata={"help": "Number of equal-width confidence bins of the ECE."})
    coverages: list[float] = field(
        default_factory=lambda: list(DEFAULT_COVERAGES),
        metadata={"help": "Coverages (fractions answered, most certain first) for the selective accuracy."},
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per member-batched forward."})
    plots: bool = field(
        default=True,
        metadata={"help": "Write the PNG plots (reliability, uncertainty, routing) to output_dir; --no_plots skips them."},
    )

    def __post_init__(self):
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if not self.coverages or not all(0 < c <= 1 for c in self.coverages):
            raise ValueError(f"coverages must be numbers in (0, 1], got {self.coverages}.")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        for spec in self.baselines:
            parse_baseline(spec)


def parse_baseline(spec: str) -> tuple[str, str, str]:
    """``(label, kind, argument)`` of a ``--baselines`` entry ``[label=]kind[:argument]``."""
    label, _, body = spec.rpartition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    kind, _, argument = body.partition(":")
    if kind not in BASELINE_KINDS:
        raise ValueError(f"--baselines entry {spec!r}: unknown kind {kind!r}; use one of {BASELINE_KINDS}.")
    if kind in ("adapter", "ensemble", "model", "member") and not argument:
        raise ValueError(f"--baselines entry {spec!r}: {kind} needs an argument ({kind}:…).")
    if kind == "member" and not argument.isdigit():
        raise ValueError(f"--baselines entry {spec!r}: member needs an index (member:0).")
    default = {"base": "base", "member": f"member_{argument}", "none": "none"}.get(kind, f"{kind}:{Path(argument).name}")
    return label or default, kind, argument


def load_baseline(kind: str, argument: str, label: str, ensemble: RenyiEnsemble, args: EvalArguments):
    """The scorer of a ``--baselines`` entry (``member`` entries need none: they come from the ensemble's pass)."""
    chat = CHAT_MODES[args.chat]
    if kind == "base":
        return SingleModel.base_of(ensemble)
    if kind == "adapter":
        base = args.base_model
        config = Path(argument, "adapter_config.json")
        if base is None and config.is_file() and not json.loads(config.read_text()).get("base_model_name_or_path"):
            base = ensemble.metadata.get("base_model_name_or_path") or None
        return SingleModel.from_pretrained(
            argument, base_model=base, tokenizer=ensemble.tokenizer, name=label, dtype=args.dtype, use_chat_template=chat
        )
    if kind == "ensemble":
        return RenyiEnsemble.from_pretrained(argument, dtype=args.dtype, use_chat_template=chat)
    if kind == "model":
        return SingleModel.from_pretrained(argument, name=label, dtype=args.dtype, use_chat_template=chat)
    raise ValueError(f"Cannot load a baseline of kind {kind!r}.")


def evaluate(args: EvalArguments) -> dict:
    """Run the evaluation described by ``args``; returns the report (also written to ``output_dir``)."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the data first: a wrong file or format fails before the ensemble's model loads
    items, fmt = load_choice_items(args.data, args.data_format, args.first_item, args.max_items)
    print(f"{args.data}: {len(items)} items, format {fmt}.")
    chat = CHAT_MODES[args.chat]
    ensemble = RenyiEnsemble.from_pretrained(
        args.ensemble, base_model=args.base_model, revision=args.revision, dtype=args.dtype, use_chat_template=chat
    )
    prompts, choices = model_inputs(items, fmt, ensemble.tokenizer, chat, args.system_prompt)
    labels = [item.labels for item in items]
    reward = fmt == "preference" and args.preference_scoring == "reward"
    base = SingleModel.base_of(ensemble)
    reference = base if reward else None
    likelihood = ensemble.preference_likelihood(args.beta) if reward else None  # as trained; refused before scoring
    if likelihood is not None:
        likelihood.check_scorable()
    # label -> (predictions, member names)
    options = dict(reference=reference, likelihood=likelihood, length_normalize=args.length_normalize, batch_size=args.batch_size)
    results = {"ensemble": (predict(ensemble, prompts, choices, **options), ensemble.member_names)}
    notes = []
    for spec in args.baselines:
        label, kind, argument = parse_baseline(spec)
        if kind == "none":
            continue
        if label in results:
            raise ValueError(f"--baselines: the label {label!r} is used twice; name entries with label=spec.")
        if kind == "member":
            k = int(argument)
            if k >= ensemble.num_members:
                raise ValueError(f"--baselines {spec!r}: the ensemble has {ensemble.num_members} members.")
            results[label] = (member_predictions(results["ensemble"][0], k), [label])
            continue
        if reward and kind == "base":
            note = "base: left out under reward scoring (the base model is the reference, so its margin is always 0)."
            print(note)
            notes.append(note)
            continue
        scorer = load_baseline(kind, argument, label, ensemble, args)
        results[label] = (predict(scorer, prompts, choices, **options), scorer.member_names)
    report = {
        "ensemble": {
            "path": args.ensemble,
            "num_members": ensemble.num_members,
            "alpha": ensemble.alpha,
            "member_weights": ensemble.member_weights,
            "base_model": ensemble.metadata.get("base_model_name_or_path"),
        },
        "data": {"path": args.data, "format": fmt, "num_items": len(items), "first_item": args.first_item},
        "settings": asdict(args),
        "models": {},
        "notes": notes,
    }
    for name, (predictions, names) in results.items():
        report["models"][name] = model_report(predictions, labels, args.n_bins, args.coverages, names)
    results = {name: predictions for name, (predictions, _) in results.items()}
    write_predictions(out / "predictions.jsonl", items, results)
    if args.plots:
        report["plots"] = write_plots(out, results, labels, report, ensemble)
    (out / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    return report


def make_parser():
    return RenyiParser((EvalArguments,), prog="trl-renyi eval")


def main(args: EvalArguments) -> int:
    report = evaluate(args)
    print(report_table(report))
    written = "Report, predictions and plots" if args.plots else "Report and predictions (no plots: --no_plots)"
    print(f"\n{written} written to {args.output_dir}.")
    return 0
