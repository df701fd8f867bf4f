"""The saved ensemble format: one plain PEFT adapter folder per member plus ``renyi_ensemble.json``.

On disk (and on the Hub) an ensemble is a folder holding ``member_k/adapter_config.json`` +
``adapter_model.safetensors`` for every member (each loadable with ``PeftModel.from_pretrained(base, folder/member_k)``),
``renyi_ensemble.json`` with the ensemble's settings, the tokenizer and the model card ``README.md``. Every name of that
layout, the metadata fields and the logged metric keys the metadata is filled from are defined here, once; this
module builds, reads and validates the layout (:mod:`trl_renyi.model.saving` writes it).

Every save records one id, ``save_id``, in ``renyi_ensemble.json`` and in the header of every member's
``adapter_model.safetensors``, so a folder whose parts come from two saves is recognised and refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from trl_renyi.data.loading import looks_like_hub_id
from trl_renyi.model.layer import MEMBER_PREFIX, member_names
from trl_renyi.model.loading import canonical_name, model_name_or_path
from trl_renyi.objective import (
    check_alpha,
    check_floor,
    check_num_members,
    check_warmup_ratio,
)
from trl_renyi.objective import check_member_weights as check_mixture_weights
from trl_renyi.paths import did_you_mean
from trl_renyi.version import __version__

# ---------------------------------------------------------------------------------------------------- names
METADATA_FILE = "renyi_ensemble.json"
CARD_FILE = "README.md"
#: Where the card is rendered before it replaces ``README.md`` of a saved ensemble in one rename.
CARD_TMP_FILE = f".{CARD_FILE}.tmp"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_ADAPTER_WEIGHTS = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
#: Member folders carry the adapter names, ``member_names(K)``: ``member_0 … member_{K-1}``.
MEMBER_FOLDER_PATTERN = f"{MEMBER_PREFIX}*"
LIBRARY_NAME = "trl_renyi"
FORMAT_VERSION = 1

#: The ensemble settings recorded in ``renyi_ensemble.json`` (``RenyiEnsembleArguments.renyi_metadata()``).
SETTINGS_FIELDS = (
    "num_members",
    "alpha",
    "member_weights",
    "loglik_reduction",
    "alpha_warmup_ratio",
    "member_init_std",
    "responsibility_floor",
)
#: Fields of ``renyi_ensemble.json`` only the model card reads; kept when a loaded ensemble is saved again.
CARD_FIELDS = ("trainer", "routing_share", "eval_results", "dataset_name", "alpha_auto")
#: A DPO ensemble's preference likelihood (``trl_renyi.preference.PreferenceLikelihood``): β, loss type, smoothing,
#: divergence, LD weighting, reference. Scoring the ensemble by reward rebuilds it from this record.
PREFERENCE_FIELD = "preference_likelihood"
#: Fields of ``renyi_ensemble.json`` a loaded ensemble keeps when it is saved again
KEPT_FIELDS = (*CARD_FIELDS, PREFERENCE_FIELD)
#: The id of the save that wrote a folder: a field of ``renyi_ensemble.json`` and, under :data:`SAVE_ID_HEADER`, a
#: key of every member's safetensors header.
SAVE_ID_FIELD = "save_id"
SAVE_ID_HEADER = "trl_renyi_save_id"
#: The top-level entries a save wrote (what the next save into the same folder replaces).
FILES_FIELD = "files"

#: Keys of the routing metrics the trainers log in TRL's ``_metrics``; ``routing_share`` is read back from them.
ALPHA_METRIC = "renyi/alpha"
SHARE_METRIC = "renyi/{name}/share"

# adapter_config.json fields every member must share (the member-batched forward stacks their LoRA weights)
_SHARED_LORA_FIELDS = (
    "peft_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "modules_to_save",
)


_STRUCTURAL_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
)


def base_config_hash(config) -> str:
    """SHA-256 of the base model's structural config fields (architecture and sizes), to detect a wrong base."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = {key: getattr(text_config, key, None) for key in _STRUCTURAL_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def ensemble_metadata(peft_model: PeftModel, settings: Mapping, extra: Mapping | None = None) -> dict:
    """The content of ``renyi_ensemble.json`` for ``peft_model``.

    Args:
        peft_model: the PeftModel holding the member adapters (their number is K).
        settings: the ensemble settings (:data:`SETTINGS_FIELDS`; ``alpha`` is required, the others have defaults).
            Other keys are ignored.
        extra: further fields recorded as they are (e.g. :data:`CARD_FIELDS`).

    Returns:
        The metadata, without the save's own fields (:data:`SAVE_ID_FIELD`, :data:`FILES_FIELD`), which the save adds.
    """
    names = member_names(sum(1 for name in peft_model.peft_config if name.startswith(MEMBER_PREFIX)))
    base = peft_model.get_base_model()
    weights = settings.get("member_weights")
    if weights is None:
        weights = [1.0 / len(names)] * len(names)
    meta = {
        "format_version": FORMAT_VERSION,
        "library": LIBRARY_NAME,
        "library_version": __version__,
        "num_members": len(names),
        "member_names": names,
        "alpha": float(settings["alpha"]),
        "member_weights": [float(w) for w in weights],
        "loglik_reduction": settings.get("loglik_reduction", "sum"),
        "alpha_warmup_ratio": float(settings.get("alpha_warmup_ratio", 0.0)),
        "member_init_std": float(settings.get("member_init_std", 0.0)),
        "responsibility_floor": float(settings.get("responsibility_floor", 0.0)),
        # the name the base was loaded by (an embedded alias stays an alias: those are the weights trained on)
        "base_model_name_or_path": model_name_or_path(base) or peft_model.peft_config[names[0]].base_model_name_or_path,
        "base_model_config_hash": base_config_hash(base.config),
    }
    if extra:
        meta.update(extra)
    return meta


