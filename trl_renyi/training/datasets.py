"""Dataset checks around TRL's dataset preparation.
"""

from __future__ import annotations

import warnings

from datasets import Dataset


def report_dropped_examples(raw, prepared, args, dataset_name: str) -> int:
    """Warn about (or refuse) examples removed by preparation; return how many were dropped.

    Only counted for map-style datasets that were not packed (packing changes the number of rows by design).
    """
    if not (isinstance(raw, Dataset) and isinstance(prepared, Dataset)) or "seq_lengths" in prepared.column_names:
        return 0
    total, kept = len(raw), len(prepared)
    dropped = total - kept
    if dropped <= 0:
        return 0
    max_length = getattr(args, "max_length", None)
    mode = getattr(args, "truncation_mode", "keep_start")
    if kept == 0:
        raise ValueError(
            f"All {total} examples of the {dataset_name} dataset have no completion token left after truncation to "
            f"max_length={max_length} (truncation_mode={mode!r}); raise max_length or shorten the prompts."
        )
    warnings.warn(
        f"{dropped} of {total} examples of the {dataset_name} dataset have no completion token left after truncation "
        f"to max_length={max_length} (truncation_mode={mode!r}) and were excluded from training.",
        UserWarning,
        stacklevel=3,
    )
    return dropped
