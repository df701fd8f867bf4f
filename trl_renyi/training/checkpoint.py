"""Atomic checkpoints: a ``checkpoint-N`` folder exists only once everything in it has been written.

``transformers.Trainer`` writes a checkpoint straight into ``checkpoint-N``, file after file (the K member
folders, ``renyi_ensemble.json``, optimizer, scheduler, RNG states, ``trainer_state.json``). A run killed
half-way leaves a folder that ``resume_from_checkpoint=True`` (``get_last_checkpoint``) picks as the newest, and
resuming from it fails, or worse, silently loads some members from nowhere.

:class:`AtomicCheckpointMixin` makes the whole save one step. Every process writes into a hidden staging folder
``.staging-checkpoint-N/checkpoint-N`` (the Trainer's own ``_save_checkpoint``, with the run folder redirected
through its ``_get_output_dir`` hook); after a barrier, the saving process flushes every file to disk (fsync) and
renames the staged folder to ``checkpoint-N`` in one rename (:func:`trl_renyi.atomic.replace_folder`, the same step
that publishes every ensemble save). A crash before the rename leaves only the staging folder, which no checkpoint
lookup matches and the next save removes.

The checkpoint layout itself is unchanged, so plain ``Trainer`` / ``PeftModel`` tooling reads it as before.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from trl_renyi.atomic import fsync_tree, replace_folder
from trl_renyi.model.saving import copy_ensemble

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
TRAINER_STATE_NAME = "trainer_state.json"


def remove_stale_staging(run_dir: Path) -> list[Path]:
    """Delete staging folders left behind by interrupted saves in ``run_dir``; return what was removed."""
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(STAGING_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


class AtomicCheckpointMixin:
    """Trainer mixin (placed before the ``transformers.Trainer`` subclass) that publishes checkpoints atomically."""

    _checkpoint_staging_dir: str | None = None
    _deferred_push: bool = False

    def _get_output_dir(self, trial) -> str:
        if self._checkpoint_staging_dir is not None:
            return self._checkpoint_staging_dir
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """transformers uploads ``output_dir`` during training (``push_to_hub`` with a save-time ``hub_strategy``).
        While a checkpoint is still staged the push waits for its published folder; then the checkpoint's ensemble is
        put into ``output_dir`` first (:func:`~trl_renyi.model.saving.copy_ensemble`: transformers copies only
        single-model and single-adapter files)."""
        if self._checkpoint_staging_dir is not None:
            self._deferred_push = True  # pushed from the published folder once it exists
            return
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            copy_ensemble(checkpoint_folder, self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / f"{STAGING_PREFIX}{name}"
        final = run_dir / name
        if self.args.should_save:
            for path in remove_stale_staging(run_dir):
                logger.warning("Removed %s, left by an interrupted checkpoint save.", path)
        self.accelerator.wait_for_everyone()

        self._checkpoint_staging_dir, self._deferred_push = str(staging_root), False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging_dir = None
        staged = staging_root / name
        if self._repoint_best_checkpoint(run_dir, staging_root) and self.args.should_save:
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG states, shards)

        if self.args.should_save:
            fsync_tree(staged)
            replace_folder(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
        if self._deferred_push:
            self._deferred_push = False
            self._push_from_checkpoint(str(final))  # the whole chain again, now from the published folder

    def _repoint_best_checkpoint(self, run_dir: Path, staging_root: Path) -> bool:
        """Point ``state.best_model_checkpoint`` at the published folder (the Trainer saw only the staging one)."""
        state = self.state
        if not state.best_global_step:
            return False
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
        current = state.best_model_checkpoint
        if (current is not None and Path(current).parent == staging_root) or best.is_dir():
            state.best_model_checkpoint = str(best)
        return state.best_model_checkpoint != current
