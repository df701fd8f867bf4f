r"""The member-batched LoRA layer: a LoRA ``Linear`` that can serve all K members in one forward.

:class:`MemberBatchedLinear` is a subclass of PEFT's LoRA ``Linear`` that PEFT itself creates, through its
custom-module dispatch (``LoraConfig._register_custom_module``, reached through :mod:`trl_renyi.compat`), for every
``torch.nn.Linear`` and GPT-2-style ``Conv1D`` target; the forward itself lives in the mixin
:class:`MemberBatchedLayer`, which :mod:`trl_renyi.model.quantized` also puts on PEFT's QLoRA layers (bitsandbytes
4-bit and 8-bit bases). Its adapters, parameters and state-dict keys are PEFT's own, so every member saves and loads
as a plain PEFT adapter.

Why a registered subclass rather than a LoRA variant or a patched ``forward``: a LoRA variant (DoRA's mechanism)
changes one adapter's computation, while member batching changes how *several* adapters share one call; and a
patched instance method is invisible to PEFT and hard to undo. A subclass that PEFT dispatches keeps every PEFT code
path (merging, ``disable_adapter()``, ``set_adapter``, saving) and overrides only ``forward``.

**Routing is opt-in.** Outside a :func:`member_routing` block the layer is exactly stock PEFT with its active
adapter, whatever the batch size. Inside the block the input rows are K blocks of B rows (``rows_per_member = B``,
checked exactly), rows ``k·B … (k+1)·B − 1`` belonging to member k, and member k's low-rank delta is added to its own
rows with two stacked batched matmuls:

.. math::

    y_{k} = W x_{k} + s_k\, (x_k A_k^\top) B_k^\top, \qquad A \in \mathbb{R}^{K\times r\times d_{in}},\;
    B \in \mathbb{R}^{K\times d_{out}\times r}

Gradient checkpointing recomputes the forward during the backward pass, so a block that trains must hold the
forward AND its backward (the trainers enter it around their whole training step).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers.pytorch_utils import Conv1D

MEMBER_PREFIX = "member_"


def member_names(num_members: int) -> list[str]:
    """The adapter names of a K-member ensemble: ``member_0 … member_{K-1}``."""
    return [f"{MEMBER_PREFIX}{k}" for k in range(num_members)]


@dataclass
class Routing:
    """One routed layout: ``names`` (the members, in row-block order), ``rows_per_member`` B and, when known, the
    ``tokens_per_row`` T of the batch (layers that see the batch flattened to B·T token rows, such as the shared
    experts of MoE blocks, then get K blocks of B·T rows)."""

    names: list[str]
    rows_per_member: int | None = None
    tokens_per_row: int | None = None

    @property
    def num_members(self) -> int:
        return len(self.names)


class MemberRouter:
    """State shared by the member-batched layers of one model: the members, and the routing in force (if any).

    ``routing`` is ``None`` outside :func:`member_routing`: the layers then behave like stock PEFT.
    """

    def __init__(self, names: Sequence[str]):
        self.member_names = list(names)
        self.routing: Routing | None = None
        # base-only mode (see `base_model_only`): every member layer returns its frozen base layer's output
        self.base_only = False
        # shared trunk (see trl_renyi.model.trunk): first adapted decoder layer, its hook handles, whether it tiles
        self.trunk_layer: int | None = None
        self.trunk_handles: list = []
        self.trunk_active = False

    @property
    def num_members(self) -> int:
        """K of the routing in force (a chunk of members, see :func:`routed_members`), else of the ensemble."""
        return self.routing.num_members if self.routing is not None else len(self.member_names)


class MemberBatchedLayer:
    """The member-batched forward shared by every member layer class (a mixin placed before a PEFT LoRA layer class).

    Outside :func:`member_routing` (or with adapters disabled, merged, or PEFT's ``adapter_names``) the PEFT class's
    own ``forward`` runs. Inside it, the frozen base layer runs once on all K·B rows and member k's delta
    :math:`s_k B_k A_k x_k` is added to its own block. Subclasses set ``quantized_base`` when the base layer's output
    must not be modified in place (bitsandbytes' quantised matmuls): the delta is then added out of place, in PEFT's
    order of operations (:math:`(x A_k^\top) B_k^\top` first, then the scaling, then the base output's dtype).
    """

    member_router: MemberRouter | None = None
    quantized_base = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Under member routing, the k-th block of rows gets y = W x + s_k B_k A_k dropout_k(x), all K members in one
        batched matmul; a base-only router gives W x; otherwise PEFT's own forward."""
        router = self.member_router
        if router is None:
            return super().forward(x, *args, **kwargs)
        if router.base_only:
            if self.merged:
                raise ValueError("A base-only forward needs unmerged LoRA layers; unmerge the adapters first.")
            return self.base_layer(x, *args, **kwargs)
        routing = router.routing
        if routing is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        return self._member_batched_forward(x, routing, *args, **kwargs)

    def _base_forward(self, x: torch.Tensor, num_members: int, *args, **kwargs) -> torch.Tensor:
        """The frozen base layer on all K·B rows at once (a base whose output for one row depends on the other rows
        overrides this)."""
        return self.base_layer(x, *args, **kwargs)

    def _member_batched_forward(self, x: torch.Tensor, routing: Routing, *args, **kwargs) -> torch.Tensor:
        names = routing.names
        num_members = len(names)
        expected = None if routing.rows_per_member is None else num_members * routing.rows_per_member
        flattened = expected is not None and x.dim() == 2 and x.shape[0] == expected * (routing.tokens_per_row or 0)
        if (expected is not None and x.shape[0] != expected and not flattened) or x.shape[0] % num_members:
            raise ValueError(
                f"Member-batched forward expects {num_members} blocks of {routing.rows_per_member} rows (one block "
                f"per member, {expected} rows), got {x.shape[0]}. Tile the inputs with `tile_for_members`, or run "
                "the forward outside `member_routing` for a plain single-adapter forward."
            )
        result = self._base_forward(x, num_members, *args, **kwargs)
        weight_a = torch.stack([self.lora_A[n].weight for n in names])  # (K, r, d_in)
        xk = x.to(weight_a.dtype).reshape(num_members, -1, x.shape[-1])
        dropouts = [self.lora_dropout[n] for n in names]
        if not all(isinstance(d, torch.nn.Identity) for d in dropouts):
            xk = torch.stack([dropout(xk[k]) for k, dropout in enumerate(dropouts)])
        low_rank = torch.bmm(xk, weight_a.transpose(1, 2))  # (K, N, r)
        blocks = result.reshape(num_members, -1, result.shape[-1])  # (K, N, d_out), member k's rows in block k
        if self.quantized_base:
            weight_b = torch.stack([self.lora_B[n].weight for n in names])  # (K, d_out, r)
            scaling = torch.tensor([self.scaling[n] for n in names], dtype=low_rank.dtype, device=low_rank.device)
            delta = torch.bmm(low_rank, weight_b.transpose(1, 2)) * scaling.view(-1, 1, 1)
            return (blocks + delta.to(result.dtype)).reshape(result.shape)
        # s_k B_k, the scaling folded into the small (d_out, r) factor rather than applied to the (N, d_out) output
        weight_b = torch.stack([self.lora_B[n].weight * self.scaling[n] for n in names])  # (K, d_out, r)
        if blocks.dtype == low_rank.dtype:
            # W x + s_k B_k A_k x: one batched GEMM accumulating onto W x in place (a linear layer's backward needs its
            # input and weight, never its output; autograd's version check refuses a base layer that would)
            return blocks.baddbmm_(low_rank, weight_b.to(low_rank.dtype).transpose(1, 2)).reshape(result.shape)
        delta = torch.bmm(low_rank, weight_b.transpose(1, 2))
        return result + delta.reshape(result.shape).to(result.dtype)


class MemberBatchedLinear(MemberBatchedLayer, LoraLinear):
    """PEFT's LoRA ``Linear`` with an opt-in member-batched forward (see the module docstring).

    Created by PEFT for ``torch.nn.Linear`` and ``Conv1D`` targets once the config is registered with
    :func:`trl_renyi.compat.register_member_layer`; ``fan_in_fan_out`` is set as PEFT's own dispatch sets it. A base
    layer whose weight is stored in an integer format (a quantised ``nn.Linear`` subclass other than bitsandbytes'
    ``Linear4bit`` / ``Linear8bitLt``, which :mod:`trl_renyi.model.quantized` serves) is refused by its type name:
    PEFT's LoRA ``Linear`` cannot merge into it.
    """

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        target = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        weight = getattr(target, "weight", None)
        if isinstance(weight, torch.Tensor) and not (weight.dtype.is_floating_point or weight.dtype.is_complex):
            raise ValueError(
                f"Cannot serve LoRA members on {type(target).__module__}.{type(target).__name__}: its weight is "
                f"stored as {weight.dtype}. Quantised bases are served for bitsandbytes Linear4bit (NF4/FP4) and "
                "Linear8bitLt layers (install bitsandbytes)."
            )
        if isinstance(target, Conv1D):
            config.fan_in_fan_out = True  # as PEFT's dispatch_default does for Conv1D
            kwargs["is_target_conv_1d_layer"] = True
        elif config.fan_in_fan_out:
            config.fan_in_fan_out = False  # as PEFT's dispatch_default does for nn.Linear
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.member_router = None


def get_router(model) -> MemberRouter:
    """The :class:`MemberRouter` of a model built by :func:`~trl_renyi.model.members.build_ensemble` (or attached)."""
    router = getattr(model, "member_router", None)
    if router is None:
        raise ValueError("This model has no member-batched ensemble; build it with `build_ensemble`.")
    return router


@contextmanager
def router_state(model, **changes):
    """Set attributes of the model's :class:`MemberRouter` inside the block and restore their previous values on exit
    (also when the block raises): the one mechanism of every routing context below."""
    router = get_router(model)
    previous = {name: getattr(router, name) for name in changes}
    for name, value in changes.items():
        setattr(router, name, value)
    try:
        yield router
    finally:
        for name, value in previous.items():
            setattr(router, name, value)


@contextmanager
def member_routing(
    model, rows_per_member: int | None = None, names: Sequence[str] | None = None, tokens_per_row: int | None = None
):
    """Route rows to members inside the block: the input holds ``len(names)`` blocks of ``rows_per_member`` rows.

    ``names`` defaults to every member (or to the chunk of :func:`routed_members`); ``rows_per_member`` ``None`` keeps
    the B of an enclosing block (the trainers open the block for the whole step and set B per forward);
    ``tokens_per_row`` T admits layers that see the batch flattened to K blocks of B·T token rows. Outside any
    block the layers are stock PEFT. Keep the backward inside the block under gradient checkpointing.
    """
    previous = get_router(model).routing
    chosen = list(names) if names is not None else (previous.names if previous is not None else get_router(model).member_names)
    rows = rows_per_member if rows_per_member is not None else (previous.rows_per_member if previous else None)
    tokens = tokens_per_row if tokens_per_row is not None else (previous.tokens_per_row if previous else None)
    with router_state(model, routing=Routing(chosen, rows, tokens)) as router:
        yield router.routing


@contextmanager
def routed_members(model, names: Sequence[str]):
    """Route the rows to the members ``names`` only (a subset, in this order) inside the block, e.g. member chunks.

    The forward AND its backward must both run inside the block under gradient checkpointing.
    """
    previous = get_router(model).routing
    rows = previous.rows_per_member if previous is not None else None
    tokens = previous.tokens_per_row if previous is not None else None
    with router_state(model, routing=Routing(list(names), rows, tokens)):
        yield


@contextmanager
def base_model_only(model):
    """Run the frozen base model alone inside the block: every member layer returns its base layer's output, whatever
    the row count (no tiling).

    Unlike PEFT's ``disable_adapter()`` this touches neither the active adapter nor any ``requires_grad`` flag
    (``disable_adapter()`` re-freezes every adapter but the active one on exit). Meant for no-grad reference passes
    (DPO's π_ref, one pass for all K members).
    """
    with router_state(model, base_only=True, trunk_active=False):  # the rows are never tiled here
        yield


@contextmanager
def router_disabled(model):
    """Plain PEFT behaviour (the active adapter only) inside the block, also within an enclosing routing block."""
    with router_state(model, routing=None, trunk_active=False):
        yield


def member_layers(model):
    """Every member layer (:class:`MemberBatchedLayer`: plain or quantised base) of ``model``."""
    return [module for module in model.modules() if isinstance(module, MemberBatchedLayer)]
