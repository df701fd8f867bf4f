"""Shared trunk: layers below the first adapted decoder layer run once for all K members.

When every LoRA module sits in decoder layers ``>= L``, the bottom ``L`` layers compute the same thing for every
member; they run on the untiled batch and the hidden states are tiled K times at layer ``L``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from peft import PeftModel

from trl_renyi.model.layer import MemberBatchedLayer, get_router, router_state
from trl_renyi.model.members import tile_rows

logger = logging.getLogger(__name__)


def _decoder_layers(model: PeftModel):
    """``(prefix, ModuleList)`` of the decoder layers of a causal LM (the ``layers`` list of its backbone)."""
    for name, module in model.named_modules():
        if name.endswith(".layers") and isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return name, module
    return None, None


# keyword arguments of a decoder layer that carry one row per example and must be tiled with the hidden states
_PER_ROW_LAYER_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


def enable_shared_trunk(model: PeftModel) -> int | None:
    r"""Share the layers below the first adapted decoder layer between members.

    When every LoRA module sits in decoder layers ``≥ L`` (e.g. ``layers_to_transform`` on the top layers), the
    bottom ``L`` layers compute the same thing for every member. With the trunk shared, the model receives the
    *untiled* batch (B rows); a forward pre-hook on layer ``L`` detaches the hidden states (nothing below trains) and
    tiles them K times, and every layer from ``L`` on tiles its per-row arguments (attention mask, position ids and
    rotary embeddings). Cost of the bottom layers: 1× instead of K×, forward and backward.

    Returns ``L``, or ``None`` (nothing installed) when a LoRA module lies outside the decoder layers or in layer 0.
    """
    router = get_router(model)
    if router.trunk_layer is not None:
        return router.trunk_layer
    prefix, layers = _decoder_layers(model)
    if layers is None:
        logger.debug(
            "shared_trunk is off: %s keeps no `*.layers` list of decoder layers (e.g. GPT-2's `transformer.h`, whose "
            "blocks take per-row arguments positionally); every member runs the whole model.",
            type(model.get_base_model()).__name__,
        )
        return None
    adapted = set()
    for name, module in model.named_modules():
        if isinstance(module, MemberBatchedLayer) and router.member_names[0] in module.lora_A:
            if not name.startswith(prefix + "."):
                logger.debug("shared_trunk is off: the LoRA module %s lies outside the decoder layers.", name)
                return None
            adapted.add(int(name[len(prefix) + 1 :].split(".")[0]))
    first = min(adapted) if adapted else None
    if not first:
        logger.debug("shared_trunk is off: the members adapt decoder layer 0, so no layer below them can be shared.")
        return None

    def tile_hook(layer_index):
        def hook(module, args, kwargs):
            if not (router.routing is not None and router.trunk_active):
                return None
            copies = router.num_members
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer_index == first:
                rows = hidden.shape[0]
                hidden = tile_rows(hidden.detach(), rows, copies)
                hidden.requires_grad_(torch.is_grad_enabled())
            else:
                rows = hidden.shape[0] // copies
            kwargs = {
                key: tile_rows(value, rows, copies) if key in _PER_ROW_LAYER_KWARGS else value
                for key, value in kwargs.items()
            }
            if args:
                args = (hidden, *(tile_rows(a, rows, copies) for a in args[1:]))
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    for index in range(first, len(layers)):
        router.trunk_handles.append(layers[index].register_forward_pre_hook(tile_hook(index), with_kwargs=True))
    router.trunk_layer = first
    return first


@contextmanager
def shared_trunk(model, active: bool = True):
    """Inside the block, forwards take the untiled batch and tile at the first adapted layer (see
    :func:`enable_shared_trunk`). Keep the backward inside the block when gradient checkpointing is on."""
    with router_state(model, trunk_active=active and get_router(model).trunk_layer is not None):
        yield
