"""``trl-renyi audit``: score a training dataset with a trained ensemble and list the examples its members disagree on.

Where the data contradicts itself, members specialise on the conflicting sides; those examples get a high epistemic
score. The listed examples (most disagreement first) are what a data curator should look at: contradictory
answers, mislabelled pairs, ambiguous prompts.

Scores per example (``--sort_by``):

* supervised data (prompt/completion, messages, text): ``mutual_information_max`` (largest per-token mutual
  information over the completion, the default), ``mutual_information`` (its mean), ``loglik_std`` (spread of the
  members' log-likelihoods ℓ_k), ``routing_entropy`` (entropy of the responsibilities at the ensemble's α; low values
  mean one member has claimed the example), ``nll`` (mixture negative log-likelihood);
* preference pairs (chosen/rejected): each member's probability that the chosen response wins, under the DPO
  implicit reward against the base model; ``mutual_information`` over (chosen, rejected) (the default), ``loglik_std``
  of ℓ_k = log σ(m_k), ``routing_entropy``, ``nll`` = −log p(chosen).

Outputs in ``--output_dir``: ``audit.jsonl`` (every example, sorted), ``audit_scores.png`` (the score's distribution)
and ``audit_routing.png`` (responsibilities, members × examples); the top examples are printed as a table.

Example::

    trl-renyi audit --ensemble outputs/renyi-sft --data train.jsonl --top 20 --output_dir outputs/audit
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trl_renyi.cli.parsing import CHAT_MODES, RenyiParser, chat_field
from trl_renyi.data.loading import load_split
from trl_renyi.evaluation import plots
from trl_renyi.evaluation.audit import (
    PREFERENCE_SCORES,
    SFT_SCORES,
    audit_table,
    score_preferences,
    score_sft,
)
from trl_renyi.evaluation.data import training_examples, training_format
from trl_renyi.inference.ensemble import RenyiEnsemble


@dataclass
class AuditArguments:
    """Arguments of ``trl-renyi audit``."""

    ensemble: str = field(metadata={"help": "Ensemble folder (written by save_model / save_pretrained) or Hub repo id."})
    data: str = field(
        metadata={
            "help": "Training data: a local file (json, jsonl, csv, parquet; .jsonl.gz too), a save_to_disk folder or "
            "a Hub dataset id, in a TRL format (prompt/completion, messages, text, or chosen/rejected [+ prompt])."
        }
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Dataset split to audit."})
    output_dir: str = field(default="renyi-audit", metadata={"help": "Folder for audit.jsonl and the plots."})
    sort_by: str = field(
        default="auto",
        metadata={
            "help": "Score to rank by (highest first): auto (mutual_information_max for supervised data, "
            "mutual_information for preference pairs), mutual_information_max, mutual_information, loglik_std, "
            "routing_entropy, nll.",
            "choices": ["auto", *SFT_SCORES],
        },
    )
    top: int = field(default=20, metadata={"help": "Number of examples printed in the table."})
    max_examples: int | None = field(default=None, metadata={"help": "Audit only the first N examples."})
    base_model: str | None = field(default=None, metadata={"help": "Base model to load the ensemble on."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the ensemble."})
    dtype: str = field(default="float32", metadata={"help": "Dtype to load the model in."})
    beta: float | None = field(
        default=None,
        metadata={
            "help": "β of the DPO implicit reward for preference data, in place of the one the ensemble was trained with "
            "(recorded with its loss type, smoothing and divergence); required for an ensemble not trained on preferences."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per member-batched forward."})
    chat: str = chat_field()
    plots: bool = field(default=True, metadata={"help": "Write the PNG plots."})

    def __post_init__(self):
        if self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}.")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {self.max_examples}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")


def load_dataset_for_audit(args: AuditArguments):
    """The split to audit: any dataset name every command accepts (:mod:`trl_renyi.data.loading`)."""
    return load_split(args.data, args.split, args.dataset_config)


def audit(args: AuditArguments) -> tuple[str, str, list[dict]]:
    """Score and rank the dataset; returns ``(kind, sort_by, rows sorted by the score)`` and writes the outputs."""
    # the data first: a wrong file, split or format fails before the ensemble's model loads
    dataset = load_dataset_for_audit(args)
    if args.max_examples is not None:
        dataset = dataset.select(range(min(args.max_examples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{args.data} holds no examples to audit.")
    kind, columns = training_examples(dataset, args.data)
    valid = SFT_SCORES if kind == "sft" else PREFERENCE_SCORES
    sort_by = (valid[0] if args.sort_by == "auto" else args.sort_by)
    if sort_by not in valid:
        raise ValueError(f"sort_by={args.sort_by!r} does not apply to {kind} data; use one of {valid}.")
    print(f"{args.data}: {len(dataset)} {kind} examples ({training_format(dataset.column_names)}).")
    ensemble = RenyiEnsemble.from_pretrained(
        args.ensemble, base_model=args.base_model, revision=args.revision, dtype=args.dtype,
        use_chat_template=CHAT_MODES[args.chat],
    )
    if kind == "sft":
        rows = score_sft(ensemble, columns, args.batch_size)
    else:
        rows = score_preferences(ensemble, columns, args.beta, args.batch_size)
    rows.sort(key=lambda row: -row[sort_by])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "audit.jsonl", "w") as handle:
        handle.writelines(json.dumps({"rank": rank, **row}) + "\n" for rank, row in enumerate(rows, start=1))
    if args.plots:
        cutoff = rows[min(args.top, len(rows)) - 1][sort_by]
        plots.score_histogram(
            [row[sort_by] for row in rows], cutoff, out / "audit_scores.png", xlabel=sort_by,
            title=f"{sort_by} over {len(rows)} training examples",
        )
        by_index = sorted(rows, key=lambda row: row["index"])
        plots.routing_heatmap(
            torch.tensor([row["responsibilities"] for row in by_index]), ensemble.member_names,
            out / "audit_routing.png", title=f"responsibilities (α = {ensemble.alpha:g})", xlabel="training example",
        )
    return kind, sort_by, rows


def make_parser():
    return RenyiParser((AuditArguments,), prog="trl-renyi audit")


def main(args: AuditArguments) -> int:
    kind, sort_by, rows = audit(args)
    print(audit_table(rows, kind, sort_by, args.top))
    print(f"\n{len(rows)} examples scored ({kind}); ranked by {sort_by}. Written to {Path(args.output_dir) / 'audit.jsonl'}.")
    return 0
