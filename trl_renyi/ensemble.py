"""`RenyiEnsemble`: a trained ensemble of K LoRA members on one base model — saving, loading and scoring.

On disk (and on the Hub) an ensemble is a folder holding one plain PEFT adapter folder per member
(``member_k/adapter_config.json`` + ``adapter_model.safetensors``, each loadable with
``PeftModel.from_pretrained(base, folder/member_k)``) and ``renyi_ensemble.json`` with the ensemble's settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from . import __version__
from .choices import predict_choices as _predict_choices
from .choices import predict_preferences as _predict_preferences
from .encoding import collate_scoring_batch, encode_prompt_completion
from .generation import generate as _generate
from .members import attach_ensemble, get_router, member_names, set_members_trainable, shared_trunk, tile_for_members
from .models import canonical_name, load_causal_lm, load_tokenizer, model_name_or_path
from .objective import normalized_log_weights, renyi_bound
from .uncertainty import decompose

METADATA_FILE = "renyi_ensemble.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_ADAPTER_WEIGHTS = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
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


def ensemble_metadata(peft_model: PeftModel, settings: dict, extra: dict | None = None) -> dict:
    """The content of ``renyi_ensemble.json`` for ``peft_model`` and the ensemble ``settings``."""
    names = member_names(settings["num_members"])
    base = peft_model.get_base_model()
    weights = settings.get("member_weights")
    if weights is None:
        weights = [1.0 / len(names)] * len(names)
    meta = {
        "format_version": 1,
        "library": "trl_renyi",
        "library_version": __version__,
        "num_members": len(names),
        "member_names": names,
        "alpha": float(settings["alpha"]),
        "member_weights": [float(w) for w in weights],
        "loglik_reduction": settings.get("loglik_reduction", "sum"),
        "alpha_warmup_ratio": float(settings.get("alpha_warmup_ratio", 0.0)),
        "member_init_std": float(settings.get("member_init_std", 0.0)),
        "base_model_name_or_path": peft_model.peft_config[names[0]].base_model_name_or_path
        or model_name_or_path(base),
        "base_model_config_hash": base_config_hash(base.config),
    }
    if extra:
        meta.update(extra)
    return meta


def write_metadata(directory: str | os.PathLike, metadata: dict) -> None:
    """Write ``renyi_ensemble.json`` atomically (a partial file never carries the final name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / METADATA_FILE)


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
    k = meta["num_members"]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{path}: num_members must be an integer >= 1, got {k!r}.")
    if meta["member_names"] != member_names(k):
        raise ValueError(f"{path}: member_names {meta['member_names']} do not match num_members={k}.")
    weights = meta["member_weights"]
    if not isinstance(weights, list) or len(weights) != k or not all(
        isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights
    ):
        raise ValueError(f"{path}: member_weights must be {k} positive numbers, got {weights!r}.")
    if not isinstance(meta["alpha"], (int, float)) or not math.isfinite(meta["alpha"]):
        raise ValueError(f"{path}: alpha must be a finite number, got {meta['alpha']!r}.")
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
        p.name for p in folder.glob("member_*") if p.is_dir() and p.name not in names and (p / ADAPTER_CONFIG).exists()
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


def _same_model_name(given: str, recorded: str) -> bool:
    """Whether two model names refer to the same model: equal after alias resolution, or a local copy whose folder
    name is the recorded repository's name (``/models/SmolLM2-135M-Instruct`` for ``HuggingFaceTB/SmolLM2-135M-Instruct``)."""
    if not given or not recorded:
        return True
    given, recorded = canonical_name(given), canonical_name(recorded)
    tail = lambda name: Path(str(name).rstrip("/")).name.lower()  # noqa: E731
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


