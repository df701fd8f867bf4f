"""The one loader for datasets named on the command line or in scripts, used by every command.

A name is one of

* ``trl_renyi:<name>``: a bundled conflicting dataset of :mod:`trl_renyi.data` (see :data:`BUILTIN_DATASETS`);
* a local data file: ``.json`` (a list of objects, or an object whose ``data`` field is that list), ``.jsonl``,
  ``.csv``, ``.parquet`` or ``.arrow``, each optionally gzipped (``.jsonl.gz``);
* a local folder: written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or holding data files that
  ``datasets.load_dataset`` reads;
* a Hugging Face Hub dataset id (``owner/name`` or a canonical ``name``).

A local path that does not exist is reported as a missing file or folder, never sent to the Hub; a Hub id is tried
only when the name looks like one.
"""

from __future__ import annotations

import gzip
import json
import re
from difflib import get_close_matches
from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk

from trl_renyi.data import conflict
from trl_renyi.paths import did_you_mean

BUILTIN_PREFIX = "trl_renyi:"
#: The bundled datasets: name -> (generator, conversational).
BUILTIN_DATASETS = {
    "conflict_sft": ("sft", False),
    "conflict_sft_chat": ("sft", True),
    "conflict_preference": ("preference", False),
    "conflict_preference_chat": ("preference", True),
}
#: ``datasets`` builders of the local file types.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def file_type(path: Path) -> str | None:
    """The ``datasets`` builder of a data file (``.gz`` looked through), ``None`` for other files."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith(".") and file_type(Path(name)) is None


def builtin_dataset(name: str, seed: int = 0):
    """The bundled dataset ``trl_renyi:<name>`` as a ``DatasetDict`` with a ``train`` split."""
    key = name[len(BUILTIN_PREFIX) :]
    if key not in BUILTIN_DATASETS:
        close = get_close_matches(key, list(BUILTIN_DATASETS), n=1)
        hint = f" Did you mean {BUILTIN_PREFIX + close[0]!r}?" if close else ""
        raise ValueError(
            f"dataset {name!r}: unknown bundled dataset; choose from {[BUILTIN_PREFIX + n for n in BUILTIN_DATASETS]}."
            + hint
        )
    kind, conversational = BUILTIN_DATASETS[key]
    make = conflict.conflict_preference_dataset if kind == "preference" else conflict.conflict_sft_dataset
    dataset = make(seed=seed, conversational=conversational)
    return dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})


def _json_field(path: Path) -> str | None:
    """``"data"`` when a ``.json`` file holds an object whose ``data`` field is the list of records."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        head = handle.read(1 << 16).lstrip()
    if not head.startswith("{"):
        return None
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError:
        return None  # e.g. JSON lines in a .json file, which `datasets` reads as such
    return "data" if isinstance(content, dict) and isinstance(content.get("data"), list) else None


def _is_empty(path: Path) -> bool:
    """Whether a data file holds nothing but white space (looked through ``.gz``)."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as handle:
        while block := handle.read(1 << 16):
            if block.strip():
                return False
    return True


def load_local(path: Path, streaming: bool = False):
    """A ``DatasetDict`` from a local data file or folder (see the module docstring)."""
    if path.is_file():
        builder = file_type(path)
        if builder is None:
            raise ValueError(
                f"{path}: unsupported file type {''.join(path.suffixes) or '(none)'!r}; use one of "
                f"{sorted(FILE_BUILDERS)} (optionally .gz)."
            )
        if _is_empty(path):
            raise ValueError(f"{path} is empty: it holds no rows.")
        kwargs = {}
        if builder == "json" and [s.lower() for s in path.suffixes if s.lower() != ".gz"][-1] == ".json":
            field = _json_field(path)
            if field:
                kwargs["field"] = field
        try:
            return load_dataset(builder, data_files=str(path), streaming=streaming, **kwargs)
        except Exception as error:  # datasets wraps parser errors in its own types
            raise ValueError(f"{path} could not be read as {builder} ({type(error).__name__}: {error}).") from None
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    return load_dataset(str(path), streaming=streaming)


def load_dataset_dict(name: str, config: str | None = None, streaming: bool = False, seed: int = 0):
    """The ``DatasetDict`` (or ``IterableDatasetDict`` when streaming) named by ``name``."""
    name = str(name) if name is not None else ""
    if not name:
        raise ValueError("A dataset is required: a local data file or folder, trl_renyi:<name>, or a Hub dataset id.")
    if name.startswith(BUILTIN_PREFIX):
        return builtin_dataset(name, seed)
    path = Path(name).expanduser()
    if path.exists():
        return load_local(path, streaming)
    if not looks_like_hub_id(name):
        hint = did_you_mean(path)
        kind = "data file" if file_type(path) else "file or folder"
        raise FileNotFoundError(f"{name}: no such {kind}.{hint}")
    try:
        return load_dataset(name, name=config, streaming=streaming)
    except (ConnectionError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"{name}: no local file or folder of that name, and the Hub dataset {name!r} could not be loaded "
            f"({type(error).__name__}: {error})."
        ) from None


def load_split(name: str, split: str = "train", config: str | None = None, seed: int = 0):
    """One split of the dataset named by ``name`` as a ``datasets.Dataset``; the error lists the splits there are."""
    loaded = load_dataset_dict(name, config=config, seed=seed)
    if split not in loaded:
        raise ValueError(f"{name}: no split {split!r}; it has {sorted(loaded)}.")
    return loaded[split]


def read_records(name: str, split: str = "train") -> list[dict]:
    """The rows of a dataset as a list of dicts (evaluation files), through :func:`load_split`."""
    # `datasets` gives every row the union of the columns (None where a row had no such key): drop those again
    records = [{k: v for k, v in row.items() if v is not None} for row in load_split(str(name), split).to_list()]
    if not records:
        raise ValueError(f"{name} holds no items.")
    return records
