"""Save a tiny ensemble with ``RenyiEnsemble.save_pretrained`` and kill this process (SIGKILL) at a named point of
the save, for the kill-during-save tests of :mod:`trl_renyi.model.saving`.

    python tests/saving_script.py FOLDER --members 2 --seed 2 --kill-at between_members

Points: ``before`` (the target checked, nothing written), ``between_members`` (PEFT has written the first member),
``before_metadata`` (members stamped, ``renyi_ensemble.json`` not yet written), ``before_rename`` (the new folder
complete and flushed), ``after_rename`` (swapped in, the old folder not yet removed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KILL_POINTS = ("before", "between_members", "before_metadata", "before_rename", "after_rename")
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def tiny_ensemble(num_members: int, seed: int):
    """The same tiny ensemble in every process: ``(RenyiEnsemble, base model factory)``."""
    from peft import LoraConfig

    from trl_renyi import RenyiEnsemble, build_ensemble
    from trl_renyi.testing import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    base = lambda: tiny_llama(tokenizer, init_std=0.5)  # noqa: E731
    model = build_ensemble(base(), LoraConfig(**LORA), num_members, seed=seed, init_std=0.05)
    return RenyiEnsemble(model, tokenizer, alpha=0.5), base


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, target: Path) -> None:
    """Make the save kill this process at ``point``."""
    import peft.peft_model

    from trl_renyi import atomic
    from trl_renyi.model import saving

    def after(function, condition=lambda *args: True):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            if condition(*args):
                _die()
            return result

        return wrapped

    def before(function):
        def wrapped(*args, **kwargs):
            _die()
            return function(*args, **kwargs)

        return wrapped

    if point == "before":
        saving.check_save_target = after(saving.check_save_target)
    elif point == "between_members":
        peft.peft_model.safe_save_file = after(peft.peft_model.safe_save_file)
    elif point == "before_metadata":
        saving.write_metadata = before(saving.write_metadata)
    elif point == "before_rename":
        saving.replace_folder = before(saving.replace_folder)
    elif point == "after_rename":
        atomic.fsync_dir = after(atomic.fsync_dir, lambda folder: Path(folder) == target.parent)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--members", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--kill-at", choices=KILL_POINTS)
    args = parser.parse_args()
    ensemble, _ = tiny_ensemble(args.members, args.seed)
    if args.kill_at:
        arm(args.kill_at, args.folder.resolve())
    ensemble.save_pretrained(args.folder)


if __name__ == "__main__":
    main()
