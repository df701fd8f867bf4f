"""`RenyiEnsemble`: a trained ensemble of K LoRA members on one base model — saving, loading and scoring.

On disk (and on the Hub) an ensemble is a folder holding one plain PEFT adapter folder per member
(``member_k/adapter_config.json`` + ``adapter_model.safetensors``, each loadable with
``PeftModel.from_pretrained(base, folder/member_k)``) and ``renyi_ensemble.json`` with the ensemble's settings.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from peft import PeftModel

from trl_renyi.compat import quiet_checkpointing_alias
from trl_renyi.hub import model_card, push_ensemble_to_hub
from trl_renyi.inference.choices import predict_choices as _predict_choices
from trl_renyi.inference.choices import predict_preferences as _predict_preferences
from trl_renyi.inference.encoding import has_chat_template
from trl_renyi.inference.generation import generate as _generate
from trl_renyi.inference.scoring import MemberModel, ScoreResult, score_completions
from trl_renyi.model.layer import MEMBER_PREFIX, member_names, member_routing
from trl_renyi.model.loading import load_causal_lm, load_tokenizer, model_name_or_path
from trl_renyi.model.members import (
    install_member_layers,
    set_members_trainable,
    tile_for_members,
)
from trl_renyi.model.saved_format import (
    KEPT_FIELDS,
    METADATA_FILE,
    PREFERENCE_FIELD,
    check_base_model_hash,
    check_base_model_name,
    check_member_weights,
    check_saved_members,
    ensemble_metadata,
    read_metadata,
    resolve_ensemble_folder,
)
from trl_renyi.model.saving import save_ensemble
from trl_renyi.model.trunk import shared_trunk
from trl_renyi.objective import DEFAULT_ALPHA, normalized_log_weights
from trl_renyi.preference import PreferenceLikelihood


class EnsembleScorer:
    """The scoring API shared by :class:`RenyiEnsemble` and the single-model baselines: K member distributions
    from :meth:`member_forward` (implemented by each subclass), combined with weights π_k.

    Args:
        model: the model (a PeftModel for an ensemble).
        tokenizer: its tokenizer (needed for scoring text).
        names: the member names, in the order of :meth:`member_forward`'s blocks.
        alpha: the Rényi order of the reported responsibilities.
        member_weights: mixture weights π_k (normalised); uniform when ``None``.
        responsibility_floor: λ of the reported responsibilities ``(1−λ)·r_ik + λ·π_k``.
        metadata: settings recorded with the model.
        use_chat_template: wrap plain-string prompts (and completions) in the tokenizer's chat template, as one user
            message (and one assistant message), in :meth:`score`, :meth:`predict_choices` and :meth:`generate`.
            ``None`` (default): when the tokenizer has a chat template. ``False`` scores plain strings as plain text,
            which is how TRL trains on plain-text prompt/completion rows. Message lists always use the template.
    """

    def __init__(
        self,
        model,
        tokenizer,
        names,
        alpha: float,
        member_weights=None,
        responsibility_floor=0.0,
        metadata=None,
        use_chat_template: bool | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.member_names = list(names)
        self.alpha = float(alpha)
        self.log_weights = normalized_log_weights(len(self.member_names), member_weights)
        self.responsibility_floor = float(responsibility_floor)
        self.metadata = dict(metadata or {})
        self.use_chat_template = use_chat_template

    @property
    def wraps_plain_prompts(self) -> bool:
        """Whether plain-string prompts are rendered with the chat template (see ``use_chat_template``)."""
        if self.use_chat_template is None:
            return self.tokenizer is not None and has_chat_template(self.tokenizer)
        if self.use_chat_template and not has_chat_template(self.tokenizer):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template.")
        return bool(self.use_chat_template)

    @property
    def num_members(self) -> int:
        """K, the number of members."""
        return len(self.member_names)

    @property
    def member_weights(self) -> list[float]:
        """The mixture weights w_k (sum to 1) used by every prediction."""
        return self.log_weights.exp().tolist()

    @property
    def device(self) -> torch.device:
        """The device the base model's parameters live on."""
        return next(self.model.parameters()).device

    def member_forward(self, batch: dict[str, torch.Tensor], **model_kwargs):
        """The model's output for ``batch`` (B rows) with ``logits`` shaped ``(K, B, T', V)``."""
        raise NotImplementedError

    def member_logits(self, batch: dict[str, torch.Tensor], **model_kwargs) -> torch.Tensor:
        """``(K, B, T, V)`` logits of every member for a batch of B rows, in one member-batched forward."""
        model_kwargs.setdefault("use_cache", False)
        return self.member_forward(batch, **model_kwargs).logits

    @property
    def members(self) -> MemberModel:
        """This scorer as the :class:`~trl_renyi.inference.scoring.MemberModel` that scoring, choice prediction and
        generation work on (its :meth:`member_forward`, tokenizer and mixture weights)."""
        return MemberModel(
            model=self.model,
            forward=self.member_forward,
            tokenizer=self.tokenizer,
            member_names=self.member_names,
            log_weights=self.log_weights,
            alpha=self.alpha,
            responsibility_floor=self.responsibility_floor,
            chat=self.wraps_plain_prompts,
        )

    def score(self, prompts, completions, batch_size: int = 8, show_progress: bool | None = None) -> ScoreResult:
        """Score completions under every member in member-batched forwards (no gradients).

        ``prompts`` / ``completions`` are plain strings or conversational message lists (rendered with the
        tokenizer's chat template exactly as SFTTrainer renders them). Plain strings are wrapped as one user and one
        assistant message when :attr:`wraps_plain_prompts` (see ``use_chat_template``).
        """
        return score_completions(self.members, prompts, completions, batch_size, show_progress)

    def predict_choices(
        self, prompts, choices, length_normalize: bool = False, batch_size: int = 8, show_progress: bool | None = None
    ):
        """Multiple-choice predictions, one :class:`~trl_renyi.inference.choices.ChoicePrediction` per prompt (each
        prompt has its own list of choices): mixture ``probs`` (C,), ``member_probs`` (K, C), entropy, aleatoric and
        mutual information. See :func:`trl_renyi.inference.choices.predict_choices`."""
        return _predict_choices(self.members, prompts, choices, length_normalize, batch_size, show_progress)

    def preference_likelihood(self, beta: float | None = None) -> PreferenceLikelihood:
        """The preference likelihood this model was trained with (recorded by ``RenyiDPOTrainer``), with ``beta`` in
        place of its β when given; for a model that records none (not trained on preferences) the plain DPO sigmoid
        likelihood at ``beta``, which must then be given."""
        recorded = self.metadata.get(PREFERENCE_FIELD)
        if recorded:
            likelihood = PreferenceLikelihood.from_metadata(recorded)
            return likelihood if beta is None else likelihood.with_beta(beta)
        if beta is None:
            raise ValueError(
                "this model records no preference likelihood (it was not trained with RenyiDPOTrainer): give beta for "
                "the plain DPO reward β·Δ, or score by likelihood"
            )
        return PreferenceLikelihood(beta=float(beta))

    def predict_preferences(self, prompts, chosen, rejected, reference=None, beta: float | None = None, likelihood=None, **kwargs):
        """(chosen, rejected) predictions by likelihood, or by the DPO implicit reward against ``reference`` with the
        preference likelihood the ensemble was trained with (``likelihood``; by default :meth:`preference_likelihood`
        with ``beta``). See :func:`trl_renyi.inference.choices.predict_preferences`."""
        if reference is not None and likelihood is None:
            likelihood = self.preference_likelihood(beta)
        reference = reference.members if reference is not None else None
        return _predict_preferences(self.members, prompts, chosen, rejected, reference=reference, likelihood=likelihood, **kwargs)

    def generate(self, prompts, strategy: str = "mixture", **kwargs):
        """Generate text with per-token entropy and mutual information; ``strategy`` is ``"mixture"`` (Bayesian model
        average, posterior-weighted), ``"member"`` (with ``member=k``) or ``"routed"``. See
        :func:`trl_renyi.inference.generation.generate` for the options."""
        return _generate(self.members, prompts, strategy=strategy, **kwargs)