def read_metadata(directory: str | os.PathLike) -> dict:
    """Read and validate ``renyi_ensemble.json``; errors name the file and the field."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a trl_renyi ensemble folder.")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    for key in ("num_members", "member_names", "alpha", "member_weights"):
        if key not in meta:
            raise ValueError(f"{path} lacks the field {key!r}.")
    try:  # each setting by its one definition (trl_renyi.objective), the message naming the file
        k = check_num_members(meta["num_members"])
        check_alpha(meta["alpha"])
        check_mixture_weights(meta["member_weights"], k)
        check_floor(meta.get("responsibility_floor", 0.0))
        check_warmup_ratio(meta.get("alpha_warmup_ratio", 0.0))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if meta["member_names"] != member_names(k):
        raise ValueError(f"{path}: member_names {meta['member_names']} do not match num_members={k}.")
    return meta


def _read_adapter_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return config


def _comparable(value):
    return sorted(value) if isinstance(value, list) else value


def check_saved_members(folder: str | os.PathLike, names: list[str]) -> None:
    """Check a saved ensemble's member folders before any weight is loaded; errors name the file at fault.

    Every member listed in ``renyi_ensemble.json`` must have ``adapter_config.json`` and safetensors weights (a
    pickle ``adapter_model.bin`` is refused: unpickling can run arbitrary code), no unlisted ``member_*`` folder may
    exist, and all members must share one LoRA configuration (:data:`_SHARED_LORA_FIELDS`).
    """
    folder = Path(folder)
    metadata = folder / METADATA_FILE
    extra = sorted(
        p.name
        for p in folder.glob(MEMBER_FOLDER_PATTERN)
        if p.is_dir() and p.name not in names and (p / ADAPTER_CONFIG).exists()
    )
    if extra:
        raise ValueError(f"{folder} holds member folders {extra} that {metadata} does not list (num_members={len(names)}).")
    reference = None
    for name in names:
        member = folder / name
        if not member.is_dir():
            raise FileNotFoundError(f"Member folder {member} listed in {metadata} is missing.")
        if not (member / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{member / ADAPTER_CONFIG} is missing.")
        if not (member / ADAPTER_WEIGHTS).is_file():
            if (member / PICKLE_ADAPTER_WEIGHTS).is_file():
                raise ValueError(
                    f"{member / PICKLE_ADAPTER_WEIGHTS} is a pickle file, which is never loaded (it can run arbitrary "
                    f"code); save the member as {ADAPTER_WEIGHTS} (safe_serialization=True)."
                )
            raise FileNotFoundError(f"{member / ADAPTER_WEIGHTS} is missing; members are loaded from safetensors only.")
        config = _read_adapter_config(member / ADAPTER_CONFIG)
        shared = {key: _comparable(config.get(key)) for key in _SHARED_LORA_FIELDS}
        if reference is None:
            reference = (member / ADAPTER_CONFIG, shared)
            continue
        differing = [key for key in _SHARED_LORA_FIELDS if shared[key] != reference[1][key]]
        if differing:
            key = differing[0]
            raise ValueError(
                f"The members' LoRA configs disagree on {differing}: {member / ADAPTER_CONFIG} has {key}="
                f"{shared[key]!r} but {reference[0]} has {key}={reference[1][key]!r}; all members must share one "
                "LoraConfig."
            )


def member_save_id(weights: str | os.PathLike) -> str | None:
    """The id of the save that wrote a member's ``adapter_model.safetensors`` (``None`` before save ids existed)."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return (handle.metadata() or {}).get(SAVE_ID_HEADER)
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{weights} is not a readable safetensors file ({type(err).__name__}: {err}).") from None


