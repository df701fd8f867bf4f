r"""Publishing ensembles: the model card and the upload to the Hugging Face Hub.

An ensemble's Hub repository has the layout of its saved folder::

    README.md               model card (YAML metadata + K, α, weights, routing shares, eval figures, usage)
    renyi_ensemble.json     the ensemble's settings (read by RenyiEnsemble.from_pretrained)
    member_0/ … member_{K-1}/   plain PEFT adapters (adapter_config.json + adapter_model.safetensors)
    tokenizer files

so ``RenyiEnsemble.from_pretrained("user/repo")`` and ``PeftModel.from_pretrained(base, "user/repo",
subfolder="member_0")`` both work on it. The card is generated from ``renyi_ensemble.json`` alone, so the same card
comes out of ``trainer.save_model``, ``RenyiEnsemble.save_pretrained`` and both ``push_to_hub`` methods.

The routing share of member k (how much of the data each member was trained on) is recorded by the trainers; see
:func:`trl_renyi.training.persistence.routing_share_from_log_history`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, constants

from trl_renyi.model.loading import hub_id
from trl_renyi.model.saved_format import (
    CARD_FILE,
    CARD_TMP_FILE,
    LIBRARY_NAME,
    METADATA_FILE,
    member_names,
)
from trl_renyi.version import __version__

#: The Jinja template of the card (package data), rendered by ``huggingface_hub.ModelCard.from_template``.
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
BASE_TAGS = ("trl", "trl-renyi", "peft", "lora", "lora-ensemble", "uncertainty")


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eval_table(results: Mapping) -> list[str]:
    """Markdown table for ``{metric: value}`` or ``{group: {metric: value}}``."""
    if all(isinstance(v, Mapping) for v in results.values()):
        metrics = list(dict.fromkeys(m for row in results.values() for m in row))
        lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for group, row in results.items():
            lines.append(f"| {group} | " + " | ".join(_fmt(row.get(m, "")) for m in metrics) + " |")
        return lines
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in results.items()]
    return lines


def _card_base_model(name: str | None) -> str | None:
    """The base model as a Hub id (embedded aliases map to their original repo); ``None`` for local folders."""
    if not name:
        return None
    resolved = hub_id(name)
    if os.path.isdir(resolved) or resolved.startswith((".", "/", "~")):
        return None
    return resolved


def _is_hub_dataset(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub dataset id (not a local path nor a bundled ``trl_renyi:<name>`` dataset)."""
    return bool(name) and ":" not in name and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def model_card(
    metadata: Mapping,
    model_name: str | None = None,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """Build the model card of an ensemble from its ``renyi_ensemble.json`` content.

    Args:
        metadata: the ensemble's metadata (``num_members``, ``alpha``, ``member_weights``, ``base_model_name_or_path``
            and optionally ``routing_share``, ``eval_results``, ``alpha_warmup_ratio``, ``trainer``).
        model_name: the card's title (defaults to the repo name or ``"trl_renyi ensemble"``).
        repo_id: the Hub repository the usage snippet loads from (a placeholder when unknown).
        dataset_name: the training data, recorded in the metadata when given.
        tags: extra tags.
    """
    dataset_name = dataset_name or metadata.get("dataset_name")
    k = int(metadata["num_members"])
    alpha = float(metadata["alpha"])
    weights = list(metadata.get("member_weights") or [1.0 / k] * k)
    names = list(metadata.get("member_names") or member_names(k))
    base_name = metadata.get("base_model_name_or_path") or ""
    base_model = _card_base_model(base_name)
    trainer = metadata.get("trainer")
    all_tags = list(BASE_TAGS)
    if trainer:
        all_tags.append("dpo" if "DPO" in trainer else "sft" if "SFT" in trainer else trainer)
    all_tags += [t for t in (tags or []) if t not in all_tags]
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if base_model else None,
        library_name=LIBRARY_NAME,
        pipeline_tag="text-generation",
        tags=all_tags,
        datasets=[dataset_name] if _is_hub_dataset(dataset_name) else None,
    )
    title = model_name or (repo_id.split("/")[-1] if repo_id else "trl_renyi ensemble")
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{base_name or 'unknown'}`"
    warmup = float(metadata.get("alpha_warmup_ratio", 0.0) or 0.0)
    alpha_text = f"{alpha:g}" + (f" (held at 1 for the first {warmup:.0%} of the steps)" if warmup > 0 else "")
    auto = metadata.get("alpha_auto")
    if isinstance(auto, Mapping) and auto.get("lambda1") is not None:
        alpha_text += (
            f"; chosen by the stability criterion (`alpha='auto'`) at step {auto.get('step')}: λ₁ = "
            f"{_fmt(auto['lambda1'])} against the null's {_fmt(auto.get('lambda_null'))} on {auto.get('num_units')} units"
        )
    elif isinstance(auto, Mapping):
        alpha_text += "; `alpha='auto'`" + (f": {auto['reason']}" if auto.get("reason") else " (not yet resolved)")
    share = metadata.get("routing_share")
    results = metadata.get("eval_results")
    return ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        title=title,
        num_members=k,
        base_link=base_link,
        trainer=trainer,
        alpha_text=alpha_text,
        weights_text=", ".join(f"{w:.3g}" for w in weights),
        floor_text=_fmt(float(metadata.get("responsibility_floor", 0.0) or 0.0)),
        loglik_reduction=metadata.get("loglik_reduction", "sum"),
        init_std_text=_fmt(float(metadata.get("member_init_std", 0.0) or 0.0)),
        dataset_name=dataset_name,
        members=[
            {
                "name": name,
                "weight": f"{weights[index]:.3f}",
                "share": f"{share[index]:.3f}" if share is not None and index < len(share) else "n/a",
            }
            for index, name in enumerate(names)
        ],
        eval_table="\n".join(_eval_table(results)) if results else "",
        source=repo_id or "path/or/repo-id",
        base_model_id=base_model or base_name or "path/to/base-model",
        first_member=names[0],
        library_version=metadata.get("library_version", __version__),
    )


def write_model_card(directory: str | os.PathLike, metadata: Mapping, **kwargs) -> Path:
    """Write the ensemble's ``README.md`` into ``directory`` in one rename (arguments as :func:`model_card`)."""
    path = Path(directory) / CARD_FILE
    tmp = path.with_name(CARD_TMP_FILE)
    model_card(metadata, **kwargs).save(str(tmp))
    os.replace(tmp, path)
    return path


def require_hub_access(what: str, saved_in: str | os.PathLike | None = None) -> None:
    """Refuse ``what`` (an upload) by name when the Hub is switched off (``HF_HUB_OFFLINE=1``), saying where the
    ensemble was saved instead, rather than failing inside ``huggingface_hub`` with ``OfflineModeIsEnabled``."""
    if constants.HF_HUB_OFFLINE:
        where = ""
        if saved_in:
            where = f" The ensemble is saved in {saved_in}; push it later with RenyiEnsemble.from_pretrained(...).push_to_hub(repo_id)."
        raise RuntimeError(f"{what} needs the Hugging Face Hub, but HF_HUB_OFFLINE is set.{where}")


def upload_ensemble_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload trl_renyi ensemble",
    create_pr: bool = False,
):
    """Create ``repo_id`` if needed and upload a saved ensemble folder (members, ``renyi_ensemble.json``, card)."""
    folder = Path(folder)
    for required in (METADATA_FILE, CARD_FILE):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder / required} is missing: save the ensemble before uploading it.")
    require_hub_access(f"Uploading {folder} to {repo_id}")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main" and not create_pr:
        api.create_branch(repo.repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
        ignore_patterns=["checkpoint-*", "*.tmp", ".*"],
    )


def push_ensemble_to_hub(ensemble, repo_id: str, model_name: str | None = None, dataset_name: str | None = None, **kwargs):
    """Save ``ensemble`` (a :class:`~trl_renyi.RenyiEnsemble`) with a card for ``repo_id`` and upload it.

    Keyword arguments go to :func:`upload_ensemble_folder` (``token``, ``private``, ``revision``, ``commit_message``,
    ``create_pr``).
    """
    require_hub_access(f"Pushing the ensemble to {repo_id}")  # before anything is written
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"dataset_name": dataset_name} if dataset_name else {}
        ensemble.save_pretrained(tmp, model_name=model_name, repo_id=repo_id, **extra)
        return upload_ensemble_folder(tmp, repo_id, **kwargs)
