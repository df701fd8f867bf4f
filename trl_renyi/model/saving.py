"""The one save path of an ensemble: trainers, ``RenyiEnsemble.save_pretrained`` and the demo all write through
:func:`save_ensemble`.

A save never writes into the target folder. It builds the complete new folder beside it (a hidden sibling
``.<name>.saving-<id>``): the member adapters, the tokenizer, ``renyi_ensemble.json`` and the model card, with the
save's id stamped into the metadata and every member (:data:`~trl_renyi.model.saved_format.SAVE_ID_FIELD`), plus
hard links to the run files the target holds besides an ensemble (``checkpoint-*``, ``runs/``, ``trainer_state.json``,
…; see :data:`RUN_ENTRIES`). It then flushes everything to disk and swaps the two folders in one rename
(:func:`trl_renyi.atomic.replace_folder`). Killed at any moment, the target is the complete old folder or the complete
new one; member folders the new ensemble does not have are gone with the old folder; checkpoints and logs of a run
are kept. A target holding anything else (files neither this library nor a trainer wrote) is refused by name rather
than mixed with. A sibling left by a killed save is removed by the next save into the same folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trl_renyi.atomic import fsync_tree, replace_folder
from trl_renyi.model.loading import (
    hub_id,
    is_embedded,
    loaded_vocab_size,
    model_name_or_path,
)
from trl_renyi.model.saved_format import (
    ADAPTER_WEIGHTS,
    CARD_FILE,
    CARD_TMP_FILE,
    FILES_FIELD,
    MEMBER_FOLDER_PATTERN,
    METADATA_FILE,
    SAVE_ID_FIELD,
    SAVE_ID_HEADER,
)

#: What transformers' ``Trainer`` and TRL keep in a run's ``output_dir`` besides the model; a save keeps them.
RUN_ENTRIES = (
    "checkpoint-*",
    ".staging-*",
    "runs",
    "trainer_state.json",
    "training_args.bin",
    "*_results.json",
    CARD_FILE,
)
#: The entries of an ensemble saved before saves listed their files (:data:`FILES_FIELD`).
_UNLISTED_ENSEMBLE_ENTRIES = (
    METADATA_FILE,
    CARD_FILE,
    MEMBER_FOLDER_PATTERN,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "vocab.*",
    "merges.txt",
    "training_args.bin",
)
_SAVING = ".saving-"


@contextmanager
def members_for_saving(peft_model: PeftModel, names):
    """The state PEFT saves the member folders in: every ``adapter_config.json`` records the base model's Hub id.

    For the embedded model the recorded name is the Hub id of its original (``HuggingFaceTB/SmolLM2-135M-Instruct``),
    so ``AutoPeftModelForCausalLM`` and ``PeftModel.from_pretrained`` resolve the base as for any Hub model (the
    members were trained on its Q4_1 GGUF dequantised to float32; ``renyi_ensemble.json`` keeps the alias, so
    ``RenyiEnsemble.from_pretrained`` loads exactly those weights). PEFT's save asks the Hub whether the embeddings
    were resized, which cannot be answered offline and warns "Could not find a config file"; for the embedded model
    the answer is known here (the loaded vocabulary size equals the model's), and that one warning is not shown.
    """
    configs = {name: peft_model.peft_config[name] for name in names}
    recorded = {name: config.base_model_name_or_path for name, config in configs.items()}
    quiet = []
    for name, config in configs.items():
        base = config.base_model_name_or_path or model_name_or_path(peft_model.get_base_model())
        if base and is_embedded(base):
            vocab = loaded_vocab_size(base)
            if vocab is not None and vocab == peft_model.get_base_model().config.vocab_size:
                quiet.append(re.escape(f"Could not find a config file in {hub_id(base)}"))
            config.base_model_name_or_path = hub_id(base)
    try:
        with warnings.catch_warnings():
            for message in quiet:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for name, config in configs.items():
            config.base_model_name_or_path = recorded[name]


def write_metadata(directory: str | os.PathLike, metadata: Mapping) -> None:
    """Write ``renyi_ensemble.json`` into ``directory``."""
    (Path(directory) / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def ensemble_entries(folder: str | os.PathLike) -> set[str]:
    """The top-level entries of the ensemble saved in ``folder`` (empty when it holds none)."""
    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        return set()
    try:
        files = json.loads((folder / METADATA_FILE).read_text()).get(FILES_FIELD)
    except (OSError, ValueError, AttributeError):  # damaged metadata: the ensemble's entries are known by name
        files = None
    if isinstance(files, list):
        return {str(name) for name in files}
    return {p.name for p in folder.iterdir() if _matches(p.name, _UNLISTED_ENSEMBLE_ENTRIES)}


def check_save_target(directory: str | os.PathLike) -> list[Path]:
    """Refuse a target folder that holds files neither this library nor a trainer wrote.

    Args:
        directory: where an ensemble is to be saved.

    Returns:
        The run files in it (:data:`RUN_ENTRIES` that are not part of a saved ensemble), which a save keeps.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file; an ensemble is saved into a folder.")
    if not target.is_dir():
        return []
    ours = ensemble_entries(target) | {CARD_TMP_FILE}  # a card left half-rendered goes with the old ensemble
    entries = [p for p in target.iterdir() if p.name not in ours]
    foreign = sorted(p.name for p in entries if not _matches(p.name, RUN_ENTRIES))
    if foreign:
        raise FileExistsError(
            f"{target} holds {foreign}, which trl_renyi did not write; an ensemble is not saved among other files (the "
            "folder would mix them). Save into another folder, or move those files away."
        )
    return entries


def _stamp_save_id(weights: Path, save_id: str) -> None:
    """Record ``save_id`` in the header of a member's safetensors file."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} was not written by the save; every member must be saved as safetensors.")
    with safe_open(str(weights), framework="pt") as handle:
        header = dict(handle.metadata() or {})
    save_file(load_file(str(weights)), str(weights), metadata={**header, SAVE_ID_HEADER: save_id})


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _carry(entry: Path, staged: Path) -> None:
    """Put a run file or folder of the old target into the new one (hard links: no data is copied)."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry), staged / entry.name)
    elif entry.is_dir():
        shutil.copytree(entry, staged / entry.name, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(entry), str(staged / entry.name))


@contextmanager
def _staged_folder(target: Path, save_id: str):
    """A new hidden sibling of ``target`` to build the saved folder in; removed if the save fails."""
    prefix = f".{target.name}{_SAVING}"
    if target.parent.is_dir():
        for stale in [p for p in target.parent.iterdir() if p.name.startswith(prefix)]:  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    staged = target.parent / f"{prefix}{save_id}"
    staged.mkdir(parents=True)
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _publish(staged: Path, target: Path, run_entries: list[Path]) -> None:
    """Add the target's run files to the complete ``staged`` folder, flush it and swap it in."""
    for entry in run_entries:
        if not os.path.lexists(staged / entry.name):  # what the save wrote itself (a card, training_args.bin) wins
            _carry(entry, staged)
    fsync_tree(staged)
    replace_folder(staged, target)


def save_ensemble(
    directory: str | os.PathLike,
    model: PeftModel,
    metadata: Mapping,
    tokenizer=None,
    card: Callable[[dict], object] | None = None,
    write_model: Callable[[Path], None] | None = None,
) -> Path:
    """Save an ensemble to ``directory`` atomically (see the module docstring).

    Args:
        directory: the target folder (created if needed; a symbolic link is followed).
        model: the PeftModel holding the members ``metadata["member_names"]``.
        metadata: the content of ``renyi_ensemble.json`` (:func:`~trl_renyi.model.saved_format.ensemble_metadata`);
            the save adds its id and the list of entries it wrote.
        tokenizer: saved beside the members when given.
        card: renders the model card ``README.md`` from the final metadata (e.g. :func:`trl_renyi.hub.model_card`).
        write_model: writes the member folders into the folder it is given; by default PEFT's ``save_pretrained`` of
            the members in safetensors (trainers pass their own save, which adds ``training_args.bin``).

    Returns:
        The target folder.
    """
    target = Path(directory).resolve()
    run_entries = check_save_target(target)
    names = list(metadata["member_names"])
    save_id = uuid.uuid4().hex
    with _staged_folder(target, save_id) as staged:
        with members_for_saving(model, names):
            if write_model is None:
                model.save_pretrained(str(staged), selected_adapters=names, safe_serialization=True)
            else:
                write_model(staged)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staged))
        for name in names:
            _stamp_save_id(staged / name / ADAPTER_WEIGHTS, save_id)
        written = {*os.listdir(staged), METADATA_FILE, *([CARD_FILE] if card is not None else [])}
        final = {**metadata, SAVE_ID_FIELD: save_id, FILES_FIELD: sorted(written)}
        write_metadata(staged, final)
        if card is not None:
            (staged / CARD_FILE).write_text(str(card(final)), encoding="utf-8")
        _publish(staged, target, run_entries)
    return target


def copy_ensemble(source: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Put the ensemble saved in ``source`` (e.g. a checkpoint) into ``directory``, atomically as :func:`save_ensemble`
    does, keeping the run files there. Returns the target folder."""
    source, target = Path(source), Path(directory).resolve()
    run_entries = check_save_target(target)
    with _staged_folder(target, uuid.uuid4().hex) as staged:
        for name in sorted(ensemble_entries(source)):
            path = source / name
            if path.is_dir():
                shutil.copytree(path, staged / name, symlinks=True)
            elif path.exists():
                shutil.copy2(path, staged / name)
        _publish(staged, target, run_entries)
    return target
