r"""Saving, loading and publishing for the ensemble trainers: the final save, checkpoints, resuming, the best-model
restore, the model card and ``push_to_hub``.

:class:`EnsemblePersistenceMixin` is the part of :class:`~trl_renyi.training.mixin.RenyiEnsembleTrainerMixin` that
touches the disk. Every save of the ensemble goes through :func:`trl_renyi.model.saving.save_ensemble` (atomic: the
target folder is the complete old or the complete new ensemble at every moment, and a run's checkpoints and logs in
``output_dir`` are kept); checkpoints as a whole are published atomically by
:class:`~trl_renyi.training.checkpoint.AtomicCheckpointMixin`. A model card is only written beside an ensemble.

The routing share recorded for the card is member k's mean gradient weight
:math:`\bar r_k = \frac{1}{N}\sum_i \tilde r_{ik}` over the logged training steps after the α warm-up, with
:math:`\tilde r_{ik} = (1-\lambda)\, r_{ik} + \lambda \pi_k` and
:math:`r_{ik} = \operatorname{softmax}_k(\log\pi_k + (1-\alpha)\ell_{ik})` (λ: the responsibility floor,
0.1 by default): how much of the data each member was trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from trl_renyi.hub import model_card, require_hub_access, write_model_card
from trl_renyi.inference.ensemble import RenyiEnsemble
from trl_renyi.model.saved_format import (
    ALPHA_METRIC,
    METADATA_FILE,
    SHARE_METRIC,
    ensemble_metadata,
    load_member_weights,
    member_names,
    read_metadata,
)
from trl_renyi.model.saving import check_save_target, save_ensemble
from trl_renyi.objective import AUTO_ALPHA
from trl_renyi.training.checkpoint import AtomicCheckpointMixin
from trl_renyi.training.config import check_construction_unchanged
from trl_renyi.training.run_summary import run_summary
from trl_renyi.training.source_routing import MEMORY_FILE as SOURCE_MEMORY_FILE

logger = logging.getLogger(__name__)


def routing_share_from_log_history(log_history: Sequence[Mapping], num_members: int, alpha: float | None = None):
    """Mean logged routing share of every member, ``None`` when nothing was logged.

    Args:
        log_history: the trainer's ``state.log_history``.
        num_members: K.
        alpha: when given, only entries logged at that α are used (after the warm-up, where α is held at 1 and
            routing is uniform by construction), unless there are none.

    Returns:
        ``[r̄_0, …, r̄_{K−1}]`` or ``None``.
    """
    keys = [SHARE_METRIC.format(name=name) for name in member_names(num_members)]
    entries = [e for e in log_history if all(key in e for key in keys)]
    if alpha is not None:
        settled = [e for e in entries if ALPHA_METRIC in e and math.isclose(e[ALPHA_METRIC], alpha, abs_tol=1e-9)]
        entries = settled or entries
    if not entries:
        return None
    return [sum(float(e[key]) for e in entries) / len(entries) for key in keys]


def eval_results_from_log_history(log_history: Sequence[Mapping]) -> dict[str, float] | None:
    """The metrics of the last evaluation logged by the trainer (``eval_*`` keys), ``None`` when there was none."""
    for entry in reversed(log_history):
        figures = {
            key: float(value)
            for key, value in entry.items()
            if key.startswith("eval_") and isinstance(value, (int, float)) and not key.endswith(("_runtime", "per_second"))
        }
        if figures:
            return figures
    return None


def training_record(log_history: Sequence[Mapping], num_members: int, alpha: float) -> dict:
    """What a trainer adds to ``renyi_ensemble.json`` for the card: routing shares and the last eval figures."""
    record = {}
    share = routing_share_from_log_history(log_history, num_members, alpha)
    if share is not None:
        record["routing_share"] = share
    figures = eval_results_from_log_history(log_history)
    if figures is not None:
        record["eval_results"] = figures
    return record


class EnsemblePersistenceMixin(AtomicCheckpointMixin):
    """Trainer mixin (before the TRL trainer in the bases): every save, load and upload of the K members."""

    #: trainer state that checkpoints carry besides the members: the source-routing memory (SFT with
    #: ``source_column``; ``None`` otherwise)
    source_memory = None

    @property
    def ensemble(self) -> RenyiEnsemble:
        """The trained ensemble as a :class:`RenyiEnsemble` (shares the trainer's model), with the metadata a save
        records (trainer, routing shares, eval figures)."""
        model = self.accelerator.unwrap_model(self.model)
        return RenyiEnsemble(
            model,
            self.processing_class,
            alpha=self.alpha_after_warmup(),
            member_weights=self.args.member_weights,
            metadata=self._ensemble_metadata(model),
        )

    def _ensemble_metadata(self, model) -> dict:
        """``renyi_ensemble.json`` content, with the logged routing shares and eval figures for the model card."""
        alpha = self.alpha_after_warmup()
        extra = {"trainer": type(self).__name__}
        if self.args.alpha == AUTO_ALPHA:  # what α was chosen from (not yet resolved: the warm-up's α = 1)
            resolution = self.auto_alpha.resolution
            extra["alpha_auto"] = resolution.to_dict() if resolution is not None else {"resolved": False}
        extra.update(training_record(self.state.log_history, self.args.num_members, alpha))
        return ensemble_metadata(model, {**self.args.renyi_metadata(), "alpha": alpha}, extra)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        """transformers' model save (members, tokenizer, ``training_args.bin``) inside one atomic ensemble save."""
        transformers_save = super()._save
        if not self.args.should_save:  # another process: only joins the collectives of a sharded save
            return transformers_save(output_dir, state_dict)

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        save_ensemble(
            output_dir,
            model,
            self._ensemble_metadata(model),
            card=partial(model_card, repo_id=self.hub_model_id),
            write_model=lambda folder: self._write_model_and_routing_state(transformers_save, folder, state_dict),
        )

    def _write_model_and_routing_state(self, transformers_save, folder, state_dict) -> None:
        """transformers' save into ``folder``, plus the routing state a resumed run needs: the source-routing memory
        where the run routes by source (so the stochastic EM continues where it stopped, instead of from an empty
        memory) and the resolution of ``alpha="auto"`` (so a resumed run keeps the α it chose)."""
        transformers_save(str(folder), state_dict)
        if self.source_memory is not None:
            torch.save(self.source_memory.state_dict(), Path(folder) / SOURCE_MEMORY_FILE)
        self.auto_alpha.save(folder)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """TRL's model-card hook (called on checkpoints and ``push_to_hub``): renders the card of the ensemble saved
        in ``args.output_dir`` (K, α, weights, routing shares, eval figures, usage) into its ``README.md``. Where no
        ensemble has been saved yet there is no card: it comes with the ensemble."""
        output_dir = Path(self.args.output_dir)
        if not self.is_world_process_zero() or not (output_dir / METADATA_FILE).is_file():
            return

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        write_model_card(
            output_dir,
            read_metadata(output_dir),
            model_name=model_name,
            repo_id=self.hub_model_id,
            dataset_name=dataset_name,
            tags=tags,
        )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """TRL's ``train``; first refuses a construction setting changed on ``trainer.args`` since the trainer was
        built, warns when ``output_dir`` holds files that a final ``save_model()`` would refuse to mix with, so that
        both are known before the training rather than after it, and logs what the run does (the ensemble and its
        objective, a quantised base, routing by source, the checkpoint it resumes from: :mod:`run_summary`)."""
        check_construction_unchanged(self.args, self.built_with)
        if self.args.should_log:
            for line in run_summary(self, resume_from_checkpoint):
                logger.info(line)
        if self.args.should_save:
            try:
                check_save_target(self.args.output_dir)
            except (FileExistsError, NotADirectoryError) as err:
                logger.warning("save_model() into output_dir will be refused: %s", err)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ publishing
    def push_to_hub(self, *args, **kwargs):
        """Upload as transformers does (it saves to ``args.output_dir`` once the Hub repository exists). When the Hub is
        switched off or the push fails (creating the repository comes before transformers' save), the ensemble is
        saved to ``args.output_dir`` before the error propagates, so the members are never lost with the upload."""
        try:
            require_hub_access("push_to_hub", saved_in=self.args.output_dir)
            return super().push_to_hub(*args, **kwargs)
        except Exception:
            self.save_model()  # the failure path only: the members must not be lost with the upload
            raise

    # ------------------------------------------------------------------ loading
    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: restore every member from ``state.best_model_checkpoint``.

        transformers looks for one root adapter (or full model) there and only warns when it finds none; an ensemble
        checkpoint holds ``member_k/`` folders, which are loaded here (the engines' own formats still go to
        transformers).
        """
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        logger.info("Loading the best members from %s (score: %s).", best, self.state.best_metric)
        model = self.accelerator.unwrap_model(self.model)
        load_member_weights(model, best, self.member_names)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.auto_alpha.load(resume_from_checkpoint)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_member_weights(model, resume_from_checkpoint, self.member_names)  # into the members as they are
        memory_file = Path(resume_from_checkpoint) / SOURCE_MEMORY_FILE
        if self.source_memory is not None and memory_file.is_file():
            self.source_memory.load_state_dict(torch.load(memory_file, weights_only=True))
        return None