@dataclass
class ScoreResult:
    """Per-example scores of prompt/completion pairs under every member and the mixture (N examples, K members).

    Attributes:
        member_loglik: ``(N, K)`` ℓ_ik, summed log-probability of the completion under member k.
        loglik: ``(N,)`` mixture log-likelihood ``log Σ_k π_k p_ik``.
        responsibilities: ``(N, K)`` routing weights ``softmax_k(log π_k + (1-α) ℓ_ik)`` at the ensemble's α.
        num_tokens: ``(N,)`` completion tokens scored.
        mutual_information: ``(N,)`` mean per-token mutual information (epistemic) over the completion.
        mutual_information_max: ``(N,)`` its maximum over the completion tokens.
        entropy: ``(N,)`` mean per-token total predictive entropy.
        aleatoric: ``(N,)`` mean per-token expected member entropy.
        loglik_std: ``(N,)`` standard deviation of ℓ_ik across members.
    """

    member_loglik: torch.Tensor
    loglik: torch.Tensor
    responsibilities: torch.Tensor
    num_tokens: torch.Tensor
    mutual_information: torch.Tensor
    mutual_information_max: torch.Tensor
    entropy: torch.Tensor
    aleatoric: torch.Tensor
    loglik_std: torch.Tensor


class RenyiEnsemble:
    """A K-member LoRA ensemble on one base model, ready for scoring, saving and publishing.

    Args:
        model: a PeftModel holding adapters ``member_0 … member_{K-1}``.
        tokenizer: its tokenizer (needed for scoring text).
        alpha: the Rényi order the ensemble was trained with (used for responsibilities).
        member_weights: mixture weights π_k (normalised); uniform when ``None``.
        metadata: extra settings recorded in ``renyi_ensemble.json``.
    """

    def __init__(self, model: PeftModel, tokenizer=None, alpha: float = 0.5, member_weights=None, metadata=None):
        num_members = sum(1 for n in model.peft_config if n.startswith("member_"))
        attach_ensemble(model, num_members)
        self.model = model
        self.tokenizer = tokenizer
        self.alpha = float(alpha)
        self.member_names = member_names(num_members)
        self.log_weights = normalized_log_weights(num_members, member_weights)
        self.metadata = dict(metadata or {})

    @property
    def num_members(self) -> int:
        return len(self.member_names)

    @property
    def member_weights(self) -> list[float]:
        return self.log_weights.exp().tolist()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def settings(self) -> dict:
        return {
            **self.metadata,
            "num_members": self.num_members,
            "alpha": self.alpha,
            "member_weights": self.member_weights,
        }

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, **extra) -> None:
        """Write every member as a plain PEFT adapter folder (safetensors), the tokenizer, ``renyi_ensemble.json`` and
        the model card ``README.md``. ``extra`` entries (e.g. ``eval_results={...}``) are recorded in the metadata."""
        from .hub import CARD_FIELDS, write_model_card

        directory = Path(directory)
        self.model.save_pretrained(str(directory), selected_adapters=self.member_names, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        extra = {**{key: self.metadata[key] for key in CARD_FIELDS if key in self.metadata}, **extra}
        metadata = ensemble_metadata(self.model, self.settings(), extra or None)
        write_metadata(directory, metadata)
        write_model_card(directory, metadata)

    def push_to_hub(self, repo_id: str, model_name: str | None = None, dataset_name: str | None = None, **kwargs):
        """Upload the ensemble to the Hub repository ``repo_id``: every member folder, ``renyi_ensemble.json``, the
        tokenizer and a generated model card. Keyword arguments: ``token``, ``private``, ``revision``,
        ``commit_message``, ``create_pr`` (see :func:`trl_renyi.hub.upload_ensemble_folder`)."""
        from .hub import push_ensemble_to_hub

        return push_ensemble_to_hub(self, repo_id, model_name=model_name, dataset_name=dataset_name, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        base_model=None,
        tokenizer=None,
        revision: str | None = None,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        check_base_model: bool = True,
        base_model_revision: str | None = None,
        is_trainable: bool = False,
    ) -> RenyiEnsemble:
        """Rebuild a saved ensemble from a local folder (or a Hub repo id, downloaded at ``revision``).

        Args:
            path: folder written by ``save_pretrained`` / ``RenyiSFTTrainer.save_model``, or a Hub repo id.
            base_model: the base model, as a loaded model or a name; by default the one recorded in the metadata.
            tokenizer: defaults to the tokenizer saved with the ensemble, else the base model's.
            revision: Hub revision (branch, tag or commit) of the ensemble repository to pin.
            dtype: dtype of a base model loaded by name.
            trust_remote_code: allow a base model or tokenizer loaded by name to run code from its repository (off
                unless asked).
            check_base_model: refuse a base model whose name or config hash differs from the recorded one.
            base_model_revision: Hub revision of a base model (and its tokenizer) loaded by name.
            is_trainable: leave the members' LoRA weights trainable (to continue training them); by default they are
                frozen and in inference mode, as with PEFT's ``PeftModel.from_pretrained``.

        Member weights are read from safetensors only; the folder is validated (``renyi_ensemble.json``, every member
        folder, the members' LoRA configs, the base model) before any weight is loaded.
        """
        folder = Path(path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(path), revision=revision))
        meta = read_metadata(folder)
        check_saved_members(folder, meta["member_names"])
        base_name = meta.get("base_model_name_or_path") or ""
        if base_model is None:
            if not base_name:
                raise ValueError(f"{folder / METADATA_FILE} records no base model: pass `base_model`.")
            base_model = base_name
        if check_base_model:  # by name first: fails before a download
            given = base_model if isinstance(base_model, str) else model_name_or_path(base_model)
            check_base_model_name(given, meta, folder / METADATA_FILE)
        hub_kwargs = {"trust_remote_code": trust_remote_code}
        if base_model_revision is not None:
            hub_kwargs["revision"] = base_model_revision
        if isinstance(base_model, str):
            base_model = load_causal_lm(base_model, dtype=dtype, **hub_kwargs)
        if check_base_model:
            check_base_model_hash(base_model, meta, folder / METADATA_FILE)
        if tokenizer is None:
            if (folder / "tokenizer_config.json").is_file():
                tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
            elif base_name:
                tokenizer = load_tokenizer(base_name, **hub_kwargs)
        names = meta["member_names"]
        model = PeftModel.from_pretrained(base_model, str(folder / names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(folder / name), adapter_name=name)
        model.eval()
        ensemble = cls(model, tokenizer, alpha=meta["alpha"], member_weights=meta["member_weights"], metadata=meta)
        if not is_trainable:
            set_members_trainable(model, names, trainable=False)
        return ensemble

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def member_forward(self, batch: dict[str, torch.Tensor], **model_kwargs):
        """The model's output for ``batch`` (B rows) tiled K times, in one member-batched forward (no gradients).

        ``logits`` come back as ``(K, B, T', V)``; ``model_kwargs`` (e.g. a KV ``cache``, ``use_cache``,
        ``logits_to_keep``) go to the model as they are, so a KV cache holds the K·B tiled rows.
        """
        router = get_router(self.model)
        if not router.enabled:
            raise RuntimeError("The member router is disabled; re-enable it before member-batched inference.")
        device = self.device
        tiled = tile_for_members({k: v.to(device) for k, v in batch.items() if k != "labels"}, self.num_members)
        with shared_trunk(self.model, active=False):  # the rows are tiled here, never again inside the model
            outputs = self.model(**tiled, **model_kwargs)
        outputs.logits = outputs.logits.view(self.num_members, batch["input_ids"].shape[0], *outputs.logits.shape[1:])
        return outputs

    def member_logits(self, batch: dict[str, torch.Tensor], **model_kwargs) -> torch.Tensor:
        """``(K, B, T, V)`` logits of every member for a batch of B rows, in one member-batched forward."""
        model_kwargs.setdefault("use_cache", False)
        return self.member_forward(batch, **model_kwargs).logits

    def score(self, prompts, completions, batch_size: int = 8, show_progress: bool | None = None) -> ScoreResult:
        """Score completions under every member in member-batched forwards (no gradients).

        ``prompts`` / ``completions`` are plain strings or conversational message lists (rendered with the
        tokenizer's chat template exactly as SFTTrainer renders them).
        """
        if self.tokenizer is None:
            raise ValueError("This ensemble has no tokenizer; pass one to RenyiEnsemble or from_pretrained.")
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
        was_training = self.model.training
        self.model.eval()
        encoded = [encode_prompt_completion(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        starts = range(0, len(encoded), batch_size)
        if show_progress is None:
            show_progress = len(encoded) > 4 * batch_size
        fields: dict[str, list[torch.Tensor]] = {}
        for start in tqdm(starts, desc="scoring", disable=not show_progress):
            batch = collate_scoring_batch(encoded[start : start + batch_size], pad)
            for key, value in self._score_batch(batch).items():
                fields.setdefault(key, []).append(value)
        if was_training:
            self.model.train()
        out = {key: torch.cat(values) for key, values in fields.items()}
        bound = renyi_bound(out["member_loglik"], self.alpha, self.log_weights)
        out["responsibilities"] = bound.responsibilities
        out["loglik"] = renyi_bound(out["member_loglik"], 0.0, self.log_weights).value
        out["loglik_std"] = out["member_loglik"].std(dim=-1, unbiased=False)
        return ScoreResult(**out)

    def _score_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # only the columns that predict a completion token go through the LM head (prompts are often most tokens)
        scored = (batch["labels"][:, 1:] != -100).any(0).nonzero().flatten()
        first, last = (int(scored[0]), int(scored[-1])) if len(scored) else (0, 0)
        logits = self.member_logits(batch, logits_to_keep=torch.arange(first, last + 1))  # (K, B, T', V)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        labels = batch["labels"][:, 1 + first : 2 + last].to(log_probs.device)
        mask = labels != -100
        token_lp = log_probs.gather(-1, labels.clamp(min=0)[None, ..., None].expand(self.num_members, -1, -1, 1))
        token_lp = token_lp.squeeze(-1) * mask  # (K, B, T-1)
        member_loglik = token_lp.sum(-1).T.cpu()  # (B, K)
        parts = decompose(log_probs, self.log_weights.to(log_probs.device))  # each (B, T-1)
        num_tokens = mask.sum(-1).clamp(min=1)
        mean = lambda x: ((x * mask).sum(-1) / num_tokens).cpu()  # noqa: E731
        return {
            "member_loglik": member_loglik,
            "num_tokens": mask.sum(-1).cpu(),
            "mutual_information": mean(parts.mutual_information),
            "mutual_information_max": parts.mutual_information.masked_fill(~mask, 0.0).amax(-1).cpu(),
            "entropy": mean(parts.total),
            "aleatoric": mean(parts.aleatoric),
        }

    def predict_choices(
        self, prompts, choices, length_normalize: bool = False, batch_size: int = 8, show_progress: bool | None = None
    ):
        """Multiple-choice predictions, one :class:`~trl_renyi.choices.ChoicePrediction` per prompt (each prompt has
        its own list of choices): mixture ``probs`` (C,), ``member_probs`` (K, C), entropy, aleatoric and mutual
        information. See :func:`trl_renyi.choices.predict_choices`."""
        return _predict_choices(self, prompts, choices, length_normalize, batch_size, show_progress)

    def predict_preferences(self, prompts, chosen, rejected, reference=None, beta: float = 0.1, **kwargs):
        """(chosen, rejected) predictions by likelihood, or by the DPO implicit reward against ``reference``.
        See :func:`trl_renyi.choices.predict_preferences`."""
        return _predict_preferences(self, prompts, chosen, rejected, reference=reference, beta=beta, **kwargs)

    def generate(self, prompts, strategy: str = "mixture", **kwargs):
        """Generate text with per-token entropy and mutual information; ``strategy`` is ``"mixture"`` (Bayesian model
        average, posterior-weighted), ``"member"`` (with ``member=k``) or ``"routed"``. See
        :func:`trl_renyi.generation.generate` for the options."""
        return _generate(self, prompts, strategy=strategy, **kwargs)