def check_single_save(folder: str | os.PathLike, names: list[str]) -> None:
    """Refuse a folder whose members and ``renyi_ensemble.json`` were not all written by one save.

    Every save records its id in the metadata (:data:`SAVE_ID_FIELD`) and in each member's safetensors header
    (:data:`SAVE_ID_HEADER`); a member copied in from another save, or left by an interrupted save of an older
    library version, carries another id (or none).
    """
    folder = Path(folder)
    metadata = folder / METADATA_FILE
    expected = read_metadata(folder).get(SAVE_ID_FIELD)
    for name in names:
        weights = folder / name / ADAPTER_WEIGHTS
        found = member_save_id(weights)
        if found != expected:
            raise ValueError(
                f"{folder} mixes two saves: {weights} was written by save {found or '(none recorded)'} but {metadata} "
                f"by save {expected or '(none recorded)'}. Save the ensemble again, or restore the whole folder."
            )


def _same_model_name(given: str, recorded: str) -> bool:
    """Whether two model names refer to the same model: equal after alias resolution, or a local copy whose folder
    name is the recorded repository's name (``/models/SmolLM2-135M-Instruct`` for ``HuggingFaceTB/SmolLM2-135M-Instruct``)."""
    if not given or not recorded:
        return True
    given, recorded = canonical_name(given), canonical_name(recorded)
    tail = lambda name: Path(str(name).rstrip("/")).name.lower()
    return given == recorded or tail(given) == tail(recorded)


def check_base_model_name(name: str, metadata: dict, metadata_path: Path) -> None:
    """Refuse a base model whose name differs from ``base_model_name_or_path`` recorded in ``metadata``."""
    recorded_name = metadata.get("base_model_name_or_path") or ""
    if not _same_model_name(name, recorded_name):
        raise ValueError(
            f"The base model {name!r} differs from the one recorded in {metadata_path} ({recorded_name!r}): "
            "base_model_name_or_path does not match. Pass the recorded base model, or check_base_model=False if "
            "it is the same model under another name."
        )