class RenyiEnsemble(EnsembleScorer):
    """A K-member LoRA ensemble on one base model, ready for scoring, saving and publishing.

    Args:
        model: a PeftModel holding adapters ``member_0 … member_{K-1}``.
        tokenizer: its tokenizer (needed for scoring text).
        alpha: the Rényi order the ensemble was trained with (used for responsibilities); by default the ``alpha``
            recorded in ``metadata``, else the training configs' default.
        member_weights: mixture weights π_k (normalised); uniform when ``None``.
        metadata: extra settings recorded in ``renyi_ensemble.json``.
        responsibility_floor: λ of the reported responsibilities ``(1−λ)·r_ik + λ·π_k``, as in training; by default
            the one recorded in ``metadata`` (0 when none is).
        use_chat_template: render plain-string prompts with the tokenizer's chat template (``None``: when it has
            one; see :class:`EnsembleScorer`).

    The constructor changes nothing on ``model`` but routing state: members keep their ``requires_grad`` flags.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer=None,
        alpha: float | None = None,
        member_weights=None,
        metadata=None,
        responsibility_floor: float | None = None,
        use_chat_template: bool | None = None,
    ):
        num_members = sum(1 for n in model.peft_config if n.startswith(MEMBER_PREFIX))
        names = member_names(num_members)
        install_member_layers(model, names)
        metadata = dict(metadata or {})
        alpha = metadata.get("alpha", DEFAULT_ALPHA) if alpha is None else alpha
        floor = metadata.get("responsibility_floor", 0.0) if responsibility_floor is None else responsibility_floor
        super().__init__(model, tokenizer, names, alpha, member_weights, floor, metadata, use_chat_template)

    def __repr__(self) -> str:
        base_model = self.model.get_base_model()
        base = self.metadata.get("base_model_name_or_path") or model_name_or_path(base_model)
        base = base or f"<{type(base_model).__name__} in memory>"
        return (
            f"{type(self).__name__}(num_members={self.num_members}, base_model={base!r}, alpha={self.alpha}, "
            f"responsibility_floor={self.responsibility_floor}, member_weights={[round(w, 4) for w in self.member_weights]})"
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self, directory: str | os.PathLike, model_name: str | None = None, repo_id: str | None = None, **extra
    ) -> None:
        """Save the ensemble to ``directory`` in one atomic step (:func:`trl_renyi.model.saving.save_ensemble`).

        Args:
            directory: the target folder. A folder holding files this library did not write is refused.
            model_name: the model card's title.
            repo_id: the Hub repository the card's usage snippet loads from.
            **extra: fields recorded in ``renyi_ensemble.json`` (e.g. ``eval_results={...}``, ``dataset_name=...``).

        Writes every member as a plain PEFT adapter folder (safetensors), the tokenizer, ``renyi_ensemble.json`` and
        the model card ``README.md``.
        """
        settings = {
            **self.metadata,
            "alpha": self.alpha,
            "member_weights": self.member_weights,
            "responsibility_floor": self.responsibility_floor,
        }
        extra = {**{key: self.metadata[key] for key in KEPT_FIELDS if key in self.metadata}, **extra}
        save_ensemble(
            directory,
            self.model,
            ensemble_metadata(self.model, settings, extra),
            tokenizer=self.tokenizer,
            card=partial(model_card, model_name=model_name, repo_id=repo_id),
        )

    def push_to_hub(self, repo_id: str, model_name: str | None = None, dataset_name: str | None = None, **kwargs):
        """Upload the ensemble to the Hub repository ``repo_id``: every member folder, ``renyi_ensemble.json``, the
        tokenizer and a generated model card. Keyword arguments: ``token``, ``private``, ``revision``,
        ``commit_message``, ``create_pr`` (see :func:`trl_renyi.hub.upload_ensemble_folder`)."""
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
        use_chat_template: bool | None = None,
        quantization_config=None,
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
            use_chat_template: render plain-string prompts with the chat template (``None``: when the tokenizer has
                one).
            quantization_config: load a base model given by name quantised (e.g. ``BitsAndBytesConfig(load_in_4bit=
                True)``, as it was trained with QLoRA); see :func:`~trl_renyi.model.loading.load_causal_lm`.

        Member weights are read from safetensors only; the folder is validated (``renyi_ensemble.json``, every member
        folder, the members' LoRA configs, the base model) before any weight is loaded.
        """
        folder = resolve_ensemble_folder(path, revision)
        meta = read_metadata(folder)
        check_saved_members(folder, meta["member_names"])
        check_member_weights(folder, meta["member_names"])
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
            base_model = load_causal_lm(base_model, dtype=dtype, quantization_config=quantization_config, **hub_kwargs)
        if check_base_model:
            check_base_model_hash(base_model, meta, folder / METADATA_FILE)
        if tokenizer is None:
            if (folder / "tokenizer_config.json").is_file():
                tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
            elif base_name:
                tokenizer = load_tokenizer(base_name, **hub_kwargs)
        names = meta["member_names"]
        with quiet_checkpointing_alias():  # PEFT reads transformers' deprecated alias
            model = PeftModel.from_pretrained(base_model, str(folder / names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(folder / name), adapter_name=name)
        model.eval()
        set_members_trainable(model, names, trainable=is_trainable)
        return cls(
            model,
            tokenizer,
            alpha=meta["alpha"],
            member_weights=meta["member_weights"],
            metadata=meta,
            use_chat_template=use_chat_template,
        )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def member_forward(self, batch: dict[str, torch.Tensor], **model_kwargs):
        """The model's output for ``batch`` (B rows) tiled K times, in one member-batched forward (no gradients).

        ``logits`` come back as ``(K, B, T', V)``; ``model_kwargs`` (e.g. a KV ``cache``, ``use_cache``,
        ``logits_to_keep``) go to the model as they are, so a KV cache holds the K·B tiled rows.
        """
        device = self.device
        rows, tokens = batch["input_ids"].shape[:2]
        tiled = tile_for_members({k: v.to(device) for k, v in batch.items() if k != "labels"}, self.num_members)
        # the rows are tiled here, never again inside the model (no shared trunk)
        with member_routing(self.model, rows, self.member_names, tokens), shared_trunk(self.model, False):
            outputs = self.model(**tiled, **model_kwargs)
        outputs.logits = outputs.logits.view(self.num_members, batch["input_ids"].shape[0], *outputs.logits.shape[1:])
        return outputs
