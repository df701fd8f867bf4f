r"""Multi-annotator rows in ``RenyiSFTTrainer``: expansion before TRL's preparation, per-example weights, and one
prompt pass for all completions of a row.

See :mod:`trl_renyi.data.multi_completion` for the format and the loss it defines. A dataset with ``prompt`` +
``completions`` (+ ``completion_weights``) columns is expanded into one-completion rows that keep their weight, so
that TRL tokenises and truncates every completion exactly as it would a plain prompt/completion row.

* With ``share_prompt`` (the default where the model allows it) the prepared rows are regrouped into one row per
  prompt (:func:`lay_out_weighted_rows`, at TRL's own preparation step) and
  :class:`~trl_renyi.training.prompt_sharing.SharedPromptCollator` packs each prompt with all its completions
  (:mod:`trl_renyi.model.shared_prompt`): the prompt runs once per member per step, and a batch holds
  ``per_device_train_batch_size`` prompts with all their completions.
* Without it, the trainer keeps the ``completion_weight`` column through TRL's preparation and the collator passes it
  as the batch's ``completion_weights``; a batch then holds ``per_device_train_batch_size`` completions.

Either way the weights scale both the bound and the token normaliser, and the loss equals that of the expanded rows.

With ``multi_annotator_routing="row"`` (shared prompts only) the collator also gives each completion the index of its
row in the batch (``row_index``), and the trainer turns the completions' log-likelihoods into one per row,

.. math::

    \ell_{ik} = \sum_j w_{ij}\, \ell_{ijk}, \qquad
    \mathcal{L} = -\frac{\sum_i J(\ell_{i\cdot})}{\sum_i \sum_j w_{ij}\, n_{ij}},

the log-likelihood of all of the row's annotations under member k: the row, not each vote, is routed to members.
At α = 1 (J linear in ℓ) and for K = 1 this is the expanded rows' loss.
"""

from __future__ import annotations

from datasets import Dataset, IterableDataset

from trl_renyi.data.multi_completion import (
    GROUPED_COLUMNS,
    GROUPED_SOURCES,
    SOURCE_ID_COLUMN,
    WEIGHT_COLUMN,
    expand_multi_completion,
    group_completions,
    is_multi_completion,
)


def _map_datasets(function, dataset):
    if isinstance(dataset, dict):
        return {name: _map_datasets(function, d) for name, d in dataset.items()}
    return function(dataset)


def has_multi_completion(train_dataset, eval_dataset) -> bool:
    datasets = [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])]
    return any(is_multi_completion(d) for d in datasets)


def check_row_routing(args, weighted: bool, share_prompt: bool) -> None:
    """``multi_annotator_routing="row"`` needs every completion of a row in the same batch (the shared layout)."""
    if args.multi_annotator_routing == "row" and weighted and not share_prompt:
        raise ValueError(
            "multi_annotator_routing='row' routes a multi-annotator row as one example, so all its completions must be "
            "in one batch: that is the shared-prompt layout, which is off here (share_prompt=False, or the model or "
            "the options do not allow it; see the log). Use multi_annotator_routing='completion'."
        )


def check_source_routing(args) -> None:
    """``source_column`` keeps a memory of every source on one process and scores all members together."""
    if getattr(args, "source_column", None) is None:
        return
    if args.member_chunk_size:
        raise ValueError("source_column cannot be combined with member_chunk_size (the source bound needs all members).")
    if args.world_size > 1:
        raise ValueError(
            f"source_column routes with a memory of every source kept on one process; this run has "
            f"{args.world_size} processes. Train on one process, or leave source_column unset."
        )


def row_log_likelihood(loglik, num_tokens, weights, row_index):
    """``(loglik (R, K), num_tokens (R,))`` of the R rows from their completions' ``(N, K)`` and ``(N,)``, weighted:
    ℓ_ik = Σ_j w_ij ℓ_ijk, n_i = Σ_j w_ij n_ij."""
    if row_index.shape[0] != loglik.shape[0]:
        raise ValueError(f"{row_index.shape[0]} row indices for {loglik.shape[0]} completions with completion tokens")
    rows = int(row_index.max()) + 1 if row_index.numel() else 0
    weights = weights.to(device=loglik.device, dtype=loglik.dtype)
    index = row_index.to(loglik.device)
    row_loglik = loglik.new_zeros(rows, loglik.shape[1]).index_add(0, index, weights[:, None] * loglik)
    row_tokens = num_tokens.new_zeros(rows).index_add(0, index, weights.to(num_tokens.dtype) * num_tokens)
    return row_loglik, row_tokens


