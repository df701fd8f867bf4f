r"""Member-batched LoRA on a quantised frozen base (QLoRA): bitsandbytes 4-bit (NF4 / FP4) and 8-bit layers.

PEFT wraps a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base layer in its own LoRA classes
(``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``), not in LoRA ``Linear``: their forward keeps the quantised
matmul's output intact and adds each adapter's delta out of place. The member layers here are those PEFT classes with
the member-batched forward of :class:`~trl_renyi.model.layer.MemberBatchedLayer` in front: inside
:func:`~trl_renyi.model.layer.member_routing` the quantised base runs **once** on all K·B rows and member k's delta
is added to its own block, in PEFT's order of operations,

.. math::

    y_k = \mathrm{dequant}(W)\, x_k + \big((x_k A_k^\top) B_k^\top\big)\, s_k ,

so that member k's output is PEFT's own QLoRA layer with adapter k active (the LoRA factors keep their own dtype,
e.g. the bfloat16 TRL casts them to for a quantised base, and the delta is cast to the base output's dtype). One
exception to "the base once": LLM.int8 with an outlier threshold (bitsandbytes' default 6.0) chooses its 16-bit
outlier columns over all rows of a call, so there the 8-bit base runs once per member block. The
classes exist only when bitsandbytes is installed (the ``quantization`` extra); :func:`quantized_member_layers` maps
each bitsandbytes base type to its member layer, and :func:`peft_quantized_layers` PEFT's LoRA class to it (to promote
layers of a PeftModel loaded elsewhere). Other quantised layer types are refused by name (see
:class:`~trl_renyi.model.layer.MemberBatchedLinear`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available

from trl_renyi.model.layer import MemberBatchedLayer


def _per_member_int8_base(self, x, num_members: int, *args, **kwargs):
    """LLM.int8 with an outlier threshold picks the outlier columns it computes in 16-bit over *all* rows of a call,
    so one call on the tiled batch would let the members' activations change each other's base outputs. With a
    threshold the base runs once per member block (the same FLOPs), which keeps member k's output PEFT's own."""
    if not getattr(self.get_base_layer().state, "threshold", 0.0):
        return self.base_layer(x, *args, **kwargs)
    return torch.cat([self.base_layer(block, *args, **kwargs) for block in x.chunk(num_members)])


def _define(peft_class, name: str, base_forward=None):
    """``MemberBatchedLayer`` in front of one of PEFT's QLoRA classes (created by PEFT's custom-module dispatch)."""

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        peft_class.__init__(self, base_layer, adapter_name, config=config, **kwargs)
        self.member_router = None

    doc = (
        f"PEFT's QLoRA ``{peft_class.__name__}`` with the opt-in member-batched forward of "
        ":class:`~trl_renyi.model.layer.MemberBatchedLayer` (base output once, each member's delta on its block)."
    )
    namespace = {"__init__": __init__, "quantized_base": True, "__doc__": doc}
    if base_forward is not None:
        namespace["_base_forward"] = base_forward
    return type(name, (MemberBatchedLayer, peft_class), namespace)


@lru_cache(maxsize=1)
def _classes() -> tuple[tuple[type, type, type], ...]:
    """``(bitsandbytes base type, PEFT LoRA class, member layer class)`` for each quantised layer served."""
    if not is_bnb_available():
        return ()
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as peft_bnb

    int8 = _define(peft_bnb.Linear8bitLt, "MemberBatchedLinear8bitLt", base_forward=_per_member_int8_base)
    found = [(bnb.nn.Linear8bitLt, peft_bnb.Linear8bitLt, int8)]
    if is_bnb_4bit_available():
        found.append((bnb.nn.Linear4bit, peft_bnb.Linear4bit, _define(peft_bnb.Linear4bit, "MemberBatchedLinear4bit")))
    for _, _, cls in found:
        cls.__module__ = __name__
    return tuple(found)


def quantized_member_layers() -> dict[type, type]:
    """``{bitsandbytes layer type: member layer class}`` (empty without bitsandbytes), for PEFT's custom dispatch.

    These must be registered before ``torch.nn.Linear``: bitsandbytes' layers subclass it, and PEFT takes the first
    registered type that matches.
    """
    return {base: member for base, _, member in _classes()}


def peft_quantized_layers() -> dict[type, type]:
    """``{PEFT QLoRA class: member layer class}`` (empty without bitsandbytes)."""
    return {peft_cls: member for _, peft_cls, member in _classes()}