def check_base_model_hash(base_model, metadata: dict, metadata_path: Path) -> None:
    """Refuse a base model whose structural config hash differs from ``base_model_config_hash`` in ``metadata``."""
    recorded_hash = metadata.get("base_model_config_hash")
    if recorded_hash and recorded_hash != base_config_hash(base_model.config):
        name = model_name_or_path(base_model) or type(base_model).__name__
        raise ValueError(
            f"The base model ({name}) differs from the one recorded in {metadata_path} "
            f"({metadata.get('base_model_name_or_path') or 'unnamed'}): its config hash (base_model_config_hash) "
            "does not match."
        )


def load_member_weights(model: PeftModel, checkpoint: str | Path, names: list[str]) -> None:
    """Load every member's LoRA weights from ``checkpoint/member_k/adapter_model.safetensors`` in place."""
    checkpoint = Path(checkpoint)
    recorded = None
    if (checkpoint / METADATA_FILE).is_file():
        recorded = read_metadata(checkpoint)["member_names"]
        if recorded != list(names):
            raise ValueError(
                f"{checkpoint / METADATA_FILE} records num_members={len(recorded)} but this trainer has "
                f"num_members={len(names)}; resume with the num_members the checkpoint was trained with."
            )
    for name in names:
        path = checkpoint / name / ADAPTER_WEIGHTS
        if not path.is_file() and (checkpoint / name / PICKLE_ADAPTER_WEIGHTS).is_file():
            raise ValueError(
                f"{checkpoint / name / PICKLE_ADAPTER_WEIGHTS} is a pickle file, which is never loaded (it can run "
                f"arbitrary code); member weights are read from {ADAPTER_WEIGHTS} only."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"Checkpoint {checkpoint} lacks {name}/{ADAPTER_WEIGHTS}; every member must be saved as safetensors."
            )
    weights = {name: read_member_weights(checkpoint / name / ADAPTER_WEIGHTS, name) for name in names}
    if recorded is not None:
        check_single_save(checkpoint, list(names))
    for name in names:
        result = set_peft_model_state_dict(model, weights[name], adapter_name=name)
        unexpected = [key for key in getattr(result, "unexpected_keys", []) if name in key or "lora_" in key]
        if unexpected:
            raise ValueError(
                f"{checkpoint / name / ADAPTER_WEIGHTS} holds weights that fit no layer of the model: {unexpected[:5]}."
            )


def read_member_weights(path: str | os.PathLike, name: str) -> dict:
    """Read one member's ``adapter_model.safetensors``; refuse a damaged file or non-finite weights by member and path."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(
            f"Member {name}: {path} is not a readable safetensors file ({type(err).__name__}: {err}); the file is "
            "damaged or incomplete — save the ensemble again or restore this member folder."
        ) from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"Member {name}: {path} holds NaN or infinite weights in {key!r}; refusing to load it.")
    return tensors


def check_member_weights(folder: str | os.PathLike, names: list[str]) -> None:
    """Read and check every member's weights file before any of them is loaded into a model: readable, finite, and
    written by the save that wrote ``renyi_ensemble.json`` (:func:`check_single_save`)."""
    for name in names:
        read_member_weights(Path(folder) / name / ADAPTER_WEIGHTS, name)
    check_single_save(folder, names)


def resolve_ensemble_folder(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a saved ensemble: ``path`` itself, or a Hub repo id downloaded at ``revision``.

    A path that does not exist is reported as a missing folder (with the closest names beside it); only a string
    shaped like ``owner/name`` is looked up on the Hub.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise NotADirectoryError(f"{folder} is a file; an ensemble is a folder holding {METADATA_FILE}.")

    text = str(path)
    if "/" in text and looks_like_hub_id(text) and not text.startswith("~") and not Path(text.split("/")[0]).is_dir():
        try:
            return Path(snapshot_download(text, revision=revision))
        except Exception as err:
            raise FileNotFoundError(
                f"{text!r} is no local folder, and the Hub repository {text!r} could not be fetched "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
            ) from None

    hint = did_you_mean(folder, folders_only=True)
    raise FileNotFoundError(f"Ensemble folder {str(folder)!r} does not exist.{hint}")
