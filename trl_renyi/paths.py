"""Suggestions for a mistyped local path ("Did you mean …?")."""

from __future__ import annotations

import difflib
from pathlib import Path

SIMILARITY_CUTOFF = 0.7


def _stem(name: str) -> str:
    return name.split(".", 1)[0] if not name.startswith(".") else name


def closest_sibling(path: str | Path, folders_only: bool = False) -> Path | None:
    """The existing entry beside ``path`` whose name is closest to it (compared without file suffixes, so that two
    unrelated ``.jsonl`` files are not taken for a typo of each other), or ``None``."""
    path = Path(path)
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if not parent.is_dir():
        return None
    candidates = [p for p in parent.iterdir() if p.is_dir() or not folders_only]
    by_stem = {}
    for candidate in candidates:
        by_stem.setdefault(_stem(candidate.name), candidate)
    close = difflib.get_close_matches(_stem(path.name), list(by_stem), n=1, cutoff=SIMILARITY_CUTOFF)
    return parent / by_stem[close[0]].name if close else None


def did_you_mean(path: str | Path, folders_only: bool = False) -> str:
    """``" Did you mean '<closest>'?"`` or an empty string."""
    close = closest_sibling(path, folders_only)
    return f" Did you mean {str(close)!r}?" if close is not None else ""