def share_prompt_blockers(args, train_dataset, data_collator, regroup: bool) -> dict[str, bool]:
    """The reasons, beside the model's, why SFT batches cannot share their prompt pass (``regroup``: multi-annotator
    rows, which are regrouped by prompt; otherwise a prefix common to a batch's rows)."""
    blockers = {
        "a custom data_collator builds the batches (the shared layout needs the trainer's own collator)": (
            data_collator is not None
        ),
        "packing=True already packs several sequences into each row": bool(getattr(args, "packing", False)),
    }
    if regroup:
        blockers["an IterableDataset cannot be regrouped by prompt"] = isinstance(train_dataset, IterableDataset)
        blockers[
            f"train_sampling_strategy={args.train_sampling_strategy!r} samples by the length of single sequences, not of "
            "prompts with their completions"
        ] = args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
    return blockers


def as_single_completion_rows(dataset, source_column: str):
    """Prompt/completion rows that name a source, as multi-annotator rows of one completion (same loss), so that the
    source travels with the expansion; other datasets unchanged."""
    names = getattr(dataset, "column_names", None) or []
    if dataset is None or is_multi_completion(dataset) or not {"prompt", "completion"} <= set(names):
        return dataset
    if source_column not in names:
        raise ValueError(f"source_column {source_column!r} is not a column of the dataset (columns: {names})")
    return dataset.map(
        lambda row: {"completions": [row["completion"]], "completion_weights": [1.0]},
        remove_columns=["completion"],
    )


def prepare_multi_completion(args, train_dataset, eval_dataset, share_prompt: bool = False):
    """Expand multi-annotator datasets; returns ``(train, eval, weighted)``. Refuses, by name, the options whose
    meaning the weights would silently change. With ``share_prompt`` each expanded row records its source row; with
    ``args.source_column`` each records its source (prompt/completion rows become one-completion rows first)."""
    source_column = getattr(args, "source_column", None)
    if source_column is not None:
        if not isinstance(train_dataset, Dataset):
            raise ValueError(
                f"source_column={source_column!r} needs a datasets.Dataset of prompt/completion or multi-annotator rows "
                f"as train_dataset, got {type(train_dataset).__name__}"
            )
        train_dataset = as_single_completion_rows(train_dataset, source_column)
        if not is_multi_completion(train_dataset):
            raise ValueError(
                f"source_column={source_column!r} routes prompt/completion or multi-annotator rows; the training "
                f"dataset has columns {train_dataset.column_names}"
            )
        if source_column not in train_dataset.column_names:
            raise ValueError(
                f"source_column {source_column!r} is not a column of the training dataset "
                f"(columns: {train_dataset.column_names})"
            )
        eval_dataset = _map_datasets(lambda d: as_single_completion_rows(d, source_column), eval_dataset)
    weighted = has_multi_completion(train_dataset, eval_dataset)
    if weighted:
        if args.gradient_accumulation_steps > 1 and args.loglik_reduction == "sum":
            raise ValueError(
                "multi-annotator rows (completion_weights) with gradient_accumulation_steps > 1: the Trainer's "
                "num_items_in_batch counts unweighted tokens; use gradient_accumulation_steps=1"
            )
        if getattr(args, "packing", False):
            raise ValueError("multi-annotator rows (completion_weights) cannot be packed: set packing=False")

    def expand(dataset):
        if not is_multi_completion(dataset):
            return dataset
        sources = source_column if source_column in dataset.column_names else None
        return expand_multi_completion(dataset, keep_groups=share_prompt, source_column=sources)

    return _map_datasets(expand, train_dataset), _map_datasets(expand, eval_dataset), weighted


def weighted_columns(share_prompt: bool, dataset) -> list[str]:
    """The columns of the prepared multi-annotator rows the Trainer must keep besides the model inputs."""
    names = getattr(dataset, "column_names", None) or []
    wanted = [*GROUPED_COLUMNS, GROUPED_SOURCES] if share_prompt else [WEIGHT_COLUMN, SOURCE_ID_COLUMN]
    return [c for c in wanted if c in names]


def lay_out_weighted_rows(prepared, memory, share_prompt: bool, train: bool):
    """A prepared (tokenised) multi-annotator dataset as the trainer reads it, at TRL's preparation step: every row's
    source as its integer id in ``memory`` (with ``source_column``; a training dataset sets each source's total weight,
    an evaluation one adds its own sources), and with ``share_prompt`` one row per prompt with all its completions."""
    if memory is not None:
        prepared = memory.encode(prepared, WEIGHT_COLUMN, train=train)
    return group_completions(prepared) if share_prompt else prepared
