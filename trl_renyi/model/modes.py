"""Model state that lives for one call: evaluation mode around inference, the caller's mode restored after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in evaluation mode inside the block and give it back its train / eval mode afterwards, also when
    the block raises (scoring, choice prediction and generation run inside it; a trainer's model keeps training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_activation_checkpointing(model) -> bool:
    """Whether the model recomputes activations in backward (transformers 5 renamed ``is_gradient_checkpointing``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(model, name))
    return False
